"""cpu.PackedLinear and load(..., prepack=True): weights in oneDNN's blocked layout compute what the plain Linear
layers compute. The layer itself against a float64 product, a packed layer moved to another dtype or device
unpacks to exactly the weight it was given; every stage against the reference fixtures at fp32's tolerance and
every generation case token for token run in test_model.py and test_generate.py with prepack=True."""

import pytest
import torch
import torch.nn as nn

import blip2_mini
from blip2_mini.cpu import PackedLinear, can_prepack, packable_linears
from blip2_mini.loader import PREPACKED_STAGES, load_model
from test_model import FIXTURES, NAMES, load_fixture

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="PyTorch was built without oneDNN")
DTYPES = [torch.float32] + ([torch.bfloat16] if can_prepack(torch.bfloat16) else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 40), (5, 40), (2, 33, 40), (1, 257, 40)])  # a token, 5 beams, prompts, ViT
@pytest.mark.parametrize("bias", [True, False])
def test_packed_layer_computes_the_linear_product(dtype, shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(40, 96, bias=bias).to(dtype).requires_grad_(False)
    x = torch.randn(shape).to(dtype)
    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
    packed = PackedLinear(linear)(x)
    assert packed.dtype == dtype and packed.shape == exact.shape
    # fp32: rounding of the sums only; bf16: the output's rounding to 8 bits (2**-8 relative), as F.linear's
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((packed.double() - exact).abs() <= tol * exact.abs().max()).all()
    if dtype == torch.float32:
        assert (packed - linear(x)).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("move", [{"dtype": torch.bfloat16}, {"device": "meta"}, {"dtype": torch.float64}])
def test_moving_a_packed_layer_unpacks_it(move):
    """.to() of another dtype or device hands the weight back in the plain layout (oneDNN's lives on the CPU in
    one dtype): exactly the weight it was given, cast as nn.Linear's .to() would cast it."""
    linear = nn.Linear(40, 96).requires_grad_(False)
    layer = PackedLinear(linear)
    layer.to(torch.float32).to("cpu")  # no change of dtype or device: stays packed
    assert layer.packed is not None and layer.weight is None
    layer.to(**move)
    expected = linear.weight.to(**move)
    assert layer.packed is None and layer.weight.dtype == expected.dtype and layer.weight.device == expected.device
    if expected.device.type == "cpu":
        assert torch.equal(layer.weight, expected)
        plain = nn.Linear(40, 96).to(**move).requires_grad_(False)
        plain.load_state_dict({"weight": expected, "bias": linear.bias.to(**move)})
        x = torch.randn(3, 40, dtype=expected.dtype)
        assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("name", NAMES)
def test_prepack_packs_every_layer_it_can(name):
    """(test_model and test_generate run every stage and every generation case with prepack=True too.)"""
    model = load_model(FIXTURES / name, progress=False, prepack=True)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) >= 8 and packable_linears(model, PREPACKED_STAGES) == []


@pytest.mark.skipif(torch.bfloat16 not in DTYPES, reason="no bf16 instructions for oneDNN on this CPU")
def test_prepacked_bf16_model_computes_the_bf16_models_logits():
    """In bf16 the packed and the plain layers round the same products: the logits differ by the order of the
    float sums at most (a few bf16 steps), far inside the bf16-vs-fp32 tolerance of test_model."""
    inputs, reference, _ = load_fixture("opt-base")
    with torch.no_grad():
        plain = load_model(FIXTURES / "opt-base", dtype=torch.bfloat16, progress=False)(**inputs).float()
        packed = load_model(FIXTURES / "opt-base", dtype=torch.bfloat16, progress=False, prepack=True)(**inputs)
    assert packed.dtype == torch.bfloat16
    mask = inputs["attention_mask"][..., None]
    assert ((packed.float() - plain).abs() * mask).max() <= 0.01 * reference["logits"].abs().max()


def test_tied_head_is_not_packed():
    """T5's output head shares the embedding table: packing it would keep a second copy, so it stays a Linear."""
    model = load_model(FIXTURES / "t5-base", progress=False, prepack=True)
    lm = model.language_model
    assert type(lm.lm_head) is nn.Linear and lm.lm_head.weight.data_ptr() == lm.shared.weight.data_ptr()
    assert isinstance(lm.encoder.layers[0].ffn.wo, PackedLinear)


def test_prepack_is_for_cpus():
    with pytest.raises(ValueError, match="prepack=True is for CPUs"):
        blip2_mini.load(FIXTURES / "opt-base", device="meta", prepack=True, progress=False)


def test_quantize_and_bf16_storage_refuse_packed_layers():
    """Both replace nn.Linear layers: on packed ones they would silently do nothing, so they say what to do."""
    from blip2_mini.quantize import quantize_language_model, store_vision_in_bf16

    model = load_model(FIXTURES / "opt-base", progress=False, prepack=True)
    with pytest.raises(ValueError, match="quantize: .*packed for oneDNN.*load\\(path, quantize=..., prepack=True\\)"):
        quantize_language_model(model)
    with pytest.raises(ValueError, match="store_vision_in_bf16: .*packed for oneDNN"):
        store_vision_in_bf16(model)


def test_quantized_load_packs_the_float_stages_only():
    """load(quantize=..., prepack=True): the int8 language model as quantize makes it, the ViT packed; the
    logits are those of the unpacked quantized model."""
    from blip2_mini.quantize import Int8Linear

    inputs, _, _ = load_fixture("opt-base")
    plain = load_model(FIXTURES / "opt-base", progress=False, quantize="int8-dynamic")
    packed = load_model(FIXTURES / "opt-base", progress=False, quantize="int8-dynamic", prepack=True)
    vision = list(packed.vision_model.modules())
    assert any(isinstance(m, PackedLinear) for m in vision) and not any(isinstance(m, nn.Linear) for m in vision)
    assert not any(isinstance(m, PackedLinear) for m in packed.language_model.modules())
    assert any(isinstance(m, Int8Linear) for m in packed.language_model.modules())
    with torch.no_grad():
        assert (packed(**inputs) - plain(**inputs)).abs().max() < 1e-4
