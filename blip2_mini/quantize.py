"""Int8 weights for the language model: 4x fewer bytes to read per generated token.

Why: generating a caption is mostly *decoding*, one token at a time. Each step multiplies a single activation
row (1, D) by every weight matrix of the language model, so each weight is read once and used for one
multiply-add. The step is limited by how fast memory delivers the weights, not by arithmetic: OPT-2.7b's
2.7 B weights are 10.6 GB in fp32, 5.3 GB in bf16 and 2.7 GB in int8. Fewer bytes per weight is the only way to
decode faster than `weight bytes / memory bandwidth` (benchmarks/ measures both on your machine).

The scheme (symmetric, per output channel, weights only; cf. LLM.int8(), Dettmers et al. 2022, whose
vector-wise scales this is, without the outlier decomposition):

    for each output row o of a Linear weight W (O, I):
        s[o]    = max_i |W[o, i]| / 127                      one fp32 scale per output channel
        q[o, i] = round(W[o, i] / s[o])   in [-127, 127]     int8: 1 byte instead of 4 (fp32) or 2 (bf16)

so W[o, i] ~= s[o] * q[o, i], with an error of at most s[o] / 2 per weight. A per-channel scale (rather than
one for the whole matrix) keeps one row with large weights from coarsening all the others.

The matmul: because s depends only on the output channel, it factors out of the sum over inputs,

    y[b, o] = sum_i x[b, i] * W[o, i] ~= s[o] * sum_i x[b, i] * q[o, i]      i.e.  y = (x @ q^T) * s + bias

so the int8 matrix is multiplied as it is and the scale is one multiply per output. The kernels:

- activations="float" (the default, weight-only: x is not rounded to 8 bits). Three kernels, one per machine:
  * on an x86 CPU (PyTorch's fbgemm engine), x is written as *two int8 digits* and fbgemm's integer kernel
    multiplies both at once (`two_digit_matmul`). Each row of x is scaled by m = max|x_row| so that
    t = x * 63 / m lies in [-63, 63]; the first digit is d1 = round(t), the second rounds what is left,
    d2 = round((t - d1) * 126), so that

        x ~= (m / 63) * (d1 + d2 / 126)        (error <= m / 15876 per element: ~14 bits, bf16 keeps 8)

    and, since the matmul is linear and d1 @ q^T, d2 @ q^T are exact integer sums,

        x @ q^T ~= (m / 63) * (d1 @ q^T + (d2 @ q^T) / 126)

    d1 and d2 go through fbgemm as two rows of one input, so the weights are read once for both: a generated
    token costs ~1 byte x weights / bandwidth, like int8 activations below, with the accuracy of float ones.
    Measured at OPT-2.7b's fc1 (10240 x 2560), 2 threads, Intel Xeon with AMX: one row 1.9 ms, against 2.8 ms
    for PyTorch's int8 x bf16 kernel below and 1.4 ms for int8 activations; five rows (beams) 3.0-3.3 vs
    5.6 ms; 33 rows (a prompt) 7.6-8.3 ms vs 27.9 ms (the bf16 block kernel below: 5.3-7.3 ms). The whole
    language model, alternating with the kernels it replaced (int8 x bf16 for <= 8 rows, bf16 blocks for
    prompts) in one process: per generated token 0.82x their time, per 5-beam step 0.67x, prompt 0.89x.
    Digits of 7 bits (not 8), for the reason given under "int8" below.
  * on other CPUs, PyTorch's int8 x bf16 kernel `_weight_int8pack_mm` (the one gpt-fast and torchao use) for
    few rows (`use_packed_int8_kernel`): it reads q as int8 and widens it to float in registers, so RAM
    traffic is 1 byte per weight; x, s and y pass through bf16 (8 significant bits: ~0.3 % relative error per
    matmul, against the weights' ~0.9 %). On an AMD EPYC with AVX-512 it read the weights at ~33 GB/s (one row
    per OPT-2.7b layer 2.3 ms, five rows 4.4, 33 rows 17.9, against fp32's 12.8 / 26.9 / 40.5 ms); on the Intel
    Xeon above it is compute-bound (~9 GB/s with 2 cores, memory gives ~20).
  * elsewhere (a GPU; widths that are not multiples of 32; prompts on CPUs without fbgemm), `q` is converted to
    floats in blocks of rows small enough to stay in the CPU cache, and each block goes through the ordinary
    float matmul. In fp32 it is exact apart from the rounding of the weights, but barely faster than fp32: the
    int8 -> fp32 conversion runs at ~6 G weights/s per core (AVX2 EPYC), about the rate at which fp32
    weights stream from RAM. On CPUs that multiply bf16 faster than fp32 the blocks are bf16, with the int8 x
    bf16 kernel's precision (`block_kernel_dtype`): a prompt's products run 2x faster there.
- activations="int8" (x is quantized too): PyTorch's fbgemm kernel `quantized::linear_dynamic` also rounds each
  call's input x to 8 bits (one scale and zero point for the whole input, computed on the fly), then runs an
  integer matmul reading the int8 weights directly. Much faster on x86 CPUs, a little less accurate. We ask for
  7-bit inputs ("reduce_range"): without VNNI instructions (AVX2 CPUs) fbgemm adds pairs of u8 x s8 products
  in 16 bits, which saturate with full 8-bit inputs (measured: 3x larger errors).

What is quantized: every nn.Linear inside `model.language_model` except the output head. The head (OPT: the
token embedding table itself, opt.py: logits = x @ embed_tokens^T) is stored in fp16 by default (Fp16Linear,
fbgemm's fp16 kernel; fp32 where fbgemm is missing): it is 5 % of OPT-2.7b's weights, but its errors go straight
into the logits that choose each token, and on the trained toy model it alone decides whether captions survive
(measured below). With quantize_head=True the table's rows, which are the head's output channels, get one int8
table with per-row scales that serves both the input lookup and the output head (on x86 the head's matmul
reads fbgemm's packed copy of it). Layers that read the same input (OPT's q, k and v; Flan-T5's self-attention
q, k, v and its FFN's two input matrices) become one int8 matrix, their rows stacked, multiplied in one call
(fused_projections: measured faster, same numbers). Everything else (LayerNorms, biases, position table) is
small and stays in float, converted to fp32, so the language model computes in fp32 (its input is cast at the
stage boundary, model.py).

Accuracy. Logits vs fp32 (tests/test_quantize.py; benchmarks/): relative error ||l8 - l32|| / ||l32|| <= 2 %
weight-only, <= 4 % with int8 activations. Where that comes from: a weight's rounding error is uniform in
+-s/2 (std s / sqrt(12)), and for a row of I = 2560 Gaussian weights s = max|w| / 127 ~ 3.9 rms(w) / 127, so
every matmul adds ~0.9 % of relative noise (7-bit activations: ~1.6 % more). The error is noise-like, so its
largest value over n logits is ~ sqrt(2 ln n) times its typical size: 4x for the test fixture, 5.3x for
33 positions x 50304 tokens. A bound on the max error must grow with n like that; a fixed "max <= 5 % of
std(l32)" contradicts "relative <= 2 %" at full shape. Measured at OPT-2.7b width (random weights with the
benchmark's initialisation, 33 positions), relative error / max error in % of std(l32):
    4 of 32 layers:  weight-only 1.78 / 9.0 (head fp32), 1.97 / 10.4 (head int8);
                     int8 activations 4.29 / 21.0 (head fp32), 4.82 / 24.6 (head int8)
    32 layers, head int8 (an earlier benchmark run): weight-only 2.47 / 11.5, int8 activations 4.21 / 24.3
    32 layers, head fp16 (benchmarks/RESULTS.md):  weight-only 2.28 / 11.4, int8 activations 3.70 / 22.2
                                                   (weight-only through the two-digit kernel: what the exact fp32
                                                   block kernel gave, 2.28 / 11.5; the int8 x bf16 one 2.34 / 12.1)
so random full-size weights sit at or just over the relative tolerance.
On the trained toy model (weights/blip2-shapes-tiny, benchmarks/int8_captions.py, 200 test scenes, 40 greedy
tokens) the share of captions identical to fp32, for the current model (caption exact match 88.0 % on them):
    head fp16 (the default):          weight-only 100 % (also with two_digit_matmul),  int8 activations 99.5 %
for the two before it (exact match 91.5 % and 45 %): weight-only 99.5 and 99.5 %, int8 activations 99.5 and
94.5 %; and for an earlier, weaker toy model (8 queries), whose greedy choices had many more near-ties:
    head int8 (quantize_head=True):   weight-only 89.0 %,  int8 activations 83.5 %
    head fp16 (the default):          weight-only 95.5 %,  int8 activations 88.0 %
    head fp32 (no fbgemm):            weight-only 96.0 %,  int8 activations 89.5 %
(fp16's 2e-4 relative error on the logits still flipped one to three of its captions of 200).
The measurements below were made on that earlier model. Per-group scales (one per 128 input channels) instead
of per output channel: 89.5 % / 96.0 % (weight-only, simulated), no better than keeping the head in fp32; so the
scales stay per output channel.
Int8 activations lose more because fbgemm rounds each call's whole input (B, I) with one scale, and that script
captions 100 scenes per batch: one scale for 100 rows. Measured, not shipped: one scale per row (token) 94.0 %;
rounding the rounding error too, x ~ Q(x) + Q(x - Q(x)) (~14-bit inputs), 96.0 %, at twice the time when the
kernel ran twice (per OPT-2.7b layer, one row: 11.9 vs 5.9 ms). As two rows of one call, with a scale per row,
that is the weight-only kernel on x86 CPUs (two_digit_matmul).

Usage:
    model = blip2_mini.load_model(path, dtype=torch.float32)
    quantize_language_model(model)                       # in place; returns the model

Notation: B rows (tokens) in the call, I input features, O output features, V vocabulary, D model width.
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu import INTEL, PackedLinear, cpu_multiplies_bf16_faster

INT8_MAX = 127
# Weight-only block kernel: rows of q converted to float per block, sized to stay in the CPU cache (fp32: 4 MiB,
# within L3; measured fastest of 1-8 MiB at the OPT-2.7b shapes, on a busy machine; bf16: 8 MiB, measured faster
# than 2 MiB on an Intel Xeon with AMX, per 10240 x 2560 matrix and 33 rows 5.3-7.3 vs 7.7-11.3 ms).
BLOCK_ELEMENTS = 1 << 20
BF16_BLOCK_ELEMENTS = 1 << 22


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, I) float weight -> q (O, I) int8 and per-output-channel scales s (O,) fp32, with W ~= s[:, None] * q.

    Computed a block of rows at a time: the float temporaries (|W|, W / s, its rounding) stay block-sized and
    reuse the same memory. Whole-matrix temporaries, 4-8x the size of the int8 result, fragment the heap when
    a whole model is quantized while loading: measured 2.1 GB of memory held per 0.5 GB of int8 kept."""
    O, I = weight.shape
    q = torch.empty(O, I, dtype=torch.int8, device=weight.device)
    scale = torch.empty(O, dtype=torch.float32, device=weight.device)
    rows = max(1, BLOCK_ELEMENTS // I)
    for start in range(0, O, rows):
        w = weight[start:start + rows].detach().float()  # (r, I)
        s = w.abs().amax(dim=1) / INT8_MAX  # (r,)
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale gives q = 0
        q[start:start + rows] = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX)  # cast to int8 on write
        scale[start:start + rows] = s
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float matrix that q and s stand for: (O, I) fp32."""
    return q.float() * scale[:, None]


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")  # looked up once, not on every matmul
DIGIT_MAX = 63  # two_digit_matmul: digits in [-63, 63], stored by fbgemm as unsigned 1..127 around zero point 64


def packs_for_fbgemm(device: torch.device) -> bool:
    """Whether a weight-only Int8Linear with its weights on `device` keeps q in fbgemm's packed layout and
    multiplies with two_digit_matmul: on x86 CPUs (where PyTorch has fbgemm). Elsewhere q stays a plain int8
    tensor.

    Measured, not used: oneDNN's int8 matmul (torch.ops.onednn.qlinear_pointwise, on the AMX tiles), which
    takes the same digits and gives the same sums. Per 10240 x 2560 matrix, 2 threads, Intel Xeon with AMX:
    as fast as fbgemm for 1-2 rows when the machine was quiet (~1.1 ms), 1.1-1.7x faster for 10 rows (5
    beams), 2-2.8x for 66-132 (prompts), but ~2x slower than fbgemm whenever the shared machine was busy (2
    rows: 4.1-5.3 vs 2.3-3.0 ms). The whole OPT-2.7b language model, the two alternating in one process, in
    two runs (medians of 30 and 60 tokens): per token 1.10x and 1.43x fbgemm's time, per 5-beam step 0.83x
    and 1.14x, prompt 0.73x and 0.99x; so decoding, the bulk of a caption, stays with fbgemm."""
    return device.type == "cpu" and _fbgemm_available()


def require_cpu_input(x: torch.Tensor, layer: str):
    """fbgemm's packed weights (Int8Linear, Fp16Linear) stay on the CPU when the model is moved: .to(device)
    does not see them. One clear error then, rather than a crash inside fbgemm."""
    if x.device.type != "cpu":
        raise RuntimeError(f"{layer}: these weights are packed for the CPU (fbgemm) but the input is on {x.device}; "
                           "quantize the model after moving it there, or use bf16 on a GPU")


def two_digit_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """(x @ q^T) * s for x (B, I) fp32 and fbgemm's packed q and s, with x written as two int8 digits per element
    (module docstring): x ~= (m / 63) * (d1 + d2 / 126), m = max |x| of each row. fbgemm's kernel takes one
    scale and zero point for its whole input, here 1 and 64: the digits are integers, which it stores exactly."""
    B = x.shape[0]
    # (B, 1): m / 63, one per row. clamp: an all-zero row gets zero digits with any step (and no 0 / 0)
    step = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30).div_(DIGIT_MAX)
    t = x / step  # (B, I), in [-63, 63]
    d1 = t.round()  # the first digit, an integer in [-63, 63]
    d2 = (t - d1).mul_(2 * DIGIT_MAX).round_()  # what d1 left, |t - d1| <= 1/2, as an integer in [-63, 63]
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        torch.cat([d1, d2]), 1.0, DIGIT_MAX + 1, packed)  # (2B, O): d1 @ (s q)^T, then d2 @ (s q)^T
    # (Written with few operations: each is a few microseconds for one row, ~190 matmuls per OPT-2.7b token.)
    return torch.add(y[:B], y[B:], alpha=1 / (2 * DIGIT_MAX)).mul_(step)  # (B, O)


def use_packed_int8_kernel(x: torch.Tensor, in_features: int) -> bool:
    """Whether the weight-only matmul of x (B, I) runs PyTorch's int8 x bf16 CPU kernel (`_weight_int8pack_mm`).

    Its conditions, measured (torch 2.13, 2 threads, per 10240 x 2560 matrix unless said): a CPU tensor; I a
    multiple of 32 (other widths crashed the process, e.g. I = 77 or 100); and few rows unless the CPU is an
    AMD one with AVX-512. The kernel's cost grows with the rows faster than the block kernel's, by how much
    depends on the CPU: on an AMD EPYC with AVX-512 it won at every count measured (per OPT-2.7b layer, 33 rows:
    17.9 vs 36.9 ms); with AVX2 only it loses past ~64 rows (per layer, 128 rows: 122 vs 94 ms); on an Intel
    Xeon (AVX-512, AMX) it wins for 5 rows (5.4 vs 11.4 ms) and loses for 33 (29.4 vs 20.6 ms), so there it
    runs decoding (<= 8 rows: greedy, beams) and the block kernel runs prompts. Elsewhere (GPU, odd widths)
    the block kernel below runs. (Measured before two_digit_matmul replaced both on CPUs with fbgemm: it now
    serves CPUs without it, e.g. ARM ones.)"""
    if x.device.type != "cpu" or in_features % 32 or not HAS_INT8PACK:
        return False
    if INTEL:
        return x.shape[0] <= 8
    return x.shape[0] <= 64 or torch.backends.cpu.get_cpu_capability() == "AVX512"


def block_kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The float type in which the weight-only block kernel converts q and multiplies: bf16 on a CPU that
    multiplies bf16 faster than fp32 (cpu.py), with the int8 x bf16 kernel's precision (q's integers are exact
    in bf16, x is rounded to 8 significant bits); x's own dtype elsewhere, exact apart from the rounding of the
    weights. bf16 makes a prompt's products 2x faster there (Intel Xeon with AMX, 33 rows, per 10240 x 2560
    matrix: 11.3-16.8 -> 5.3-7.3 ms)."""
    return torch.bfloat16 if x.device.type == "cpu" and cpu_multiplies_bf16_faster() else x.dtype


class StoredLayer(nn.Module):
    """The layers of this file store their weights in a dtype of their own (int8, fp16, bf16) and compute in
    fp32. Casting the model (.to(torch.bfloat16), .half(), .float()) leaves that storage and the fp32 scales
    and biases as they are (a cast could only lose precision) and changes only the dtype they return, so that
    they still fit between the model's cast layers; moving the model (.to(device)) moves them."""

    out_dtype = torch.float32  # what forward returns: the dtype of the model around the layer

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.out_dtype))  # where and in which dtype the rest of the model goes
        self.out_dtype = probe.dtype
        return super()._apply(lambda t: t.to(device=probe.device), recurse)

    def refuse_gradients(self, x: torch.Tensor):
        """The integer kernels have no backward: a gradient would stop here (or fail on an in-place op)."""
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(f"{type(self).__name__}: quantized layers are for inference only (no gradient flows "
                               "through them); load the model without quantize= to take gradients")


class Int8Linear(StoredLayer):
    """A Linear layer y = x W^T + b whose weight is stored as int8 + per-output-channel scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, activations: str = "float"):
        super().__init__()
        if activations not in ("float", "int8"):
            raise ValueError(f"quantize: activations must be 'float' (weight-only) or 'int8', got {activations!r}")
        if activations == "int8" and not _fbgemm_available():
            raise ValueError("quantize: activations='int8' needs PyTorch's fbgemm engine (x86 CPUs); "
                             "use activations='float'")
        self.out_features, self.in_features = q.shape
        self.activations = activations
        self.register_buffer("scale", scale.float())  # (O,)
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # (O,)
        if activations == "float" and not packs_for_fbgemm(q.device):
            self.register_buffer("weight_int8", q)  # (O, I)
            self.packed = None
        else:
            # fbgemm keeps its own packed (tiled) copy of q and applies s itself; the bias too with int8
            # activations (two_digit_matmul adds its two rows, so there the bias is added after).
            zero_points = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # PyTorch flags its quantized tensor types as deprecated
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias if activations == "int8" else None)
            self.weight_int8 = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "float") -> "Int8Linear":
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias, activations)

    @classmethod
    def stacked(cls, parts: list[tuple], activations: str = "float") -> "Int8Linear":
        """One Int8Linear for several layers that multiply the same input, from their [(q, scale, bias)]: their
        rows stacked, so that its output is theirs side by side (fused_projections). Exact: each row keeps its
        own scale. The layers have biases or not alike (they are built from the same config)."""
        qs, scales, biases = zip(*parts)
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(torch.cat(qs), torch.cat(scales), bias, activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.refuse_gradients(x)
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()  # (B, I)
        if self.packed is not None:
            require_cpu_input(x, "Int8Linear")
        if self.activations == "int8":  # fbgemm applies s and the bias itself
            y = torch.ops.quantized.linear_dynamic(x, self.packed, True)  # reduce_range=True: see the docstring
        else:
            if self.packed is not None:
                y = two_digit_matmul(x, self.packed)  # (B, O)
            elif use_packed_int8_kernel(x, self.in_features):
                # PyTorch's int8 x bf16 kernel (the one gpt-fast/torchao use): q is read as int8 and widened in
                # registers, so RAM traffic is 1 byte per weight; x, s and y pass through bf16 (module docstring).
                y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight_int8,
                                                       self.scale.to(torch.bfloat16)).float()  # (B, O)
            else:
                y = self._block_matmul(x)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(self.out_dtype)

    def _block_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(x @ q^T) * s for x (B, I) fp32, with q converted to float one cache-sized block of rows at a time
        into the same scratch buffer, used while it is still in cache. Two things matter for speed: the fp32
        copy of the whole matrix never exists (RAM traffic stays ~1 byte per weight), and the buffer is
        allocated once per call: a fresh multi-MiB tensor per block is fresh pages from the kernel, whose
        page faults made this kernel 2x slower than fp32 (measured). The float type: block_kernel_dtype."""
        dtype = block_kernel_dtype(x)
        rows = max(1, (BF16_BLOCK_ELEMENTS if dtype == torch.bfloat16 else BLOCK_ELEMENTS) // self.in_features)
        x = x.to(dtype).contiguous()  # so that x.T below is a transposed view, the layout MKL multiplies fastest
        block = torch.empty(min(rows, self.out_features), self.in_features, dtype=dtype, device=x.device)
        y_t = torch.empty(self.out_features, x.shape[0], dtype=dtype, device=x.device)  # (O, B): y transposed
        for start in range(0, self.out_features, rows):
            r = min(rows, self.out_features - start)
            block[:r].copy_(self.weight_int8[start:start + r])  # int8 -> float, still unscaled: (r, I)
            torch.mm(block[:r], x.T, out=y_t[start:start + r])  # (r, I) @ (I, B) -> (r, B), rows of y_t
        return y_t.T.float() * self.scale  # (B, O); the per-output-channel scale, factored out of the sum over I

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations={self.activations}"


class Int8Embedding(StoredLayer):
    """An embedding table stored as int8 rows with one scale per row: lookup = q[ids] * s[ids]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight_int8", q)  # (V, D)
        self.register_buffer("scale", scale.float())  # (V,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_int8[ids].float() * self.scale[ids][..., None]).to(self.out_dtype)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def replace_module(root: nn.Module, name: str, module: nn.Module):
    """Put `module` at the dotted path `name` inside `root` (e.g. "layers.3.fc1"), in place of what is there."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def linears_to_quantize(lm: nn.Module, quantize_head: bool = False) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs of the language model's Linear layers that become int8: all of them except an
    untied output head (T5's lm_head), unless quantize_head. The rule in one place, for quantize_language_model
    below and for the loader's quantize-while-loading."""
    head = None if quantize_head else getattr(lm, "lm_head", None)
    return [(name, m) for name, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not head]


# Layers that multiply the same x, and the slot where their stacked int8 matrix goes (fused_projections).
STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),  # OPT's attention (opt.py)
          "qkv": ("q", "k", "v"),                       # Flan-T5's self-attention (t5.py; not its cross-attention)
          "wi": ("wi_0", "wi_1")}                       # Flan-T5's gated FFN: gate and value


def fused_projections(lm: nn.Module) -> dict[str, list[str]]:
    """{name of a stacked Int8Linear: the names of the Linear layers it replaces}, for every module that offers a
    slot of STACKS (an attribute set to None, next to the layers it would replace): OPT's q, k and v, Flan-T5's
    self-attention q, k and v and its FFN's wi_0 and wi_1 become one int8 matrix each, their rows stacked
    (Int8Linear.stacked). The layers multiply the same x, so one call serves them all: the per-call work around
    the integer product (writing x as digits, adding the bias, fbgemm's own set-up) is done once, and fbgemm
    streams one larger matrix. Measured (2 threads, Intel Xeon, the two forms alternating in one process,
    medians of paired runs): OPT-2.7b's 32 layers' q, k, v, one row (greedy decoding) 0.75x the time of three
    calls weight-only, 0.89x with int8 activations; five rows (beams) 0.82x / 0.91x. The whole OPT-2.7b (medians
    of 40 / 20 / 8 paired runs): per generated token 0.92x / 0.96x, per 5-beam step 0.94x / 0.98x, prompt 0.97x
    / 0.96x, logits identical. Flan-T5-XL's 24 decoder layers' q, k, v and wi_0, wi_1, one row: 0.86x weight-only,
    0.92x with int8 activations; its whole decoder (medians of 30 / 16 paired runs): per generated token 0.93x
    / 0.96x, per 5-row step 0.94x / 0.97x, logits identical. (In fp32 and bf16 OPT's three products fused took
    0.97x / 0.89x their time: the float models keep the checkpoint's matrices.)"""
    fused = {}
    for name, m in lm.named_modules():
        for slot, parts in STACKS.items():
            if getattr(m, slot, "absent") is None and all(isinstance(getattr(m, p, None), nn.Linear) for p in parts):
                at = f"{name}." if name else ""  # (the language model itself is named "")
                fused[at + slot] = [at + p for p in parts]
    return fused


class Fp16Linear(StoredLayer):
    """y = x W^T + b with W stored in fp16 and packed for fbgemm's fp16 kernel (x, products and sums in fp32).

    Used for the output head, which int8 rounds too coarsely (module docstring): fp16 keeps 11 significant
    bits (relative error ~2e-4 on the logits, measured), reads half of fp32's bytes, and fbgemm's kernel stays
    fast for a few rows: at OPT-2.7b's head (50304 x 2560), 1 thread, 18.7 ms for one row and 24.2 ms for five
    (beam search), against 30.6 / 70.9 ms in fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        b = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), b)  # fbgemm's own layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_cpu_input(x, "Fp16Linear")
        self.refuse_gradients(x)
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self.packed)
        return y.reshape(*shape[:-1], self.out_features).to(self.out_dtype)  # (..., O)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored=float16"


class Fp16Embedding(StoredLayer):
    """An embedding table stored in fp16; lookups return fp32 rows (or the dtype the model was cast to)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight_fp16", weight.detach().half())  # (V, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_fp16[ids].to(self.out_dtype)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored=float16"


@torch.no_grad()
def store_head_in_fp16(lm: nn.Module) -> nn.Module:
    """The language model's output head in fp16 (Fp16Linear), in place; for OPT's tied head, the embedding
    table too (Fp16Embedding: the two copies, lookup table and packed head, take the bytes of one fp32 table).
    Needs fbgemm (x86); elsewhere the head is left as it is. Returns lm."""
    if not _fbgemm_available():
        return lm
    if getattr(lm, "lm_head", "absent") is None and isinstance(getattr(lm, "embed_tokens", None), nn.Embedding):
        table = lm.embed_tokens.weight  # (V, D), OPT: logits = x @ table^T
        lm.lm_head = Fp16Linear(table)
        lm.embed_tokens = Fp16Embedding(table)
    elif isinstance(getattr(lm, "lm_head", None), nn.Linear):  # an untied head (T5)
        lm.lm_head = Fp16Linear(lm.lm_head.weight, lm.lm_head.bias)
    return lm


@torch.no_grad()
def quantize_language_model(model: nn.Module, activations: str = "float", quantize_head: bool = False) -> nn.Module:
    """Replace the language model's Linear layers by int8 ones (those that read the same input, e.g. q, k and
    v, by one stacked matrix: fused_projections), in place; return the model.

    `model` is a blip2_mini Blip2 (or its language model). activations="float" quantizes the weights only
    (the matmul inputs are not rounded to 8 bits: x86 CPUs write them as two int8 digits, ~14 bits of each
    row's range; other CPUs round them to bf16; GPUs keep fp32); "int8" rounds them to 8 bits, per call
    (faster still on x86, see the module docstring).
    The output head (OPT: the tied embedding table) is stored in fp16 (store_head_in_fp16; fp32 without
    fbgemm) unless `quantize_head` makes it int8 too: it is one matrix (5 % of OPT-2.7b's weights) but its
    rounding errors land directly on the logits that pick each token (module docstring: measured captions).
    Each float weight is released as soon as its int8 replacement exists, so the peak is the float model plus
    one matrix. Apply it once: a quantized model cannot be quantized again.
    """
    lm = getattr(model, "language_model", model)
    if lm is None:
        raise ValueError("quantize: this checkpoint has no language model (a retrieval checkpoint)")
    if any(isinstance(m, (Int8Linear, Int8Embedding, Fp16Linear)) for m in lm.modules()):
        raise ValueError("quantize: the language model is already quantized")
    if any(isinstance(m, PackedLinear) for m in lm.modules()):
        raise ValueError("quantize: the language model's weights are packed for oneDNN (prepack=True); quantize a "
                         "model loaded without it, or load(path, quantize=..., prepack=True)")
    if activations not in ("float", "int8"):
        raise ValueError(f"quantize: activations must be 'float' (weight-only) or 'int8', got {activations!r}")

    # OPT's tied head: quantize the embedding table once, per row (= per output channel of the head).
    tied = getattr(lm, "lm_head", "absent") is None and isinstance(getattr(lm, "embed_tokens", None), nn.Embedding)
    if tied and quantize_head:
        q, scale = quantize_weight(lm.embed_tokens.weight)
        lm.embed_tokens = Int8Embedding(q, scale)
        lm.lm_head = Int8Linear(q, scale, None, activations)  # shares q unless fbgemm packs a copy (x86)

    for fused, parts in fused_projections(lm).items():  # e.g. q, k, v -> one matrix; then the other Linears
        linears = [lm.get_submodule(p) for p in parts]
        replace_module(lm, fused, Int8Linear.stacked([(*quantize_weight(m.weight), m.bias) for m in linears],
                                                     activations))
        for name, linear in zip(parts, linears):
            replace_module(lm, name, None)
            linear.weight = None
    for name, linear in linears_to_quantize(lm, quantize_head):
        replace_module(lm, name, Int8Linear.from_linear(linear, activations))
        linear.weight = None  # release the float weight now rather than at the end

    # What is left in float (norms, position table, biases) computes in fp32; the head, unless int8, in fp16.
    lm.float()
    if not quantize_head:
        store_head_in_fp16(lm)
    return model


# ---- the vision encoder: half the bytes, same fp32 arithmetic ----------------------------------------------


class Bf16Linear(StoredLayer):
    """A Linear layer whose weight is *stored* in bf16 and *computed* in fp32.

    Why not simply run it in bf16: the vision encoder is compute-bound (257 tokens per image reuse every
    weight 257 times), and CPUs without native bf16 instructions multiply bf16 matrices several times slower
    than fp32 (benchmarks/ measures it). Storing bf16 and converting to fp32 per call keeps fp32's speed and
    accuracy of arithmetic and halves the memory; the conversion costs ~10 % of the matmul at ViT-g's shapes.
    It runs one block of rows at a time (<= 8 MiB of fp32): a block that size is reused from the allocator's
    cache, while a whole 35 MB matrix would be fresh pages from the kernel on every call (page faults).
    """

    BLOCK_BYTES = 8 << 20

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16))  # (O, I)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())  # (O,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, self.BLOCK_BYTES // (4 * self.in_features))
        x = x.float()
        blocks = [F.linear(x, self.weight_bf16[start:start + rows].float())  # (..., I) -> (..., rows)
                  for start in range(0, self.out_features, rows)]
        y = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]  # (..., O)
        return (y if self.bias is None else y + self.bias).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored=bfloat16"


@torch.no_grad()
def store_vision_in_bf16(model: nn.Module) -> nn.Module:
    """Store the vision encoder's Linear weights in bf16 (Bf16Linear), in place; return the model.

    Together with an int8 language model this is the low-memory pipeline: at the blip2-opt-2.7b shape the
    ViT-g goes from 3.9 GB to 2.0 GB. The small rest of the encoder (patch convolution, position table,
    LayerNorms) is kept in fp32, so the encoder still takes fp32 pixels and computes in fp32. Works whether the
    encoder was loaded in fp32 or bf16 (e.g. load_model(..., dtype_policy={"vision_model": torch.bfloat16})).
    """
    vision = model.vision_model
    if any(isinstance(m, PackedLinear) for m in vision.modules()):
        raise ValueError("store_vision_in_bf16: the vision encoder's weights are packed for oneDNN (prepack=True); "
                         "load the model without prepack (a bf16-stored ViT computes in fp32: nothing to pack)")
    for name, linear in [(n, m) for n, m in vision.named_modules() if isinstance(m, nn.Linear)]:
        replace_module(vision, name, Bf16Linear(linear))
        linear.weight = None  # release the float weight now rather than at the end
    for module in vision.modules():  # the rest back to fp32 (Bf16Linear keeps its weight in buffers)
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                module._parameters[name] = nn.Parameter(p.detach().float(), requires_grad=False)
    return model
