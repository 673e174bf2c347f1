"""Expert stores (packaging/store.py): packages uploaded to a shared store and mirrored per node, each verified on
the node. A `file://` store here; tests/integration/test_store_s3.py runs the same against an S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertserve.cli.main import main
from expertserve.errors import PackageError
from expertserve.packaging import archive, store
from expertserve.registry import Registry
from tests.helpers import make_expert, manifest


def upload_(*args, **kwargs) -> str:
    return store.upload(*args, **kwargs)[0]


def package(tmp_path: Path, name: str = "expert-demo", version: str = "0.1.0") -> Path:
    data = manifest(name=name, version=version)
    expert = make_expert(tmp_path / "src" / f"{name}-{version}", data)
    return archive.build_package(expert, tmp_path / "packages")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Switches the mirror cache between two 'nodes' (separate cache directories)."""

    def use(name: str) -> Path:
        cache = tmp_path / f"node-{name}"
        monkeypatch.setenv("EXPERTSERVE_STORE_CACHE", str(cache))
        return cache

    use("a")
    return use


def test_a_package_in_the_store_is_mirrored_and_served_by_every_node(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    where = upload_(package(tmp_path), uri)
    assert where == f"{uri}/expert-demo/0.1.0.expert"
    paths = {}
    for name in ("a", "b"):
        cache = node(name)
        roots, problems = store.local_roots([uri])
        assert problems == []
        assert roots[0].is_relative_to(cache)
        registry = Registry.scan(roots)
        record = registry.get("expert-demo")
        assert record.version == "0.1.0"
        assert record.provenance["package_sha256"]
        paths[name] = record.root.relative_to(roots[0])
    # The same bytes under the same relative path on both nodes: an engine on either finds what the ingress saw.
    assert paths["a"] == paths["b"]


def test_sync_installs_once_then_follows_replacements_and_removals(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    first = store.sync(uri)
    assert first.installed == ["expert-demo/0.1.0.expert"]
    assert store.sync(uri).installed == []  # unchanged: nothing downloaded again
    old_dirs = list((first.root / "expert-demo").iterdir())

    with pytest.raises(PackageError, match="already in the store"):
        upload_(package(tmp_path / "v2"), uri)
    replacement = make_expert(tmp_path / "v3" / "expert-demo", manifest(description="changed"))
    upload_(archive.build_package(replacement, tmp_path / "v3" / "out"), uri, force=True)
    replaced = store.sync(uri)
    assert replaced.installed == ["expert-demo/0.1.0.expert"]
    new_dirs = list((first.root / "expert-demo").iterdir())
    assert (
        len(new_dirs) == 1 and new_dirs != old_dirs
    )  # the old content is gone, the new one has its own path
    assert Registry.scan([first.root]).get("expert-demo").manifest.description == "changed"

    (tmp_path / "store" / "expert-demo" / "0.1.0.expert").unlink()
    gone = store.sync(uri)
    assert gone.removed == ["expert-demo/0.1.0.expert"]
    assert len(Registry.scan([first.root])) == 0


def test_a_tampered_package_in_the_store_is_reported_and_the_rest_still_mirror(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    upload_(package(tmp_path, "expert-other"), uri)
    bad = tmp_path / "store" / "expert-other" / "0.1.0.expert"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = store.sync(uri)
    assert result.installed == ["expert-demo/0.1.0.expert"]
    assert len(result.problems) == 1 and "expert-other/0.1.0.expert" in result.problems[0]
    assert [r.name for r in Registry.scan([result.root])] == ["expert-demo"]


def test_a_store_that_cannot_be_opened_keeps_the_last_mirror(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    roots, _ = store.local_roots([uri])
    # The same mirror, its store now unreachable (here: a file where the directory was).
    (tmp_path / "store").rename(tmp_path / "moved")
    (tmp_path / "store").write_text("not a directory")
    roots2, problems = store.local_roots([uri])
    assert roots2 == roots
    assert len(problems) == 1 and "serving this node's last mirror" in problems[0]
    assert len(Registry.scan(roots2)) == 1


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3://", "s3:///", "nfs://server/path"])
def test_unknown_or_empty_store_uris_are_refused(uri: str) -> None:
    with pytest.raises(store.StoreError, match="expected a URI of"):
        store.check_uri(uri)


def test_install_into_a_store_from_the_cli(tmp_path: Path, node, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"file://{tmp_path}/store"
    pkg = package(tmp_path)
    # Unsigned: refused without --allow-untrusted, as for a local install, and nothing is written.
    assert main(["install", str(pkg), "--dir", uri]) != 0
    assert "signed" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
    assert main(["install", str(pkg), "--dir", uri, "--allow-untrusted"]) == 0
    out = capsys.readouterr().out
    assert f"{uri}/expert-demo/0.1.0.expert" in out
    assert main(["install", str(pkg), "--dir", "ftp://nowhere/x", "--allow-untrusted"]) == 2
    assert "expected a URI of" in capsys.readouterr().err
    assert main(["list", "--experts-dir", uri, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed["experts"]] == ["expert-demo"]


def test_an_engine_replica_on_another_node_fetches_what_the_ingress_registered(tmp_path: Path, node) -> None:
    import dataclasses

    from expertserve.errors import ExpertLoadError
    from expertserve.serve.replica import fetch_from_store

    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    cache_a = node("a")
    roots, _ = store.local_roots([uri])  # the ingress's node (a) scans
    record = Registry.scan(roots).get("expert-demo")
    spec = record.engine_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    spec = dataclasses.replace(
        spec,
        store=store.store_of(record.root, {uri: store.mirror_dir(uri)}),
        mirror=str(store.mirror_dir(uri)),
    )
    assert spec.store == uri and spec.adapter_dir.startswith(str(cache_a))

    cache_b = node("b")  # an engine replica on node b: its own, empty mirror
    on_b = fetch_from_store(spec)
    assert on_b.adapter_dir.startswith(str(cache_b)) and on_b.key == spec.key
    assert Path(on_b.adapter_dir, "adapter_model.safetensors").is_file()
    assert all(Path(p).is_file() and p.startswith(str(cache_b)) for p in on_b.soft_prompt_files)
    assert fetch_from_store(spec) == on_b  # present now: no second sync needed

    # Replaced in the store after node a's scan: node c cannot get those bytes any more, and says so.
    replacement = make_expert(tmp_path / "v2" / "expert-demo", manifest(description="changed"))
    upload_(archive.build_package(replacement, tmp_path / "v2" / "out"), uri, force=True)
    node("c")
    with pytest.raises(ExpertLoadError, match="no longer holds the package.*reload the experts"):
        fetch_from_store(spec)


def test_the_server_config_names_a_store_uri_it_cannot_open() -> None:
    from expertserve.serve.config import ConfigError, ServeConfig

    assert ServeConfig.load(
        None, environ={}, overrides={"experts_dirs": ["experts", "s3://bucket/x"]}
    ).experts_dirs == [
        "experts",
        "s3://bucket/x",
    ]
    with pytest.raises(ConfigError, match="experts_dirs.*expected a URI of"):
        ServeConfig.load(None, environ={}, overrides={"experts_dirs": ["ftp://host/x"]})


def _poisoned_package(tmp_path: Path, manifest_bytes: bytes, name: str = "poison.expert") -> Path:
    """A package whose checksums hold but whose manifest is hostile."""
    import gzip
    import hashlib
    import io
    import tarfile

    members = {
        "manifest.json": manifest_bytes,
    }
    members["CHECKSUMS.sha256"] = f"{hashlib.sha256(manifest_bytes).hexdigest()}  manifest.json\n".encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def test_a_poisoned_object_costs_only_itself_and_is_not_fetched_again(
    tmp_path: Path, node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Findings 3 and 5 of the security issue: a deeply nested manifest raised RecursionError out of the sync (no
    node could start); an unexpected error in one package must cost that package only, reported by name."""
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    upload_(package(tmp_path, "expert-other"), uri)
    deep = b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    poison_dir = tmp_path / "store" / "expert-poison"
    poison_dir.mkdir()
    _poisoned_package(tmp_path, deep).replace(poison_dir / "0.1.0.expert")

    # ... and one whose install raises something no check anticipated.
    real_install = store.install_package
    calls: list[str] = []

    def install(local: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(local.name)
        if local.name == "other.expert":
            raise ValueError("bad sparse map")
        return real_install(local, *args, **kwargs)

    monkeypatch.setattr(store, "install_package", install)
    other = tmp_path / "store" / "expert-other" / "0.1.0.expert"
    other.replace(tmp_path / "store" / "expert-other" / "other.expert")

    roots, problems = store.local_roots([uri])
    assert [r.name for r in Registry.scan(roots)] == ["expert-demo"]
    assert any("expert-poison/0.1.0.expert" in p and "nested deeper than" in p for p in problems), problems
    assert any("expert-other/other.expert" in p and "ValueError: bad sparse map" in p for p in problems), (
        problems
    )

    calls.clear()
    roots, again = store.local_roots([uri])
    assert calls == []  # neither refused package is downloaded again while it is unchanged ...
    assert sorted(again) == sorted(problems)  # ... and both are still reported
    assert [r.name for r in Registry.scan(roots)] == ["expert-demo"]


def test_downloads_are_capped(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    result = store.sync(uri, archive.Limits(package_bytes=100))
    assert result.installed == []
    assert "more than the limit of 100" in result.problems[0]
    assert not list(result.root.glob("expert-demo*"))


def test_index_entries_outside_the_mirror_are_never_deleted(tmp_path: Path, node) -> None:
    """Finding 15: the index's `dir` is what a sync deletes when its package leaves the store."""
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    mirror = store.sync(uri).root
    victim = tmp_path / "victim"
    (victim / "x").mkdir(parents=True)
    index = json.loads((mirror / store.INDEX).read_text())
    index["gone/0.1.0.expert"] = {"stamp": "1:1", "dir": str(victim)}
    index["gone2/0.1.0.expert"] = {"stamp": "1:1", "dir": "../../victim"}
    (mirror / store.INDEX).write_text(json.dumps(index))
    store.sync(uri)
    assert (victim / "x").is_dir()


def test_a_targeted_sync_touches_one_experts_packages(tmp_path: Path, node) -> None:
    uri = f"file://{tmp_path}/store"
    upload_(package(tmp_path), uri)
    upload_(package(tmp_path, "expert-other"), uri)
    result = store.sync(uri, only="expert-other")
    assert result.installed == ["expert-other/0.1.0.expert"]
    assert store.sync(uri).installed == ["expert-demo/0.1.0.expert"]
    (tmp_path / "store" / "expert-demo" / "0.1.0.expert").unlink()
    # Another expert's removal waits for a full sync.
    assert store.sync(uri, only="expert-other").removed == []


def test_an_unsigned_package_never_shadows_a_trusted_one(tmp_path: Path, node) -> None:
    """Finding 4: the same name and version, unsigned, with a hash that sorts first, took the trusted one offline."""
    from expertserve.packaging import signing
    from expertserve.packaging.trust import TrustPolicy
    from expertserve.serve.expert_checks import trust_problems

    key = tmp_path / "keys" / "k"
    public = signing.generate_key(key)
    source = make_expert(tmp_path / "src" / "expert-demo", manifest(name="expert-demo"))
    signed = archive.build_package(source, tmp_path / "signed", sign_key=key)
    signed_sha = archive.verify_package(signed).sha256
    for attempt in range(200):  # an unsigned twin whose mirror directory sorts first
        (source / "README.md").write_text(f"twin {attempt}\n")
        unsigned = archive.build_package(source, tmp_path / f"unsigned{attempt}")
        if archive.verify_package(unsigned).sha256[:12] < signed_sha[:12]:
            break
    uri = f"file://{tmp_path}/store"
    upload_(signed, uri)
    (tmp_path / "store" / "aaa").mkdir()
    unsigned.replace(tmp_path / "store" / "aaa" / "0.1.0.expert")
    roots, problems = store.local_roots([uri])
    assert problems == []
    policy = TrustPolicy(frozenset({public}))
    registry = Registry.scan(roots, check=lambda r: trust_problems(r, policy))
    record = registry.get("expert-demo", "0.1.0")
    assert record.broken is None and record.provenance["signer"] == public
    assert any("name clash" in p and "unsigned" in p for p in registry.problems), registry.problems


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:wJalrSECRETKEY@bucket/experts",
        "abfs://acct:SECRETKEY@container/experts",
        "s3://bucket/experts?access_key=AKIAEXAMPLE&secret_key=SECRETKEY",
        "abfs://container/experts?client_secret=SECRETKEY",
        "gs://bucket/x?sig=SECRETKEY&sv=2020",
        "s3://bucket/x?session_token=SECRETKEY",
    ],
)
def test_credentials_in_store_uris_are_refused_and_never_echoed(uri: str) -> None:
    """Finding 7 of the security issue: the URI was echoed in /v1/experts problems, reload answers and logs."""
    from expertserve.serve.config import ConfigError, ServeConfig

    with pytest.raises(store.StoreError) as info:
        store.check_uri(uri)
    assert "credential" in str(info.value) and "SECRETKEY" not in str(info.value)
    with pytest.raises(ConfigError) as config_info:
        ServeConfig.load(environ={"EXPERTSERVE_EXPERTS_DIRS": json.dumps([uri])})
    assert "SECRETKEY" not in str(config_info.value) and "credential" in str(config_info.value)


def test_endpoint_options_and_user_names_are_still_accepted() -> None:
    for uri in (
        "s3://bucket/experts?endpoint_override=host:9000&scheme=http",
        "hdfs://alice@namenode/experts",
    ):
        assert store.check_uri(uri) == uri
