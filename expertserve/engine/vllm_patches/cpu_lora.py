"""CPU LoRA kernels: rows without an adapter get no LoRA term, and a step costs a few products per layer.

vLLM's CPU LoRA kernels (`bgmv_shrink`, `bgmv_expand`, `bgmv_expand_slice` in vllm/lora/ops/torch_ops) index the
adapter weights with -1 for "no LoRA", which wraps to the last slot: a base-model row that shares a step with
adapter rows is computed with another expert's adapter (the GPU kernels skip -1; vllm-project/vllm#48421 proposes
the same masking upstream). They are also slow: every row (every token of a prefill) gathers its own copy of its
adapter's weight matrix before one batched product, so a decode step of 8 adapter rows ran 3x slower than 8 base
rows, and base rows paid the same math on zeros. The replacement groups the rows by adapter: one matrix product per
adapter in the step on float32 copies of that adapter's weights laid out for few products per layer (or one product
over every slot for a short step), nothing at all for rows without an adapter (-1: no LoRA term, exactly as on GPU),
and no LoRA work in a step whose rows have none. Base-model requests then need no all-zero adapter.

Remove when: the base-row bug is fixed upstream (vllm-project/vllm#48421) *and* vLLM's CPU LoRA path is within a few
percent of these kernels in `expertserve bench` (the speed part has no upstream counterpart yet).
"""

from __future__ import annotations

from typing import Any

from expertserve.engine.vllm_patches.guard import verified

VERIFIED = ("0.32.0",)


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
    """float32 copies of vLLM's stacked LoRA weights ([slots, 1, out, in] per layer and slice), laid out for few
    products per layer (see _Layer). vLLM loads an adapter into a slot by writing the stacked tensors in place, always
    through the layer's `reset_lora(slot)` first (patched to mark the slot here): the copy then refreshes that slot
    only. A write without the mark (their version counters moved, no slot marked) rebuilds the whole copy, so a copy
    never serves stale weights."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[tuple, tuple[int, ...], _Layer]] = {}
        self._dirty: dict[int, set[int]] = {}

    def mark(self, first_a, slot: int) -> None:  # noqa: ANN001 (a torch tensor)
        """Slot `slot` of the layer whose first A stack is `first_a` is being rewritten."""
        self._dirty.setdefault(id(first_a), set()).add(slot)

    def get(self, lora_a: tuple, lora_b: tuple, output_slices: tuple[int, ...]) -> _Layer:
        stacks = (*lora_a, *lora_b)
        key = id(stacks[0])
        versions = tuple(t._version for t in stacks)
        entry = self._copies.get(key)
        same = entry is not None and all(a is b for a, b in zip(entry[0], stacks, strict=True))
        if entry is not None and same and entry[1] == versions:
            return entry[2]
        dirty = self._dirty.pop(key, None)
        if entry is not None and same and dirty:
            entry[2].refresh(lora_a, lora_b, dirty)
            layer = entry[2]
        else:
            layer = _Layer(lora_a, lora_b, output_slices)
        self._copies[key] = (stacks, versions, layer)
        return layer


class _Layer:
    """One LoRA layer's adapter slots in float32: the A sides of its slices concatenated ([slots, slices * rank, in]:
    one shrink product), the B sides block-diagonal ([slots, out of all slices, slices * rank]: one expand product),
    and both over every slot for a step's single product (`dense`)."""

    def __init__(self, lora_a: tuple, lora_b: tuple, output_slices: tuple[int, ...]) -> None:
        import torch

        first_a = lora_a[0]
        self.slots = first_a.shape[0]
        self.inner = sum(t.shape[-2] for t in lora_a)
        self.width = sum(output_slices)
        self.output_slices = output_slices
        self.a = torch.zeros(self.slots, self.inner, first_a.shape[-1])
        self.b = torch.zeros(self.slots, self.width, self.inner)
        self._dense_b = None
        self.refresh(lora_a, lora_b, range(self.slots))

    def refresh(self, lora_a: tuple, lora_b: tuple, slots) -> None:  # noqa: ANN001 (an iterable of ints)
        """Copies `slots` from vLLM's stacks (every slot when built; the slots vLLM rewrote after)."""
        import torch

        flat_a = [t.flatten(0, 1) if t.dim() == 4 else t for t in lora_a]  # [slots, rank, in]
        flat_b = [t.flatten(0, 1) if t.dim() == 4 else t for t in lora_b]  # [slots, out, rank]
        index = torch.tensor(sorted(slots))
        self.a[index] = torch.cat([t[index] for t in flat_a], dim=1).float()
        block = torch.zeros(len(index), self.width, self.inner)
        offset = column = 0
        for b, size in zip(flat_b, self.output_slices, strict=True):
            rank, rows = b.shape[2], min(size, b.shape[1])
            block[:, offset : offset + rows, column : column + rank] = b[index, :rows].float()
            offset, column = offset + size, column + rank
        self.b[index] = block
        if self._dense_b is not None:
            view = self._dense_b.view(self.width, self.slots, self.inner)
            view[:, index] = block.permute(1, 0, 2)

    def dense(self) -> tuple[Any, Any]:  # torch tensors (torch is imported lazily)
        """A over every slot [slots * inner, in] and B over every slot [width, slots * inner]."""
        if self._dense_b is None:
            self._dense_b = self.b.permute(1, 0, 2).flatten(1, 2).contiguous()
        return self.a.flatten(0, 1), self._dense_b


_STACKS = _Float32Stacks()
# A step of at most this many rows over more than one adapter takes one product over every adapter slot, each row
# masked to its own slot's block (a few larger products instead of a few small ones per adapter); a longer step takes
# one product per adapter on its rows. Measured here (SmolLM2-135M's 120 LoRA layers, 9 slots, bf16, AMD EPYC 2 cores),
# ms per step, per adapter / over every slot: 8 rows of 5 adapters 27 / 25, 16 rows of 8 adapters 62 / 36, 24 rows of
# 5 adapters 32 / 32, 32 rows 37 / 54, 48 rows 41-46 / 43-72 (vLLM's own kernels: 42, 86, 55, 61, 71-75).
DENSE_ROWS = 24


class _StepRows:
    """The rows of one engine step by adapter slot, computed once per step rather than once per layer and slice."""

    def __init__(self, indices) -> None:  # noqa: ANN001 (a torch tensor)
        self.indices = indices
        self.groups = _groups(indices)
        self._masks: dict[tuple[int, int], object] = {}

    def mask(self, slots: int, inner: int):  # noqa: ANN201 (a torch tensor)
        """[rows, slots * inner] float32: ones over each row's own slot block, none for rows without an adapter."""
        import torch

        found = self._masks.get((slots, inner))
        if found is None:
            own = (self.indices[:, None] == torch.arange(slots)[None, :]).float()
            found = own.repeat_interleave(inner, dim=1)
            self._masks[(slots, inner)] = found
        return found


def _add_lora(y, x, lora_a, lora_b, scale, output_slices, step) -> None:  # noqa: ANN001
    """y[rows, slice] += scale * x[rows] @ A.T @ B.T per adapter and output slice, in float32 (vLLM's CPU kernels
    shrink in float32 too; small bf16 products take twice as long here). `step` is a _StepRows; its groups are not
    None (rows without any adapter get no LoRA work)."""
    layer = _STACKS.get(tuple(lora_a), tuple(lora_b), tuple(output_slices))
    width = min(layer.width, y.shape[1])
    xf = x.float()
    groups = step.groups
    rows_n = x.shape[0]
    if len(groups) > 1 and rows_n <= DENSE_ROWS and rows_n == step.indices.shape[0]:
        a_all, b_all = layer.dense()
        shrunk = xf @ a_all.T  # [rows, slots * inner]: every slot's shrink, kept only for the row's own slot
        shrunk *= step.mask(layer.slots, layer.inner)
        if scale != 1.0:
            shrunk *= scale
        y[:, :width] += (shrunk @ b_all.T)[:, :width].to(y.dtype)
        return
    for slot, rows in groups:
        xs = xf if rows is None else xf.index_select(0, rows)
        shrunk = xs @ layer.a[slot].T  # [rows, slices * rank]
        if scale != 1.0:
            shrunk *= scale
        delta = (shrunk @ layer.b[slot].T)[:, :width]  # the slices' B blocks side by side: one product
        if rows is None:
            y[:, :width] += delta.to(y.dtype)
        else:
            y[:, :width].index_add_(0, rows, delta.to(y.dtype))


def _patch_slot_writes() -> None:
    """Every vLLM write of an adapter slot starts with the layer's `reset_lora(slot)`: mark that slot for the
    float32 copies (see _Float32Stacks)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    for cls in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        original = cls.reset_lora
        if getattr(original, "_expertserve", False):
            continue

        def reset_lora(self, index: int, _original=original) -> None:  # noqa: ANN001
            stacks = self.lora_a_stacked
            _STACKS.mark(stacks[0] if isinstance(stacks, tuple | list) else stacks, index)
            _original(self, index)

        reset_lora._expertserve = True  # type: ignore[attr-defined]
        cls.reset_lora = reset_lora


def _patch_cpu_lora_steps() -> None:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _patch_slot_writes()

    if getattr(PunicaWrapperCPU.update_metadata, "_expertserve", False):
        return
    update = PunicaWrapperCPU.update_metadata

    def update_metadata(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        update(self, *args, **kwargs)
        # Once per step, not once per layer and slice: the rows of each adapter.
        self._expertserve_tokens = _StepRows(self.token_lora_indices)
        self._expertserve_sampler = _StepRows(self.sampler_indices)

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs
    ):  # noqa: ANN001, ANN003, ARG001, E501
        step = self._expertserve_tokens
        if step.groups is not None:
            _add_lora(
                y.view(-1, y.shape[-1]),
                x.view(-1, x.shape[-1]),
                lora_a_stacked,
                lora_b_stacked,
                scale,
                output_slices,
                step,
            )

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):  # noqa: ANN001, ANN003, ARG001, E501
        step = self._expertserve_sampler
        if step.groups is not None:
            width = lora_b_stacked.shape[-2]
            _add_lora(
                y.view(-1, y.shape[-1]),
                x.view(-1, x.shape[-1]),
                (lora_a_stacked,),
                (lora_b_stacked,),
                scale,
                (width,),
                step,
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


def apply() -> None:
    """Installs the kernels and the step hooks (once) after checking the installed vLLM."""
    verified("cpu_lora", VERIFIED)
    _patch_cpu_lora_base_rows()
    _patch_cpu_lora_steps()
