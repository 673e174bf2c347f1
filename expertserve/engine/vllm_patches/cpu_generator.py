"""Seeded sampling crashes the engine on CPU ("CPU Generator does not use offset").

When a sampled token is discarded (a chunked prefill step), vLLM rewinds the request's generator with `set_offset`,
which only CUDA generators have (the rewind came with vllm-project/vllm#10097, "relies on cuda-specific torch-internal
impl details"). The patch hides CPU generators from that rewind (the only `.get` on the generators dict in this
path): sampling still uses the seeded generator, and a seed stays reproducible for the same batch schedule, but a
discarded step's draws are not given back.

Remove when: vLLM's input batch skips the rewind for CPU generators (check `InputBatch` / the model runner's
discard path on each vLLM upgrade; the seeded-sampling test in tests/integration/test_vllm_patches.py fails
without the patch).
"""

from __future__ import annotations

from expertserve.engine.vllm_patches.guard import verified

VERIFIED = ("0.32.0",)


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


def apply() -> None:
    """Installs the patch (once) after checking the installed vLLM."""
    verified("cpu_generator", VERIFIED)
    _patch_cpu_generator_rewind()
