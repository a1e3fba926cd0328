"""What this CPU is good at, for the few places that pick a kernel by it (opt.py, quantize.py, loader.py).

The fastest way to multiply the same matrices differs between CPUs by 2-5x (the docstrings next to each
choice give the measurements): Intel's BLAS (MKL) takes its fast paths on Intel CPUs only, and CPUs with bf16
instructions (AVX512-BF16, AMX) multiply bf16 several times faster than fp32 while the others emulate it,
several times slower. The vendor is read once; bf16 speed is measured rather than looked up in a table of
instruction-set flags.
"""

import functools
import time

import torch


def _cpu_vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", ... (Linux), or "" where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


INTEL = _cpu_vendor() == "GenuineIntel"  # MKL, Intel's BLAS, takes its fastest paths on Intel CPUs only


@functools.cache
def cpu_multiplies_bf16_faster(n: int = 512) -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 ones: times one (n, n) @ (n, n) product in
    each (best of 3, ~20 ms in all; once per process). CPUs with bf16 instructions (AVX512-BF16, AMX) do it
    several times faster (measured on a 2-core AMD EPYC with AVX512-BF16: 970 vs 227 GFLOP/s); without them
    bf16 is emulated and several times slower (an AVX2 EPYC: 21 vs 175 GFLOP/s). Asking the hardware beats a
    table of CPU flags."""
    def best_seconds(dtype):
        a = torch.randn(n, n).to(dtype)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.bfloat16) < best_seconds(torch.float32)
