"""Expert roots in shared storage: an object store or a shared file system named by a URI (`s3://bucket/experts`,
`gs://...`, `abfs://...`, `hdfs://...`, `file:///mnt/shared/experts`), read and written through pyarrow.fs, the
library Ray Train already uses for its `storage_path`.

A store holds `.expert` packages as `<uri>/<name>/<version>.expert`; `expertserve install PACKAGE --dir URI`
verifies a package and uploads it there. Every node mirrors a store into its own cache directory
(`store_cache_dir()/<hash of the URI>/`) and serves the mirror: each package is installed there through the same
checks as `expertserve install` (limits, checksums, signature; the signer is recorded for the server's trust
policy), so what a node serves was verified on that node. A mirrored expert's directory is named after its
package's SHA-256 (`<name>/<version>+<sha12>/`): the same path on every node means the same bytes, so an engine
replica on another node that lacks the directory syncs the store and finds exactly what the ingress registered,
or nothing. A package removed from the store leaves the mirror at the next sync; a replaced one is installed
again under its new hash; a package that fails its checks is reported and skipped, the rest still mirror.

Credentials come from the environment, as pyarrow reads them (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, instance profiles); never from the URI. Endpoint options ride in the URI's query as
pyarrow documents them (`s3://bucket/experts?endpoint_override=host:9000&scheme=http`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertserve.errors import ExpertserveError, PackageError
from expertserve.packaging.archive import (
    DEFAULT_LIMITS,
    SUFFIX,
    Limits,
    PackageInfo,
    install_package,
    verify_package,
)
from expertserve.packaging.trust import TrustPolicy
from expertserve.settings import store_cache_dir

# The URI schemes pyarrow.fs opens; anything else is refused with this list.
STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
INDEX = ".index.json"  # the mirror's record of what it installed from which package


class StoreError(ExpertserveError):
    """A store URI that cannot be opened, listed or written."""


def is_store(root: str | Path) -> bool:
    """True when `root` names a store (a URI), False for a local directory."""
    return isinstance(root, str) and "://" in root


def check_uri(uri: str) -> str:
    """The URI, checked for a known scheme, a bucket or path, and no credentials.

    Credentials in a URI end up in every message, listing and log line that names the store; they come from the
    environment or the provider's chain instead (see the module docstring).

    Raises:
        StoreError: Another scheme, nothing after it, or a secret in it (the message never shows the secret).
    """
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in STORE_SCHEMES or not rest.split("?")[0].strip("/"):
        raise StoreError(
            f"{redacted(uri)!r}: expected a URI of {', '.join(s + '://' for s in STORE_SCHEMES)} with a bucket "
            "or path"
        )
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if ":" in authority.rpartition("@")[0]:
        raise StoreError(
            f"{redacted(uri)!r}: credentials in the URI (user:secret@) are refused; give them through the "
            "environment or the provider's credential chain (AWS_ACCESS_KEY_ID, AZURE_STORAGE_ACCOUNT_KEY, ...)"
        )
    secret = [k for k in _query_keys(uri) if _SECRET_QUERY.search(k)]
    if secret:
        raise StoreError(
            f"{redacted(uri)!r}: {', '.join(secret)} in the URI's query: credentials in a URI are refused; give "
            "them through the environment or the provider's credential chain"
        )
    return uri


# Query options that carry a secret (S3 keys and session tokens, Azure account keys and SAS signatures, OAuth).
_SECRET_QUERY = re.compile(
    r"secret|password|passwd|token|credential|access_key|account_key|^sig$|^sas|key$", re.I
)


def _query_keys(uri: str) -> list[str]:
    query = uri.partition("?")[2]
    return [part.partition("=")[0] for part in query.split("&") if part]


def redacted(uri: str) -> str:
    """The URI as messages may show it: no query values, no password."""
    scheme, sep, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if at and ":" in user:
        authority = f"{user.split(':', 1)[0]}:***@{host}"
    path, q, query = f"{slash}{path}".partition("?")
    shown_query = "&".join(f"{part.partition('=')[0]}=***" for part in query.split("&") if part)
    return f"{scheme}{sep}{authority}{path}{q}{shown_query}"


def mirror_dir(uri: str) -> Path:
    """This node's mirror of the store at `uri`."""
    return store_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]


def expert_dir_name(info: PackageInfo) -> str:
    """A mirrored expert's directory under `<mirror>/<name>/`: its version and its package's hash."""
    return f"{info.version}+{info.sha256[:12]}"


@dataclass
class SyncResult:
    """What one sync did.

    Attributes:
        root: The local mirror, an expert root like any directory.
        installed: Packages installed by this sync (store paths).
        removed: Mirrored experts removed because their package left the store.
        problems: One line per package that could not be mirrored (it is skipped; the rest still mirror).
    """

    root: Path
    installed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def open_store(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem and the path inside it.

    Raises:
        StoreError: The URI is not one pyarrow can open (its reason).
    """
    import pyarrow.fs as pafs

    check_uri(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError, TypeError) as e:
        raise StoreError(f"{_shown(uri)}: cannot open: {_first_line(e)}") from None
    return fs, path.rstrip("/")


def upload(
    package: Path,
    uri: str,
    *,
    force: bool = False,
    public_key: str | None = None,
    policy: TrustPolicy | None = None,
) -> tuple[str, PackageInfo]:
    """Verifies `package`, checks its signer against `policy`, and writes it to the store as
    `<name>/<version>.expert`; returns its URI and what the package holds.

    Raises:
        PackageError: As `verify_package`, or that version is in the store already and `force` is false.
        SignatureError: `policy` refuses the package's signer.
        StoreError: The store cannot be written.
    """
    import pyarrow.fs as pafs

    info = verify_package(package, public_key=public_key)
    if policy is not None:
        policy.check(info.signer, f"{package}: {info.name} {info.version}")
    fs, base = open_store(uri)
    target = f"{base}/{info.name}/{info.version}{SUFFIX}"
    where = f"{_shown(uri)}/{info.name}/{info.version}{SUFFIX}"
    try:
        if not force and fs.get_file_info(target).type != pafs.FileType.NotFound:
            raise PackageError(
                f"{info.name} {info.version} is already in the store at {where} (pass --force)"
            )
        fs.create_dir(f"{base}/{info.name}", recursive=True)
        # Written under a name no sync picks up, then moved into place: a reader never sees half a package.
        partial = f"{base}/{info.name}/.{info.version}.partial-{os.getpid()}"
        with fs.open_output_stream(partial) as out, package.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        fs.move(partial, target)
    except OSError as e:
        raise StoreError(f"{where}: cannot write: {_first_line(e)}") from None
    return where, info


def sync(uri: str, limits: Limits = DEFAULT_LIMITS, *, only: str | None = None) -> SyncResult:
    """Brings this node's mirror of the store up to date; see the module docstring.

    Every package is isolated: whatever goes wrong with one (a failed check, a download, an unexpected error)
    is reported with its name and costs that package only. A refused package is remembered by its size and
    modification time and not downloaded again until it changes. `only` names one expert: just the packages under
    `<uri>/<only>/` are brought up to date and nothing else is touched (an engine fetching the expert it loads).

    Raises:
        StoreError: The store cannot be listed (the mirror is left as it was).
    """
    import pyarrow.fs as pafs

    fs, base = open_store(uri)
    mirror = mirror_dir(uri)
    mirror.mkdir(parents=True, exist_ok=True)
    result = SyncResult(mirror)
    with _locked(mirror):
        try:
            where = f"{base}/{only}" if only else base
            listing = fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
        except OSError as e:
            raise StoreError(f"{_shown(uri)}: cannot list: {_first_line(e)}") from None
        packages = {
            _relative(info.path, base): info
            for info in listing
            if info.type == pafs.FileType.File
            and info.path.endswith(SUFFIX)
            and (only is None or _relative(info.path, base).startswith(f"{only}/"))
        }
        index = _read_index(mirror)
        for rel, entry in list(index.items()):
            if rel not in packages and (only is None or rel.startswith(f"{only}/")):
                if "dir" in entry:
                    _remove(mirror, entry["dir"])
                del index[rel]
                result.removed.append(rel)
        for rel, info in sorted(packages.items()):
            stamp = f"{info.size}:{info.mtime_ns}"
            known = index.get(rel)
            if known is not None and known["stamp"] == stamp:
                if "problem" in known:  # refused before: not downloaded again until the object changes
                    result.problems.append(f"{_shown(uri)}/{rel}: {known['problem']}")
                    continue
                if (mirror / known["dir"]).is_dir():
                    continue
            try:
                installed = _install(fs, info.path, rel, mirror, info.size, limits)
            except Exception as e:  # noqa: BLE001 - any failure costs this package only, never the sync
                problem = _first_line(e) if isinstance(e, (PackageError, OSError)) else _unexpected(e)
                result.problems.append(f"{_shown(uri)}/{rel}: {problem}")
                if known is not None and "dir" in known:
                    _remove(mirror, known["dir"])
                index[rel] = {"stamp": stamp, "problem": problem}
                continue
            if known is not None and known.get("dir") not in (None, installed):
                _remove(mirror, known["dir"])
            index[rel] = {"stamp": stamp, "dir": installed}
            result.installed.append(rel)
        _write_index(mirror, index)
    return result


def local_roots(roots: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The expert roots as local directories, each store synced into its mirror; problems of stores that could not
    be synced (a store that cannot be listed keeps serving its last mirror) and of packages that were skipped."""
    paths: list[Path] = []
    problems: list[str] = []
    for root in roots:
        if not is_store(root):
            paths.append(Path(root))
            continue
        uri = str(root)
        try:
            result = sync(uri)
            problems += result.problems
        except StoreError as e:
            problems.append(f"{e} (serving this node's last mirror of it)")
        except Exception as e:  # noqa: BLE001 - one store's failure never stops the other roots
            problems.append(
                f"{_shown(uri)}: cannot sync: {_unexpected(e)} (serving this node's last mirror of it)"
            )
        paths.append(mirror_dir(uri))
    return paths, problems


def store_of(path: str | Path, mirrors: Mapping[str, Path]) -> str | None:
    """The store whose mirror (`mirrors`: store URI -> this node's `mirror_dir`) holds `path`, or None (a local
    expert)."""
    resolved = Path(path)
    return next((uri for uri, mirror in mirrors.items() if resolved.is_relative_to(mirror)), None)


def _install(fs: Any, path: str, rel: str, mirror: Path, listed_size: int | None, limits: Limits) -> str:
    """Downloads one package (at most `limits.package_bytes`, counted while it streams: the listing's size may
    change under us) and installs it into the mirror; returns its directory relative to the mirror."""
    if listed_size is not None and listed_size > limits.package_bytes:
        raise PackageError(
            f"the package is {listed_size} bytes, more than the limit of {limits.package_bytes}"
        )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=mirror) as scratch:
        local = Path(scratch) / Path(rel).name
        with fs.open_input_stream(path) as src, local.open("wb") as out:
            size = 0
            for chunk in iter(lambda: src.read(1 << 20), b""):
                size += len(chunk)
                if size > limits.package_bytes:
                    raise PackageError(f"the package is more than the limit of {limits.package_bytes} bytes")
                out.write(chunk)
        target = install_package(local, mirror, layout=expert_dir_name, force=True, limits=limits)
    return str(target.relative_to(mirror))


def _unexpected(e: Exception) -> str:
    return f"refused: {type(e).__name__}: {_first_line(e)}"


def _shown(uri: str) -> str:
    """The URI without its query (endpoint options), as messages name a package in the store."""
    return uri.split("?")[0].rstrip("/")


def _relative(path: str, base: str) -> str:
    return path[len(base) :].lstrip("/") if base else path


def _remove(mirror: Path, rel: str) -> None:
    """Moves a mirrored expert out of the scanned tree (scans skip dot-directories), then deletes it: a scan never
    sees half a directory."""
    directory = mirror / rel
    if not directory.is_dir():
        return
    aside = Path(tempfile.mkdtemp(prefix=".removing-", dir=mirror))
    os.replace(directory, aside / "expert")
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # the expert's name directory, once it holds no version
        directory.parent.rmdir()


def _read_index(mirror: Path) -> dict[str, dict[str, str]]:
    """The mirror's index, each entry checked: a `dir` is what sync deletes, so only `<name>/<version dir>` inside
    the mirror is taken; anything else in the file is dropped (the package is fetched again)."""
    try:
        data = json.loads((mirror / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {rel: entry for rel, entry in data.items() if _valid_entry(entry)}


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("stamp"), str):
        return False
    if "problem" in entry:
        return isinstance(entry["problem"], str) and "dir" not in entry
    rel = entry.get("dir")
    if not isinstance(rel, str):
        return False
    parts = rel.split("/")
    return len(parts) == 2 and all(p and p not in (".", "..") and not p.startswith(".") for p in parts)


def _write_index(mirror: Path, index: dict[str, dict[str, str]]) -> None:
    tmp = mirror / f"{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, mirror / INDEX)


@contextlib.contextmanager
def _locked(mirror: Path) -> Iterator[None]:
    """One sync per mirror at a time on this node (ingress and engine replicas share it)."""
    with (mirror / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
