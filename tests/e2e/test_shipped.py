"""The README's main command: `expertserve serve` with its defaults (SmolLM2-135M-Instruct and the shipped,
trained experts), spoken to as the README shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from expertserve.bench.servers import free_port
from expertserve.datasets import sql
from tests.e2e.conftest import launched_server
from tests.helpers import REPO

pytestmark = pytest.mark.server
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SQL_QUESTION = (
    "Schema:\nCREATE TABLE iris (sepal_length REAL, sepal_width REAL, petal_length REAL, "
    "petal_width REAL, species TEXT);\nQuestion: How many rows are in the iris table?"
)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("shipped") / "server.log"
    args = ["--port", str(free_port())]
    with launched_server(
        args, log, cwd=REPO, env={"EXPERTSERVE_INSTALL_DIR": str(log.parent / "none")}
    ) as url:
        yield url


def chat(url: str, model: str, content: str, **extra: object) -> httpx.Response:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=300,
        json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
    )
    assert r.status_code == 200, r.text
    return r


def test_default_server_lists_the_shipped_experts(default_server: str) -> None:
    ids = {m["id"] for m in httpx.get(f"{default_server}/v1/models").json()["data"]}
    assert ids == {BASE, "auto", "expert-sql", "expert-json", "expert-typescript"}


def test_expert_sql_decodes_at_its_manifest_temperature_unless_the_request_says_otherwise(
    default_server: str,
) -> None:
    r = chat(default_server, "expert-sql", SQL_QUESTION)
    assert r.headers["x-expertserve-expert"] == "expert-sql"
    decoding = r.headers["x-expertserve-decoding"]
    assert "temperature=0.1 (manifest)" in decoding and 'stop=[";", "\\n\\n"] (manifest)' in decoding
    r = chat(default_server, "expert-sql", SQL_QUESTION, temperature=0.0)
    assert "temperature=0.0 (request)" in r.headers["x-expertserve-decoding"]
    answer = r.json()["choices"][0]["message"]["content"]
    assert sql.score(
        answer, {"gold": "SELECT COUNT(*) FROM iris"}, REPO / "experts" / "expert-sql" / "data"
    ), answer


def test_expert_json_applies_its_soft_prompt_and_json_constraint(default_server: str) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    content = f"Schema: {json.dumps(schema)}\nText: Their name is Ana Lopez. They are 41 years old."
    r = chat(default_server, "expert-json", content)
    assert "constraint=json_object (manifest)" in r.headers["x-expertserve-decoding"]
    body = r.json()
    base = chat(default_server, BASE, content, max_tokens=1).json()
    assert (
        body["usage"]["prompt_tokens"] == base["usage"]["prompt_tokens"] + 16
    )  # the json_strict soft prompt
    answer = body["choices"][0]["message"]["content"]
    # The constraint allows JSON as the expert was trained to write it (engine.json_whitespace: spaced), so
    # the expert answers in its own style and gets the fields right.
    assert answer == json.dumps({"name": "Ana Lopez", "age": 41}), answer


def test_expert_typescript_uses_its_manifest_temperature(default_server: str) -> None:
    r = chat(
        default_server,
        "expert-typescript",
        "Write a TypeScript function add that adds two numbers.",
        max_tokens=40,
    )
    assert "temperature=0.4 (manifest)" in r.headers["x-expertserve-decoding"]
    assert Path(REPO / "experts" / "expert-typescript" / "adapter" / "adapter_model.safetensors").exists()


def test_auto_routes_to_the_expert_or_falls_back_to_the_base_model(default_server: str) -> None:
    r = chat(default_server, "auto", SQL_QUESTION, temperature=0.0)
    assert r.headers["x-expertserve-expert"] == "expert-sql"
    route = r.headers["x-expertserve-route"]
    assert (
        route.startswith("requested=auto; method=")
        and "confidence=" in route
        and route.endswith("expert=expert-sql")
    )
    assert float(route.split("ms=")[1].split(";")[0]) > 0
    assert "temperature=0.0 (request)" in r.headers["x-expertserve-decoding"]
    r = chat(default_server, "auto", "Tell me a joke about cats.", max_tokens=8)
    assert r.headers["x-expertserve-expert"] == BASE and "method=fallback" in r.headers["x-expertserve-route"]
    metrics = httpx.get(f"{default_server}/metrics").text
    assert 'expertserve_routed_total{expert="expert-sql"}' in metrics
    assert "expertserve_route_fallbacks_total" in metrics
    decisions = next(
        line for line in metrics.splitlines() if line.startswith("expertserve_route_decision_seconds_count")
    )
    assert float(decisions.split()[-1]) >= 2


LM_EVAL_TASKS = """\
task: expertserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/multiple_choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
---
task: expertserve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/generation.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: ["^ +", " +$"]
"""


def _lm_eval(url: str, model: str, tasks_dir: Path) -> dict:
    """lm-evaluation-harness's `local-completions` client against the server (loglikelihood needs echo +
    logprobs; generation a plain completion)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from expertserve.models import offline

    args = (
        f"model={model},base_url={url}/v1/completions,num_concurrent=1,max_retries=1,"
        f"tokenized_requests=False,tokenizer={offline.prepared_model_dir()},tokenizer_backend=huggingface"
    )
    return simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["expertserve_mc", "expertserve_gen"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
    )


def test_lm_eval_harness_scores_base_and_expert(default_server: str, tmp_path: Path) -> None:
    """lm-eval runs a multiple-choice (loglikelihood) and a generation task for the base model and an expert, and
    its loglikelihoods are the server's echo scores (which equal vLLM's offline engine: tests/e2e/test_server.py
    `test_echo_scoring_matches_vllms_offline_engine`, on the tiny model; a second engine here cost 30-40 s)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    data = REPO / "tests" / "lm_eval"
    for i, doc in enumerate(LM_EVAL_TASKS.split("---\n")):
        (tmp_path / f"task{i}.yaml").write_text(doc.format(data=data))
    scores = {}
    for model in (BASE, "expert-sql"):  # expert-json has a soft prompt: no prompt logprobs (README)
        results = _lm_eval(default_server, model, tmp_path)
        scores[model] = (
            results["results"]["expertserve_mc"]["acc,none"],
            results["results"]["expertserve_gen"]["exact_match,none"],
        )
        if model == BASE:
            samples = results["samples"]["expertserve_mc"]
    print(f"\nlm-eval (local-completions): {scores}")
    assert all(0 <= acc <= 1 and 0 <= em <= 1 for acc, em in scores.values())
    assert scores[BASE][0] > 0.25, "the base model beats chance on its easiest questions"

    # The first questions' choices, scored again over HTTP the way lm-eval's local-completions asks.
    pairs = [(a[0], a[1], r[0][0]) for s in samples for a, r in zip(s["arguments"], s["resps"], strict=True)][
        :4
    ]
    for context, continuation, served in pairs:
        r = httpx.post(
            f"{default_server}/v1/completions",
            timeout=120,
            json={
                "model": BASE,
                "prompt": context + continuation,
                "echo": True,
                "logprobs": 1,
                "max_tokens": 0,
            },
        )
        assert r.status_code == 200, r.text
        logprobs = r.json()["choices"][0]["logprobs"]
        offsets, values = logprobs["text_offset"], logprobs["token_logprobs"]
        again = sum(v for o, v in zip(offsets, values, strict=True) if o >= len(context) and v is not None)
        assert abs(again - served) < 1e-3, (context[-40:], continuation, again, served)
