"""Ed25519 keys and signatures for `.expert` packages.

A private key is a PKCS#8 PEM file (mode 0600); its public key is written beside it as `<key>.pub`, one
line of hex. The signature covers the package's checksum list, which covers every other file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

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
        if p.exists() and not force:
            raise SignatureError(f"{p} exists; pass --force to overwrite it")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = public_hex(key)
    pub_path.write_text(public + "\n", encoding="ascii")
    return public


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
    except ValueError as e:
        raise SignatureError(f"malformed signature or public key: {e}") from None
