"""Every stage of blip2_mini against the stored reference outputs (tests/fixtures/model, built by
tests/reference/build_fixtures.py with transformers): fp32 agreement to 1e-5 at every stage."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_mini.loader import load_model
from stages import compare_stages, our_stages
from test_generate import PREPACK

FIXTURES = Path(__file__).parent / "fixtures" / "model"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists())
# 1e-5, plus 1e-6 of the stage's largest value (a few float32 ulps: the patch embeddings reach |x| ~ 65, where one
# ulp is 8e-6). T5's logits get 2e-5: unscaled (|x| ~ 17) and after two random stacks, they moved by 3e-4 between
# CPUs of different vector widths (the reference itself, on this fixture), while here they agree to < 3e-6.
TOLERANCE = {"opt": dict(rtol=1e-6), "itm": dict(rtol=1e-6), "t5": dict(rtol=1e-6, rtol_for={"logits": 2e-5})}


def load_fixture(name):
    stored = load_file(FIXTURES / name / "reference.safetensors")
    inputs = {k[len("input."):]: v for k, v in stored.items() if k.startswith("input.")}
    outputs = {k[len("output."):]: v for k, v in stored.items() if k.startswith("output.")}
    meta = json.loads((FIXTURES / name / "reference.json").read_text())
    return inputs, outputs, meta


def test_fixtures_cover_every_family():
    families = {json.loads((FIXTURES / n / "reference.json").read_text())["family"] for n in NAMES}
    assert families == {"opt", "t5", "itm"}


@pytest.mark.parametrize("prepack", PREPACK)  # cpu.PackedLinear must compute the same stages
@pytest.mark.parametrize("name", NAMES)
def test_every_stage_matches_reference(name, prepack):
    inputs, reference, meta = load_fixture(name)
    model = load_model(FIXTURES / name, progress=False, prepack=prepack)
    ours = our_stages(model, **inputs, interpolate_pos_encoding=meta["interpolate_pos_encoding"])
    worst = compare_stages(ours, reference, inputs.get("attention_mask"), atol=1e-5, **TOLERANCE[meta["family"]])
    assert len(worst) >= 7  # patch embeddings, ViT layers, image embeds, Q-Former layers, queries, ...


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("itm")])
def test_forward_logits_match_reference(name):
    """model(...) in one call gives the reference logits (the staged path above is not the only route)."""
    inputs, reference, meta = load_fixture(name)
    model = load_model(FIXTURES / name, progress=False)
    with torch.no_grad():
        logits = model(**inputs, interpolate_pos_encoding=meta["interpolate_pos_encoding"])
    compare_stages({"logits": logits}, {"logits": reference["logits"]}, inputs.get("attention_mask"),
                   **TOLERANCE[meta["family"]])


def test_attention_weights_path_equals_fused_path():
    """The explicit softmax path (used for attention maps) and the fused kernel compute the same output."""
    inputs, _, _ = load_fixture("opt-base")
    model = load_model(FIXTURES / "opt-base", progress=False)
    with torch.no_grad():
        fast = model.encode_image(inputs["pixel_values"])
        slow, extras = model.encode_image(inputs["pixel_values"], output_attentions=True)
        q_fast = model.query(fast)
        q_slow, q_extras = model.query(fast, output_attentions=True)
    assert (fast - slow).abs().max() < 1e-5 and (q_fast - q_slow).abs().max() < 1e-5
    weights = extras["attentions"][0]  # (B, nh, P, P): rows are probability distributions
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-5)
    cross = [w for w in q_extras["cross_attentions"] if w is not None]
    assert len(cross) == 1 and cross[0].shape[-1] == fast.shape[1]  # layer 0 of 2 (frequency 2) reads the image


def test_attention_maps_path_applies_the_mask_like_the_fused_path():
    """With a padding mask (the Q-Former's text, OPT's left padding) the explicit path, which returns the maps,
    must mask exactly as the fused kernel: equal outputs, and no weight on a masked key."""
    from blip2_mini.attention import attend, padding_bias

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    bias = padding_bias(mask, q.dtype)  # (B, 1, 1, S)
    fused = attend(q, k, v, bias)
    explicit, weights = attend(q, k, v, bias, return_weights=True)
    assert (fused - explicit).abs().max() < 1e-6
    assert weights[mask[:, None, None, :].expand_as(weights) == 0].abs().max() == 0
    assert (attend(q, k, v) - fused).abs().max() > 1e-2  # the mask matters for these inputs


def test_bf16_forward_close_to_fp32_reference():
    """bf16 weights and activations (any CPU) stay within a bf16-sized tolerance of the fp32 reference: bf16 keeps
    8 bits of mantissa (relative step 2**-8 = 0.4%), and errors compound over the layers, so we allow 5% of the
    logits' range. As in the reference, bf16 means bf16 everywhere (the Q-Former too)."""
    inputs, reference, _ = load_fixture("opt-base")
    model = load_model(FIXTURES / "opt-base", dtype=torch.bfloat16, progress=False)
    assert model.qformer.layernorm.weight.dtype == torch.bfloat16
    assert model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**inputs).float()
    ref = reference["logits"]
    mask = inputs["attention_mask"][..., None]
    err = ((logits - ref).abs() * mask).max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    agree = (logits.argmax(-1) == ref.argmax(-1))[inputs["attention_mask"].bool()].float().mean()
    assert agree > 0.8


def test_wrong_shapes_raise_value_errors_naming_the_stage():
    model = load_model(FIXTURES / "opt-base", progress=False)
    with pytest.raises(ValueError, match="patch embedding.*\\(B, 3, H, W\\)"):
        model.encode_image(torch.randn(2, 28, 28))
    with pytest.raises(ValueError, match="patch embedding.*expects 28x28"):
        model.encode_image(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match="patch embedding.*float"):
        model.encode_image(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="query: expected image_embeds"):
        model.query(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="project: expected query_output"):
        model.project(torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match="exactly 4 <image> tokens"):
        model(torch.randn(1, 3, 28, 28), torch.tensor([[2, 5, 6]]))


def test_every_norm_uses_the_epsilon_of_its_stage():
    """A norm's epsilon moves the outputs by far less than the fixture tolerance (vision 1e-6 -> 1e-5: 1.8e-5 on
    values of ~50), so it is checked here directly: each stage's norms take its config field, as the reference
    does (OPT has no field: the reference hard-codes 1e-5)."""
    from blip2_mini.t5 import T5RMSNorm

    def eps_of(module):
        return {m.eps for m in module.modules() if isinstance(m, (torch.nn.LayerNorm, T5RMSNorm))}

    for name in ("opt-base", "t5-base"):
        model = load_model(FIXTURES / name, progress=False)
        config = model.config
        assert eps_of(model.vision_model) == {config.vision_config.layer_norm_eps}
        assert eps_of(model.qformer) == {config.qformer_config.layer_norm_eps}
        expected_lm = 1e-5 if name.startswith("opt") else config.text_config.layer_norm_epsilon
        assert eps_of(model.language_model) == {expected_lm}
    assert config.vision_config.layer_norm_eps != config.qformer_config.layer_norm_eps  # the fixtures tell them apart
