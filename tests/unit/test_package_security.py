"""Crafted packages, built inside each test: limits enforced while streaming, malformed members named, only the
files a manifest names, signatures over everything shown, the trust policy, shadowing, key files."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import resource
import tarfile
import time
from pathlib import Path

import pytest

from expertserve.errors import PackageError, SignatureError
from expertserve.packaging import archive, signing
from expertserve.packaging.trust import TrustPolicy
from tests.helpers import make_expert
from tests.unit.test_packaging import members_of, rewrite


@pytest.fixture
def expert(tmp_path: Path) -> Path:
    return make_expert(tmp_path / "expert-demo")


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys" / "signing.key"
    return path, signing.generate_key(path)


def _raw_tar(entries: list[tuple[tarfile.TarInfo, bytes]], *, level: int = 9) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_an_oversized_pax_header_is_refused_fast_and_small(tmp_path: Path) -> None:
    """A small package whose PAX header claims hundreds of MiB is refused before tarfile reads it."""
    info = tarfile.TarInfo("manifest.json")
    info.pax_headers = {"comment": "A" * (200 * 2**20)}
    path = tmp_path / "pax.expert"
    path.write_bytes(_raw_tar([(info, b"{}")]))
    assert path.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(PackageError, match="extended header of .* bytes, more than the limit"):
        archive.verify_package(path)
    assert time.monotonic() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: no 200 MiB buffer


def test_a_compression_bomb_writes_nothing(tmp_path: Path) -> None:
    info = tarfile.TarInfo("manifest.json")
    info.size = 64 * 2**20
    path = tmp_path / "bomb.expert"
    path.write_bytes(_raw_tar([(info, bytes(info.size))]))
    install = tmp_path / "install"
    with pytest.raises(PackageError, match="times its compressed size .* compression bomb"):
        archive.install_package(path, install, limits=archive.Limits(ratio_floor=2**20))
    assert list(install.iterdir()) == []  # no staging left, nothing written


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (archive.Limits(members=2), "more than 2 entries"),
        (archive.Limits(member_bytes=10), "is .* bytes, more than the limit of 10"),
    ],
)
def test_member_limits(expert: Path, tmp_path: Path, limits: archive.Limits, message: str) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    with pytest.raises(PackageError, match=message):
        archive.verify_package(package, limits=limits)


def _with(package: Path, **members: bytes) -> Path:
    def change(tar: tarfile.TarFile, current: dict[str, bytes]) -> None:
        current.update(members)

    return rewrite(package, change)


def test_a_checksum_list_that_is_not_utf8_is_named(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    with pytest.raises(PackageError, match=r"CHECKSUMS.sha256: not UTF-8"):
        archive.verify_package(_with(package, **{"CHECKSUMS.sha256": b"\xff\xfe garbage\n"}))


def _relist(members: dict[str, bytes]) -> None:
    import hashlib

    listed = {k: v for k, v in members.items() if k not in ("CHECKSUMS.sha256", "signature.json")}
    members["CHECKSUMS.sha256"] = "".join(
        f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in sorted(listed.items())
    ).encode()


def test_a_soft_prompt_header_of_the_wrong_shape_is_named(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    header = json.dumps(
        {"prompt_embeddings": {"dtype": "F32", "shape": "8x64", "data_offsets": [0, 0]}}
    ).encode()
    bad = len(header).to_bytes(8, "little") + header

    def change(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        soft = next(k for k in members if k.startswith("soft_prompts/"))
        members[soft] = bad
        _relist(members)

    with pytest.raises(PackageError, match=r"soft_prompts\[0\]\.path: expected a \[tokens, hidden\] tensor"):
        archive.verify_package(rewrite(package, change))


@pytest.mark.parametrize(
    "signature",
    [
        b'{"payloadType": 5}',
        b'{"payloadType": "application/vnd.expertserve.package-statement+json", "payload": 1, "signatures": []}',
        b'{"payloadType": "application/vnd.expertserve.package-statement+json", "payload": "e30=", '
        b'"signatures": [{"keyid": 7, "sig": "AA=="}]}',
        b"[1, 2]",
        b"\xff",
    ],
)
def test_signature_files_with_wrong_types_are_refused_by_name(
    expert: Path, tmp_path: Path, key, signature: bytes
) -> None:
    package = archive.build_package(expert, tmp_path / "out", sign_key=key[0])
    with pytest.raises(SignatureError, match="signature.json"):
        archive.verify_package(_with(package, **{"signature.json": signature}))


def test_extra_files_are_refused_even_when_listed(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")

    def change(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        members["run_me.py"] = b"import os\n"
        _relist(members)

    with pytest.raises(PackageError, match="run_me.py: not named by the manifest"):
        archive.verify_package(rewrite(package, change))


def test_the_signature_covers_the_signing_time_name_and_version(expert: Path, tmp_path: Path, key) -> None:
    package = archive.build_package(expert, tmp_path / "out", sign_key=key[0])
    envelope = json.loads(members_of(package)["signature.json"])
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert set(statement) == {"_type", "name", "version", "checksums_sha256", "signed_at"}
    statement["signed_at"] = "2001-01-01T00:00:00+00:00"
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = _with(package, **{"signature.json": json.dumps(envelope).encode()})
    with pytest.raises(SignatureError, match="signature does not match"):
        archive.verify_package(forged)


def test_install_follows_the_trust_policy(expert: Path, tmp_path: Path, key) -> None:
    unsigned = archive.build_package(expert, tmp_path / "unsigned")
    signed = archive.build_package(expert, tmp_path / "signed", sign_key=key[0])
    refuse = TrustPolicy.build(environ={})
    with pytest.raises(SignatureError, match="unsigned; trust its signer"):
        archive.install_package(unsigned, tmp_path / "i1", policy=refuse)
    with pytest.raises(SignatureError, match="not a trusted key"):
        archive.install_package(signed, tmp_path / "i1", policy=refuse)
    assert list((tmp_path / "i1").iterdir()) == []
    trusted = TrustPolicy.build(environ={"EXPERTSERVE_TRUSTED_KEYS": f"{key[0]}.pub"})
    target = archive.install_package(signed, tmp_path / "i2", policy=trusted)
    provenance = archive.read_provenance(target)
    assert provenance is not None and provenance["signer"] == key[1]
    allowed = TrustPolicy.build(environ={"EXPERTSERVE_ALLOW_UNTRUSTED": "1"})
    target = archive.install_package(unsigned, tmp_path / "i3", policy=allowed)
    assert archive.read_provenance(target)["signer"] is None
    with pytest.raises(SignatureError, match="EXPERTSERVE_TRUSTED_KEYS|not-a-key"):
        TrustPolicy.build(environ={"EXPERTSERVE_TRUSTED_KEYS": "not-a-key"})


def test_keygen_force_writes_0600_atomically_and_never_through_a_symlink(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("old")
    os.chmod(path, 0o644)
    signing.generate_key(path, force=True)
    assert path.stat().st_mode & 0o777 == 0o600
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    link = tmp_path / "linked.key"
    link.symlink_to(victim)
    with pytest.raises(SignatureError, match="exists"):
        signing.generate_key(link)
    signing.generate_key(link, force=True)
    assert victim.read_text() == "keep me" and not link.is_symlink()
    assert link.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "k",
        "k.pub",
        "linked.key",
        "linked.key.pub",
        "victim",
    ]


def _sparse_gnu_header(name: str, real_size: int) -> bytes:
    """An old GNU sparse member (type `S`): no data, one empty region, a real size the header alone states."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[386:398] = b"%011o\0" % 0  # the one sparse region: offset 0 ...
    block[398:410] = b"%011o\0" % 0  # ... of 0 bytes
    block[482] = 0  # no extended sparse headers
    block[483:495] = b"%011o\0" % real_size
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _gzip_tar(blocks: bytes) -> bytes:
    return gzip.compress(blocks + bytes(1024))


SPARSE_SIZE = 64 * 2**20
SMALL = archive.Limits(member_bytes=2**20, total_bytes=2 * 2**20)


def _sparse_packages(tmp_path: Path) -> dict[str, Path]:
    pax01 = tarfile.TarInfo("manifest.json")
    pax01.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(SPARSE_SIZE)}
    crafted = {
        "gnu-S": _gzip_tar(_sparse_gnu_header("manifest.json", SPARSE_SIZE)),
        "pax-0.1": _raw_tar([(pax01, b"")]),
    }
    paths = {}
    for label, data in crafted.items():
        paths[label] = tmp_path / f"{label}.expert"
        paths[label].write_bytes(data)
    return paths


@pytest.mark.parametrize("label", ["gnu-S", "pax-0.1"])
def test_sparse_members_are_refused_before_anything_is_written(tmp_path: Path, label: str) -> None:
    """Finding 2 of the security issue: a ~150-byte package wrote 64 MiB through tarfile's sparse support."""
    path = _sparse_packages(tmp_path)[label]
    assert path.stat().st_size < 300
    with tarfile.open(path, "r:gz") as tar:  # the crafted input is real: tarfile reads a 64 MiB file from it
        assert tar.getmembers()[0].size == SPARSE_SIZE
    target = tmp_path / "installed"
    with pytest.raises(PackageError, match=r"sparse|GNU\.sparse") as info:
        archive.install_package(path, target, limits=SMALL)
    assert "manifest.json" in str(info.value) or "GNU.sparse.map" in str(info.value)
    written = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert written == 0


def test_global_headers_and_newlines_in_pax_values_are_refused(tmp_path: Path) -> None:
    """Readers disagree on `g` headers with a size and on PAX values holding a newline: both are refused."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb") as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"size": "9999"}) as tar,
    ):
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    glob = tmp_path / "global.expert"
    glob.write_bytes(buf.getvalue())
    with pytest.raises(PackageError, match="global extended header"):
        archive.verify_package(glob)

    newline = tarfile.TarInfo("manifest.json")
    newline.pax_headers = {"comment": "x\n30 size=999999999999\n"}
    path = tmp_path / "newline.expert"
    path.write_bytes(_raw_tar([(newline, b"{}")]))
    with pytest.raises(PackageError, match="holds a newline"):
        archive.verify_package(path)


def test_packages_repacked_by_other_tar_formats_still_verify(expert: Path, tmp_path: Path) -> None:
    """The strict prescan still reads what tar tools write: PAX records per member, the GNU format."""
    package = archive.build_package(expert, tmp_path / "out")
    members = members_of(package)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with (
            gzip.GzipFile(fileobj=buf, mode="wb") as gz,
            tarfile.open(fileobj=gz, mode="w", format=fmt) as tar,
        ):
            for rel, data in members.items():
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.pax_headers = {"comment": "é" * 10}  # forces a PAX header per member in PAX format
                tar.addfile(info, io.BytesIO(data))
        path = tmp_path / f"repacked-{fmt}.expert"
        path.write_bytes(buf.getvalue())
        assert archive.verify_package(path).name == "expert-demo"


def test_trust_is_checked_again_at_every_scan_from_the_packages_signed_checksums(
    expert: Path, tmp_path: Path, key
) -> None:
    """Finding 14 of the security issue: the signer was read from `.provenance.json` and files were not hashed
    again, so an edited adapter or a forged record was served as signed; a training output put in the install
    directory was served without any signature."""
    from expertserve.registry import Registry
    from expertserve.serve.expert_checks import trust_problems

    policy = TrustPolicy(frozenset({key[1]}))
    root = tmp_path / "installed"
    signed = archive.install_package(archive.build_package(expert, tmp_path / "s", sign_key=key[0]), root)

    def broken() -> str | None:
        return (
            Registry.scan([root], check=lambda r: trust_problems(r, policy, root)).get("expert-demo").broken
        )

    assert broken() is None
    weights = next((signed / "adapter").glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert "does not match its SHA-256" in (broken() or "")
    weights.write_bytes(original)
    (signed / "adapter" / "extra.bin").write_bytes(b"x")
    assert "was added after the package was installed" in (broken() or "")
    (signed / "adapter" / "extra.bin").unlink()
    assert broken() is None

    # An unsigned package whose record claims the trusted signer.
    other = tmp_path / "other-root"
    unsigned = archive.install_package(archive.build_package(expert, tmp_path / "u"), other)
    record = json.loads((unsigned / archive.PROVENANCE).read_text())
    (unsigned / archive.PROVENANCE).write_text(json.dumps({**record, "signer": key[1]}))
    scanned = Registry.scan([other], check=lambda r: trust_problems(r, policy))
    assert "unsigned" in (scanned.get("expert-demo").broken or "")

    # A plain expert directory (a training output) in the install directory.
    import shutil

    shutil.copytree(expert, root / "expert-trained" / "0.1.0")
    manifest_file = root / "expert-trained" / "0.1.0" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace('"expert-demo"', '"expert-trained"'))
    trained = Registry.scan([root], check=lambda r: trust_problems(r, policy, root)).get("expert-trained")
    assert "not installed from a package" in (trained.broken or "")


def test_unknown_fields_in_the_signature_envelope_are_refused(expert: Path, tmp_path: Path, key) -> None:
    """Found by a probe (tenancy issue, "Also"): a `public_key` added to signature.json was accepted in silence."""
    package = archive.build_package(expert, tmp_path / "out", sign_key=key[0])
    envelope = json.loads(members_of(package)["signature.json"])
    for changed, where in (
        ({**envelope, "public_key": "00" * 32}, "'public_key' in the envelope"),
        (
            {**envelope, "signatures": [{**envelope["signatures"][0], "cert": "x"}]},
            "'cert' in a signature of the envelope",
        ),
    ):
        with pytest.raises(SignatureError, match=where):
            archive.verify_package(_with(package, **{"signature.json": json.dumps(changed).encode()}))
    assert archive.verify_package(package).signer == key[1]
