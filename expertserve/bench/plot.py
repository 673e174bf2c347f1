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
    fig.suptitle(f"expertserve bench ({results['size']}): {m['cores']} cores, {m['memory_gib']} GiB, {m['device']}")

    s = results["stack"]
    labels = ["output tok/s", "TTFT p50 (ms)", "latency p50 (ms)"]
    keys = ["output_tokens_per_s", "ttft_ms_p50", "latency_ms_p50"]
    x = range(len(keys))
    ax[0][0].bar([i - 0.2 for i in x], [s["vllm"][k] for k in keys], 0.4, label="vLLM OpenAI server")
    ax[0][0].bar([i + 0.2 for i in x], [s["expertserve"][k] for k in keys], 0.4, label="expertserve")
    ax[0][0].set_xticks(list(x), labels)
    ax[0][0].set_title(f"1. stack: ours / vLLM throughput {results['stack_throughput_ratio']:.2f}x")
    ax[0][0].legend()

    e = results["experts"]
    names = ["base", "mixed1", "mixed8", "mixed32"]
    ax[0][1].bar(["base only", "1 expert", "8 experts", "32 experts"], [e[n]["output_tokens_per_s"] for n in names])
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
    twin.bar(["no soft prompt", "soft prompt"], [sp["without"]["output_tokens_per_s"],
                                                 sp["with"]["output_tokens_per_s"]], color="tab:purple")
    twin.set_ylabel("output tokens/s")
    ax[1][1].set_title(f"4. routing +{results['routing_added_ms_p50']:.1f} ms; "
                       f"5. soft prompt {results['softprompt_throughput_ratio']:.2f}x")
    ax[1][1].tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
