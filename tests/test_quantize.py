"""Int8 language model (blip2_mini/quantize.py) against the fp32 model on the stored OPT fixture.

Documented tolerance (logits of the int8 model vs the fp32 model, over the real tokens of the fixture prompt):
    activations="float" (weight-only):  relative error ||l8 - l32|| / ||l32|| <= 2 %,  max |l8 - l32| <= 5 % of std(l32)
    activations="int8"  (fbgemm):       relative error                        <= 4 %,  max |l8 - l32| <= 10 % of std(l32)
Measured on this fixture (head fp32, the default / quantize_head=True): weight-only 0.6 % / 2.4 % and
0.8 % / 3.2 %; int8 activations 1.5 % / 6.7 % and 2.1 % / 7.1 %. benchmarks/RESULTS.md gives the figures for
the full-size random model.

Greedy tokens: a rounding of the weights can only flip a greedy choice whose margin (best minus second-best
logit) is smaller than the logit error, and the tiny random fixture model has near-ties (margins below 0.01).
So the tests check (a) along the fp32 greedy path (teacher-forced), the int8 model picks the same token at
every step whose fp32 margin exceeds twice the rms error the tolerance allows, and (b) free-running generation gives
the fp32 tokens in each row up to its first near-tie. (Measured: weight-only int8 reproduces all 12 tokens of
one row and diverges in the other at a margin of 0.007.)
"""

from pathlib import Path

import pytest
import torch

from blip2_mini import load_model
from blip2_mini.model import OPTSession
from blip2_mini.quantize import (HAS_INT8PACK, Int8Linear, dequantize_weight, linears_to_quantize,
                                 quantize_language_model, quantize_weight, store_head_in_fp16, use_packed_int8_kernel)
from test_model import load_fixture  # the stored inputs and the reference's outputs of a fixture

FIXTURE = Path(__file__).parent / "fixtures" / "model" / "opt-base"
TOLERANCE = {"float": (0.02, 0.05), "int8": (0.04, 0.10)}  # (relative error, max error / std of fp32 logits)
MODES = ["float"] + (["int8"] if "fbgemm" in torch.backends.quantized.supported_engines else [])
STEPS = 12


def load(activations=None, quantize_head=False):
    model = load_model(FIXTURE, progress=False)
    return model if activations is None else quantize_language_model(model, activations, quantize_head)


def test_quantize_weight_rounds_each_row_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=g) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different sizes
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (7,)
    assert torch.equal(q[3], torch.zeros_like(q[3]))
    error = (dequantize_weight(q, scale) - w).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())  # at most half a step, per row


@pytest.mark.parametrize("activations", MODES)
def test_int8_linear_computes_scaled_integer_matmul(activations, monkeypatch):
    """y = (x @ q^T) * s + b: exact for the weight-only block kernel (several cache blocks, in fp32), within 8-bit
    input rounding with int8 activations."""
    monkeypatch.setattr("blip2_mini.quantize.packs_for_fbgemm", lambda device: False)  # the block kernel, even on x86
    monkeypatch.setattr("blip2_mini.quantize.BLOCK_ELEMENTS", 40 * 16)  # 16 rows per block -> 3 blocks + rest
    monkeypatch.setattr("blip2_mini.quantize.block_kernel_dtype", lambda x: x.dtype)  # the exact fp32 blocks
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(40, 53)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(53, 40, generator=g) / 40 ** 0.5)
    layer = Int8Linear.from_linear(linear, activations)
    x = torch.randn(2, 5, 40, generator=g)
    q, scale = quantize_weight(linear.weight)
    expected = x @ dequantize_weight(q, scale).T + linear.bias.detach()  # (2, 5, 53)
    y = layer(x)
    assert y.shape == (2, 5, 53)
    if activations == "float":
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    else:
        assert (y - expected).norm() / expected.norm() < 0.02


def weight_only_layer_and_expected(seed: int, rows: int, x: torch.Tensor | None = None):
    """A weight-only Int8Linear (96 -> 50), an input x (rows, 96) (random unless given), the exact
    y = x (s q)^T + b, and s q (50, 96)."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(96, 50)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(50, 96, generator=g) / 96 ** 0.5)
    x = torch.randn(rows, 96, generator=g) if x is None else x
    rounded = dequantize_weight(*quantize_weight(linear.weight))  # (50, 96)
    return Int8Linear.from_linear(linear), x, x @ rounded.T + linear.bias.detach(), rounded


@pytest.mark.skipif("int8" not in MODES, reason="fbgemm (x86) runs the two-digit kernel")
def test_two_digit_kernel_rounds_only_x_and_to_14_bits():
    """On x86 the weight-only layer multiplies x written as two int8 digits, x ~= (m / 63)(d1 + d2 / 126) with m
    = max |x| per row: each element of x is off by at most m / 15876, so each output by at most that times the
    sum of |s q| over its inputs (checked per element); rows of very different sizes and an all-zero row keep
    their own scale. Rounding x to bf16 instead (8 significant bits, the other CPU kernel) errs 13x more here."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 96, generator=g) * torch.tensor([1.0, 1e-3, 1e3, 0.0, 1.0])[:, None]
    x[4, 7] = 50.0  # one outlier feature: the rest of its row gets coarser digits, still within the bound
    layer, x, expected, rounded = weight_only_layer_and_expected(seed=4, rows=5, x=x)
    assert layer.packed is not None and layer.weight_int8 is None  # fbgemm's copy of q only
    y = layer(x)
    bound = x.abs().amax(dim=1, keepdim=True) / 15876 * rounded.abs().sum(dim=1)  # (5, 50)
    assert bool(((y - expected).abs() <= bound * 1.01 + 1e-5 * expected.abs()).all())
    assert torch.equal(y[3], layer.bias)  # x = 0: exactly the bias
    relative = ((y - expected).norm() / expected.norm()).item()
    bf16 = ((x.bfloat16().float() @ rounded.T + layer.bias - expected).norm() / expected.norm()).item()
    assert 0 < relative < bf16 / 5


@pytest.mark.skipif("int8" not in MODES, reason="fbgemm (x86) packs the weights")
@pytest.mark.parametrize("activations", MODES)
def test_packed_weights_refuse_inputs_on_another_device(activations):
    """fbgemm's packed copy stays on the CPU when the model is moved: one clear error, not a crash inside fbgemm
    (a "meta" tensor stands in for a GPU one), for the int8 layers and for the fp16 head."""
    from blip2_mini.quantize import Fp16Linear
    for layer in (Int8Linear.from_linear(torch.nn.Linear(64, 32), activations), Fp16Linear(torch.randn(32, 64))):
        with pytest.raises(RuntimeError, match="packed for the CPU .* quantize the model after moving it"):
            layer(torch.zeros(1, 64, device="meta"))


@pytest.mark.skipif(not HAS_INT8PACK, reason="no int8 x bf16 kernel")
def test_packed_int8_kernel_computes_the_same_matmul_through_bf16(monkeypatch):
    """At widths that are multiples of 32, CPUs without fbgemm run PyTorch's int8 x bf16 kernel: the same
    y = (x @ q^T) * s + b, with x, s and y rounded to bf16 (8 significant bits: relative error ~0.3 %); other
    widths use the block kernel."""
    monkeypatch.setattr("blip2_mini.quantize.packs_for_fbgemm", lambda device: False)  # as on a CPU without fbgemm
    layer, x, expected, _ = weight_only_layer_and_expected(seed=2, rows=3)
    assert use_packed_int8_kernel(x, 96) and not use_packed_int8_kernel(x, 77)
    error = ((layer(x) - expected).norm() / expected.norm()).item()
    assert 1e-4 < error < 0.01  # rounded through bf16 (so not the block kernel's exact fp32), and only that


def test_bf16_block_kernel_computes_the_same_matmul_through_bf16(monkeypatch):
    """Where the CPU multiplies bf16 faster, the block kernel converts q to bf16 blocks and rounds x to bf16: the
    same y = (x @ q^T) * s + b with the int8 x bf16 kernel's precision (relative error ~0.3 %); elsewhere fp32."""
    from blip2_mini import quantize
    monkeypatch.setattr(quantize, "BF16_BLOCK_ELEMENTS", 96 * 16)  # 16 rows per block -> 3 blocks + rest
    monkeypatch.setattr(quantize, "use_packed_int8_kernel", lambda x, in_features: False)
    monkeypatch.setattr(quantize, "packs_for_fbgemm", lambda device: False)
    layer, x, expected, _ = weight_only_layer_and_expected(seed=3, rows=40)
    monkeypatch.setattr(quantize, "cpu_multiplies_bf16_faster", lambda: True)
    assert quantize.block_kernel_dtype(x) == torch.bfloat16
    error = ((layer(x) - expected).norm() / expected.norm()).item()
    assert 1e-4 < error < 0.01  # rounded through bf16 (so not the exact fp32 blocks), and only that
    monkeypatch.setattr(quantize, "cpu_multiplies_bf16_faster", lambda: False)
    assert quantize.block_kernel_dtype(x) == torch.float32
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize_head", [False, True])
@pytest.mark.parametrize("activations", MODES)
def test_int8_logits_within_tolerance_of_fp32(activations, quantize_head):
    inputs = load_fixture("opt-base")[0]
    with torch.no_grad():
        fp32 = load()(**inputs)
        int8 = load(activations, quantize_head)(**inputs)
    real = inputs["attention_mask"].bool()
    l32, l8 = fp32[real], int8[real]  # (real tokens, V)
    relative, max_over_std = TOLERANCE[activations]
    assert (l8 - l32).norm() / l32.norm() <= relative
    assert (l8 - l32).abs().max() <= max_over_std * l32.std()
    assert (l8 - l32).abs().max() > 0  # the int8 path really ran


def test_int8_flan_t5_computes_with_the_rounded_weights(monkeypatch):
    """The encoder-decoder too (Flan-T5's gated FFN once reached for wo.weight, which an int8 layer has not):
    with the exact block kernel, the int8 model's logits are those of the fp32 model whose Linear weights are
    replaced by their int8 roundings s * q (and whose head is stored in fp16, the default). (Against fp32 itself
    this random fixture is no test: it is chaotic, and even bf16 activations alone move its logits by 13 %.)"""
    monkeypatch.setattr("blip2_mini.quantize.packs_for_fbgemm", lambda device: False)
    monkeypatch.setattr("blip2_mini.quantize.use_packed_int8_kernel", lambda x, in_features: False)
    monkeypatch.setattr("blip2_mini.quantize.block_kernel_dtype", lambda x: x.dtype)  # fp32 blocks
    t5 = FIXTURE.parent / "t5-base"
    inputs = load_fixture("t5-base")[0]
    rounded = load_model(t5, progress=False)
    with torch.no_grad():
        for _, linear in linears_to_quantize(rounded.language_model):
            linear.weight.copy_(dequantize_weight(*quantize_weight(linear.weight)))
        store_head_in_fp16(rounded.language_model)  # as quantize_language_model does
        expected = rounded(**inputs)
        int8 = quantize_language_model(load_model(t5, progress=False))(**inputs)
    # Equal up to the order of float sums (y = (x q^T) s, not x (s q)^T), which this fixture amplifies: measured
    # 7.5e-5 of the largest logit, while the rounding of the weights itself moves the logits by 14 %.
    assert (int8 - expected).abs().max() <= 1e-3 * expected.abs().max()
    if "int8" in MODES:  # x86: the default kernel writes each input as two int8 digits (~14 bits of its range)
        monkeypatch.undo()
        with torch.no_grad():
            digits = quantize_language_model(load_model(t5, progress=False))(**inputs)
        # This fixture amplifies the inputs' rounding too: measured 3.2 % (bf16 inputs move it by ~13 %, above).
        assert 0 < (digits - expected).norm() / expected.norm() < 0.06


def greedy_path_with_margins(model, pixel_values, forced=None):
    """Greedy decoding of a caption; with `forced` (B, STEPS), feed those tokens instead (teacher forcing).
    Returns the tokens picked (B, STEPS) and the fp32 margins best - second best (B, STEPS)."""
    with torch.no_grad():
        embeds, mask = model.language_model_inputs(model.image_prompt(pixel_values))
        session = OPTSession(model.language_model, embeds, mask)
        logits, picked, margins = session.prefill(), [], []
        for t in range(STEPS):
            top2 = logits.topk(2).values  # (B, 2)
            picked.append(logits.argmax(-1))
            margins.append(top2[:, 0] - top2[:, 1])
            logits = session.step(picked[-1] if forced is None else forced[:, t])
    return torch.stack(picked, 1), torch.stack(margins, 1)


@pytest.mark.parametrize("activations", MODES)
def test_int8_greedy_tokens_equal_fp32(activations):
    pixel_values = load_fixture("opt-base")[0]["pixel_values"]
    fp32_model, int8_model = load(), load(activations)
    tokens, margins = greedy_path_with_margins(fp32_model, pixel_values)
    relative, _ = TOLERANCE[activations]
    with torch.no_grad():
        logit_rms = float(fp32_model(pixel_values).pow(2).mean().sqrt())
    # A decision is "clear" when its margin is over twice the typical (rms) logit error the tolerance allows.
    clear = margins > 2 * relative * logit_rms  # (B, STEPS)
    assert clear.float().mean() >= 0.6  # most steps are checked, so the test is not vacuous

    # (a) teacher-forced along the fp32 path: the same choice at every clear step
    forced, _ = greedy_path_with_margins(int8_model, pixel_values, forced=tokens)
    assert torch.equal(forced[clear], tokens[clear])

    # (b) free-running generate(): identical tokens in each row up to its first near-tie
    with torch.no_grad():
        ours = int8_model.generate(pixel_values, max_new_tokens=STEPS, min_new_tokens=STEPS)
    assert torch.equal(tokens, fp32_model.generate(pixel_values, max_new_tokens=STEPS, min_new_tokens=STEPS))
    first_tie = torch.where(clear.all(dim=1), STEPS, (~clear).float().argmax(dim=1))  # (B,)
    assert int(first_tie.sum()) >= 4  # tokens compared free-running, over both rows
    for row, n in enumerate(first_tie.tolist()):
        assert torch.equal(ours[row, :n], tokens[row, :n])


@pytest.mark.skipif("int8" not in MODES, reason="fbgemm (x86) packs the fp16 head")
def test_head_is_fp16_unless_asked():
    """By default OPT's tied head / embedding table is kept in fp16 (lookup table + fbgemm-packed head), whose
    logits are within fp16 rounding of fp32; quantize_head=True stores it once as int8, shared by both uses."""
    from blip2_mini.quantize import Fp16Embedding, Fp16Linear, Int8Embedding

    fp32 = load().language_model
    lm = load("float").language_model
    assert isinstance(lm.embed_tokens, Fp16Embedding) and isinstance(lm.lm_head, Fp16Linear)
    assert isinstance(lm.layers[0].fc1, Int8Linear)
    x = torch.randn(3, 1, fp32.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = x @ fp32.embed_tokens.weight.T  # the fp32 head
        got = lm.lm_head(x)
        ids = torch.tensor([[0, 5, 7]])
        torch.testing.assert_close(lm.embed_tokens(ids), fp32.embed_tokens(ids), rtol=1e-3, atol=1e-4)
    assert got.shape == want.shape and 0 < (got - want).norm() / want.norm() < 1e-3
    lm = load("float", quantize_head=True).language_model
    assert isinstance(lm.embed_tokens, Int8Embedding) and isinstance(lm.lm_head, Int8Linear)
    # one int8 table (per-row scales) serves both: the lookup's, and the head's (on x86 fbgemm's packed copy of it)
    if lm.lm_head.packed is None:  # no fbgemm (e.g. ARM): the head reads the lookup's very tensor
        assert lm.lm_head.weight_int8 is lm.embed_tokens.weight_int8
    else:
        packed = torch.ops.quantized.linear_unpack(lm.lm_head.packed)[0]
        assert torch.equal(packed.int_repr(), lm.embed_tokens.weight_int8)
        assert torch.equal(packed.q_per_channel_scales().float(), lm.embed_tokens.scale)


def test_linears_to_quantize_leaves_the_head_out():
    """The loader's quantize-while-loading and quantize_language_model share this list: every Linear of the
    language model but an untied head (T5's lm_head), which is kept unless quantize_head=True."""
    opt = load().language_model
    names = [name for name, _ in linears_to_quantize(opt)]
    assert len(names) == 6 * len(opt.layers) and "layers.0.self_attn.q_proj" in names and "layers.0.fc2" in names
    t5 = load_model(FIXTURE.parent / "t5-base", progress=False).language_model
    assert "lm_head" not in [name for name, _ in linears_to_quantize(t5)]
    assert "lm_head" in [name for name, _ in linears_to_quantize(t5, quantize_head=True)]


KERNELS = ["fbgemm", "block"] if "int8" in MODES else ["block"]


@pytest.mark.parametrize("activations, kernel", [(a, k) for a in MODES for k in KERNELS
                                                 if not (a == "int8" and k == "block")])  # int8 x: always fbgemm
def test_stacked_projections_compute_the_three_layers(activations, kernel, monkeypatch):
    """Layers that read the same x (here three, as OPT's q, k, v) become one Int8Linear of stacked rows
    (fused_projections): same integers, same scales, and its output is the three layers' outputs side by side:
    bit for bit through fbgemm (integer sums, one input for all three), to float rounding through the block
    kernel (other CPUs, GPUs)."""
    if kernel == "block":
        monkeypatch.setattr("blip2_mini.quantize.packs_for_fbgemm", lambda device: False)
        monkeypatch.setattr("blip2_mini.quantize.block_kernel_dtype", lambda x: x.dtype)  # fp32: comparable
    g = torch.Generator().manual_seed(5)
    linears = [torch.nn.Linear(64, 64) for _ in range(3)]
    with torch.no_grad():
        for i, linear in enumerate(linears):  # rows of different sizes in each, so the per-row scales matter
            linear.weight.copy_(torch.randn(64, 64, generator=g) * (i + 1) * torch.logspace(-1, 1, 64)[:, None])
    stacked = Int8Linear.stacked([(*quantize_weight(m.weight), m.bias) for m in linears], activations)
    alone = [Int8Linear.from_linear(m, activations) for m in linears]
    x = torch.randn(2, 3, 64, generator=g)
    with torch.no_grad():
        y, expected = stacked(x), torch.cat([m(x) for m in alone], dim=-1)  # (2, 3, 192)
    if kernel == "fbgemm":
        assert torch.equal(y, expected)
    else:
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(stacked.weight_int8, torch.cat([m.weight_int8 for m in alone]))


# The stacked matrices each family gets: (slot, the Linear layers it replaces) per module name; T5's cross-
# attention keeps q, k and v apart (its k and v read the encoder output, not the x that q reads).
STACKED = {
    "opt-base": {"layers.{}.self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj"))},
    "t5-base": {"encoder.layers.{}.self_attn": ("qkv", ("q", "k", "v")),
                "encoder.layers.{}.ffn": ("wi", ("wi_0", "wi_1")),
                "decoder.layers.{}.self_attn": ("qkv", ("q", "k", "v")),
                "decoder.layers.{}.ffn": ("wi", ("wi_0", "wi_1"))},
}


@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
@pytest.mark.parametrize("activations", MODES)
def test_quantized_model_multiplies_stacked_matrices(activations, name):
    """Quantizing replaces the Linear layers that read the same x by one Int8Linear of their stacked rows: OPT's
    q_proj, k_proj, v_proj by qkv_proj; Flan-T5's self-attention q, k, v by qkv and its FFN's wi_0, wi_1 by wi
    (nothing else); the logits are those of the same layers quantized and run one by one."""
    from blip2_mini.quantize import fused_projections
    lm = load_model(FIXTURE.parent / name, progress=False).language_model
    expected = {f"{module.format(i)}.{slot}": [f"{module.format(i)}.{p}" for p in parts]
                for module, (slot, parts) in STACKED[name].items()
                for i in range(len(lm.get_submodule(module.partition(".{}")[0])))}  # every layer of the stack
    assert expected and fused_projections(lm) == expected

    fused = quantize_language_model(load_model(FIXTURE.parent / name, progress=False), activations)
    for stacked, parts in expected.items():
        module = fused.language_model.get_submodule(stacked)
        assert isinstance(module, Int8Linear) and module.out_features == sum(
            lm.get_submodule(p).out_features for p in parts)
        owner = fused.language_model.get_submodule(stacked.rpartition(".")[0])
        assert all(getattr(owner, p.rpartition(".")[2]) is None for p in parts)
    # the same model with the layers kept apart: every Linear quantized alone, no stacked slot
    apart = load_model(FIXTURE.parent / name, progress=False)
    for stacked in expected:
        owner, _, slot = stacked.rpartition(".")
        setattr(apart.language_model.get_submodule(owner), slot, "kept apart")  # not None: left alone
    quantize_language_model(apart, activations)
    for stacked, parts in expected.items():
        owner, _, slot = stacked.rpartition(".")
        assert all(isinstance(apart.language_model.get_submodule(p), Int8Linear) for p in parts)
        setattr(apart.language_model.get_submodule(owner), slot, None)
    inputs = load_fixture(name)[0]
    with torch.no_grad():
        a, b = fused(**inputs), apart(**inputs)
    if fused.language_model.get_submodule(next(iter(expected))).packed is not None:  # fbgemm: integer sums
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_quantize_errors():
    model = load("float")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_language_model(model)
    with pytest.raises(ValueError, match="activations must be"):
        quantize_language_model(load(), activations="int4")
    retrieval = load_model(FIXTURE.parent / "itm-base", progress=False)
    with pytest.raises(ValueError, match="no language model"):
        quantize_language_model(retrieval)


@pytest.mark.parametrize("loaded_as", [torch.float32, torch.bfloat16])
def test_vision_stored_in_bf16_computes_like_fp32_with_rounded_weights(loaded_as):
    """store_vision_in_bf16 changes only where the weights live: its image features equal those of the fp32
    encoder whose Linear weights were rounded to bf16 (and the rest rounded too when it was loaded in bf16)."""
    from blip2_mini.quantize import Bf16Linear, store_vision_in_bf16
    stored = store_vision_in_bf16(load_model(FIXTURE, dtype_policy={"vision_model": loaded_as}, progress=False))
    rounded = load_model(FIXTURE, progress=False)
    with torch.no_grad():
        for name, p in rounded.vision_model.named_parameters():
            if loaded_as == torch.bfloat16 or name.endswith(("qkv.weight", "projection.weight", "fc1.weight",
                                                            "fc2.weight")):
                p.copy_(p.bfloat16().float())
    linears = [m for m in stored.vision_model.modules() if isinstance(m, Bf16Linear)]
    assert len(linears) == 4 * stored.config.vision_config.num_hidden_layers
    assert {p.dtype for p in stored.vision_model.parameters()} == {torch.float32}
    assert all(m.weight_bf16.dtype == torch.bfloat16 for m in linears)
    pixel_values = load_fixture("opt-base")[0]["pixel_values"]
    with torch.no_grad():
        got, want = stored.encode_image(pixel_values), rounded.encode_image(pixel_values)
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5
    full = load_model(FIXTURE, progress=False).encode_image(pixel_values)  # and bf16 storage is close to fp32
    assert 0 < (got - full).abs().max().item() < 0.05 * full.abs().max().item()


@pytest.mark.parametrize("activations", MODES)
def test_a_quantized_model_cast_to_bf16_keeps_its_storage_and_computes(activations):
    """model.to(torch.bfloat16) after quantizing: the int8 / fp16 / bf16-stored layers keep their storage and
    fp32 scales (a cast could only lose precision) and return bf16, so they fit between the cast layers."""
    from blip2_mini.quantize import Bf16Linear, Fp16Embedding, store_vision_in_bf16

    inputs = load_fixture("opt-base")[0]
    model = store_vision_in_bf16(load(activations))
    with torch.no_grad():
        before = model(**inputs)
        stored = {n: (t.dtype, t.clone()) for n, t in model.named_buffers()}
        model.to(torch.bfloat16)
        after = model(**{k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()})
    assert {n: t.dtype for n, t in model.named_buffers()} == {n: d for n, (d, _) in stored.items()}
    assert all(torch.equal(t, stored[n][1]) for n, t in model.named_buffers())
    assert {type(m) for m in model.modules()} >= {Int8Linear, Fp16Embedding, Bf16Linear}
    assert after.dtype == torch.bfloat16
    real = inputs["attention_mask"].bool()
    error = (after.float() - before)[real].norm() / before[real].norm()
    assert 0 < error < 0.03  # the norms, embeddings and Q-Former in bf16 now; the stored layers as before
