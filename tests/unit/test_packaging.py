"""`.expert` packages: round trip, tampering, unsafe archives, signatures, atomic install."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from expertserve.errors import ManifestError, PackageError, SignatureError
from expertserve.packaging import archive, signing
from tests.helpers import make_expert, manifest


@pytest.fixture
def expert(tmp_path: Path) -> Path:
    root = make_expert(tmp_path / "expert-demo")
    (root / "README.md").write_text("# demo\n")
    return root


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys" / "signing.key"
    return path, signing.generate_key(path)


def members_of(package: Path) -> dict[str, bytes]:
    with tarfile.open(package, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def rewrite(package: Path, change: Callable[[tarfile.TarFile, dict[str, bytes]], None]) -> Path:
    """Writes a new archive from the members of `package`, letting `change` add its own entries."""
    members = members_of(package)
    out = package.with_name("evil.expert")
    with tarfile.open(out, "w:gz") as tar:
        change(tar, members)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def add_entry(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def test_round_trip(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    assert package.name == "expert-demo-0.1.0.expert"
    assert package.stat().st_mode & 0o777 == 0o644
    names = set(members_of(package))
    assert names == {
        "manifest.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "soft_prompts/style.safetensors",
        "grammar.gbnf",
        "README.md",
        "CHECKSUMS.sha256",
    }
    info = archive.verify_package(package)
    assert (info.name, info.version, info.signer) == ("expert-demo", "0.1.0", None)
    for rel, digest in info.files.items():
        assert hashlib.sha256((expert / rel).read_bytes()).hexdigest() == digest
    installed = archive.install_package(package, tmp_path / "install")
    assert installed == tmp_path / "install" / "expert-demo" / "0.1.0"
    for rel in info.files:
        assert (installed / rel).read_bytes() == (expert / rel).read_bytes()


def test_datasets_stay_out_of_packages(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    assert not any(n.startswith("data/") for n in members_of(package))


def test_packages_are_reproducible(expert: Path, tmp_path: Path) -> None:
    a = archive.build_package(expert, tmp_path / "a").read_bytes()
    b = archive.build_package(expert, tmp_path / "b").read_bytes()
    assert a == b


def test_package_refuses_missing_files(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo", files=False)
    with pytest.raises(PackageError, match=r"soft_prompts\[0\].path: soft prompt file not found"):
        archive.build_package(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_package_refuses_invalid_manifest(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo", manifest(version="latest"))
    with pytest.raises(ManifestError, match="version"):
        archive.build_package(root, tmp_path / "out")


def test_soft_prompt_with_wrong_row_count_is_refused(expert: Path, tmp_path: Path) -> None:
    from tests.helpers import write_safetensors

    write_safetensors(expert / "soft_prompts" / "style.safetensors", {"prompt_embeddings": ([5, 8], "F32")})
    with pytest.raises(PackageError, match="tensor has 5 rows but tokens is 4"):
        archive.build_package(expert, tmp_path / "out")


def test_tampered_member_fails_verification(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")

    def tamper(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        members["adapter/adapter_model.safetensors"] = (
            members["adapter/adapter_model.safetensors"][:-1] + b"\x02"
        )

    evil = rewrite(package, tamper)
    with pytest.raises(PackageError, match="adapter/adapter_model.safetensors does not match its SHA-256"):
        archive.verify_package(evil)


def test_tampered_manifest_fails_verification(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")

    def tamper(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        data = json.loads(members["manifest.json"])
        data["training"]["decoding"]["temperature"] = 1.9
        members["manifest.json"] = json.dumps(data).encode()

    with pytest.raises(PackageError, match="manifest.json does not match"):
        archive.verify_package(rewrite(package, tamper))


def test_unlisted_and_missing_files_fail(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    extra = rewrite(package, lambda tar, members: add_entry(tar, "payload.sh", b"rm -rf /"))
    with pytest.raises(PackageError, match="payload.sh not listed in CHECKSUMS.sha256"):
        archive.verify_package(extra)
    missing = rewrite(package, lambda tar, members: members.pop("grammar.gbnf"))
    with pytest.raises(PackageError, match="grammar.gbnf is listed in CHECKSUMS.sha256 but missing"):
        archive.verify_package(missing)
    no_sums = rewrite(package, lambda tar, members: members.pop("CHECKSUMS.sha256"))
    with pytest.raises(PackageError, match="no CHECKSUMS.sha256"):
        archive.verify_package(no_sums)


@pytest.mark.parametrize("cut", [10, 200, 0.5, 0.9])
def test_truncated_package_fails_cleanly(expert: Path, tmp_path: Path, cut: float) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    data = package.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    package.write_bytes(data[:n])
    with pytest.raises(PackageError, match="truncated or corrupt|is truncated"):
        archive.install_package(package, tmp_path / "install")
    assert list((tmp_path / "install").iterdir()) == []


def test_not_a_package(tmp_path: Path) -> None:
    path = tmp_path / "x.expert"
    path.write_text("hello")
    with pytest.raises(PackageError, match="truncated or corrupt"):
        archive.verify_package(path)
    with pytest.raises(PackageError, match="package file not found"):
        archive.verify_package(tmp_path / "missing.expert")


UNSAFE_ENTRIES: list[tuple[str, Callable[[tarfile.TarFile], None], str]] = [
    ("dot-dot", lambda t: add_entry(t, "../escape.txt"), "climbs out of the package"),
    ("nested dot-dot", lambda t: add_entry(t, "adapter/../../escape.txt"), "climbs out of the package"),
    ("absolute", lambda t: add_entry(t, "/tmp/escape.txt"), "absolute path"),
    ("symlink", lambda t: add_entry(t, "link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
    ("hardlink", lambda t: add_entry(t, "hard", type=tarfile.LNKTYPE, linkname="manifest.json"), "is a link"),
    ("char device", lambda t: add_entry(t, "dev", type=tarfile.CHRTYPE), "device or special file"),
    ("fifo", lambda t: add_entry(t, "fifo", type=tarfile.FIFOTYPE), "device or special file"),
    ("backslash", lambda t: add_entry(t, "..\\escape.txt"), "backslash"),
]


@pytest.mark.parametrize(
    ("add", "message"), [c[1:] for c in UNSAFE_ENTRIES], ids=[c[0] for c in UNSAFE_ENTRIES]
)
def test_unsafe_entries_are_rejected_and_nothing_is_written(
    expert: Path, tmp_path: Path, add: Callable[[tarfile.TarFile], None], message: str
) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    evil = rewrite(package, lambda tar, members: add(tar))
    install = tmp_path / "sandbox" / "install"
    with pytest.raises(PackageError, match=message):
        archive.install_package(evil, install)
    assert list(install.iterdir()) == []
    assert not (tmp_path / "sandbox" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_duplicate_entries_are_rejected(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    evil = rewrite(package, lambda tar, members: add_entry(tar, "manifest.json", b"{}"))
    with pytest.raises(PackageError, match="appears twice"):
        archive.verify_package(evil)


def test_too_large_package_is_rejected(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    with pytest.raises(PackageError, match="unpacks to more than 100 bytes"):
        archive.verify_package(package, limits=archive.Limits(total_bytes=100))


def test_signed_package_verifies_and_pins_its_signer(expert: Path, tmp_path: Path, key) -> None:
    key_path, public = key
    package = archive.build_package(expert, tmp_path / "out", sign_key=key_path)
    assert "signature.json" in members_of(package)
    info = archive.verify_package(package, public_key=public)
    assert info.signer == public and info.signed_at
    _, other = tmp_path / "k2", signing.generate_key(tmp_path / "k2")
    with pytest.raises(SignatureError, match="not by the required key"):
        archive.verify_package(package, public_key=other)


def test_unsigned_package_fails_when_a_signer_is_required(expert: Path, tmp_path: Path, key) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    with pytest.raises(SignatureError, match="unsigned, but a signature by"):
        archive.verify_package(package, public_key=key[1])


def test_resigned_tampered_checksums_fail_the_signature(expert: Path, tmp_path: Path, key) -> None:
    package = archive.build_package(expert, tmp_path / "out", sign_key=key[0])

    def tamper(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        members["grammar.gbnf"] = b'root ::= "DROP TABLE users"\n'
        digest = hashlib.sha256(members["grammar.gbnf"]).hexdigest()
        lines = [
            f"{digest}  grammar.gbnf" if line.endswith("  grammar.gbnf") else line
            for line in members["CHECKSUMS.sha256"].decode().splitlines()
        ]
        members["CHECKSUMS.sha256"] = ("\n".join(lines) + "\n").encode()

    with pytest.raises(SignatureError, match="signed statement's checksums_sha256 .*tampered"):
        archive.verify_package(rewrite(package, tamper))


def test_malformed_signature_file(expert: Path, tmp_path: Path, key) -> None:
    package = archive.build_package(expert, tmp_path / "out", sign_key=key[0])

    def tamper(tar: tarfile.TarFile, members: dict[str, bytes]) -> None:
        members["signature.json"] = b'{"public_key": "00"}'

    with pytest.raises(SignatureError, match="signature.json: expected a DSSE envelope"):
        archive.verify_package(rewrite(package, tamper))


def test_keygen_refuses_to_overwrite_and_keys_are_private(tmp_path: Path, key) -> None:
    key_path, public = key
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert signing.read_public_key(str(key_path) + ".pub") == public
    assert signing.read_public_key(public.upper()) == public
    with pytest.raises(SignatureError, match="exists; pass --force"):
        signing.generate_key(key_path)
    with pytest.raises(SignatureError, match="expected 64 hex characters"):
        signing.read_public_key("not-a-key")
    with pytest.raises(SignatureError, match="signing key not found"):
        signing.load_private_key(tmp_path / "nope.key")


def test_install_refuses_existing_version_without_force(expert: Path, tmp_path: Path) -> None:
    package = archive.build_package(expert, tmp_path / "out")
    target = archive.install_package(package, tmp_path / "install")
    (target / "marker").write_text("old")
    with pytest.raises(PackageError, match="already installed"):
        archive.install_package(package, tmp_path / "install")
    assert (target / "marker").exists()
    archive.install_package(package, tmp_path / "install", force=True)
    assert not (target / "marker").exists()
    assert sorted(p.name for p in (tmp_path / "install").iterdir()) == ["expert-demo"]


def test_gzip_of_garbage_tar(tmp_path: Path) -> None:
    path = tmp_path / "g.expert"
    path.write_bytes(gzip.compress(b"\x00" * 10 + b"junk" * 300))
    with pytest.raises(PackageError):
        archive.verify_package(path)
