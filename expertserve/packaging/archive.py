"""Building, verifying and installing `.expert` packages (tar.gz).

A package holds `manifest.json`, the files the manifest names (adapter, soft prompts, grammar, JSON
schema; datasets stay out), `CHECKSUMS.sha256` (the SHA-256 of every other file) and, when signed,
`signature.json` (Ed25519 over the checksum list).

Verifying and installing share one path: members are extracted into a fresh directory inside the target
while they are hashed, checked (names, types, sizes, checksums, signature, manifest, referenced files), and
only then renamed into place. Nothing is written outside the target and a bad package leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from expertserve.errors import ExpertserveError, PackageError, SignatureError
from expertserve.manifest.files import adapter_files, check_files, file_refs
from expertserve.manifest.load import MANIFEST_FILE, LoadedManifest, load_manifest
from expertserve.packaging import signing

SUFFIX = ".expert"
CHECKSUMS = "CHECKSUMS.sha256"
SIGNATURE = "signature.json"
README = "README.md"
MAX_TOTAL_BYTES = 4 * 2**30
MAX_MEMBERS = 10_000
# Fixed metadata so the same expert always packs to the same bytes.
_MTIME = 0


@dataclass(frozen=True)
class PackageInfo:
    """What a verified package holds.

    Attributes:
        name: Expert name.
        version: Expert version.
        files: Member paths with their SHA-256, checksum list and signature excluded.
        signer: Hex public key of the signer, or None for an unsigned package.
        signed_at: Signing time from signature.json, when signed.
    """

    name: str
    version: str
    files: dict[str, str]
    signer: str | None
    signed_at: str | None


def package_name(name: str, version: str) -> str:
    """`<name>-<version>.expert`."""
    return f"{name}-{version}{SUFFIX}"


def package_files(loaded: LoadedManifest) -> list[str]:
    """Relative paths of the files a package of this expert carries, manifest first."""
    root = loaded.root
    paths: list[str] = [MANIFEST_FILE]
    for ref in file_refs(loaded.manifest):
        if not ref.packaged:
            continue
        if ref.kind == "adapter":
            paths += [_rel(p, root) for p in adapter_files(root / ref.path)]
        else:
            paths.append(_rel(root / ref.path, root))
    if (root / README).is_file():
        paths.append(README)
    return list(dict.fromkeys(paths))  # first occurrence of each, in order


def build_package(expert_dir: Path, out_dir: Path, *, sign_key: Path | None = None) -> Path:
    """Writes `<out_dir>/<name>-<version>.expert` for an expert directory; returns its path.

    Raises:
        ManifestError: The manifest is invalid.
        PackageError: A referenced file is missing or malformed, or the package cannot be written.
        SignatureError: The signing key cannot be read.
    """
    loaded = load_manifest(expert_dir)
    problems = check_files(loaded.manifest, loaded.root, datasets=False)
    if problems:
        raise PackageError(
            f"{loaded.path}: cannot package, referenced files are not ready:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    key = signing.load_private_key(sign_key) if sign_key else None
    try:
        members = {rel: (loaded.root / rel).read_bytes() for rel in package_files(loaded)}
    except ValueError:
        raise PackageError(
            f"{loaded.path}: a referenced file resolves outside the expert directory "
            "(a symbolic link?); packages hold the expert's own files only"
        ) from None
    checksums = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {rel}\n" for rel, data in sorted(members.items())
    )
    members[CHECKSUMS] = checksums.encode()
    if key is not None:
        sig = {
            "algorithm": "ed25519",
            "public_key": signing.public_hex(key),
            "signature": signing.sign(key, members[CHECKSUMS]),
            "timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "signed_file": CHECKSUMS,
        }
        members[SIGNATURE] = (json.dumps(sig, indent=2) + "\n").encode()

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / package_name(loaded.manifest.name, loaded.manifest.version)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out_dir)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=_MTIME) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for rel in sorted(members, key=lambda r: (r != MANIFEST_FILE, r)):
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(members[rel]), _MTIME, 0o644
                tar.addfile(info, io.BytesIO(members[rel]))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a package is meant to be shared
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PackageError(f"cannot write {target}: {e}") from None
    return target


def verify_package(path: Path, *, public_key: str | None = None) -> PackageInfo:
    """Checks every hash, the signature (if any, or required by `public_key`) and the manifest.

    Raises:
        PackageError: Unsafe, corrupt, truncated, tampered or invalid package.
        SignatureError: Bad signature, or not signed by `public_key`.
    """
    with tempfile.TemporaryDirectory(prefix="expertserve-verify-") as scratch:
        info, _ = extract_verified(path, Path(scratch) / "x", public_key)
    return info


def install_package(
    path: Path, install_root: Path, *, public_key: str | None = None, force: bool = False
) -> Path:
    """Verifies a package and installs it as `<install_root>/<name>/<version>/`; returns that directory.

    Raises:
        PackageError: As `verify_package`, or the version is installed already and `force` is false.
    """
    install_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=install_root))
    try:
        info, tree = extract_verified(path, staging / "tree", public_key)
        target = install_root / info.name / info.version
        if target.exists() and not force:
            raise PackageError(
                f"{info.name} {info.version} is already installed at {target} (pass --force to replace it)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            old = staging / "old"
            os.replace(target, old)
        os.replace(tree, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def extract_verified(path: Path, dest: Path, public_key: str | None = None) -> tuple[PackageInfo, Path]:
    """Extracts `path` into the new directory `dest`, hashing as it goes, then runs every check.

    The caller owns `dest` and removes it when a check fails.

    Raises:
        PackageError: As `verify_package`.
    """
    if not path.is_file():
        raise PackageError(f"{path}: package file not found")
    dest.mkdir(parents=True)
    digests: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            total = 0
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise PackageError(f"{path}: more than {MAX_MEMBERS} entries")
                rel = _safe_member_name(path, member)
                if member.isdir():
                    continue
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise PackageError(f"{path}: unpacks to more than {MAX_TOTAL_BYTES} bytes")
                if rel in digests:
                    raise PackageError(f"{path}: entry {rel!r} appears twice")
                digests[rel] = _write_member(tar, member, dest / rel)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise PackageError(f"{path}: truncated or corrupt package ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot unpack: {e}") from None

    checksums = _read_checksums(path, dest, digests)
    signer, signed_at = _check_signature(path, dest, digests, public_key)
    for rel, want in checksums.items():
        if rel not in digests:
            raise PackageError(f"{path}: {rel} is listed in {CHECKSUMS} but missing from the package")
        if digests[rel] != want:
            raise PackageError(
                f"{path}: {rel} does not match its SHA-256 in {CHECKSUMS} (tampered or corrupt)"
            )
    unlisted = sorted(set(digests) - set(checksums) - {CHECKSUMS, SIGNATURE})
    if unlisted:
        raise PackageError(f"{path}: {', '.join(unlisted)} not listed in {CHECKSUMS}")
    try:
        loaded = load_manifest(dest)
    except ExpertserveError as e:
        raise PackageError(f"{path}: {e}") from None
    problems = check_files(loaded.manifest, dest, datasets=False)
    if problems:
        raise PackageError(
            f"{path}: files the manifest names are missing or malformed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    info = PackageInfo(loaded.manifest.name, loaded.manifest.version, checksums, signer, signed_at)
    return info, dest


def _safe_member_name(path: Path, member: tarfile.TarInfo) -> str:
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "device or special file"
        raise PackageError(f"{path}: entry {name!r} is a {kind}; packages hold regular files only")
    if "\\" in name or "\x00" in name:
        raise PackageError(f"{path}: entry {name!r} has a backslash or NUL in its name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("/"):
        raise PackageError(f"{path}: entry {name!r} is an absolute path")
    if ".." in pure.parts:
        raise PackageError(f"{path}: entry {name!r} climbs out of the package ('..')")
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts:
        raise PackageError(f"{path}: entry with an empty name")
    return "/".join(parts)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    source = tar.extractfile(member)
    if source is None:
        raise PackageError(f"entry {member.name!r} has no data")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    # O_EXCL: a name that maps onto an existing path (a dir/file clash) fails instead of overwriting.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
            written += len(chunk)
    if written != member.size:
        raise PackageError(f"entry {member.name!r} is truncated ({written} of {member.size} bytes)")
    return digest.hexdigest()


def _read_checksums(path: Path, dest: Path, digests: dict[str, str]) -> dict[str, str]:
    if CHECKSUMS not in digests:
        raise PackageError(f"{path}: no {CHECKSUMS}; not an expertserve package")
    listed: dict[str, str] = {}
    for lineno, line in enumerate((dest / CHECKSUMS).read_text(encoding="utf-8").splitlines(), start=1):
        want, sep, rel = line.partition("  ")
        if not sep or len(want) != 64 or not rel:
            raise PackageError(f"{path}: {CHECKSUMS} line {lineno} is not '<sha256>  <path>'")
        listed[rel] = want
    if MANIFEST_FILE not in listed:
        raise PackageError(f"{path}: {CHECKSUMS} does not cover {MANIFEST_FILE}")
    return listed


def _check_signature(
    path: Path, dest: Path, digests: dict[str, str], public_key: str | None
) -> tuple[str | None, str | None]:
    if SIGNATURE not in digests:
        if public_key is not None:
            raise SignatureError(f"{path}: unsigned, but a signature by {public_key[:16]}... is required")
        return None, None
    try:
        sig = json.loads((dest / SIGNATURE).read_text(encoding="utf-8"))
        signer, signature = sig["public_key"], sig["signature"]
        if sig.get("algorithm", "ed25519") != "ed25519" or sig.get("signed_file", CHECKSUMS) != CHECKSUMS:
            raise ValueError("unsupported algorithm or signed file")
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{path}: malformed {SIGNATURE}: {e}") from None
    try:
        signing.verify(signer, signature, (dest / CHECKSUMS).read_bytes())
    except SignatureError as e:
        raise SignatureError(f"{path}: {e}") from None
    if public_key is not None and signer.lower() != public_key.lower():
        raise SignatureError(f"{path}: signed by {signer}, not by the required key {public_key}")
    return signer, sig.get("timestamp")


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()
