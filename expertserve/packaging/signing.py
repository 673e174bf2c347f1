"""Ed25519 keys and signatures for `.expert` packages.

A private key is a PKCS#8 PEM file (mode 0600, written atomically, never through a symbolic link); its public key is
written beside it as `<key>.pub`, one line of hex. A package is signed with a DSSE envelope
(https://github.com/secure-systems-lab/dsse) whose payload is a statement of everything `verify` shows: the expert's
name and version, the SHA-256 of the checksum list (which covers every other file) and the signing time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertserve.errors import SignatureError

if TYPE_CHECKING:  # cryptography is imported when a key is used, so `validate` stays fast
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")


def generate_key(path: Path, *, force: bool = False) -> str:
    """Writes a new private key to `path` and its public key to `path.pub`; returns the public key (hex).

    Raises:
        SignatureError: The key file exists and `force` is false.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if (p.exists() or p.is_symlink()) and not force:
            raise SignatureError(f"{p} exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = public_hex(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, pem, 0o600)
        _write_atomically(pub_path, (public + "\n").encode("ascii"), 0o644)
    except OSError as e:
        raise SignatureError(f"cannot write the key files: {e}") from None
    return public


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Writes a new file beside `path` with `mode` from the start, then renames it over `path`: an existing file's
    mode never carries over, and a symbolic link at `path` is replaced, not followed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Reads a PEM private key written by `generate_key`.

    Raises:
        SignatureError: Missing file, or not an Ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(
            f"{path}: signing key not found (create one with `expertserve keygen`)"
        ) from None
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_hex(private_key: Ed25519PrivateKey) -> str:
    """Hex of the raw public key of a private key."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return str(raw.hex())


def read_public_key(value: str) -> str:
    """A public key given as 64 hex characters or as a path to a `.pub` file; returns the hex.

    Raises:
        SignatureError: Neither a hex key nor a readable key file.
    """
    if _HEX_KEY.match(value.strip()):
        return value.strip().lower()
    path = Path(value)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        raise SignatureError(f"{value}: expected 64 hex characters or a readable .pub file") from None
    if not _HEX_KEY.match(text):
        raise SignatureError(f"{path}: expected one line of 64 hex characters (an Ed25519 public key)")
    return text.lower()


def sign(private_key: Ed25519PrivateKey, data: bytes) -> str:
    """Hex Ed25519 signature of `data`."""
    return str(private_key.sign(data).hex())


def verify(public_key: str, signature: str, data: bytes) -> None:
    """Checks a hex signature of `data` by a hex public key.

    Raises:
        SignatureError: Malformed key or signature, or the signature does not match.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), data)
    except InvalidSignature:
        raise SignatureError(
            "signature does not match the package contents (tampered, or signed by another key)"
        ) from None
    except (ValueError, TypeError) as e:
        raise SignatureError(f"malformed signature or public key: {e}") from None


PAYLOAD_TYPE = "application/vnd.expertserve.package-statement+json"
STATEMENT_TYPE = "expertserve.package/v1"


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_statement(private_key: Ed25519PrivateKey, statement: dict[str, Any]) -> dict[str, Any]:
    """A DSSE envelope over `statement` (canonical JSON), signed by `private_key`."""
    payload = json.dumps(
        {"_type": STATEMENT_TYPE, **statement}, sort_keys=True, separators=(",", ":")
    ).encode()
    signature = private_key.sign(_pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": public_hex(private_key), "sig": base64.b64encode(signature).decode()}],
    }


def open_envelope(envelope: Any) -> tuple[dict[str, Any], str]:
    """The statement of a DSSE envelope and the key that signed it, after checking the signature.

    Raises:
        SignatureError: Not an envelope of this format, or no signature in it verifies.
    """
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"expected a DSSE envelope with payloadType {PAYLOAD_TYPE!r}")
    # Unknown fields are errors, as everywhere else: a `public_key` beside the signatures would read as if it
    # meant something.
    unknown = sorted(set(envelope) - {"payloadType", "payload", "signatures"})
    if unknown:
        raise SignatureError(f"unknown field(s) {', '.join(map(repr, unknown))} in the envelope")
    bad = [
        sorted(set(s) - {"keyid", "sig"})
        for s in envelope.get("signatures") or []
        if isinstance(s, dict) and set(s) - {"keyid", "sig"}
    ]
    if bad:
        raise SignatureError(
            f"unknown field(s) {', '.join(map(repr, bad[0]))} in a signature of the envelope"
        )
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = [(s["keyid"], base64.b64decode(s["sig"], validate=True)) for s in envelope["signatures"]]
    except (KeyError, TypeError, ValueError):
        raise SignatureError(
            "malformed envelope: payload and signatures[].keyid/sig must be base64 strings"
        ) from None
    if not signatures:
        raise SignatureError("the envelope holds no signature")
    for keyid, signature in signatures:
        if isinstance(keyid, str) and _HEX_KEY.match(keyid):
            try:
                verify(keyid, signature.hex(), _pae(PAYLOAD_TYPE, payload))
            except SignatureError:
                continue
            try:
                statement = json.loads(payload)
            except ValueError:
                raise SignatureError("the signed payload is not JSON") from None
            if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
                raise SignatureError(f"the signed payload is not an {STATEMENT_TYPE} statement")
            return statement, keyid.lower()
    raise SignatureError("signature does not match the package contents (tampered, or signed by another key)")
