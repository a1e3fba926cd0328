"""What this CPU is good at, for the few places that pick a kernel by it (opt.py, quantize.py, loader.py), and
weights pre-packed for its matrix library (PackedLinear, load(..., prepack=True)).

The fastest way to multiply the same matrices differs between CPUs by 2-5x (the docstrings next to each
choice give the measurements): Intel's BLAS (MKL) takes its fast paths on Intel CPUs only, and CPUs with bf16
instructions (AVX512-BF16, AMX) multiply bf16 several times faster than fp32 while the others emulate it,
several times slower. The vendor is read once; bf16 speed is measured rather than looked up in a table of
instruction-set flags.
"""

import collections
import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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


# ---- weights pre-packed for oneDNN -----------------------------------------------------------------------


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether oneDNN (PyTorch's CPU matrix library besides MKL) can hold weights of this dtype pre-packed here:
    fp32 wherever PyTorch was built with it, bf16 where the CPU has bf16 instructions (AVX512-BF16, AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """A Linear layer (y = x W^T + b) whose weight is kept in oneDNN's own blocked layout, for CPU inference.

    Why: a matrix library multiplies in small tiles, and it first copies ("packs") the weight into the order in
    which its kernel reads those tiles. F.linear does that on every call: the weight is read, written and read
    again. Packing once, at load time, leaves only the read. Measured on an Intel Xeon with AMX, 2 threads,
    OPT-2.7b's fc1 (10240 x 2560), against F.linear: bf16, 1 row (a generated token) 1.69 vs 2.14 ms, 257 rows
    (a ViT layer's tokens) 6.7 vs 8.5 ms; fp32, 5 rows (5 beams) 4.2 vs 7.2 ms, 1 row 3.2-3.5 vs 3.3 ms (MKL's
    matrix-vector product does not pack). The whole ViT-g: 0.83x the time in bf16, 0.87x in fp32.

    The packed weight is an opaque tensor (the tile order depends on the CPU), so it is not a parameter: it is
    not in state_dict() or parameters(). Calling .to(), .cuda(), .half(), ... unpacks it first (to_dense), after
    which the layer is an ordinary Linear in whatever dtype and device it is moved to. Like quantize.py's layers
    it takes any float input, converted to its own dtype.
    """

    ROWS_HINT = 32  # the rows oneDNN tunes the layout for; one layout serves any count (1 to 257 rows measured)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.dtype = linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.ROWS_HINT)  # opaque
        self.register_parameter("weight", None)  # the plain (O, I) weight once unpacked (_apply)
        self.bias = linear.bias  # (O,) or None, a parameter as in nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and torch.is_grad_enabled() and x.requires_grad:  # oneDNN's op has no backward,
            # and torch would only warn while the gradient silently stopped here
            raise RuntimeError("PackedLinear: packed weights are for inference only (no gradient flows through "
                               "them); load the model without prepack=True to take gradients")
        x = x.to(self.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # (..., I) -> (..., O)

    def _apply(self, fn, recurse=True):
        # nn.Module's .to() / .cuda() / .half() / .float() land here. The packed layout exists only on the CPU
        # in one dtype: if fn would move or cast, hand the weight back in the plain (O, I) layout first.
        moved = fn(torch.empty(0, dtype=self.dtype))
        if self.packed is not None and (moved.device.type != "cpu" or moved.dtype != self.dtype):
            self.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)  # (O, I)
            self.packed = None
        self.dtype = moved.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        layout = "oneDNN packed" if self.packed is not None else "plain"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, {layout}"


def packable_linears(model: nn.Module, within: tuple[str, ...] = ("",)) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs of `model`'s Linear layers, under one of the name prefixes `within`, that
    PackedLinear can hold: on the CPU, in a dtype can_prepack accepts, and with a weight no other parameter
    shares (T5's output head may be its embedding table; packing it would keep two copies)."""
    uses = collections.Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(within) and m.weight.device.type == "cpu"
            and can_prepack(m.weight.dtype) and uses[m.weight.data_ptr()] == 1]


@torch.no_grad()
def prepack(model: nn.Module, within: tuple[str, ...] = ("",), after_each=None) -> nn.Module:
    """Replace the packable Linear layers of `model` (packable_linears) by PackedLinear ones, in place, one at a
    time (memory grows by one matrix at most); return the model. `after_each(name)` is called once each layer
    is packed (the loader gives back the file pages of its weight there)."""
    for name in [name for name, _ in packable_linears(model, within)]:  # names only: a replaced layer is freed
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, PackedLinear(getattr(owner, child)))
        if after_each is not None:
            after_each(name)
    return model
