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

    from expertserve.engine.vllm_patches import JSON_WHITESPACE, _JsonStyleCompiler
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

    from expertserve.engine import vllm_patches

    with pytest.raises(ValueError, match="EXPERTSERVE_JSON_WHITESPACE='loose': expected one of"):
        vllm_patches._patch_json_whitespace("loose")
    vllm_patches._patch_json_whitespace("spaced")
    assert getattr(XgrammarBackend.__post_init__, "_expertserve", False)
