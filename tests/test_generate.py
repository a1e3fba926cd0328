"""model.generate token for token against the reference's generate (fixtures from tests/reference), for OPT and
Flan-T5: greedy, beam search (2-5 beams, length penalties -1/0/1/2, several return sequences, early stopping),
sampling (seeded), EOS lists and no EOS, min_new_tokens, repetition penalty, the defaults of options left out,
batched prompts of different lengths (left padding for OPT)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_mini.cpu import can_prepack
from blip2_mini.decode import generate_naive
from blip2_mini.loader import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "model"
# load(..., prepack=True) (cpu.PackedLinear) must give the same tokens
PREPACK = [False, pytest.param(True, marks=pytest.mark.skipif(not can_prepack(torch.float32), reason="no oneDNN"))]


def fixture(name, prepack=False):
    stored = load_file(FIXTURES / name / "reference.safetensors")
    meta = json.loads((FIXTURES / name / "reference.json").read_text())
    return load_model(FIXTURES / name, progress=False, prepack=prepack), stored, meta["generate"]


def run_case(model, pixel_values, input_ids, attention_mask, case: dict):
    from hf_models_cases import split_case  # importable without transformers

    prompt, seed, kwargs = split_case(case)
    if not prompt:
        input_ids = attention_mask = None
    if seed is not None:
        torch.manual_seed(seed)  # as the reference, sampling draws from torch's global generator
    return model.generate(pixel_values, input_ids, attention_mask, **kwargs)


def cases():
    from_json = json.loads((FIXTURES / "opt-base" / "reference.json").read_text())["generate"]
    return sorted(from_json)


@pytest.mark.parametrize("prepack", PREPACK)
@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
@pytest.mark.parametrize("case_name", cases())
def test_generate_matches_reference_tokens(name, case_name, prepack):
    import hf_models_cases  # the case definitions, importable without transformers

    model, stored, expected = fixture(name, prepack)
    ids = run_case(model, stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"],
                   hf_models_cases.GENERATION_CASES[case_name])
    assert ids.tolist() == expected[case_name]


def test_fixture_generations_are_not_degenerate():
    """Guard against random models that repeat one token: those could not tell two decoders apart. Nearly every
    case must produce at least 3 distinct tokens (plain captioning with T5 may settle on one token per row)."""
    for name in ("opt-base", "t5-base"):
        _, _, expected = fixture(name)
        lively = [len({t for row in rows for t in row}) >= 3 for rows in expected.values()]
        assert sum(lively) >= len(lively) - 2, (name, expected)


@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
def test_cached_equals_naive_no_cache_decoding(name):
    model, stored, _ = fixture(name)
    pixel_values, ids, mask = stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"]
    cached = model.generate(pixel_values, ids, mask, max_new_tokens=10, eos_token_id=None)
    lm = model.language_model
    with torch.no_grad():
        embeds, enc_mask = model.language_model_inputs(model.image_prompt(pixel_values), ids, mask)
        if model.is_encoder_decoder:
            encoded = lm.encode(embeds, enc_mask)
            start = torch.full((ids.shape[0], 1), model.config.text_config.decoder_start_token_id)

            def full_logits(new_tokens):  # the whole decoder re-run from scratch each step
                return lm.decode(torch.cat([start, new_tokens], dim=1), encoded, enc_mask)[:, -1]
        else:
            def full_logits(new_tokens):  # the whole prompt + answer re-run from scratch each step
                x = torch.cat([embeds, lm.embed_tokens(new_tokens)], dim=1)
                m = torch.cat([enc_mask, torch.ones_like(new_tokens)], dim=1)
                return lm(x, m)[:, -1]

        naive = generate_naive(full_logits, ids.shape[0], max_new_tokens=10, eos_token_id=None,
                               pad_token_id=model.config.text_config.pad_token_id)
    assert torch.equal(cached, naive)


def test_batch_equals_each_prompt_alone():
    """Left padding (OPT) and padding masks (T5) make a batched prompt decode exactly as it does alone."""
    for name in ("opt-base", "t5-base"):
        model, stored, _ = fixture(name)
        pixel_values, ids, mask = stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"]
        batch = model.generate(pixel_values, ids, mask, max_new_tokens=8, num_beams=3)
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            alone = model.generate(pixel_values[b:b + 1], ids[b:b + 1, keep], max_new_tokens=8, num_beams=3)
            assert alone[0].tolist() == batch[b, :alone.shape[1]].tolist(), (name, b)


def test_sampling_is_reproducible_with_a_seed():
    model, stored, _ = fixture("opt-base")
    pixel_values = stored["input.pixel_values"]

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(pixel_values, do_sample=True, top_k=20, top_p=0.9, temperature=1.3,
                              max_new_tokens=12, generator=g)

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad, message", [
    (dict(num_beams=0), "num_beams"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_return_sequences=3, num_beams=2), "num_return_sequences"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int, got 2.5"),
    (dict(num_beams=2.0), "num_beams must be an int, got 2.0"),
    (dict(max_new_tokens="20"), "max_new_tokens must be an int, got '20'"),
    (dict(min_new_tokens=25), r"min_new_tokens=25 exceeds the default max_new_tokens \(20\); pass max_new_tokens"),
    (dict(do_sample="no"), "do_sample must be True or False, got 'no'"),
    (dict(eos_token_id=-1), r"eos_token_id \[-1\] has ids outside the vocabulary"),
    (dict(eos_token_id="eos"), "eos_token_id must be token ids \\(ints\\), got 'eos'"),
    (dict(eos_token_id=[2, 10**6]), r"eos_token_id \[2, 1000000\] has ids outside the vocabulary"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0 and finite"),
    (dict(do_sample=True, generator=0), "generator must be a torch.Generator"),
])
def test_impossible_options_are_refused(bad, message):
    model, stored, _ = fixture("opt-base")
    with pytest.raises(ValueError, match=message):
        model.generate(stored["input.pixel_values"], **bad)


def test_retrieval_checkpoint_cannot_generate():
    model = load_model(FIXTURES / "itm-base", progress=False)
    with pytest.raises(ValueError, match="retrieval checkpoint"):
        model.generate(torch.randn(1, 3, 28, 28))


def test_prefill_scores_only_the_last_position():
    """Generation needs the next-token logits only: OPT's prefill runs the final norm and the (V x D) head on
    the last position, and gives the same logits as the full forward pass."""
    from blip2_mini.model import OPTSession

    model, stored, _ = fixture("opt-base")
    lm = model.language_model
    with torch.no_grad():
        embeds, mask = model.language_model_inputs(model.image_prompt(stored["input.pixel_values"]),
                                                   stored["input.input_ids"], stored["input.attention_mask"])
        full = lm(embeds, mask)  # (B, T, V): forward() still scores every position
        seen = []
        hook = lm.final_norm.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
        try:
            last = OPTSession(lm, embeds, mask).prefill()  # (B, V)
        finally:
            hook.remove()
    assert full.shape[1] == embeds.shape[1] > 1
    assert seen == [(embeds.shape[0], 1, embeds.shape[2])]
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("intel", [True, False])  # the block counts chosen on either kind of CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features", [48, 50])  # split in 2 or 4 blocks of rows, or not divisible by 4
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 33, 65])
def test_opt_linear_equals_f_linear(rows, out_features, dtype, intel, monkeypatch):
    """opt.linear computes a few rows (decoding) as blocks of (W @ x^T)^T for speed: the same numbers as F.linear
    up to float rounding, for every row count, with and without bias, from contiguous or transposed inputs."""
    from blip2_mini import opt

    monkeypatch.setattr(opt, "INTEL", intel)
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(out_features, 40, generator=g), torch.randn(out_features, generator=g)
    x = torch.randn(rows, 1, 40, generator=g)
    x_t = torch.randn(40, rows, generator=g).T.reshape(rows, 1, 40)  # a non-contiguous input
    weight, bias, x, x_t = weight.to(dtype), bias.to(dtype), x.to(dtype), x_t.to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)  # bf16: 8 bits
    for inputs in (x, x_t):
        for b in (bias, None):
            y = opt.linear(inputs, weight, b)
            assert y.shape == (rows, 1, out_features) and y.is_contiguous() and y.dtype == dtype
            torch.testing.assert_close(y.float(), torch.nn.functional.linear(inputs.float(), weight.float(),
                                                                             None if b is None else b.float()),
                                       **tol)


@pytest.mark.parametrize("index", [[0, 1, 2, 3], [2, 2, 0, 1], [3, 2, 1, 0], [1, 1, 1, 1], [0, 0, 2, 3]])
def test_kv_cache_reorder_equals_index_select(index):
    """Beam search's cache reorder copies only the rows that continue another row (in place, rows may swap):
    the result must be every layer's keys/values index_select-ed, and later appends must still land right."""
    from blip2_mini.attention import KVCache

    g = torch.Generator().manual_seed(0)
    cache, expected = KVCache(), []
    for layer in range(2):
        k, v = torch.randn(4, 3, 5, 8, generator=g), torch.randn(4, 3, 5, 8, generator=g)
        cache.update(layer, k, v)
        expected.append((k, v))
    index = torch.tensor(index)
    cache.reorder(index)
    new = torch.randn(4, 3, 1, 8, generator=g)
    for layer, (k, v) in enumerate(expected):
        keys, values = cache.update(layer, new, -new)
        torch.testing.assert_close(keys, torch.cat([k.index_select(0, index), new], dim=2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat([v.index_select(0, index), -new], dim=2), rtol=0, atol=0)


def test_eos_token_id_as_numpy_or_tensor_is_the_same_as_an_int():
    import numpy as np

    model, stored, _ = fixture("opt-base")
    pixel_values = stored["input.pixel_values"]
    want = model.generate(pixel_values, max_new_tokens=6, eos_token_id=5)
    for eos in (np.int64(5), torch.tensor(5), torch.tensor([5]), (5,)):
        assert torch.equal(model.generate(pixel_values, max_new_tokens=6, eos_token_id=eos), want)


def test_eos_none_stops_at_nothing_and_the_default_at_the_checkpoints_eos():
    """As in the reference: eos_token_id=None generates through every EOS, the default stops at the checkpoint's.
    The fixture model never emits its own EOS (2), so it is declared to be 36, which it emits mid-way."""
    model, stored, expected = fixture("opt-base")
    pixel_values, ids, mask = stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"]
    model.config.text_config.eos_token_id = 36
    assert model.generate(pixel_values, ids, mask, max_new_tokens=10, eos_token_id=None).tolist() == \
        expected["greedy-prompt-batch"]  # the reference's tokens with EOS 2: 36 inside, nothing padded
    stopped = model.generate(pixel_values, ids, mask, max_new_tokens=10)
    assert stopped.tolist() == expected["greedy-eos-list"]  # the reference's, stopping at 36 (of [36, 92, 33])
    assert stopped.tolist() == [[19, 34, 65, 25, 36], [65, 14, 36, 1, 1]]  # what tells the two cases apart


def test_default_length_ends_with_the_position_table():
    """No max_new_tokens: 20 new tokens, fewer where OPT's position table ends first (the reference caps the
    prompt + new tokens at max_position_embeddings; the live test compares one such prompt)."""
    model, stored, _ = fixture("opt-base")
    pixel_values = stored["input.pixel_values"][:1]
    limit, Q = model.config.text_config.max_position_embeddings, model.config.num_query_tokens
    for T0, new in ((Q + 1, 20), (limit - 7, 7), (limit - 1, 1)):
        ids = torch.tensor([[model.config.image_token_index] * Q + [2] + [40] * (T0 - Q - 1)])
        out = model.generate(pixel_values, ids, eos_token_id=None)
        assert out.shape == (1, new), T0
    ids = torch.tensor([[model.config.image_token_index] * Q + [2] + [40] * (limit - Q - 1)])  # fills the table
    with pytest.raises(ValueError, match=f"a prompt of {limit} tokens .* leaves none of the language model's"):
        model.generate(pixel_values, ids)  # the reference: max_length = the prompt's length, an error
    assert model.generate(pixel_values, ids, max_new_tokens=1).shape == (1, 1)  # the last token needs no position


def test_right_padded_opt_prompts_are_refused():
    # OPT continues after the last position: a right-padded row would continue after its pads (the reference only
    # warns and answers differently than for the prompt alone).
    model, stored, _ = fixture("opt-base")
    ids, mask = stored["input.input_ids"].clone(), stored["input.attention_mask"].clone()
    ids[1, -1], mask[1, -1] = 1, 0  # row 1 one token shorter, padded on the right
    right_ids, right_mask = ids, mask
    with pytest.raises(ValueError, match="right-padded prompts.*pad on the left"):
        model.generate(stored["input.pixel_values"], right_ids, right_mask, max_new_tokens=3)


def test_inputs_that_would_fail_deep_in_torch_are_one_line():
    model, stored, _ = fixture("opt-base")
    pixel_values, ids, mask = stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"]
    V = model.language_model.embed_tokens.num_embeddings
    cases = [
        (dict(pixel_values=pixel_values.to("meta")), ValueError, "pixel_values is on meta, the model on cpu"),
        (dict(input_ids=ids.masked_fill(ids == ids.max(), V)), ValueError, f"outside the vocabulary .0..{V - 1}."),
        (dict(input_ids=ids.float()), TypeError, "input_ids must hold integer token ids, got torch.float32"),
        (dict(input_ids=ids.tolist()), TypeError, "input_ids must be a torch tensor, got list"),
    ]
    for change, error, message in cases:
        inputs = dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask) | change
        for call in (model.generate, model.forward):
            with pytest.raises(error, match=message) as e:
                call(**inputs)
            assert "\n" not in str(e.value)
    # A float 0/1 mask, which the reference accepts, means the same as the integer one.
    assert torch.equal(model(pixel_values, ids, mask.float()), model(pixel_values, ids, mask))


def test_gradients_through_packed_or_int8_layers_are_refused():
    from blip2_mini.cpu import can_prepack

    stored = load_file(FIXTURES / "opt-base" / "reference.safetensors")
    pixel_values = stored["input.pixel_values"].clone().requires_grad_()
    models = [load_model(FIXTURES / "opt-base", quantize="int8", progress=False)]
    if can_prepack(torch.float32):
        models.append(load_model(FIXTURES / "opt-base", prepack=True, progress=False))
    for m in models:
        with pytest.raises(RuntimeError, match="inference only.*load the model without"):
            m(pixel_values, stored["input.input_ids"], stored["input.attention_mask"])
        with torch.no_grad():  # and without gradients they compute as usual
            m(pixel_values, stored["input.input_ids"], stored["input.attention_mask"])
