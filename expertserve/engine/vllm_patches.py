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

4. JSON whitespace under a grammar. vLLM's `disable_any_whitespace` (needed: with free whitespace small models
pad with spaces until max_tokens) compiles xgrammar 0.2.8 JSON with a mixed style, `{"a":"b", "c":1}` (the colon
without its space, the comma with one; xgrammar issue 945). A model trained on JSON as most data writes it
(`json.dumps`: `{"a": "b", "c": 1}`) is then forced off its own tokens at every key: the shipped JSON expert
scored 65% exact under that grammar and 98% without a grammar on its validation split. EXPERTSERVE_JSON_WHITESPACE
(set from `engine.json_whitespace`) chooses the style JSON and JSON-schema constraints compile with.
"""

from __future__ import annotations

import os

ENV = "EXPERTSERVE_VLLM_PATCHES"
JSON_WHITESPACE_ENV = "EXPERTSERVE_JSON_WHITESPACE"
# xgrammar's compile_json_schema keywords per `engine.json_whitespace` style (config.py documents the styles);
# "vllm" keeps vLLM's own keywords.
JSON_WHITESPACE: dict[str, dict[str, object]] = {
    "spaced": {"any_whitespace": False, "separators": (", ", ": ")},
    "bounded": {"any_whitespace": True, "separators": None, "max_whitespace_cnt": 1},
    "vllm": {},
}


def register() -> None:
    """Entry point: patch when asked to."""
    if os.environ.get(ENV) != "1":
        return
    _patch_cpu_generator_rewind()
    _patch_lora_embedding()
    _patch_cpu_lora_base_rows()
    _patch_json_whitespace(os.environ.get(JSON_WHITESPACE_ENV, "spaced"))


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


class _JsonStyleCompiler:
    """xgrammar's GrammarCompiler with JSON compiled in one whitespace style; everything else passes through."""

    def __init__(self, compiler, style: dict[str, object]) -> None:  # noqa: ANN001 (xgrammar's type)
        self._compiler = compiler
        self._style = style

    def compile_json_schema(self, schema, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return self._compiler.compile_json_schema(schema, **{**kwargs, **self._style})

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._compiler, name)


def _patch_json_whitespace(name: str) -> None:
    style = JSON_WHITESPACE.get(name)
    if style is None:
        raise ValueError(f"{JSON_WHITESPACE_ENV}={name!r}: expected one of {sorted(JSON_WHITESPACE)}")
    if not style:
        return
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    if getattr(XgrammarBackend.__post_init__, "_expertserve", False):
        return
    original = XgrammarBackend.__post_init__

    def post_init(self) -> None:  # noqa: ANN001
        original(self)
        self.compiler = _JsonStyleCompiler(self.compiler, style)

    post_init._expertserve = True  # type: ignore[attr-defined]
    XgrammarBackend.__post_init__ = post_init
