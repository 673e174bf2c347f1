"""expertserve's vLLM plugin on the CPU LoRA kernels: rows without an adapter (-1) get no LoRA term."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine


def _reference(x, a_slices, b_slices, indices, scale, init):  # noqa: ANN001, ANN202
    """Row by row, in float32: y[r] += scale * x[r] @ A[slot].T @ B[slot].T per output slice; no term for -1."""
    y = init.clone()
    for r, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        offset = 0
        for a, b in zip(a_slices, b_slices, strict=True):
            delta = (x[r].float() @ a[slot, 0].float().T) * scale @ b[slot, 0].float().T
            y[r, offset : offset + delta.shape[0]] += delta.to(y.dtype)
            offset += delta.shape[0]
    return y


def test_base_rows_get_no_lora_term_in_a_mixed_batch() -> None:
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from expertserve.engine.vllm_patches import cpu_lora

    # The kernel as vLLM ships it (an in-process engine of an earlier test may have patched the module).
    shipped = cpu_lora.SHIPPED_KERNELS.get("bgmv_shrink", lora_ops.bgmv_shrink)
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 3, 5)  # two adapter slots: [slots, 1, rank, hidden]
    inputs = torch.randn(3, 5)
    indices = torch.tensor([0, -1, 1])  # an expert row, a base row, another expert row
    unpatched = torch.zeros(3, 3)
    shipped(inputs, weights, unpatched, indices, 1.0)
    assert torch.allclose(unpatched[1], inputs[1] @ weights[1, 0].T), "vLLM's bug: -1 is the last slot"

    shrunk = torch.full((3, 3), 7.0)
    cpu_lora.bgmv_shrink(inputs, weights, shrunk, indices, 1.0)
    assert torch.equal(shrunk[1], torch.zeros(3))
    assert torch.allclose(shrunk[0], inputs[0] @ weights[0, 0].T)
    assert torch.allclose(shrunk[2], inputs[2] @ weights[1, 0].T)

    b = torch.randn(2, 1, 5, 3)
    out = torch.ones(3, 5)
    cpu_lora.bgmv_expand(shrunk, b, out, indices, True)
    assert torch.equal(out[1], torch.ones(5)), "the base row's output is left as it was"
    assert torch.allclose(out[0], 1 + shrunk[0] @ b[0, 0].T)
    sliced = torch.ones(3, 9)
    cpu_lora.bgmv_expand_slice(shrunk, b, sliced, indices, 2, 5, False)
    assert torch.equal(sliced[1, 2:7], torch.zeros(5)) and torch.equal(sliced[:, :2], torch.ones(3, 2))
    assert torch.allclose(sliced[2, 2:7], shrunk[2] @ b[1, 0].T)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "rows",
    [[1] * 6, [-1] * 6, [0, 1, -1, 2, 2, -1], [3, 3, 0, 0, 0, 3]],
    ids=["one-adapter", "no-adapter", "mixed-with-base", "two-adapters"],
)
@pytest.mark.parametrize("dense_rows", [0, 64], ids=["per-adapter", "over-every-slot"])
def test_grouped_lora_step_matches_the_row_by_row_definition(
    dtype: str, rows: list[int], dense_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from expertserve.engine.vllm_patches import cpu_lora

    monkeypatch.setattr(cpu_lora, "DENSE_ROWS", dense_rows)

    dt = getattr(torch, dtype)
    torch.manual_seed(1)
    slices = (16, 8, 8)  # a fused q/k/v projection
    a = tuple(torch.randn(4, 1, 4, 12, dtype=dt) for _ in slices)
    b = tuple(torch.randn(4, 1, n, 4, dtype=dt) for n in slices)
    x = torch.randn(6, 12, dtype=dt)
    indices = torch.tensor(rows)
    want = _reference(x, a, b, indices, 0.5, torch.ones(6, 32, dtype=dt))
    got = torch.ones(6, 32, dtype=dt)
    step = cpu_lora._StepRows(indices)
    assert (step.groups is None) == all(r < 0 for r in rows)
    if step.groups is not None:
        cpu_lora._add_lora(got, x, a, b, 0.5, slices, step)
    tolerance = {"atol": 1e-4} if dt == torch.float32 else {"atol": 0.1, "rtol": 0.02}
    assert torch.allclose(got.float(), want.float(), **tolerance)
    for r in (i for i, slot in enumerate(rows) if slot < 0):
        assert torch.equal(got[r], torch.ones(32, dtype=dt)), "a base row gets no LoRA term"


def test_a_slot_loaded_with_another_adapter_is_not_served_from_a_stale_float32_copy() -> None:
    import torch

    from expertserve.engine.vllm_patches import cpu_lora

    a = (torch.randn(2, 1, 4, 6, dtype=torch.bfloat16),)
    b = (torch.randn(2, 1, 5, 4, dtype=torch.bfloat16),)
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    first = torch.zeros(3, 5, dtype=torch.bfloat16)
    step = cpu_lora._StepRows(torch.tensor([1, 1, 1]))
    cpu_lora._add_lora(first, x, a, b, 1.0, (5,), step)
    assert first.abs().sum() > 0
    # vLLM loads an adapter into a slot by copying into the stacked tensors in place.
    b[0][1, 0].copy_(torch.zeros(5, 4))
    again = torch.zeros(3, 5, dtype=torch.bfloat16)
    cpu_lora._add_lora(again, x, a, b, 1.0, (5,), step)
    assert torch.equal(again, torch.zeros(3, 5, dtype=torch.bfloat16))
    # The same for a step over both slots (one product over every slot, built from the same copy).
    mixed = torch.zeros(3, 5, dtype=torch.bfloat16)
    cpu_lora._add_lora(mixed, x, a, b, 1.0, (5,), cpu_lora._StepRows(torch.tensor([1, 0, 1])))
    assert torch.equal(mixed[0], torch.zeros(5, dtype=torch.bfloat16)) and mixed[1].abs().sum() > 0


def test_the_plugin_patches_the_kernels_the_cpu_wrapper_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    from expertserve.engine import vllm_patches

    monkeypatch.setenv(vllm_patches.ENV, "1")
    vllm_patches.register()
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        assert getattr(getattr(punica_cpu, name), "_expertserve", False), name
    for name in ("update_metadata", "add_lora_linear", "add_lora_logits"):
        assert getattr(getattr(punica_cpu.PunicaWrapperCPU, name), "_expertserve", False), name
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import QKVParallelLinearWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    for cls in (BaseLinearLayerWithLoRA, QKVParallelLinearWithLoRA, LogitsProcessorWithLoRA):
        assert getattr(cls.reset_lora, "_expertserve", False), f"{cls.__name__}: slot writes are marked"


@pytest.mark.parametrize(
    ("style", "accepted", "refused"),
    [
        ("spaced", '{"name": "Ana", "age": 41}', '{"name":"Ana", "age":41}'),
        # vLLM's own disable_any_whitespace as xgrammar 0.2.8 compiles it: the mixed style the plugin replaces.
        ("vllm", '{"name":"Ana", "age":41}', '{"name": "Ana", "age": 41}'),
        ("bounded", '{"name": "Ana","age":41}', '{"name":  "Ana"}'),
    ],
)
def test_json_constraints_compile_in_the_configured_whitespace_style(
    style: str, accepted: str, refused: str
) -> None:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from expertserve.engine.vllm_patches.json_whitespace import JSON_WHITESPACE, _JsonStyleCompiler
    from expertserve.models import offline

    tokenizer = AutoTokenizer.from_pretrained(offline.prepared_model_dir())
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
    # The keywords vLLM's xgrammar backend passes with disable_any_whitespace; the style overrides them.
    styled = _JsonStyleCompiler(compiler, JSON_WHITESPACE[style])
    ctx = styled.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"))

    def complete(text: str) -> bool:
        matcher = xgr.GrammarMatcher(ctx)
        return matcher.accept_string(text) and matcher.is_completed()

    assert complete(accepted)
    assert not complete(refused)
    assert styled.compile_regex("a+") is not None  # everything but JSON passes through


def test_the_plugin_refuses_an_unknown_json_style_and_patches_the_xgrammar_backend() -> None:
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    from expertserve.engine.vllm_patches import json_whitespace

    with pytest.raises(ValueError, match="EXPERTSERVE_JSON_WHITESPACE='loose': expected one of"):
        json_whitespace._patch_json_whitespace("loose")
    json_whitespace._patch_json_whitespace("spaced")
    assert getattr(XgrammarBackend.__post_init__, "_expertserve", False)


def test_a_rewritten_slot_is_refreshed_alone_and_matches_a_full_copy() -> None:
    import torch

    from expertserve.engine.vllm_patches import cpu_lora

    torch.manual_seed(2)
    slices = (6, 4)
    a = tuple(torch.randn(3, 1, 2, 5, dtype=torch.bfloat16) for _ in slices)
    b = tuple(torch.randn(3, 1, n, 2, dtype=torch.bfloat16) for n in slices)
    layer = cpu_lora._STACKS.get(a, b, slices)
    layer.dense()  # the over-every-slot copy is refreshed too
    untouched = layer.a[0].clone()
    # What vLLM's set_lora does for slot 2 (reset_lora marks it), then a new adapter's weights.
    cpu_lora._STACKS.mark(a[0], 2)
    for t in (*a, *b):
        t[2] = torch.randn_like(t[2])
    refreshed = cpu_lora._STACKS.get(a, b, slices)
    assert refreshed is layer, "refreshed in place, not rebuilt"
    full = cpu_lora._Layer(a, b, slices)
    assert torch.equal(refreshed.a, full.a) and torch.equal(refreshed.b, full.b)
    assert torch.equal(refreshed.dense()[1], full.dense()[1])
    assert torch.equal(refreshed.a[0], untouched)


def test_every_patch_refuses_a_vllm_it_was_not_verified_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from expertserve.engine.vllm_patches import cpu_generator, cpu_lora, json_whitespace, lora_embedding
    from expertserve.engine.vllm_patches.guard import OVERRIDE_ENV, UnverifiedVLLM, installed_vllm, verified

    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    for module in (cpu_generator, cpu_lora, json_whitespace, lora_embedding):
        assert installed_vllm() in module.VERIFIED, module.__name__  # the pinned vLLM is the verified one
        with pytest.raises(UnverifiedVLLM, match="verified on vLLM 0.32.0; this environment has 0.33.0"):
            verified(module.__name__, module.VERIFIED, installed="0.33.0")
    verified("cpu_lora", cpu_lora.VERIFIED, installed="0.32.0+cpu")  # a local build tag is the same release
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    verified("cpu_lora", cpu_lora.VERIFIED, installed="0.33.0")  # an operator who checked it by hand


def test_the_engine_start_fails_loudly_on_an_unverified_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    from expertserve.engine import vllm_patches
    from expertserve.engine.vllm_patches import guard

    monkeypatch.delenv(guard.OVERRIDE_ENV, raising=False)
    monkeypatch.setenv(vllm_patches.ENV, "1")
    monkeypatch.setattr(guard, "installed_vllm", lambda: "0.40.1")
    with pytest.raises(guard.UnverifiedVLLM, match="cpu_generator"):
        vllm_patches.register()
