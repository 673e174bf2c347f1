"""The benchmark's PNG: one panel per scenario."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> None:
    """Writes a 2x2 figure of the stack, many-experts, cold/warm and routing + soft-prompt figures."""
    import matplotlib

    matplotlib.use("Agg")  # no screen here, and none needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    m = results["machine"]
    fig.suptitle(
        f"expertserve bench ({results['size']}): {m['cores']} cores, {m['memory_gib']} GiB, {m['device']}"
    )

    ratios = results["stack"]["ratios"]
    labels = ["output\ntok/s", "TTFT\np50", "TTFT\np99", "latency\np50", "latency\np99"]
    keys = ["output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "latency_ms_p50", "latency_ms_p99"]
    ax[0][0].bar(labels, [ratios[k] for k in keys], color=["tab:blue"] + ["tab:orange"] * 4)
    ax[0][0].axhline(1.0, color="black", linewidth=1)
    ax[0][0].axhline(0.95, color="tab:blue", linestyle="--", linewidth=1, label="throughput target 0.95")
    ax[0][0].set_ylabel("expertserve / vLLM OpenAI server")
    ax[0][0].set_title(
        f"1. stack: throughput {results['stack_throughput_ratio']:.2f}x vLLM (higher is better; "
        "times: lower)",
        fontsize=9,
    )
    ax[0][0].legend(fontsize=8)

    e = results["experts"]
    names = ["base", "mixed1", "mixed8", "mixed32"]
    ax[0][1].bar(
        ["base only", "1 expert", "8 experts", "32 experts"], [e[n]["output_tokens_per_s"] for n in names]
    )
    ax[0][1].set_ylabel("output tokens/s")
    ax[0][1].set_title(f"2. many experts: 8 mixed / base {results['mixed8_throughput_ratio']:.2f}x")

    c = results["cold_warm"]
    ax[1][0].bar(["cold (first request)", "warm"], [c["cold_ttft_ms_p50"], c["warm_ttft_ms_p50"]])
    ax[1][0].set_ylabel("TTFT p50 (ms)")
    ax[1][0].set_title(f"3. cold / warm TTFT {results['cold_warm_ttft_ratio']:.2f}x")

    r, sp = results["routing"], results["softprompt"]
    ax[1][1].bar(["named expert", "model: auto"], [r["named_ms_p50"], r["auto_ms_p50"]], color="tab:green")
    ax[1][1].set_ylabel("one-token latency p50 (ms)")
    twin = ax[1][1].twinx()
    twin.bar(
        ["no soft prompt", "soft prompt"],
        [sp["without"]["output_tokens_per_s"], sp["with"]["output_tokens_per_s"]],
        color="tab:purple",
    )
    twin.set_ylabel("output tokens/s")
    ax[1][1].set_title(
        f"4. routing +{results['routing_added_ms_p50']:.1f} ms; "
        f"5. soft prompt {results['softprompt_throughput_ratio']:.2f}x"
    )
    ax[1][1].tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
