"""expertserve's vLLM plugin on the CPU LoRA kernels: rows without an adapter (-1) get no LoRA term."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_base_rows_get_no_lora_term_in_a_mixed_batch() -> None:
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from expertserve.engine.vllm_patches import _masked

    # The kernels as vLLM ships them (an in-process engine of an earlier test may have patched the module).
    shrink = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    expand = getattr(lora_ops.bgmv_expand, "__wrapped__", lora_ops.bgmv_expand)
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 3, 5)  # two adapter slots: [slots, 1, rank, hidden]
    inputs = torch.randn(3, 5)
    indices = torch.tensor([0, -1, 1])  # an expert row, a base row, another expert row

    unpatched = torch.zeros(3, 3)
    shrink(inputs, weights, unpatched, indices, 1.0)
    assert torch.allclose(unpatched[1], inputs[1] @ weights[1, 0].T), "vLLM's bug: -1 is the last slot"

    shrunk = torch.zeros(3, 3)
    _masked(shrink)(inputs, weights, shrunk, indices, 1.0)
    assert torch.equal(shrunk[1], torch.zeros(3))
    assert torch.allclose(shrunk[0], inputs[0] @ weights[0, 0].T) and torch.allclose(shrunk[2], unpatched[2])

    b = torch.randn(2, 1, 5, 3)
    out = torch.ones(3, 5)
    _masked(expand)(shrunk, b, out, indices, True)
    assert torch.equal(out[1], torch.ones(5)), "the base row's output is left as it was"
    assert torch.allclose(out[0], 1 + shrunk[0] @ b[0, 0].T)


def test_the_plugin_patches_the_kernels_the_cpu_wrapper_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    from expertserve.engine import vllm_patches

    monkeypatch.setenv(vllm_patches.ENV, "1")
    vllm_patches.register()
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        assert getattr(getattr(punica_cpu, name), "_expertserve", False), name
