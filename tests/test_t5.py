"""Flan-T5 (blip2_mini/t5.py) against the reference T5ForConditionalGeneration (transformers 5.23).

Default tests read tests/fixtures/t5/: a tiny reference model in the reference's naming, inputs with padding,
and the reference's outputs (rebuild with tests/reference/build_t5_fixtures.py). `pytest --live` also builds
fresh random references for every config in build_t5_fixtures.CONFIGS and compares on the spot.

Tolerances (each comparison prints its largest difference: run with -s; measured on CPU, torch 2.13):
    fp32 against the reference, and cached against uncached decoding   1e-5 per unit of the largest expected
                                                                       magnitude (measured <= 6e-6 on an AMD
                                                                       EPYC, 1.08e-5 on logits <= 3.99 on an
                                                                       Intel Xeon, eager attention)
    bf16, fp16-with-fp32-wo against the reference in that dtype        BF16_ATOL, FP16_ATOL below
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_mini.config import T5Config
from blip2_mini.t5 import T5
from build_t5_fixtures import CONFIGS, example_inputs, reference_outputs, reference_state_dict, reference_t5

FIXTURES = Path(__file__).parent / "fixtures" / "t5"
ATOL = 1e-5
# Half precision. Against the reference's default attention ("sdpa", the same torch kernel that we call) we
# measured exactly 0 in bf16 and in fp16-with-fp32-wo. The tolerances allow a few rounding steps of a logit of
# size ~4 (a bf16 step there is 2**-6 = 0.016, an fp16 step 2**-9 = 0.002) for other kernels or devices. For
# scale: the reference's own "eager" and "sdpa" paths differ by up to 0.17 in bf16 (0.025 in fp16), about as
# much as bf16 differs from fp32 (0.16), so these comparisons are made against the reference's "sdpa" path.
BF16_ATOL = 0.05
FP16_ATOL = 0.008
BF16_FROM_FP32 = 0.25  # bf16 logits vs the fp32 reference (measured <= 0.16)

# ---- the reference's names -> ours (test-local: blip2_mini.loader's KEY_MAP does this for checkpoints) ------
# T5 numbers its sub-layers: in an encoder block layer.0 is self-attention and layer.1 the feed-forward; a
# decoder block inserts cross-attention as layer.1, so its feed-forward is layer.2.
_RENAMES = [
    (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.", r"\1.layers.\2.self_attn_norm."),
    (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"\1.layers.\2.self_attn."),
    (r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"decoder.layers.\1.cross_attn_norm."),
    (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.", r"decoder.layers.\1.cross_attn."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"encoder.layers.\1.ffn_norm."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"encoder.layers.\1.ffn."),
    (r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm\.", r"decoder.layers.\1.ffn_norm."),
    (r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.", r"decoder.layers.\1.ffn."),
    (r"^(encoder|decoder)\.final_layer_norm\.", r"\1.final_norm."),
]


def to_ours(reference_state: dict) -> dict:
    out = {}
    for name, tensor in reference_state.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue  # copies tied to `shared`
        for pattern, replacement in _RENAMES:
            name, hits = re.subn(pattern, replacement, name)
            if hits:
                break
        out[name] = tensor
    return out


def load_ours(fields: dict, reference_state: dict) -> T5:
    model = T5(T5Config(**fields))
    model.load_state_dict(to_ours(reference_state), strict=True)  # every parameter, and nothing else
    return model.eval()


def max_diff(a, b) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_close(name, got, expected, atol=None):
    """Max abs difference <= atol; by default fp32's ATOL per unit of the largest expected magnitude (at least
    ATOL): fp32 rounding grows with the values, and the logits reach ~4 (measured against the reference's eager
    attention on an Intel Xeon: 1.08e-5 on logits of at most 3.99)."""
    if atol is None:
        atol = ATOL * max(1.0, expected.abs().max().item())
    diff = max_diff(got, expected)
    print(f"{name}: max abs diff {diff:.3g}")  # shown with -s; the report quotes these
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:.3g}"


def cached_logits(model, decoder_input_ids, encoded, mask, chunks):
    """Decode with a cache, `chunks` new tokens per call; returns the logits of all calls (B, t, V)."""
    cache, out, start = model.new_cache(), [], 0
    for n in chunks:
        out.append(model.decode(decoder_input_ids[:, start:start + n], encoded, mask, cache))
        start += n
        assert cache.seq_len == start
    return torch.cat(out, dim=1)


# ---- default tests: the stored fixture ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored():
    meta = json.loads((FIXTURES / "config.json").read_text())
    data = load_file(FIXTURES / "reference.safetensors")
    model = load_ours(meta["fields"], load_file(FIXTURES / "model.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in data.items() if k.startswith("input.")}
    expected = {k.removeprefix("output."): v for k, v in data.items() if k.startswith("output.")}
    return model, inputs, expected


@torch.no_grad()
def test_encoder_matches_reference(stored):
    model, inputs, expected = stored
    out, hidden = model.encode(inputs["inputs_embeds"], inputs["attention_mask"], return_hidden_states=True)
    assert_close("encoder output", out, expected["encoder_output"])
    assert_close("encoder hidden states", torch.stack(hidden), expected["encoder_hidden_states"])
    assert torch.equal(hidden[-1], out)


@torch.no_grad()
def test_decoder_logits_match_reference(stored):
    model, inputs, expected = stored
    encoded = model.encode(inputs["inputs_embeds"], inputs["attention_mask"])
    logits = model.decode(inputs["decoder_input_ids"], encoded, inputs["attention_mask"])
    assert_close("decoder logits", logits, expected["logits"])
    assert torch.equal(model(**inputs), logits)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (2, 1, 2), (5,)], ids=["one-by-one", "2-1-2", "all-at-once"])
def test_cached_decode_equals_uncached(stored, chunks):
    model, inputs, _ = stored
    ids, mask = inputs["decoder_input_ids"], inputs["attention_mask"]
    encoded = model.encode(inputs["inputs_embeds"], mask)
    assert_close(f"cached {chunks} vs uncached", cached_logits(model, ids, encoded, mask, chunks),
                 model.decode(ids, encoded, mask))


@torch.no_grad()
def test_cache_reorder(stored):
    """Beam search keeps some rows of the batch, possibly twice: after cache.reorder(index) the cached decoder
    must continue exactly as an uncached decoder run on the reordered rows."""
    model, inputs, _ = stored
    ids, mask = inputs["decoder_input_ids"], inputs["attention_mask"]
    encoded = model.encode(inputs["inputs_embeds"], mask)
    cache = model.new_cache()
    model.decode(ids[:, :3], encoded, mask, cache)
    index = torch.tensor([1, 0, 1])
    cache.reorder(index)
    assert cache.seq_len == 3
    got = torch.cat([model.decode(ids[index, i:i + 1], encoded[index], mask[index], cache) for i in (3, 4)], dim=1)
    expected = model.decode(ids[index], encoded[index], mask[index])[:, 3:]
    assert_close("reordered cache", got, expected)


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_leaves_real_positions_unchanged(stored, side):
    """Row 1 of the fixture has 8 real tokens of 12. Run alone and unpadded it must give the same encoder
    output at its real positions and the same logits. Left padding too: T5's positions are relative, so
    shifting every real token by the same amount changes nothing."""
    model, inputs, _ = stored
    mask = inputs["attention_mask"][1]
    real = inputs["inputs_embeds"][1][mask.bool()][None]  # (1, 8, D)
    ids = inputs["decoder_input_ids"][1:2]
    alone = model.encode(real, None)
    pad = torch.randn(1, 4, real.shape[-1])
    padded = torch.cat([real, pad] if side == "right" else [pad, real], dim=1)
    padded_mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)] if side == "right"
                            else [torch.zeros(1, 4), torch.ones(1, 8)], dim=1).long()
    encoded = model.encode(padded, padded_mask)
    keep = padded_mask[0].bool()
    assert_close(f"{side}-padded encoder", encoded[:, keep], alone)
    assert_close(f"{side}-padded logits", model.decode(ids, encoded, padded_mask), model.decode(ids, alone, None))


@torch.no_grad()
def test_bf16_matches_reference(stored):
    model, inputs, expected = stored
    model = copy.deepcopy(model).to(torch.bfloat16)
    inputs = dict(inputs, inputs_embeds=inputs["inputs_embeds"].to(torch.bfloat16))
    logits = model(**inputs)
    assert logits.dtype == torch.bfloat16
    assert_close("bf16 logits", logits, expected["bf16_logits"], BF16_ATOL)
    assert_close("bf16 logits vs fp32 reference", logits, expected["logits"], BF16_FROM_FP32)


@torch.no_grad()
def test_pure_fp16_overflows_where_fp32_wo_does_not(stored):
    """Why the fp16 layout keeps `wo` in fp32: an FFN output beyond fp16's range (65504), as Flan-T5's reach,
    becomes inf in pure fp16 and NaN downstream, but stays finite when `wo` and the residual stream are fp32.
    (Here forced by scaling up one FFN, to outputs of ~5e5 from weights that fp16 still holds; the real
    checkpoints get there by themselves.)"""
    model, inputs, _ = stored
    model = copy.deepcopy(model).half()
    model.encoder.layers[0].ffn.wi_1.weight.mul_(100)
    model.encoder.layers[0].ffn.wo.weight.mul_(1000)
    assert all(p.isfinite().all() for p in model.parameters())
    inputs = dict(inputs, inputs_embeds=inputs["inputs_embeds"].half())
    assert not model(**inputs).isfinite().all()
    for stack in (model.encoder, model.decoder):
        for layer in stack.layers:
            layer.ffn.wo.float()
    assert model(**inputs).isfinite().all()


def test_num_decoder_layers_none_means_num_layers():
    fields = dict(CONFIGS["d32-h3-kv12"], num_layers=3, num_decoder_layers=None)
    model = T5(T5Config(**fields))
    assert len(model.encoder.layers) == len(model.decoder.layers) == 3


def test_tied_head_is_rejected():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        T5(T5Config(**CONFIGS["d32-h3-kv12"], tie_word_embeddings=True))


@torch.no_grad()
def test_bad_inputs_raise(stored):
    model, inputs, _ = stored
    e, m, ids = inputs["inputs_embeds"], inputs["attention_mask"], inputs["decoder_input_ids"]
    encoded = model.encode(e, m)
    cases = [
        (lambda: model.encode(e[0], m), r"encode.*inputs_embeds.*\(B, S, 32\)"),
        (lambda: model.encode(e[..., :-1], m), r"encode.*inputs_embeds.*\(B, S, 32\)"),
        (lambda: model.encode(e.double(), m), r"encode.*float64.*float32"),
        (lambda: model.encode(e, m[:, :-1]), r"encode.*attention_mask.*\(2, 12\)"),
        (lambda: model.decode(ids.float(), encoded, m), r"decode.*decoder_input_ids.*integer"),
        (lambda: model.decode(ids[0], encoded, m), r"decode.*decoder_input_ids.*\(B, t\)"),
        (lambda: model.decode(ids, encoded[..., :-1], m), r"decode.*encoder_hidden_states.*\(2, S, 32\)"),
        (lambda: model.decode(ids[:1], encoded, m), r"decode.*encoder_hidden_states.*\(1, S, 32\)"),
        (lambda: model.decode(ids, encoded, m[:, :-1]), r"decode.*encoder_attention_mask.*\(2, 12\)"),
        (lambda: model(e, m, ids[0]), r"decode.*decoder_input_ids"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()
    cache = model.new_cache()
    model.decode(ids[:, :1], encoded, m, cache)
    with pytest.raises(ValueError, match=r"decode.*cache holds 2 rows.*3"):
        model.decode(ids[[0, 1, 1], 1:2], encoded[[0, 1, 1]], m[[0, 1, 1]], cache)


# ---- live tests: fresh random references ------------------------------------------------------------------


def live_pair(config_id, attn_implementation="eager", seed=1):
    reference = reference_t5(CONFIGS[config_id], seed=seed, attn_implementation=attn_implementation)
    return reference, load_ours(CONFIGS[config_id], reference_state_dict(reference))


@pytest.mark.live
@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_live_matches_reference(config_id, attn_implementation):
    reference, ours = live_pair(config_id, attn_implementation)
    for left_padding in (False, True):
        inputs = example_inputs(CONFIGS[config_id], seed=2, source_lengths=(20, 13), target_length=6,
                                left_padding=left_padding)
        expected = reference_outputs(reference, **inputs)
        out, hidden = ours.encode(inputs["inputs_embeds"], inputs["attention_mask"], return_hidden_states=True)
        assert_close("encoder output", out, expected["encoder_output"])
        assert_close("encoder hidden states", torch.stack(hidden), expected["encoder_hidden_states"])
        assert_close("decoder logits", ours(**inputs), expected["logits"])


@pytest.mark.live
@torch.no_grad()
@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_live_cached_decode_matches_reference_cache(config_id):
    """Token by token with the reference's own cache against ours (the reference's cache path shifts its
    position buckets by the cache length; ours must agree)."""
    reference, ours = live_pair(config_id)
    inputs = example_inputs(CONFIGS[config_id], seed=3, source_lengths=(9, 14), target_length=7)
    ids, mask = inputs["decoder_input_ids"], inputs["attention_mask"]
    encoded = ours.encode(inputs["inputs_embeds"], mask)
    reference_encoded = reference.encoder(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask)[0]
    past, cache = None, ours.new_cache()
    for i in range(ids.shape[1]):
        step = reference(encoder_outputs=(reference_encoded,), attention_mask=mask, decoder_input_ids=ids[:, i:i + 1],
                         past_key_values=past, use_cache=True)
        past = step.past_key_values
        assert_close(f"cached step {i}", ours.decode(ids[:, i:i + 1], encoded, mask, cache), step.logits)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (16, 50)])
def test_relative_position_buckets_match_the_stored_reference(bidirectional, num_buckets, max_distance):
    from blip2_mini.t5 import relative_position_bucket

    stored = load_file(Path(__file__).parent / "fixtures" / "t5" / "buckets.safetensors")
    expected = stored[f"{'encoder' if bidirectional else 'decoder'}.{num_buckets}.{max_distance}"]
    relative = torch.arange(-300, 301)[None, :]  # key position - query position
    assert torch.equal(relative_position_bucket(relative, bidirectional, num_buckets, max_distance)[0], expected)
    assert len(expected.unique()) >= num_buckets - 1  # the distances reach every bucket (encoder: but "+0")


@pytest.mark.live
@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (16, 50)])
def test_live_relative_position_buckets(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention as ReferenceAttention

    from blip2_mini.t5 import relative_position_bucket

    relative = torch.arange(-300, 301)[None, :]  # key position - query position
    expected = ReferenceAttention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(relative_position_bucket(relative, bidirectional, num_buckets, max_distance), expected)


@pytest.mark.live
@torch.no_grad()
@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_live_bf16(config_id):
    """Both models entirely in bf16 (how Flan-T5 was trained, and BLIP-2's usual dtype)."""
    reference, ours = live_pair(config_id, attn_implementation="sdpa")
    inputs = example_inputs(CONFIGS[config_id], seed=4)
    fp32_logits = reference_outputs(reference, **inputs)["logits"]
    reference, ours = reference.to(torch.bfloat16), ours.to(torch.bfloat16)
    inputs["inputs_embeds"] = inputs["inputs_embeds"].to(torch.bfloat16)
    expected = reference_outputs(reference, **inputs)
    assert_close("bf16 encoder output", ours.encode(inputs["inputs_embeds"], inputs["attention_mask"]),
                 expected["encoder_output"], BF16_ATOL)
    logits = ours(**inputs)
    assert logits.dtype == torch.bfloat16
    assert_close("bf16 logits", logits, expected["logits"], BF16_ATOL)
    assert_close("bf16 logits vs fp32 reference", logits, fp32_logits, BF16_FROM_FP32)


@pytest.mark.live
@torch.no_grad()
@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_live_fp16_with_fp32_wo(config_id):
    """The reference's fp16 layout: everything fp16 except each FFN's output projection `wo`, kept fp32 (its
    `_keep_in_fp32_modules`); the FFN casts its input up to fp32 for `wo`, and the residual stream becomes fp32
    from there on. Ours must follow the same dtype path."""
    reference, ours = live_pair(config_id, attn_implementation="sdpa")
    reference.half()
    ours.half()
    for stack in (reference.encoder, reference.decoder):
        for block in stack.block:
            block.layer[-1].DenseReluDense.wo.float()
    for stack in (ours.encoder, ours.decoder):
        for layer in stack.layers:
            layer.ffn.wo.float()
    inputs = example_inputs(CONFIGS[config_id], seed=5)
    inputs["inputs_embeds"] = inputs["inputs_embeds"].half()
    expected = reference_outputs(reference, **inputs)
    logits = ours(**inputs)
    assert logits.dtype == expected["logits"].dtype == torch.float16
    assert_close("fp16+fp32-wo logits", logits, expected["logits"], FP16_ATOL)
