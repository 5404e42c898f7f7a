"""What the hardware runs natively: whether bf16 autocast pays off here, and how to name the CPU in results."""

from __future__ import annotations

import functools
import platform
from time import perf_counter

import torch

__all__ = [
    "BF16_CPU_FLAGS",
    "bf16_pays",
    "cpu_bf16_speedup",
    "cpu_flags",
    "cpu_name",
    "emulated_bf16_warning",
    "native_bf16",
]

#: ``/proc/cpuinfo`` flags of CPUs with bf16 matrix instructions (AVX512-BF16, AMX). Without them bf16 matmuls are
#: emulated, many times slower than float32 (``benchmarks/checks/bf16.py`` measures it on the machine at hand).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == name), None)
    except OSError:
        return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name and the widest vector unit torch uses on it (e.g. ``AMD EPYC (AVX2)``), plus
    ``bf16`` when it has bf16 matrix instructions."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    extras = [torch.backends.cpu.get_cpu_capability()] + (["bf16"] if cpu_flags() & set(BF16_CPU_FLAGS) else [])
    return f"{name} ({', '.join(extras)})"


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether bf16 autocast runs natively on ``device`` (default: CUDA when available, else the CPU): a CUDA GPU
    that supports bf16, or a CPU with one of :data:`BF16_CPU_FLAGS`."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return bool(cpu_flags() & set(BF16_CPU_FLAGS))
    return True  # other accelerators (xpu, mps, npu): their own kernels decide; nothing to say here


def cpu_bf16_speedup(tokens: int = 2048, repeats: int = 5) -> float:
    """float32 time over bf16-autocast time of one MiniLM linear layer (384 -> 1536, ``tokens`` rows), forward +
    backward, on this CPU with the current torch threads (median of ``repeats`` after a warm-up; about a second):
    above 1, bf16 autocast is faster here. Having bf16 instructions does not make it so: on one Xeon with
    AVX512-BF16 (no AMX) autocast made the layer 1.6-1.8x slower and a translation teacher's step 1.56x slower."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 384, generator=generator, requires_grad=True)
    x = torch.randn(tokens, 384, generator=generator, requires_grad=True)

    def median_s(bf16: bool) -> float:
        times = []
        for i in range(repeats + 1):
            start = perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = torch.nn.functional.linear(x, weight)
            y.float().sum().backward()
            if i:  # the first call warms up
                times.append(perf_counter() - start)
        return sorted(times)[len(times) // 2]

    with torch.enable_grad():
        return median_s(False) / median_s(True)


@functools.cache
def _cpu_bf16_pays() -> bool:
    return native_bf16("cpu") and cpu_bf16_speedup() > 1.1


def bf16_pays(device: str | torch.device | None = None) -> bool:
    """Whether to train in bf16 autocast on ``device`` (default: CUDA when available, else the CPU): a CUDA GPU
    with bf16; a CPU only where it has bf16 instructions (:func:`native_bf16`) *and* :func:`cpu_bf16_speedup`
    measures bf16 at least 10% faster (measured once per process). Where bf16 is emulated it never is."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return _cpu_bf16_pays() if kind == "cpu" else native_bf16(kind)


def emulated_bf16_warning(args, device: torch.device) -> str | None:
    """The warning to give when ``args`` (``TrainingArguments``) ask for bf16 autocast on a CPU without bf16
    instructions, where it is many times slower than float32; ``None`` otherwise."""
    if not getattr(args, "bf16", False) or device.type != "cpu" or native_bf16("cpu"):
        return None
    return (
        f"bf16=True on a CPU without bf16 instructions ({cpu_name()}; none of {', '.join(BF16_CPU_FLAGS)}): "
        "autocast emulates bf16 there and trains many times slower than float32. Drop --bf16 on this machine."
    )
