"""blip2_mini's per-stage outputs under the same names as tests/reference/hf_models.py:reference_stages."""

import torch


@torch.no_grad()
def our_stages(model, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
               interpolate_pos_encoding=False) -> dict:
    out = {}
    image_embeds, extras = model.encode_image(pixel_values, interpolate_pos_encoding, output_hidden_states=True)
    out["patch_embeddings"] = extras["hidden_states"][0]
    for i, h in enumerate(extras["hidden_states"][1:]):
        out[f"vision_layer_{i}"] = h
    out["image_embeds"] = image_embeds
    query_output, extras = model.query(image_embeds, output_hidden_states=True)
    for i, h in enumerate(extras["hidden_states"][1:]):
        out[f"qformer_layer_{i}"] = h
    out["query_output"] = query_output
    if model.language_model is None:
        return out
    visual_prompt = model.project(query_output)
    out["projection"] = visual_prompt
    embeds, mask = model.language_model_inputs(visual_prompt, input_ids, attention_mask)
    if model.is_encoder_decoder:
        encoded = model.language_model.encode(embeds, mask)
        out["t5_encoder_output"] = encoded
        out["logits"] = model.language_model.decode(decoder_input_ids, encoded, mask)
    else:
        out["logits"] = model.language_model(embeds, mask)
    return out


def compare_stages(ours: dict, reference: dict, attention_mask=None, atol=1e-5, rtol=0.0, rtol_for=None):
    """Assert every reference stage is matched to atol + rtol * max |reference| (rtol_for: {stage: rtol} where a
    stage needs its own); logits are compared at real (non-padding) positions only, since what a model computes
    at a padding position is never used and differs between implementations."""
    assert set(reference) <= set(ours), f"stages missing: {set(reference) - set(ours)}"
    worst = {}
    for name, ref in reference.items():
        got = ours[name].float()
        ref = ref.float()
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
        diff = (got - ref).abs()
        if name == "logits" and attention_mask is not None and diff.shape[1] == attention_mask.shape[1]:
            diff = diff * attention_mask[..., None]
        tol = atol + (rtol_for or {}).get(name, rtol) * ref.abs().max().item()
        worst[name] = diff.max().item()
        assert worst[name] <= tol, f"{name}: max abs diff {worst[name]:.3g} > {tol:.3g}"
    return worst
