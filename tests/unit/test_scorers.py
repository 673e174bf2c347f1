"""The objective scorers and the dataset format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from expertserve.datasets import json_extract, sql, typescript
from expertserve.datasets.common import DatasetError, answer, read_jsonl, split
from tests.helpers import REPO

SQL_DATA = REPO / "experts" / "expert-sql" / "data"


@pytest.mark.parametrize(
    ("prediction", "ok"),
    [
        ("SELECT COUNT(*) FROM iris", True),
        ("select count(*) from iris;", True),
        ("```sql\nSELECT COUNT(*) FROM iris\n```", True),
        ("SELECT COUNT(*) FROM cars", False),
        ("SELECT COUNT(* FROM iris", False),
        ("The answer is 150.", False),
        ("", False),
    ],
)
def test_sql_execution_accuracy(prediction: str, ok: bool) -> None:
    assert sql.score(prediction, {"gold": "SELECT COUNT(*) FROM iris"}, SQL_DATA) is ok


def test_sql_order_matters_only_when_gold_orders() -> None:
    gold = "SELECT model FROM cars ORDER BY mpg DESC LIMIT 3"
    assert sql.score(gold, {"gold": gold}, SQL_DATA)
    assert not sql.score("SELECT model FROM cars ORDER BY mpg ASC LIMIT 3", {"gold": gold}, SQL_DATA)
    unordered = "SELECT DISTINCT cyl FROM cars"
    assert sql.score("SELECT DISTINCT cyl FROM cars ORDER BY cyl DESC", {"gold": unordered}, SQL_DATA)


def test_sql_database_is_read_only_and_runaway_queries_stop(tmp_path: Path) -> None:
    shutil.copy(SQL_DATA / sql.DB_FILE, tmp_path / sql.DB_FILE)
    assert not sql.score("DELETE FROM iris", {"gold": "SELECT 1"}, tmp_path)
    assert sql.score("SELECT COUNT(*) FROM iris", {"gold": "SELECT 150"}, tmp_path)
    huge = "SELECT COUNT(*) FROM quakes a, quakes b, quakes c"
    assert not sql.score(huge, {"gold": "SELECT 1"}, tmp_path)


@pytest.mark.parametrize(
    ("prediction", "ok"),
    [
        ('{"name": "Ana", "age": 30}', True),
        ('{"age": 30.0, "name": "Ana"}', True),
        ('```json\n{"name": "Ana", "age": 30}\n```', True),
        ('{"name": "Ana", "age": "30"}', False),
        ('{"name": "Ana"}', False),
        ('{"name": "Ana", "age": 30, "x": 1}', False),
        ("name: Ana", False),
        ("[1, 2]", False),
    ],
)
def test_json_exact_match(prediction: str, ok: bool) -> None:
    assert json_extract.score(prediction, {"gold": {"name": "Ana", "age": 30}}) is ok


def test_json_booleans_are_not_numbers() -> None:
    assert not json_extract.score('{"x": 1}', {"gold": {"x": True}})
    assert json_extract.score('{"x": true}', {"gold": {"x": True}})


def test_json_answers_are_also_checked_for_being_json_at_all() -> None:
    from expertserve.eval.scorers import SCORERS

    name, check = SCORERS["json-exact"].well_formed
    assert name == "valid_json"
    assert check('{"a": 1}') and check('```json\n{"a": 1}\n```')
    assert not check('{"a": 1') and not check("[1, 2]") and not check("Sure! {}")
    assert SCORERS["sql-execution"].well_formed is None


@pytest.mark.skipif(typescript.tsc_command() is None, reason="tsc is installed by scripts/setup.sh")
def test_typescript_scorer_type_checks_and_runs_tests() -> None:
    meta = {"name": "add", "tests": [["1, 2", "3"], ["0, 0", "0"]]}
    answers = [
        "function add(a: number, b: number): number {\n  return a + b;\n}",
        "```typescript\nfunction add(a: number, b: number): number { return a + b; }\n```",
        "function add(a: number, b: number): number {\n  return a - b;\n}",  # wrong result
        "function add(a, b) {\n  return a + b;\n}",  # implicit any: fails --strict
        "function add(a: number, b: number): string {\n  return a + b;\n}",  # type error
        "function add(a: number, b: number): number {\n  while (true) {}\n}",  # never returns: killed
    ]
    scores = typescript.score_many(answers, [meta] * len(answers), timeout_s=2)
    assert scores == [True, True, False, False, False, False]


def test_shipped_datasets_are_well_formed_and_held_out() -> None:
    for name in ("expert-sql", "expert-json", "expert-typescript"):
        data = REPO / "experts" / name / "data"
        splits = {part: read_jsonl(data / f"{part}.jsonl") for part in ("train", "valid", "test")}
        prompts = {part: {json.dumps(e["messages"][:-1]) for e in ex} for part, ex in splits.items()}
        assert not prompts["test"] & prompts["train"], f"{name}: test prompts also in train"
        assert 100 <= len(splits["train"]) <= 5000 and len(splits["test"]) >= 100
    ts_train = read_jsonl(REPO / "experts" / "expert-typescript" / "data" / "train.jsonl")
    ts_test = read_jsonl(REPO / "experts" / "expert-typescript" / "data" / "test.jsonl")
    assert not {e["meta"]["name"] for e in ts_test} & {e["meta"]["name"] for e in ts_train}


def test_generators_are_deterministic_and_their_answers_score() -> None:
    a, b = json_extract.generate(30, seed=5), json_extract.generate(30, seed=5)
    assert a == b and all(json_extract.score(answer(e), e["meta"]) for e in a)
    assert split(a, 1, 5, 5)["test"] == split(b, 1, 5, 5)["test"]
    assert typescript.generate(1) == typescript.generate(1)


def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\nnot json\n'
    )
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(f)
    f.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:1: messages\[0\]"):
        read_jsonl(f)
    with pytest.raises(DatasetError, match="dataset file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.skipif(typescript.tsc_command() is None, reason="tsc is installed by scripts/setup.sh")
def test_typescript_model_output_runs_in_a_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model output cannot pass by printing, and cannot read the caller's environment or files, start processes,
    or outgrow its limits."""
    monkeypatch.setenv("EXPERTSERVE_SCORER_SECRET", "leaked")
    add = {"name": "add", "tests": [["1, 2", "3"], ["0, 0", "0"]]}
    probe = {"name": "probe", "tests": [["", '"denied"']]}
    node = "declare const require: any; declare const process: any;\n"
    cases = [
        # prints what the old harness printed, and a line shaped like the runner's, without computing anything
        (
            add,
            'function add(a: number, b: number): number { return 0; }\nconsole.log("[true,true]");\n'
            'console.log(\'abc[{"json":"3"},{"json":"0"}]\');',
            False,
        ),
        (
            add,
            f"function add(a: number, b: number): number {{ return a + b; }}\n{node}process.exit(0);",
            False,
        ),
        (
            probe,
            f'{node}function probe(): string {{ return process.env.EXPERTSERVE_SCORER_SECRET ?? "denied"; }}',
            True,
        ),
        (
            probe,
            f"{node}function probe(): string {{ try {{ return require('fs').readFileSync('"
            f"{REPO / 'experts/expert-typescript/data/test.jsonl'}', 'utf8'); }} catch {{ return 'denied'; }} }}",
            True,
        ),
        (
            probe,
            f"{node}function probe(): string {{ try {{ require('child_process').execSync('id'); return 'ran'; }}"
            " catch { return 'denied'; } }",
            True,
        ),
        (
            probe,
            f"{node}function probe(): string {{ try {{ require('fs').writeFileSync('x', 'y'); return 'wrote'; }}"
            " catch { return 'denied'; } }",
            True,
        ),
        (
            add,
            "function add(a: number, b: number): number { const xs: number[] = [];"
            " while (true) { xs.push(a); } }",
            False,
        ),
    ]
    scores = typescript.score_many([c[1] for c in cases], [c[0] for c in cases], timeout_s=3)
    assert scores == [c[2] for c in cases]


def test_the_sandbox_scrubs_the_environment_and_limits_resources(tmp_path: Path) -> None:
    import sys

    from expertserve.eval import sandbox

    script = "import os, resource; print(sorted(os.environ), resource.getrlimit(resource.RLIMIT_FSIZE)[0], os.getcwd())"
    out = sandbox.run([sys.executable, "-c", script], tmp_path)
    assert out.returncode == 0 and out.stdout.split("]")[0] == "['HOME', 'LANG', 'NODE_OPTIONS', 'PATH'"
    assert f"{2**20} {tmp_path}" in out.stdout
    slow = sandbox.run(
        [sys.executable, "-c", "while True: pass"], tmp_path, limits=sandbox.SandboxLimits(1, 5)
    )
    assert slow.returncode != 0 and not slow.timed_out  # stopped by the CPU limit


def test_the_sandbox_has_no_network_and_bounded_output(tmp_path: Path) -> None:
    """Finding 8 of the security issue: the sandbox reached loopback admin endpoints, Ray's Jobs API and cloud
    metadata; 300 MiB printed cost the caller 914 MiB."""
    import socket
    import sys

    from expertserve.eval import sandbox

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probe = (
        "import socket\n"
        "for host in ('127.0.0.1', '169.254.169.254', '8.8.8.8'):\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        f"    print(host, s.connect_ex((host, {port} if host == '127.0.0.1' else 80)))\n"
    )
    out = sandbox.run([sys.executable, "-c", probe], tmp_path)
    listener.close()
    assert out.returncode == 0, out.stderr
    codes = dict(line.split() for line in out.stdout.splitlines())
    assert codes["127.0.0.1"] != "0" and codes["169.254.169.254"] != "0" and codes["8.8.8.8"] != "0", codes

    flood = sandbox.run(
        [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"],
        tmp_path,
        limits=sandbox.SandboxLimits(file_bytes=2**20),
    )
    assert (
        flood.returncode != 0 and len(flood.stdout) <= 2**20
    )  # killed at the limit; the caller read no more
