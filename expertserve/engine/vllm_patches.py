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
adapter rows is computed with another expert's adapter (the GPU kernels skip -1). They are also slow: every row
(every token of a prefill) gathers its own copy of its adapter's weight matrix before one batched product, so a
decode step of 8 adapter rows ran 3x slower than 8 base rows, and base rows paid the same math on zeros. The
replacement kernels group the rows by adapter: one matrix product per adapter in the step on that adapter's weights
in place, nothing at all for rows without an adapter (-1: no LoRA term, exactly as on GPU), and no LoRA work in
a step whose rows have none. Base-model requests then need no all-zero adapter.

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
    _patch_cpu_lora_steps()
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


def _groups(indices):  # noqa: ANN001, ANN202
    """The step's rows per adapter slot: None when no row has an adapter, [(slot, None)] when every row has the
    same one, else [(slot, row indices)] per slot (rows of -1 belong to none)."""
    import torch

    ids = torch.unique(indices).tolist() if indices.numel() else []
    if not ids or ids[-1] < 0:
        return None
    if len(ids) == 1:
        return [(ids[0], None)]
    return [(slot, (indices == slot).nonzero(as_tuple=True)[0]) for slot in ids if slot >= 0]


def _lora_term(inputs, weights, indices, dtype):  # noqa: ANN001, ANN202 (torch tensors)
    """Per row r, inputs[r] @ weights[indices[r]].T in `dtype`, zero where indices[r] < 0; None when no row has
    an adapter. One product per distinct adapter, on its weight matrix in place (vLLM's kernels copy the matrix
    once per row)."""
    import torch

    groups = _groups(indices)
    if groups is None:
        return None
    slots = weights.squeeze(1) if weights.dim() == 4 else weights  # [slots, out, in]
    inputs = inputs.to(dtype)
    if groups[0][1] is None:  # every row has the same adapter
        return inputs @ slots[groups[0][0]].to(dtype).T
    out = torch.zeros(inputs.shape[0], slots.shape[1], dtype=dtype, device=inputs.device)
    for slot, rows in groups:
        out.index_copy_(0, rows, inputs.index_select(0, rows) @ slots[slot].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):  # noqa: ANN001, ANN201
    """vLLM's `bgmv_shrink` contract (output[:, :rank] = scaling * x @ A.T per row), grouped by adapter."""
    term = _lora_term(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    rank = lora_a_weights.shape[-2]
    if term is None:
        output_tensor[:, :rank] = 0
    else:
        output_tensor[:, :rank] = scaling * term


def _limit(term, output_tensor):  # noqa: ANN001, ANN202
    # vLLM's expand broadcasts a single computed row over a longer output.
    return 1 if term.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):  # noqa: ANN001, ANN201
    """vLLM's `bgmv_expand` contract (output[:, :n] (+)= x @ B.T per row), grouped by adapter."""
    term = _lora_term(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    if term is None:
        if not add_inputs:
            output_tensor[:, :common] = 0
        return
    if add_inputs:
        output_tensor[:, :common] += term[: _limit(term, output_tensor), :common]
    else:
        output_tensor[:, :common] = term[: _limit(term, output_tensor), :common]


def bgmv_expand_slice(  # noqa: ANN201
    inputs,  # noqa: ANN001
    lora_b_weights,  # noqa: ANN001
    output_tensor,  # noqa: ANN001
    lora_indices_tensor,  # noqa: ANN001
    slice_offset,  # noqa: ANN001
    slice_size,  # noqa: ANN001
    add_inputs=True,  # noqa: ANN001
):
    """vLLM's `bgmv_expand_slice` contract (one slice of the output), grouped by adapter."""
    term = _lora_term(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if term is None:
        if not add_inputs:
            target.zero_()
    elif add_inputs:
        target += term
    else:
        target.copy_(term)


# vLLM's own kernels, kept when the plugin replaces them (tests show the bug they fix).
SHIPPED_KERNELS: dict[str, object] = {}
KERNELS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
for _kernel in KERNELS.values():
    _kernel._expertserve = True  # type: ignore[attr-defined]


class _Float32Stacks:
    """float32 copies of vLLM's stacked LoRA weights ([slots, 1, out, in] per layer and slice), the slices of a
    layer's A side concatenated: one shrink product per layer. A copy is rebuilt when its source tensors were
    written (loading an adapter into a slot bumps their version counter), so it never serves stale weights."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[tuple, tuple[int, ...], object]] = {}

    def get(self, stacks: tuple):  # noqa: ANN201 (a torch tensor)
        import torch

        key = id(stacks[0])
        versions = tuple(t._version for t in stacks)
        entry = self._copies.get(key)
        if (
            entry is None
            or entry[1] != versions
            or any(a is not b for a, b in zip(entry[0], stacks, strict=True))
        ):
            flat = [t.flatten(0, 1) if t.dim() == 4 else t for t in stacks]  # [slots, out, in]
            entry = (tuple(stacks), versions, torch.cat(flat, dim=1).float())
            self._copies[key] = entry
        return entry[2]


_STACKS = _Float32Stacks()


def _add_lora(y, x, lora_a, lora_b, scale, output_slices, groups) -> None:  # noqa: ANN001
    """y[rows, slice] += scale * x[rows] @ A.T @ B.T per adapter group and output slice, in float32 (vLLM's CPU
    kernels shrink in float32 too; small bf16 products take twice as long here)."""
    a_all = _STACKS.get(tuple(lora_a))
    b_each = [_STACKS.get((b,)) for b in lora_b]
    for slot, rows in groups:
        xs = (x if rows is None else x.index_select(0, rows)).float()
        shrunk = xs @ a_all[slot].T  # [rows, slices * rank]
        if scale != 1.0:
            shrunk *= scale
        offset = 0
        for i, (b, size) in enumerate(zip(b_each, output_slices, strict=True)):
            rank = b.shape[2]
            delta = shrunk[:, i * rank : (i + 1) * rank] @ b[slot].T
            width = min(size, delta.shape[1], y.shape[1] - offset)
            target = y[:, offset : offset + width]
            if rows is None:
                target.add_(delta[:, :width])
            else:
                target.index_add_(0, rows, delta[:, :width].to(y.dtype))
            offset += size


def _patch_cpu_lora_steps() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if getattr(PunicaWrapperCPU.update_metadata, "_expertserve", False):
        return
    update = PunicaWrapperCPU.update_metadata

    def update_metadata(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        update(self, *args, **kwargs)
        # Once per step, not once per layer and slice: the rows of each adapter.
        self._expertserve_tokens = _groups(self.token_lora_indices)
        self._expertserve_sampler = _groups(self.sampler_indices)

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs
    ):  # noqa: ANN001, ANN003, ARG001, E501
        groups = self._expertserve_tokens
        if groups is not None:
            _add_lora(
                y.view(-1, y.shape[-1]),
                x.view(-1, x.shape[-1]),
                lora_a_stacked,
                lora_b_stacked,
                scale,
                output_slices,
                groups,
            )

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):  # noqa: ANN001, ANN003, ARG001, E501
        groups = self._expertserve_sampler
        if groups is not None:
            width = lora_b_stacked.shape[-2]
            _add_lora(
                y.view(-1, y.shape[-1]),
                x.view(-1, x.shape[-1]),
                (lora_a_stacked,),
                (lora_b_stacked,),
                scale,
                (width,),
                groups,
            )

    for method in (update_metadata, add_lora_linear, add_lora_logits):
        setattr(method, "_expertserve", True)  # noqa: B010 (a marker on a function object)
        setattr(PunicaWrapperCPU, method.__name__, method)


def _patch_cpu_lora_base_rows() -> None:
    import vllm.lora.ops.torch_ops as package
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name, kernel in KERNELS.items():
        if getattr(getattr(lora_ops, name), "_expertserve", False):
            continue
        SHIPPED_KERNELS[name] = getattr(lora_ops, name)
        # lora_ops' own sgmv_* (prefill) call these through the module; the CPU wrapper imported them by name.
        for module in (lora_ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, kernel)


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
