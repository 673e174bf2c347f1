"""Building, verifying and installing `.expert` packages (tar.gz).

A package holds `manifest.json`, the files the manifest names (adapter, soft prompts, grammar, JSON
schema; datasets stay out), an optional `README.md`, `CHECKSUMS.sha256` (the SHA-256 of every other file) and,
when signed, `signature.json` (a DSSE envelope whose signed statement names the expert, its version, the SHA-256
of the checksum list and the signing time: everything `verify` shows).

Verifying and installing share one path. First the compressed stream is read once without writing anything,
and its tar headers are checked against `Limits` (members, member size, total size, compression ratio, header
size), so a bomb is refused before a byte reaches the disk. Then members are extracted into a fresh directory
inside the target while they are hashed, checked (names, types, checksums, signature, manifest, files the
manifest names and nothing else), and only then renamed into place. A bad package leaves nothing behind.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from expertserve.errors import ExpertserveError, PackageError, SignatureError
from expertserve.manifest.files import adapter_files, check_files, file_refs
from expertserve.manifest.load import MANIFEST_FILE, LoadedManifest, load_manifest
from expertserve.packaging import signing
from expertserve.packaging.trust import TrustPolicy

SUFFIX = ".expert"
CHECKSUMS = "CHECKSUMS.sha256"
SIGNATURE = "signature.json"
README = "README.md"
PROVENANCE = ".provenance.json"
# Fixed metadata so the same expert always packs to the same bytes.
_MTIME = 0


@dataclass(frozen=True)
class Limits:
    """What a package may unpack to; enforced while streaming, before anything is written.

    Attributes:
        members: Most entries (files and directories).
        member_bytes: Largest file.
        total_bytes: Most bytes in all files together.
        ratio: Most uncompressed bytes per compressed byte, once past `ratio_floor` bytes (gzip bombs).
        ratio_floor: Uncompressed bytes below which the ratio is not checked (tiny packages compress well).
        header_bytes: Largest extended header (PAX records, GNU long names).
        package_bytes: Largest package file a store sync downloads (compressed).
    """

    members: int = 256
    member_bytes: int = 2 * 2**30
    total_bytes: int = 4 * 2**30
    ratio: int = 200
    ratio_floor: int = 16 * 2**20
    header_bytes: int = 64 * 2**10
    package_bytes: int = 4 * 2**30


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PackageInfo:
    """What a verified package holds.

    Attributes:
        name: Expert name.
        version: Expert version.
        files: Member paths with their SHA-256, checksum list and signature excluded.
        signer: Hex public key of the signer, or None for an unsigned package.
        signed_at: Signing time from the signed statement, when signed.
        sha256: SHA-256 of the package file.
    """

    name: str
    version: str
    files: dict[str, str]
    signer: str | None
    signed_at: str | None
    sha256: str = ""


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
        statement = {
            "name": loaded.manifest.name,
            "version": loaded.manifest.version,
            "checksums_sha256": hashlib.sha256(members[CHECKSUMS]).hexdigest(),
            "signed_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        }
        envelope = signing.sign_statement(key, statement)
        members[SIGNATURE] = (json.dumps(envelope, indent=2) + "\n").encode()

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


def verify_package(
    path: Path, *, public_key: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> PackageInfo:
    """Checks every hash, the signature (if any, or required by `public_key`) and the manifest.

    Raises:
        PackageError: Unsafe, corrupt, truncated, tampered or invalid package.
        SignatureError: Bad signature, or not signed by `public_key`.
    """
    with tempfile.TemporaryDirectory(prefix="expertserve-verify-") as scratch:
        info, _ = extract_verified(path, Path(scratch) / "x", public_key, limits=limits)
    return info


def install_package(
    path: Path,
    install_root: Path,
    *,
    public_key: str | None = None,
    force: bool = False,
    policy: TrustPolicy | None = None,
    limits: Limits = DEFAULT_LIMITS,
    layout: Callable[[PackageInfo], str] | None = None,
) -> Path:
    """Verifies a package and installs it as `<install_root>/<name>/<version>/`; returns that directory.

    `layout` names the directory under `<name>/` instead of the version (a store's mirror names it after the
    package's hash too, see packaging/store.py).

    The installed directory records where it came from in `.provenance.json` (package hash, signer, time), which
    the server's trust policy reads.

    Raises:
        PackageError: As `verify_package`, or the version is installed already and `force` is false.
        SignatureError: `policy` refuses the package's signer.
    """
    install_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".installing-", dir=install_root))
    try:
        info, tree = extract_verified(path, staging / "tree", public_key, limits=limits)
        if policy is not None:
            policy.check(info.signer, f"{path}: {info.name} {info.version}")
        target = install_root / info.name / (layout(info) if layout else info.version)
        if target.exists() and not force:
            raise PackageError(
                f"{info.name} {info.version} is already installed at {target} (pass --force to replace it)"
            )
        provenance = {
            "package": path.name,
            "package_sha256": info.sha256,
            "signer": info.signer,
            "signed_at": info.signed_at,
            "installed_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        }
        (tree / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            old = staging / "old"
            os.replace(target, old)
        os.replace(tree, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_provenance(expert_dir: Path) -> dict[str, Any] | None:
    """The `.provenance.json` of an installed expert (None: not installed from a package, or unreadable)."""
    try:
        data = json.loads((expert_dir / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify_installed(expert_dir: Path, name: str, version: str) -> tuple[str | None, str | None]:
    """Checks an installed expert against its own package's signed checksums, as it is on disk now: every file
    listed in `CHECKSUMS.sha256` has its SHA-256 (digests cached per file stat), nothing else is there, and the
    signature (if any) covers that list, the name and the version. The signer comes from the signature, never from
    `.provenance.json` (a file anyone who can write the directory can write).

    Returns:
        (signer or None for unsigned, None) when the files are the package's; (None, the first problem) otherwise.
    """
    from expertserve.packaging.digests import file_digest

    try:
        listed = _parse_checksums((expert_dir / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None, f"{CHECKSUMS} is missing or unreadable: not the files of a verified package"
    except ValueError as e:
        return None, str(e)
    present = {
        p.relative_to(expert_dir).as_posix() for p in expert_dir.rglob("*") if p.is_file() or p.is_symlink()
    } - {CHECKSUMS, SIGNATURE, PROVENANCE}
    for rel in sorted(present | set(listed)):
        path = expert_dir / rel
        if rel not in listed:
            return None, f"{rel} was added after the package was installed (not in its {CHECKSUMS})"
        if path.is_symlink() or file_digest(path) != listed[rel]:
            return (
                None,
                f"{rel} does not match its SHA-256 in {CHECKSUMS} (changed since the package was installed)",
            )
    if not (expert_dir / SIGNATURE).is_file():
        return None, None
    try:
        _, signer = _signed_statement(
            expert_dir / SIGNATURE, name, version, file_digest(expert_dir / CHECKSUMS)
        )
    except SignatureError as e:
        return None, str(e)
    return signer, None


def extract_verified(
    path: Path, dest: Path, public_key: str | None = None, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[PackageInfo, Path]:
    """Checks the package's headers against `limits`, extracts it into the new directory `dest`, hashing as it
    goes, then runs every check.

    The caller owns `dest` and removes it when a check fails.

    Raises:
        PackageError: As `verify_package`.
    """
    if not path.is_file():
        raise PackageError(f"{path}: package file not found")
    try:
        package_sha256, plan = _prescan(path, limits)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise PackageError(f"{path}: truncated or corrupt package ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot read: {e}") from None
    dest.mkdir(parents=True)
    digests = _extract(path, dest, plan)
    checksums = _read_checksums(path, dest, digests)
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
    _check_only_named_files(path, loaded, set(digests))
    signer, signed_at = _check_signature(path, dest, digests, loaded, public_key)
    problems = check_files(loaded.manifest, dest, datasets=False)
    if problems:
        raise PackageError(
            f"{path}: files the manifest names are missing or malformed:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    info = PackageInfo(
        loaded.manifest.name, loaded.manifest.version, checksums, signer, signed_at, package_sha256
    )
    return info, dest


# Tar header fields (POSIX ustar): name, size and type. The prescan accepts only what `tarfile` then reads the same
# way: regular files and directories, each after at most one PAX (`x`) or GNU long-name (`L`) header. Sparse files
# (type `S`, PAX `GNU.sparse.*`) unpack to sizes their headers do not state; global (`g`) and long-link (`K`)
# headers, and one extended header after another, are read differently by different tar readers.
_BLOCK = 512
_FILE_KINDS = {b"0": "file", b"\0": "file", b"5": "dir"}
_EXTENDED = {b"x", b"L"}
_REFUSED_KINDS = {
    b"1": "a link",
    b"2": "a link",
    b"K": "a link (long link name)",
    b"3": "a device or special file",
    b"4": "a device or special file",
    b"6": "a device or special file",
    b"S": "a sparse file",
    b"g": "a global extended header",
}
_PAX_KEYWORDS = {
    "path",
    "size",
    "mtime",
    "atime",
    "ctime",
    "uid",
    "gid",
    "uname",
    "gname",
    "comment",
    "charset",
}
# Vendor records tarfile stores without acting on them (extended attributes written by libarchive and star).
_PAX_VENDOR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")

# One entry of a package as the prescan measured it: ("file" | "dir", size).
_Planned = tuple[str, int]


def _prescan(path: Path, limits: Limits) -> tuple[str, list[_Planned]]:
    """Reads the whole decompressed stream once, writing nothing, and refuses it at the first header that breaks a
    limit or that `tarfile` could read differently; returns the SHA-256 of the package file and the entries as
    measured, which extraction must meet exactly.

    Raises:
        PackageError: A limit is broken or a header is refused (named, with the member).
    """
    compressed = path.stat().st_size
    whole = hashlib.sha256()
    with path.open("rb") as raw:
        for chunk in iter(lambda: raw.read(1 << 20), b""):
            whole.update(chunk)
    total = 0
    plan: list[_Planned] = []
    extended: bytes | None = None  # the kind of the extended header the next member follows
    pax_size: int | None = None
    with gzip.open(path, "rb") as stream:

        def read(n: int, what: str) -> bytes:
            nonlocal total
            data = stream.read(n)
            total += len(data)
            if total > limits.ratio_floor and total > limits.ratio * compressed:
                raise PackageError(
                    f"{path}: {what}: unpacks to more than {limits.ratio} times its compressed size "
                    f"({compressed} bytes); refused as a compression bomb"
                )
            if len(data) != n:
                raise PackageError(f"{path}: truncated package (a tar entry ends early at {what})")
            return data

        while True:
            header = stream.read(_BLOCK)
            total += len(header)
            if len(header) < _BLOCK or header == bytes(_BLOCK):
                break
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace") or "(no name)"
            kind, size = header[156:157], _header_size(path, header, name)
            if kind in _EXTENDED:
                if extended is not None:
                    raise PackageError(
                        f"{path}: entry {name!r}: two extended headers in a row; tar readers disagree on them"
                    )
                if size > limits.header_bytes:
                    raise PackageError(
                        f"{path}: entry {name!r}: extended header of {size} bytes, more than the limit of "
                        f"{limits.header_bytes}"
                    )
                data = read(_padded(size), name)[:size]
                if kind == b"x":
                    pax_size = _pax_size(path, name, data)
                extended = kind
                continue
            if kind not in _FILE_KINDS:
                what = _REFUSED_KINDS.get(kind, f"of tar type {kind.decode('latin-1')!r}")
                raise PackageError(
                    f"{path}: entry {name!r} is {what}; packages hold regular files and directories only"
                )
            if pax_size is not None:
                size = pax_size
            extended, pax_size = None, None
            if len(plan) >= limits.members:
                raise PackageError(f"{path}: more than {limits.members} entries")
            if _FILE_KINDS[kind] == "dir":
                plan.append(("dir", 0))
                continue
            if size > limits.member_bytes:
                raise PackageError(
                    f"{path}: entry {name!r} is {size} bytes, more than the limit of {limits.member_bytes}"
                )
            if total + size > limits.total_bytes:
                raise PackageError(f"{path}: unpacks to more than {limits.total_bytes} bytes (at {name!r})")
            plan.append(("file", size))
            left = _padded(size)
            while left:
                step = min(left, 1 << 20)
                read(step, name)
                left -= step
    if extended is not None:
        raise PackageError(f"{path}: an extended header at the end of the package belongs to no entry")
    return whole.hexdigest(), plan


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _header_size(path: Path, header: bytes, name: str) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise PackageError(f"{path}: entry {name!r} has a malformed size field") from None


def _pax_size(path: Path, name: str, data: bytes) -> int | None:
    """The `size` record of a PAX header, if any (it overrides the ustar size field).

    Records are read by their stated length, as `tarfile` reads them, and must fill the header exactly; a value
    holding a newline, a keyword that changes how the entry unpacks (`GNU.sparse.*`, `hdrcharset`, `linkpath`),
    or a malformed length is refused.

    Raises:
        PackageError: A record is malformed or its keyword is not accepted (named).
    """
    size = None
    pos = 0
    while pos < len(data):
        digits, space, _ = data[pos : pos + 21].partition(b" ")
        if not space or not digits.isdigit() or int(digits) <= len(digits) + 1:
            raise PackageError(f"{path}: entry {name!r}: malformed PAX record at byte {pos}")
        record = data[pos : pos + int(digits)]
        if len(record) != int(digits) or not record.endswith(b"\n"):
            raise PackageError(f"{path}: entry {name!r}: PAX record at byte {pos} does not end where it says")
        keyword_b, eq, value = record[len(digits) + 1 : -1].partition(b"=")
        keyword = keyword_b.decode("utf-8", "replace")
        if not eq or b"\n" in value:
            raise PackageError(
                f"{path}: entry {name!r}: PAX record {keyword!r} is malformed or holds a newline"
            )
        if keyword not in _PAX_KEYWORDS and not keyword.startswith(_PAX_VENDOR_PREFIXES):
            raise PackageError(
                f"{path}: entry {name!r}: PAX keyword {keyword!r} is not accepted (sparse files, links and "
                "charset changes unpack differently from what their headers state)"
            )
        if keyword == "size":
            if not value.isdigit():
                raise PackageError(f"{path}: entry {name!r}: PAX size {value!r} is not a decimal number")
            size = int(value)
        pos += len(record)
    return size


def _extract(path: Path, dest: Path, plan: list[_Planned]) -> dict[str, str]:
    """Extracts the entries the prescan measured, refusing any that `tarfile` reads otherwise."""
    digests: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for index, member in enumerate(tar):
                rel = _safe_member_name(path, member)
                seen = ("dir", 0) if member.isdir() else ("file", member.size)
                if index >= len(plan) or plan[index] != seen or member.issparse():
                    raise PackageError(
                        f"{path}: entry {rel!r} reads as {seen[0]} of {seen[1]} bytes, not as its headers were "
                        "measured; refused"
                    )
                if member.isdir():
                    continue
                if rel in digests:
                    raise PackageError(f"{path}: entry {rel!r} appears twice")
                digests[rel] = _write_member(tar, member, dest / rel)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise PackageError(f"{path}: truncated or corrupt package ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot unpack: {e}") from None
    return digests


def _check_only_named_files(path: Path, loaded: LoadedManifest, present: set[str]) -> None:
    """A package carries the files its manifest names and its own metadata, nothing else: an extra file would be
    installed (and served from) without any field saying what it is."""
    try:
        allowed = set(package_files(loaded)) | {README, CHECKSUMS, SIGNATURE}
    except ValueError:
        raise PackageError(f"{path}: a file the manifest names resolves outside the package") from None
    extra = sorted(present - allowed)
    if extra:
        raise PackageError(
            f"{path}: {', '.join(extra)}: not named by the manifest; a package holds manifest.json, the files "
            f"its fields name, {README}, {CHECKSUMS} and {SIGNATURE} only"
        )


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
        # Never past the measured size, whatever the reader yields.
        while chunk := source.read(min(1 << 20, member.size + 1 - written)):
            digest.update(chunk)
            out.write(chunk)
            written += len(chunk)
            if written > member.size:
                raise PackageError(f"entry {member.name!r} holds more than its {member.size} bytes")
    if written != member.size:
        raise PackageError(f"entry {member.name!r} is truncated ({written} of {member.size} bytes)")
    return digest.hexdigest()


def _read_checksums(path: Path, dest: Path, digests: dict[str, str]) -> dict[str, str]:
    if CHECKSUMS not in digests:
        raise PackageError(f"{path}: no {CHECKSUMS}; not an expertserve package")
    try:
        text = (dest / CHECKSUMS).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PackageError(f"{path}: {CHECKSUMS}: not UTF-8 text (byte {e.start})") from None
    try:
        return _parse_checksums(text)
    except ValueError as e:
        raise PackageError(f"{path}: {e}") from None


def _parse_checksums(text: str) -> dict[str, str]:
    """`CHECKSUMS.sha256` as {path: sha256}.

    Raises:
        ValueError: A line is not `<sha256>  <path>`, a path is listed twice, or the manifest is not covered.
    """
    listed: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        want, sep, rel = line.partition("  ")
        if not sep or len(want) != 64 or not rel or any(c not in "0123456789abcdef" for c in want):
            raise ValueError(f"{CHECKSUMS} line {lineno} is not '<sha256>  <path>'")
        if rel in listed:
            raise ValueError(f"{CHECKSUMS} line {lineno} lists {rel!r} twice")
        listed[rel] = want
    if MANIFEST_FILE not in listed:
        raise ValueError(f"{CHECKSUMS} does not cover {MANIFEST_FILE}")
    return listed


def _check_signature(
    path: Path, dest: Path, digests: dict[str, str], loaded: LoadedManifest, public_key: str | None
) -> tuple[str | None, str | None]:
    """The signer and signing time, from a statement whose name, version and checksum-list hash match the
    package (so nothing `verify` shows is unsigned)."""
    if SIGNATURE not in digests:
        if public_key is not None:
            raise SignatureError(f"{path}: unsigned, but a signature by {public_key[:16]}... is required")
        return None, None
    try:
        statement, signer = _signed_statement(
            dest / SIGNATURE, loaded.manifest.name, loaded.manifest.version, digests[CHECKSUMS]
        )
    except SignatureError as e:
        raise SignatureError(f"{path}: {e}") from None
    signed_at = statement.get("signed_at")
    if not isinstance(signed_at, str):
        raise SignatureError(f"{path}: {SIGNATURE}: the signed statement has no signed_at time")
    if public_key is not None and signer != public_key.lower():
        raise SignatureError(f"{path}: signed by {signer}, not by the required key {public_key}")
    return signer, signed_at


def _signed_statement(
    signature: Path, name: str, version: str, checksums_sha256: str | None
) -> tuple[dict[str, Any], str]:
    """The statement and signer of a `signature.json` whose signature verifies and whose statement names this
    expert, version and checksum list (a package being installed, or an installed expert as it is now).

    Raises:
        SignatureError: Unreadable, not an envelope, a bad signature, or a statement about other contents.
    """
    try:
        envelope = json.loads(signature.read_text(encoding="utf-8"))
    except OSError as e:
        raise SignatureError(f"{SIGNATURE}: cannot read ({e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise SignatureError(f"{SIGNATURE}: not JSON ({e})") from None
    try:
        statement, signer = signing.open_envelope(envelope)
    except SignatureError as e:
        raise SignatureError(f"{SIGNATURE}: {e}") from None
    expected = {"name": name, "version": version, "checksums_sha256": checksums_sha256}
    for key, want in expected.items():
        if statement.get(key) != want:
            raise SignatureError(
                f"{SIGNATURE}: the signed statement's {key} is {statement.get(key)!r}, but the package has "
                f"{want!r} (tampered)"
            )
    return statement, signer


def _rel(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()
