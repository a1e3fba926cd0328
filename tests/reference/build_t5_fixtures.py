"""Random-weight reference Flan-T5 language models (transformers' T5ForConditionalGeneration) for t5.py's tests.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_t5_fixtures.py        # rewrites tests/fixtures/t5/

Writes tests/fixtures/t5/:
    config.json          the T5 fields (official config.json names) + how the reference was built
    model.safetensors    the reference's weights under the reference's names (no tied copies; lm_head untied)
    reference.safetensors  inputs (inputs_embeds, attention_mask, decoder_input_ids) and the reference's
                         encoder output, encoder hidden states and decoder logits in fp32 (its "eager"
                         attention), and its logits with the model and inputs in bf16 (its default "sdpa"
                         attention: in bf16 its two attention paths differ by as much as bf16 from fp32)
    buckets.safetensors  the reference's relative-position bucket of every distance -300..300, encoder and
                         decoder, for each of BUCKET_SETTINGS (so that the default tests check them too)

The live tests (pytest --live) import `reference_t5`, `example_inputs` and `reference_outputs` from here to
build fresh models for every config in CONFIGS; the default tests only read CONFIGS and the stored files.

Two reference quirks handled here (transformers 5.23):
- its T5Config forces `tie_word_embeddings=True` whatever it is given (the given value only decides
  `scale_decoder_outputs`), so a freshly built model has `lm_head.weight is shared.weight`. Flan-T5 checkpoints
  carry a separate head (from_pretrained unties when the two tensors differ), so we untie it by hand;
- its default initialisation is fine for T5 but gives norms of exactly 1; `scale_weights` redraws everything
  (matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.7^2), norm weights ~ 1 + N(0, 0.2^2)) so every weight matters.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

# `transformers` is imported inside the functions that need it, so that the tests can read CONFIGS (to name
# their parametrised cases) without it installed.

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "t5"

# id: T5Config fields (official names). gated-gelu, untied head and no dropout are added by `reference_t5`.
CONFIGS = {
    # d_kv * num_heads = 36 != d_model: the attention's inner width differs from the model width
    "d32-h3-kv12": dict(vocab_size=100, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_decoder_layers=2,
                        num_heads=3),
    "d64-h4-kv16": dict(vocab_size=96, d_model=64, d_kv=16, d_ff=112, num_layers=2, num_decoder_layers=2,
                        num_heads=4),
    # few buckets and a short max distance, so that short sequences reach the logarithmic and the clamped buckets
    "d48-h3-kv8-buckets8-dist12": dict(vocab_size=80, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                                       num_decoder_layers=2, num_heads=3, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=12),
}
FIXTURE_CONFIG = "d32-h3-kv12"


def reference_t5(fields: dict, seed: int = 0, attn_implementation: str = "eager"):
    """A T5ForConditionalGeneration in eval mode with scaled random weights and its own (untied) lm_head."""
    import transformers
    from hf_models import scale_weights

    config = transformers.T5Config(**fields, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   dropout_rate=0.0, decoder_start_token_id=0)
    assert not config.scale_decoder_outputs  # Flan-T5: no d_model**-0.5 rescale before the head
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.shared.weight))  # untie (see module docstring)
    scale_weights(model, seed)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def example_inputs(fields: dict, seed: int = 0, source_lengths=(12, 8), target_length: int = 5,
                   left_padding: bool = False) -> dict:
    """An encoder input like BLIP-2's [projected queries; prompt embeddings] (B, S, D), S = max(source_lengths),
    each row padded (right by default) to S; decoder ids (B, t) that start with the start token 0.

    The embeddings are random vectors with the embedding table's spread, also at padding positions: whatever
    stands there must not change any real position's output."""
    g = torch.Generator().manual_seed(seed)
    B, S, D = len(source_lengths), max(source_lengths), fields["d_model"]
    inputs_embeds = torch.randn(B, S, D, generator=g) * 0.7
    attention_mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(source_lengths):
        if left_padding:
            attention_mask[b, S - n:] = 1
        else:
            attention_mask[b, :n] = 1
    decoder_input_ids = torch.randint(2, fields["vocab_size"], (B, target_length), generator=g)
    decoder_input_ids[:, 0] = 0  # decoder_start_token_id
    return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


@torch.no_grad()
def reference_outputs(model, inputs_embeds, attention_mask, decoder_input_ids) -> dict:
    """The reference's encoder output (B, S, D), encoder hidden states (L + 1, B, S, D: the input of every
    layer, then the final output) and decoder logits (B, t, V)."""
    encoder = model.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_hidden_states=True)
    out = model(encoder_outputs=(encoder.last_hidden_state,), attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids, use_cache=False)
    return {"encoder_output": encoder.last_hidden_state, "encoder_hidden_states": torch.stack(encoder.hidden_states),
            "logits": out.logits}


def reference_state_dict(model) -> dict:
    """The weights under the reference's names, without the embedding copies tied to `shared`."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}


BUCKET_SETTINGS = [(32, 128), (8, 12), (16, 50)]  # (num_buckets, max_distance): Flan-T5's, and two odd ones
BUCKET_DISTANCES = torch.arange(-300, 301)[None, :]  # key position - query position


def write_bucket_tables():
    from transformers.models.t5.modeling_t5 import T5Attention

    tables = {f"{'encoder' if bidirectional else 'decoder'}.{n}.{d}":
              T5Attention._relative_position_bucket(BUCKET_DISTANCES, bidirectional, n, d)[0].contiguous()
              for n, d in BUCKET_SETTINGS for bidirectional in (True, False)}
    save_file(tables, OUT / "buckets.safetensors")


def main():
    from hf_models import REFERENCE_VERSION

    fields, seed = CONFIGS[FIXTURE_CONFIG], 0
    model = reference_t5(fields, seed)
    inputs = example_inputs(fields, seed)
    outputs = reference_outputs(model, **inputs)
    bf16_inputs = dict(inputs, inputs_embeds=inputs["inputs_embeds"].to(torch.bfloat16))
    bf16_model = reference_t5(fields, seed, attn_implementation="sdpa").to(torch.bfloat16)
    outputs["bf16_logits"] = reference_outputs(bf16_model, **bf16_inputs)["logits"]
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(reference_state_dict(model), OUT / "model.safetensors")
    tensors = {f"input.{k}": v for k, v in inputs.items()} | {f"output.{k}": v for k, v in outputs.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "reference.safetensors")
    meta = {"config_id": FIXTURE_CONFIG, "fields": fields, "seed": seed,
            "attn_implementation": {"fp32": "eager", "bf16": "sdpa"},
            "reference": f"transformers {REFERENCE_VERSION}, torch {torch.__version__}"}
    (OUT / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_bucket_tables()
    size_kb = sum(f.stat().st_size for f in OUT.iterdir()) / 1024
    print(f"tests/fixtures/t5: {FIXTURE_CONFIG}, {size_kb:.0f} KB")


if __name__ == "__main__":
    main()
