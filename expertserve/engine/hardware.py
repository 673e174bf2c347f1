"""What the machine can do, and the engine dtype that follows from it. Pure Python (reads /proc, imports no torch).

On a CPU, bf16 is fast only with native support (AVX-512 BF16 or AMX); without it vLLM's CPU kernels emulate it.
Measured on this project's AVX2-only AMD EPYC (vLLM 0.32 offline engine, SmolLM2-135M, 8 sequences x 32 tokens,
no LoRA, enforce_eager): float32 47.7 tok/s against bf16 21.6 tok/s (2.2x), and vLLM's own server in bf16 gave
8.3 output tok/s at 8 in flight with a 29 s median TTFT. So `engine.dtype: auto` means bfloat16 on a GPU or a CPU
with native bf16, and float32 on any other CPU; an explicit dtype is used as written.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

# The CPU flags that matter for the engine's speed, recorded with every benchmark figure.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx512_vnni")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and the relevant flags it has."""

    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 matrix math runs natively (AVX-512 BF16 or AMX)."""
        return any(f in self.flags for f in NATIVE_BF16)

    def to_dict(self) -> dict[str, object]:
        """JSON form: model, the relevant flags present, native bf16."""
        return {
            "model": self.model,
            "flags": sorted(f for f in self.flags if f in RELEVANT_FLAGS),
            "native_bf16": self.native_bf16,
        }


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """Read from /proc/cpuinfo (the first processor); the platform's name and no flags where it is missing."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(model, flags)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == (platform.processor() or platform.machine()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags)


def has_gpu() -> bool:
    """An NVIDIA GPU answers (without importing torch)."""
    if os.environ.get("EXPERTSERVE_DEVICE"):
        return os.environ["EXPERTSERVE_DEVICE"] == "cuda"
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def choose_dtype(requested: str, *, gpu: bool | None = None, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """The dtype the engine runs in, and why (one phrase for logs and reports)."""
    if requested != "auto":
        return requested, f"engine.dtype is set to {requested}"
    if gpu if gpu is not None else has_gpu():
        return "bfloat16", "auto on a GPU: bfloat16"
    cpu = cpu or cpu_info()
    if cpu.native_bf16:
        native = ", ".join(f for f in NATIVE_BF16 if f in cpu.flags)
        return "bfloat16", f"auto on {cpu.model}, which has native bf16 ({native}): bfloat16"
    return (
        "float32",
        f"auto on {cpu.model}, which has no native bf16 (no avx512_bf16 or amx_bf16): float32, measured 2.2x "
        "faster than emulated bf16 on such a CPU",
    )
