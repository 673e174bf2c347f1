"""The `expertserve` command as a user runs it: exit codes, output, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REFERENCE, REPO, make_expert, manifest


def run(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "expertserve", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_commands_and_imports_nothing_heavy() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("validate", "package", "verify", "install", "keygen", "models", "list"):
        assert command in result.stdout
    probe = (
        "import sys; from expertserve.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'vllm', 'transformers', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_shipped_experts_exits_0_and_reports_statuses() -> None:
    result = run("validate", "experts/expert-sql", "experts/expert-json", "experts/expert-typescript")
    assert result.returncode == 0, result.stdout + result.stderr
    version = json.loads((REPO / "experts" / "expert-sql" / "manifest.json").read_text())["version"]
    assert f"expert-sql {version} (schema 2.0): valid" in result.stdout
    assert "training.decoding.temperature = 0.1" in result.stdout
    assert "3 of 3 valid" in result.stdout


def test_validate_directory_of_experts() -> None:
    result = run("validate", "experts", "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert [r["name"] for r in report["results"]] == ["expert-json", "expert-sql", "expert-typescript"]


def test_validate_reference_manifests_names_the_offending_field() -> None:
    result = run("validate", *sorted(str(p) for p in REFERENCE.glob("*.manifest.json")), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    by_file = {Path(r["path"]).name: r for r in report["results"]}
    assert by_file["expert-json.manifest.json"]["valid"]
    assert by_file["expert-typescript.manifest.json"]["valid"]
    for name in ("expert-sql.manifest.json", "expert-neo4j.manifest.json"):
        [error] = by_file[name]["errors"]
        assert error.startswith("base_models[0].prompt_template:") and "'qwen3'" in error
    fields = {f["path"]: f for f in by_file["expert-json.manifest.json"]["fields"]}
    assert fields["runtime.candle_compatible"]["status"] == "not applicable"
    assert fields["name"]["status"] == "active"


def test_validate_json_shape(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    report = json.loads(run("validate", str(root), "--json", "--strict").stdout)
    assert report["valid"] is True and report["strict"] is True
    [r] = report["results"]
    assert {"path", "kind", "valid", "name", "version", "errors", "fields", "summary", "serving"} <= set(r)
    assert all({"path", "value", "status", "detail"} == set(f) for f in r["fields"])


def test_validate_strict_reports_missing_files(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo", files=False)
    assert run("validate", str(root)).returncode == 0
    result = run("validate", "--strict", str(root))
    assert result.returncode == 1
    assert "error: base_models[0].adapters[0].path: adapter directory not found" in result.stdout
    assert "error: training.dataset.path: dataset file not found" in result.stdout


def test_validate_strict_refuses_files_outside_the_expert_as_train_does(tmp_path: Path) -> None:
    """Found by a probe (tenancy issue, "Also"): `validate --strict` called an expert valid whose dataset was
    `/etc/hostname`, which `train` refuses."""
    data = manifest()
    data["training"]["dataset"]["path"] = "/etc/hostname"
    root = make_expert(tmp_path / "expert-demo", data)
    result = run("validate", "--strict", str(root))
    assert result.returncode == 1
    assert (
        "training.dataset.path: expected a path inside the expert directory, got '/etc/hostname'"
        in result.stdout
    )
    data["training"]["dataset"]["path"] = "../../outside.jsonl"
    (tmp_path / "expert-demo" / "manifest.json").write_text(json.dumps(data))
    result = run("validate", "--strict", str(root))
    assert result.returncode == 1 and "outside the expert directory" in result.stdout


def test_validate_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("validate").returncode == 2
    missing = run("validate", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    assert run("validate", "--bogus", ".").returncode == 2


def test_validate_invalid_manifest_exits_1_without_traceback(tmp_path: Path) -> None:
    data = manifest()
    data["training"]["decoding"]["temperature"] = 7
    root = make_expert(tmp_path / "expert-demo", data, files=False)
    result = run("validate", str(root))
    assert result.returncode == 1
    assert "training.decoding.temperature: input should be less than or equal to 2, got 7" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_package_verify_install_and_validate_a_package(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    assert run("keygen", "-o", str(tmp_path / "k")).returncode == 0
    assert run("keygen", "-o", str(tmp_path / "k")).returncode == 1  # refuses to overwrite
    made = run("package", str(root), "-o", str(tmp_path / "out"), "--sign", str(tmp_path / "k"))
    assert made.returncode == 0, made.stderr
    package = tmp_path / "out" / "expert-demo-0.1.0.expert"
    verified = run("verify", str(package), "--public-key", str(tmp_path / "k.pub"), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["signer"]
    validated = run("validate", "--strict", str(package))
    assert validated.returncode == 0 and "note: training.dataset.path" in validated.stdout
    refused = run("install", str(package), "--dir", str(tmp_path / "inst"))
    assert refused.returncode == 1 and "not a trusted key" in refused.stderr
    installed = run(
        "install", str(package), "--dir", str(tmp_path / "inst"), "--trusted-key", f"{tmp_path}/k.pub"
    )
    assert installed.returncode == 0 and "signed by a trusted key" in installed.stdout
    listed = run("list", "--experts-dir", str(tmp_path / "inst"), "--json")
    assert [e["name"] for e in json.loads(listed.stdout)["experts"]] == ["expert-demo"]


def test_install_warns_when_an_expert_shadows_one_from_another_root(tmp_path: Path) -> None:
    make_expert(tmp_path / "experts" / "expert-demo")  # 0.1.0, a local directory
    newer = make_expert(tmp_path / "src" / "expert-demo", manifest(version="0.2.0"))
    package = tmp_path / "out" / "expert-demo-0.2.0.expert"
    assert run("package", str(newer), "-o", str(tmp_path / "out")).returncode == 0
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"experts_dirs": [str(tmp_path / "experts")], "allow_untrusted": True}))
    result = run("install", str(package), "--dir", str(tmp_path / "inst"), "--config", str(config))
    assert result.returncode == 0 and "NOT signed by a trusted key (allowed)" in result.stdout
    assert "warning: expert-demo 0.2.0" in result.stderr and "shadows 0.1.0" in result.stderr


def test_validate_json_prints_one_object_for_a_malformed_package(tmp_path: Path) -> None:
    import gzip
    import io
    import tarfile

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in (("manifest.json", b"{}"), ("CHECKSUMS.sha256", b"\xff\xfe\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    package = tmp_path / "bad.expert"
    package.write_bytes(buf.getvalue())
    result = run("validate", "--json", str(package))
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["valid"] is False
    assert "CHECKSUMS.sha256: not UTF-8" in report["results"][0]["errors"][0]


def test_verify_tampered_package_exits_1_with_message(tmp_path: Path) -> None:
    package = tmp_path / "x.expert"
    package.write_bytes(b"\x1f\x8b" + b"junk")
    result = run("verify", str(package))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_package_of_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert run("package", str(tmp_path / "f"), "-o", str(tmp_path)).returncode == 2


@pytest.mark.parametrize("argv", [["models"], ["models", "nope"], ["package", "x"]])
def test_incomplete_commands_are_usage_errors(argv: list[str]) -> None:
    assert run(*argv).returncode == 2


def test_train_and_eval_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for command in ("train", "eval"):
        result = run(command, str(tmp_path / "file"))
        assert result.returncode == 2 and "not a directory" in result.stderr
    assert run("train", str(tmp_path), "--workers", "0").returncode == 2


def test_eval_without_scorer_or_adapter_explains_what_is_missing(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo", files=False)
    result = run("eval", str(root))
    assert result.returncode == 1 and "evaluation.scorer is not set" in result.stderr
    data = manifest(evaluation={"scorer": "json-exact"})
    data["training"]["dataset"]["test_path"] = "data/train.jsonl"
    root = make_expert(tmp_path / "expert-two", data, files=False)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{}"}]}\n'
    )
    result = run("eval", str(root))
    assert result.returncode == 1 and "no trained adapter; run `expertserve train" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_on_expert_with_bad_dataset_names_the_line(tmp_path: Path) -> None:
    root = make_expert(tmp_path / "expert-demo")
    (root / "data" / "train.jsonl").write_text("not json\n")
    result = run("train", str(root), env={"EXPERTSERVE_HOME": str(tmp_path / "home")})
    assert result.returncode == 1
    assert "train.jsonl:1: not valid JSON" in result.stderr and "Traceback" not in result.stderr
    (root / "data" / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    result = run("train", str(root), env={"EXPERTSERVE_HOME": str(tmp_path / "home")})
    assert result.returncode == 1 and "is not prepared; run `expertserve models prepare`" in result.stderr
    result = run("train", str(root), "--base-model", str(tmp_path), "--base-model-id", "x")
    assert result.returncode == 1 and "no adapter for base model x" in result.stderr


def test_serve_config_errors_are_one_line_per_problem(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 70000\nengine:\n  dtpye: x\n")
    result = run("serve", "--config", str(config), env={"EXPERTSERVE_ADMIN_KEY": "secret-value"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "port: input should be less than or equal to 65535" in lines[0]
    assert "engine.dtpye: unknown setting" in lines[1] and "secret-value" not in result.stderr
    assert "configs/expertserve.yaml" in run("serve", "--help").stdout


def test_a_trained_package_is_published_to_a_directory_or_a_store(tmp_path: Path) -> None:
    """`train --publish`: the package goes where servers read packages (finding 14 of the security issue)."""
    from expertserve.cli.train import _publish
    from expertserve.packaging import archive
    from tests.helpers import make_expert

    package = archive.build_package(make_expert(tmp_path / "expert-demo"), tmp_path / "pkg")
    installed = Path(_publish(package, str(tmp_path / "installed")))
    assert archive.read_provenance(installed) is not None
    where = _publish(package, f"file://{tmp_path}/store")
    assert (
        where.endswith("/expert-demo/0.1.0.expert")
        and (tmp_path / "store" / "expert-demo" / "0.1.0.expert").is_file()
    )
