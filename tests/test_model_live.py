"""Live reference tests: fresh random configurations built with transformers, compared stage by stage.
Run with `pytest --live`. Each parameter id names the configuration, so a failure says which one broke."""

import pytest
import torch

from stages import compare_stages, our_stages

pytestmark = pytest.mark.live

CONFIGS = {
    # id: (family, overrides, prompt lengths, input image size)
    "opt-224px-odd-heads": ("opt", dict(vision_width=24, vision_heads=3, image_size=224, lm_heads=1), [5], 224),
    "opt-freq1-q7-batch3-padding": ("opt", dict(cross_attention_frequency=1, num_query_tokens=7,
                                                qformer_layers=3), [1, 6, 3], 28),
    "opt-freq3-interp-56to84": ("opt", dict(cross_attention_frequency=3, qformer_layers=4, image_size=56,
                                            qformer_heads=1), [2, 2], 84),
    "opt-freq2-heads5-q1": ("opt", dict(qformer_width=40, qformer_heads=5, num_query_tokens=1, lm_layers=3), [4], 28),
    "t5-odd-heads-dkv": ("t5", dict(lm_heads=3, d_kv=7, num_query_tokens=3), [3, 1], 28),
    "t5-freq1-interp-batch3": ("t5", dict(cross_attention_frequency=1, lm_layers=3), [2, 5, 1], 42),
    "itm-freq2": ("itm", dict(qformer_heads=2), None, 28),
    "itm-freq3-224px": ("itm", dict(cross_attention_frequency=3, qformer_layers=3, image_size=224,
                                    vision_width=24, vision_heads=6), None, 224),
}


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_stages_match_live_reference(config_id, tmp_path):
    pytest.importorskip("transformers")
    from hf_models import build_reference, make_config, prompt_ids, reference_stages

    from blip2_mini.loader import load_model

    family, overrides, lengths, size = CONFIGS[config_id]
    config = make_config(family, **overrides)
    reference = build_reference(config, seed=sum(map(ord, config_id)))
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, progress=False)

    g = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(len(lengths or [0, 0]), 3, size, size, generator=g)}
    if lengths:
        inputs["input_ids"], inputs["attention_mask"] = prompt_ids(config, len(lengths), lengths, seed=2)
    if family == "t5":
        dec = torch.randint(2, config.text_config.vocab_size, (len(lengths), 4), generator=g)
        dec[:, 0] = config.text_config.decoder_start_token_id
        inputs["decoder_input_ids"] = dec
    interpolate = size != config.vision_config.image_size
    expected = reference_stages(reference, **inputs, interpolate_pos_encoding=interpolate)
    ours = our_stages(model, **inputs, interpolate_pos_encoding=interpolate)
    compare_stages(ours, expected, inputs.get("attention_mask"), atol=2e-5, rtol=1e-6)


def test_bf16_matches_reference_in_bf16(tmp_path):
    """Both implementations in bf16 (bf16 everywhere, the Q-Former too, in both): same logits within a bf16
    tolerance, and the same argmax at nearly every position."""
    pytest.importorskip("transformers")
    from hf_models import build_reference, make_config, prompt_ids

    from blip2_mini.loader import load_model

    config = make_config("opt")
    reference = build_reference(config, seed=5)
    reference.save_pretrained(tmp_path)
    reference_bf16 = type(reference).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model = load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids, mask = prompt_ids(config, 2, [3, 6], seed=4)
    with torch.no_grad():
        ref = reference_bf16(pixel_values=pixel_values.bfloat16(), input_ids=ids, attention_mask=mask).logits.float()
        ours = model(pixel_values.bfloat16(), ids, mask).float()
    real = mask.bool()
    err = (ours - ref).abs()[real].max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert (ours.argmax(-1) == ref.argmax(-1))[real].float().mean() > 0.9
