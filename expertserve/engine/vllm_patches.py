"""A vLLM general plugin (entry point group `vllm.general_plugins`, so it also runs inside engine-core
processes) that works around two CPU bugs of vLLM 0.32. It acts only where expertserve's engines set
EXPERTSERVE_VLLM_PATCHES=1, so a plain vLLM server in the same environment is untouched.

1. Seeded sampling crashes the engine on CPU ("CPU Generator does not use offset"): when a sampled token is
discarded (a chunked prefill step), vLLM rewinds the request's generator with `set_offset`, which only CUDA
generators have. The patch hides CPU generators from that rewind (the only `.get` on the generators dict in
this path): sampling still uses the seeded generator, and a seed stays reproducible for the same batch
schedule, but a discarded step's draws are not given back.

2. With LoRA enabled, the token embedding is wrapped in a LoRA layer. When one engine step mixes rows
given as embeddings (soft-prompt requests, `prompt_embeds`) with rows given as token ids, vLLM embeds only the
token-id subset, while the CPU LoRA kernels index the whole batch: einsum fails on the shapes and the engine
dies ("subscript b has size 22 ... previously seen size 2"). expertserve's adapters never adapt the embedding
(the manifest's target_modules allows attention and MLP projections only), so the embedding's LoRA term is
zero and the base embedding is the exact result: that is what the patched forward returns when the sizes
disagree.

3. The CPU LoRA kernels (`bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice` in vllm/lora/ops/torch_ops) index the
adapter weights with -1 for "no LoRA", which wraps to the last slot: a base-model row that shares a step with
adapter rows is computed with another expert's adapter (the GPU kernels skip -1). The patched kernels zero the
inputs of -1 rows, so those rows get no LoRA term, exactly as on GPU. Base-model requests then need no all-zero
adapter (which made every base row pay the LoRA math).
"""

from __future__ import annotations

import os

ENV = "EXPERTSERVE_VLLM_PATCHES"


def register() -> None:
    """Entry point: patch when asked to."""
    if os.environ.get(ENV) != "1":
        return
    _patch_cpu_generator_rewind()
    _patch_lora_embedding()
    _patch_cpu_lora_base_rows()


class _CpuSafeGenerators(dict):
    """The request-index -> generator dict, without CPU generators for `.get` (the rewind path)."""

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        gen = super().get(key, default)
        return (
            default
            if gen is not None and getattr(gen, "device", None) is not None and gen.device.type == "cpu"
            else gen
        )


def _patch_cpu_generator_rewind() -> None:
    from vllm.v1.worker.gpu_input_batch import InputBatch

    if getattr(InputBatch.__init__, "_expertserve", False):
        return
    original = InputBatch.__init__

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        original(self, *args, **kwargs)
        self.generators = _CpuSafeGenerators(self.generators)

    init._expertserve = True  # type: ignore[attr-defined]
    InputBatch.__init__ = init


def _patch_lora_embedding() -> None:
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    if getattr(VocabParallelEmbeddingWithLoRA.forward, "_expertserve", False):
        return
    original = VocabParallelEmbeddingWithLoRA.forward

    def forward(self, x):  # noqa: ANN001, ANN202 (vLLM's signature)
        mapped = getattr(self.punica_wrapper, "token_lora_indices", None)
        if mapped is not None and mapped.shape[0] != x.numel():
            return self.base_layer.forward(x)
        return original(self, x)

    forward._expertserve = True  # type: ignore[attr-defined]
    VocabParallelEmbeddingWithLoRA.forward = forward


def _masked(kernel):  # noqa: ANN001, ANN202 (vLLM's kernels are untyped)
    """`kernel` with the inputs of rows whose LoRA index is -1 zeroed (their LoRA term is then zero)."""

    def run(inputs, weights, output, indices, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if indices.numel() and bool((indices < 0).any()):
            keep = (indices >= 0).to(inputs.dtype)
            if inputs.shape[0] == keep.shape[0]:
                inputs = inputs * keep.unsqueeze(-1)
            indices = indices.clamp(min=0)
        return kernel(inputs, weights, output, indices, *args, **kwargs)

    run._expertserve = True  # type: ignore[attr-defined]
    run.__wrapped__ = kernel  # type: ignore[attr-defined]
    return run


def _patch_cpu_lora_base_rows() -> None:
    import vllm.lora.ops.torch_ops as package
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        original = getattr(lora_ops, name)
        if getattr(original, "_expertserve", False):
            continue
        patched = _masked(original)
        # lora_ops' own sgmv_* (prefill) call these through the module; the CPU wrapper imported them by name.
        for module in (lora_ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, patched)
