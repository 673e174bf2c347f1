"""The engine dtype follows the hardware: bf16 only where it is native (GPU, AVX-512 BF16, AMX)."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertserve.engine.args import engine_kwargs
from expertserve.engine.config import EngineConfig
from expertserve.engine.hardware import CpuInfo, choose_dtype, cpu_info

AVX2 = CpuInfo("AMD EPYC 7B13", frozenset({"sse4_2", "avx", "avx2", "fma"}))
ZEN4 = CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SPR = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"}))


def test_auto_is_bf16_only_where_bf16_is_native() -> None:
    assert choose_dtype("auto", gpu=False, cpu=AVX2)[0] == "float32"
    assert "no native bf16" in choose_dtype("auto", gpu=False, cpu=AVX2)[1]
    assert choose_dtype("auto", gpu=False, cpu=ZEN4) == (
        "bfloat16",
        "auto on AMD EPYC 9B14, which has native bf16 (avx512_bf16): bfloat16",
    )
    assert choose_dtype("auto", gpu=False, cpu=SPR)[0] == "bfloat16"
    assert choose_dtype("auto", gpu=True, cpu=AVX2)[0] == "bfloat16"
    assert choose_dtype("float16", gpu=False, cpu=AVX2) == ("float16", "engine.dtype is set to float16")


def test_cpu_info_reads_the_model_and_relevant_flags(tmp_path: Path) -> None:
    proc = tmp_path / "cpuinfo"
    proc.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512_bf16\n"
    )
    info = cpu_info(proc)
    assert info.model == "AMD EPYC 7B13" and not info.native_bf16
    assert info.to_dict() == {"model": "AMD EPYC 7B13", "flags": ["avx2"], "native_bf16": False}
    assert cpu_info(tmp_path / "missing").flags == frozenset()


def test_the_engine_gets_the_chosen_dtype() -> None:
    kwargs = engine_kwargs(
        EngineConfig(dtype="auto"), model_dir=Path("/m"), max_lora_rank=8, prefix_caching=None
    )
    assert kwargs["dtype"] == choose_dtype("auto")[0] and kwargs["dtype"] in ("float32", "bfloat16")
    assert (
        engine_kwargs(
            EngineConfig(dtype="float32"), model_dir=Path("/m"), max_lora_rank=8, prefix_caching=None
        )["dtype"]
        == "float32"
    )


def test_prefix_caching_on_cpu_gets_blocks_a_soft_prompt_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    def kwargs(config: EngineConfig, caching: bool | None) -> dict:
        return engine_kwargs(config, model_dir=Path("/m"), max_lora_rank=8, prefix_caching=caching)

    monkeypatch.setenv("EXPERTSERVE_DEVICE", "cpu")
    assert kwargs(EngineConfig(), True)["block_size"] == 32
    assert "block_size" not in kwargs(EngineConfig(), False) and "block_size" not in kwargs(
        EngineConfig(), None
    )
    assert kwargs(EngineConfig(block_size=64), True)["block_size"] == 64, "the config wins"
    monkeypatch.setenv("EXPERTSERVE_DEVICE", "cuda")
    assert "block_size" not in kwargs(EngineConfig(), True), "vLLM's GPU default (16) is small already"
