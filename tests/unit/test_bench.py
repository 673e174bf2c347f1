"""The benchmark's pure parts: seeded workloads, statistics, targets, synthetic experts."""

from __future__ import annotations

import math
from pathlib import Path

from expertserve.bench import workload
from expertserve.bench.stats import FIGURES, TARGETS, Timed, percentile, ratio, summarize, table, verdict
from expertserve.bench.workload import Shape
from expertserve.manifest.load import load_manifest
from expertserve.registry import Registry
from tests.helpers import REPO


def test_workload_is_fixed_by_its_seed_and_spreads_over_models() -> None:
    shape = Shape(requests=12, concurrency=4, max_tokens=7)
    a = workload.requests(["m1", "m2", "m3"], shape, seed=5)
    assert a == workload.requests(["m1", "m2", "m3"], shape, seed=5)
    assert a != workload.requests(["m1", "m2", "m3"], shape, seed=6)
    assert sorted(r["model"] for r in a) == sorted(["m1", "m2", "m3"] * 4)
    assert {r["max_tokens"] for r in a} == {7} and all(r["ignore_eos"] and r["stream"] for r in a)
    # The same seed gives the same prompts whatever the models: base-only and mixed runs answer the same text.
    b = workload.requests(["base"], shape, seed=5)
    assert [r["messages"] for r in a] == [r["messages"] for r in b]


def test_percentile_interpolates_and_handles_no_values() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile([10, 20], 100) == 20
    assert math.isnan(percentile([], 50))


def test_summarize_counts_only_successful_requests() -> None:
    timed = [Timed(0.1, 1.0, 10), Timed(0.3, 2.0, 10), Timed(0.0, 0.5, 0, "HTTP 500: boom")]
    s = summarize(timed, wall=4.0)
    assert s["errors"] == 1 and s["first_error"] == "HTTP 500: boom"
    assert s["output_tokens_per_s"] == 5.0 and s["requests_per_s"] == 0.5
    assert math.isclose(s["ttft_ms_p50"], 200.0)


def test_ratio_and_verdicts() -> None:
    assert ratio(1.0, 2.0) == 0.5
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0))
    assert verdict("stack_throughput_ratio", 0.96) == "pass"
    assert verdict("stack_throughput_ratio", 0.90) == "FAIL"
    assert verdict("cold_warm_ttft_ratio", 2.5) == "FAIL"
    assert verdict("routing_added_ms_p50", 3.0) == "pass"
    assert verdict("mixed32_throughput_ratio", 0.1) == "-"
    assert verdict("mixed8_throughput_ratio", math.nan) == "n/a"
    assert set(TARGETS) <= {
        "stack_throughput_ratio",
        "mixed8_throughput_ratio",
        "cold_warm_ttft_ratio",
        "routing_added_ms_p50",
        "many_throughput_ratio",
        "many_cold_warm_ttft_p99_ratio",
        "base_throughput_ratio",
        "fairness_ttft_p50_ratio",
    }
    assert verdict("many_cold_warm_ttft_p99_ratio", 2.5) == "FAIL"
    assert verdict("fairness_ttft_p50_ratio", 1.8) == "pass"


def test_table_prints_every_headline_figure() -> None:
    text = table({"stack_throughput_ratio": 0.97, "cold_warm_ttft_ratio": 3.0})
    assert "0.970" in text and "pass" in text and "FAIL" in text
    assert sum("n/a" in line for line in text.splitlines()) == len(FIGURES) - 2  # the figures not given


def test_synthetic_experts_are_valid_and_shaped_like_the_template(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from expertserve.bench.synthetic import make_experts

    template = Registry.scan([REPO / "experts"]).get("expert-sql")
    made = make_experts(
        tmp_path,
        ["expert-bench-00", "expert-bench-01"],
        template,
        "base-id",
        seed=1,
        soft_tokens=4,
        hidden_size=576,
    )
    registry = Registry.scan([tmp_path], strict=True)
    assert [r.name for r in registry] == ["expert-bench-00", "expert-bench-01"]
    assert load_manifest(made[0] / "manifest.json").manifest.base_models[0].name == "base-id"
    shipped = load_file(str(template.root / "adapter" / "adapter_model.safetensors"))
    a, b = (load_file(str(m / "adapter" / "adapter_model.safetensors")) for m in made)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in shipped.items()}
    key = next(k for k in a if "lora_B" in k)
    assert (a[key] != 0).any() and not (a[key] == b[key]).all()  # not an identity adapter, and each different
    assert load_file(str(made[0] / "soft_prompts" / "bench.safetensors"))["prompt_embeddings"].shape == (
        4,
        576,
    )


def test_bench_refuses_bad_arguments_before_measuring(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from expertserve.cli.main import main

    assert main(["bench", "--quick", "--size", "full"]) == 2
    assert main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    assert main(["bench", "--quick", "--json", "/proc/no-such-dir/out.json"]) == 2
    err = capsys.readouterr().err
    assert "--quick and --size" in err and "is a directory" in err and "cannot write there" in err


def test_the_load_generator_fails_streams_that_carry_an_error_or_end_early() -> None:
    import asyncio
    import json as _json

    import httpx

    from expertserve.bench.load import _one

    def stream(*events: str) -> httpx.MockTransport:
        body = "".join(f"data: {e}\n\n" for e in events).encode()
        return httpx.MockTransport(lambda request: httpx.Response(200, content=body))

    content = _json.dumps({"choices": [{"delta": {"content": "hi"}}]})
    usage = _json.dumps({"choices": [], "usage": {"completion_tokens": 1}})
    error = _json.dumps({"error": {"message": "engine died", "type": "server_error"}})

    async def one(transport: httpx.MockTransport):
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one(client, "http://x", {})

    ok = asyncio.run(one(stream(content, usage, "[DONE]")))
    assert ok.error is None and ok.output_tokens == 1
    failed = asyncio.run(one(stream(content, error, "[DONE]")))
    assert failed.error == "error event in the stream: engine died"
    cut = asyncio.run(one(stream(content, usage)))
    assert cut.error == "the stream ended without data: [DONE]"
    placed = httpx.MockTransport(
        lambda request: httpx.Response(
            200,
            content=f"data: {content}\n\ndata: {usage}\n\ndata: [DONE]\n\n".encode(),
            headers={"x-expertserve-replica": "r1", "x-expertserve-expert-load-ms": "12"},
        )
    )
    loaded = asyncio.run(one(placed))
    assert (loaded.replica, loaded.loaded) == ("r1", True)
    assert (ok.replica, ok.loaded) == ("", False)


def test_zipf_traffic_favours_the_first_ranks_and_is_fixed_by_its_seed() -> None:
    from expertserve.bench.workload import zipf_order

    names = [f"e{i}" for i in range(1000)]
    order = zipf_order(names, 2000, seed=1)
    assert order == zipf_order(names, 2000, seed=1)
    counts = {n: order.count(n) for n in ("e0", "e1", "e9", "e99")}
    # Rank 1 takes about 1/H(1000, 1.1) ~ 17 % of the traffic; rank 2 about 2^-1.1 of that.
    assert 0.12 < counts["e0"] / 2000 < 0.22
    assert counts["e0"] > counts["e1"] > counts["e9"] > counts["e99"]
    assert len(set(order)) > 300  # a long tail: most requests are not for the top experts


def test_compared_workloads_run_interleaved_and_are_summarised_over_both_runs(monkeypatch) -> None:  # noqa: ANN001
    from expertserve.bench import run as bench_run

    order: list[str] = []

    def fake_load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[Timed], float]:
        side = bodies[0]["model"]
        order.append(side)
        # The machine slows down as the comparison goes on: the later a run, the longer it takes.
        return [Timed(0.1, 1.0, 10)], float(len(order))

    monkeypatch.setattr(bench_run, "run_load", fake_load)
    a, b = bench_run._interleaved("http://x", [{"model": "a"}], [{"model": "b"}], 1)
    assert order == ["a", "b", "b", "a"]
    assert a["output_tokens"] == b["output_tokens"] == 20 and a["wall_s"] == b["wall_s"] == 5.0
    assert ratio(b["output_tokens_per_s"], a["output_tokens_per_s"]) == 1.0  # the drift cancels
    order.clear()
    bench_run._interleaved("http://x", [{"model": "a"}], [{"model": "b"}], 1, rounds=2)
    assert order == ["a", "b", "b", "a"] * 2


def test_server_ports_come_from_outside_the_kernels_ephemeral_range() -> None:
    """Another Ray starting on the machine takes its ports from the ephemeral range while a server started here is
    still starting: a server's port must not come from there (the two-worker suite hit exactly that)."""
    import socket

    from expertserve.bench.servers import SERVER_PORTS, free_port

    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert SERVER_PORTS.stop <= low or SERVER_PORTS.start > high
    port = free_port()
    assert port in SERVER_PORTS
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free when returned
