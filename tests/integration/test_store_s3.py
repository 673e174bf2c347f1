"""An expert store on a real S3-compatible server (moto in server mode, over HTTP on loopback): upload from the
CLI, mirror on two nodes, removal, and a store that cannot be reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertserve.cli.main import main
from expertserve.packaging import archive, store
from expertserve.registry import Registry
from tests.helpers import S3_ENV, make_expert, manifest, s3_server


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    with s3_server() as uri:
        yield uri


def test_packages_installed_into_s3_are_served_by_every_node(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("expert-one", "expert-two"):
        expert = make_expert(tmp_path / name, manifest(name=name))
        pkg = archive.build_package(expert, tmp_path / "packages")
        assert main(["install", str(pkg), "--dir", s3, "--allow-untrusted"]) == 0
    assert "s3://experts/store/expert-two/0.1.0.expert" in capsys.readouterr().out
    mirrors = []
    for node in ("a", "b"):
        monkeypatch.setenv("EXPERTSERVE_STORE_CACHE", str(tmp_path / f"node-{node}"))
        result = store.sync(s3)
        assert sorted(result.installed) == ["expert-one/0.1.0.expert", "expert-two/0.1.0.expert"]
        assert result.problems == []
        mirrors.append(sorted(str(r.root.relative_to(result.root)) for r in Registry.scan([result.root])))
    assert mirrors[0] == mirrors[1] and len(mirrors[0]) == 2

    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(s3)
    fs.delete_file(f"{base}/expert-one/0.1.0.expert")
    result = store.sync(s3)
    assert result.removed == ["expert-one/0.1.0.expert"]
    assert [r.name for r in Registry.scan([result.root])] == ["expert-two"]


def test_an_unreachable_store_keeps_the_last_mirror_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("EXPERTSERVE_STORE_CACHE", str(tmp_path / "node"))
    with s3_server() as uri:
        expert = make_expert(tmp_path / "expert-one", manifest(name="expert-one"))
        store.upload(archive.build_package(expert, tmp_path / "packages"), uri)
        roots, problems = store.local_roots([uri])
        assert problems == []
    # The server is gone now.
    roots_after, problems = store.local_roots([uri])
    assert roots_after == roots
    assert len(problems) == 1 and "serving this node's last mirror" in problems[0]
    assert [r.name for r in Registry.scan(roots_after)] == ["expert-one"]
