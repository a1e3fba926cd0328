"""decode.py against the reference's `generate` (transformers 5.23), without a BLIP-2 model.

Default tests run a toy language model (`ToyLM`, a one-layer tanh RNN in float64 whose next token depends on
the whole history) through `ToySession` and compare with the token ids that the reference's `generate`
produced for the very same toy model (tests/reference/build_decode_fixtures.py wraps it as a transformers
`PreTrainedModel`; stored in tests/fixtures/decode/). They also check the cached decoder against the naive
one, batching against one prompt at a time, sampling reproducibility, the filters on crafted distributions,
and every argument error.

Live tests (pytest --live) rebuild the toy references on the spot, and compare with the reference on random
OPT (decoder-only, left padding, DynamicCache) and Flan-T5 (encoder-decoder, EncoderDecoderCache) models
wrapped as sessions, plus each logits processor against the reference's processor classes.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_mini import decode

FIXTURES = Path(__file__).parent / "fixtures" / "decode"


# ---- the toy language model ---------------------------------------------------------------------------------


class ToyLM:
    """h_t = tanh(E[x_t] + h_{t-1} R); logits_t = h_t H. Float64 so that the cached path (carry h) and the
    reference's recompute-everything path agree to the last float32 bit. Masked (padding) positions leave h
    unchanged, so left padding cannot change a row's logits."""

    def __init__(self, weights: dict):
        self.embed, self.recur, self.head = weights["embed"], weights["recur"], weights["head"]

    @staticmethod
    def random_weights(vocab_size=40, width=16, seed=0) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"embed": torch.randn(vocab_size, width, generator=g, dtype=torch.float64),
                "recur": torch.randn(width, width, generator=g, dtype=torch.float64) * 1.2 / width ** 0.5,
                "head": torch.randn(width, vocab_size, generator=g, dtype=torch.float64) * 2.0 / width ** 0.5}

    def __call__(self, ids, mask=None, h=None):
        """ids (N, T), mask (N, T) or None, h (N, D) or None -> float32 logits (N, T, V), final h (N, D)."""
        N, T = ids.shape
        h = torch.zeros(N, self.recur.shape[0], dtype=torch.float64) if h is None else h
        logits = []
        for t in range(T):
            new_h = torch.tanh(self.embed[ids[:, t]] + h @ self.recur)
            h = new_h if mask is None else torch.where(mask[:, t, None].bool(), new_h, h)
            logits.append(h @ self.head)
        return torch.stack(logits, dim=1).float(), h


class ToySession:
    """decode.DecodingSession for ToyLM: the cache is the hidden state h."""

    def __init__(self, lm: ToyLM, prompt_ids, prompt_mask=None):
        self.lm, self.ids, self.mask, self.h = lm, prompt_ids, prompt_mask, None
        self.calls = []

    def prefill(self):
        self.calls.append(("prefill",))
        logits, self.h = self.lm(self.ids, self.mask)
        return logits[:, -1]

    def step(self, tokens):
        self.calls.append(("step", tokens.shape))
        logits, self.h = self.lm(tokens[:, None], h=self.h)
        return logits[:, -1]

    def reorder(self, index):
        self.calls.append(("reorder", index.shape))
        self.h = self.h.index_select(0, index)


SINGLE = [[7, 12, 30, 5]]
BATCH = [[9, 21, 4, 33, 17], [26, 8], [13, 13, 38, 6]]


def toy_prompts(rows: list, pad_id: int):
    """Prompt ids (B, T) left-padded with `pad_id`, and their mask, from a list of B lists of ids."""
    T = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run_case(lm: ToyLM, case: dict):
    """Our generate on a stored case (kwargs as the reference got them, plus the prompts and the seed)."""
    kwargs = dict(case["kwargs"])
    ids, mask = toy_prompts(case["prompt"], kwargs["pad_token_id"])
    generator = None if case["seed"] is None else torch.Generator().manual_seed(case["seed"])
    return decode.generate(ToySession(lm, ids, mask), ids, prompt_mask=mask, generator=generator, **kwargs)


def load_toy():
    """The stored toy and cases; (None, {}) before build_decode_fixtures.py has written them (it imports this
    file), which `test_fixtures_present` reports."""
    if not (FIXTURES / "cases.json").exists():
        return None, {}
    return ToyLM(load_file(FIXTURES / "toy_lm.safetensors")), json.loads((FIXTURES / "cases.json").read_text())["cases"]


TOY, CASES = load_toy()


def test_fixtures_present():
    assert TOY is not None and CASES, "tests/fixtures/decode/ missing: run tests/reference/build_decode_fixtures.py"


# ---- pinned to the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_toy_matches_reference(name):
    case = CASES[name]
    assert run_case(TOY, case).tolist() == case["expected"]


def test_fixture_cases_discriminate():
    """The stored answers are not degenerate: varied tokens, beams that differ from greedy, early EOS, and
    hypotheses of different lengths (so the padding rule is exercised)."""
    for name, case in CASES.items():
        assert len({t for row in case["expected"] for t in row}) >= 3, name
    assert CASES["beam3-lp1-single"]["expected"][0] != CASES["greedy-single"]["expected"][0]
    assert any(2 in row[:-1] for row in CASES["greedy-batch"]["expected"])  # a row stopped before the end
    for name in ("beam4-lp0-nrs2-batch", "beam3-pad0-batch"):
        lengths = {row.index(2) if 2 in row else len(row) for row in CASES[name]["expected"]}
        assert len(lengths) > 1, name
    assert 2 in CASES["beam3-pad0-batch"]["expected"][0][-2:]  # EOS used as filler when pad id is 0


# ---- the decoder against itself ---------------------------------------------------------------------------


def toy_full_logits(lm, ids, mask):
    """The naive decoder's model call: everything recomputed from the prompt on."""
    def full_logits(new_tokens):
        all_ids = torch.cat([ids, new_tokens], dim=1)
        all_mask = torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
        return lm(all_ids, all_mask)[0][:, -1]
    return full_logits


@pytest.mark.parametrize("eos", [2, [2, 7], None])
def test_greedy_equals_naive(eos):
    ids, mask = toy_prompts(BATCH, pad_id=1)
    cached = decode.generate(ToySession(TOY, ids, mask), ids, max_new_tokens=15, eos_token_id=eos, pad_token_id=1)
    naive = decode.generate_naive(toy_full_logits(TOY, ids, mask), 3, max_new_tokens=15, eos_token_id=eos,
                                  pad_token_id=1)
    assert cached.tolist() == naive.tolist()
    assert len(set(cached.flatten().tolist())) >= 3


@pytest.mark.parametrize("kwargs", [dict(), dict(repetition_penalty=1.4, min_new_tokens=4),
                                    dict(num_beams=3, num_return_sequences=2, length_penalty=-1.0),
                                    dict(num_beams=4, repetition_penalty=1.3)])
def test_batch_equals_each_prompt_alone(kwargs):
    """Left padding changes nothing: the toy skips padded positions, and the repetition penalty skips a
    row's leading padding when given the mask (the reference does the same)."""
    ids, mask = toy_prompts(BATCH, pad_id=1)
    kw = dict(max_new_tokens=12, eos_token_id=2, pad_token_id=1) | kwargs
    batched = decode.generate(ToySession(TOY, ids, mask), ids, prompt_mask=mask, **kw)
    rows = kwargs.get("num_return_sequences", 1)
    for b in range(3):
        alone = ids[b:b + 1, mask[b].argmax():]
        single = decode.generate(ToySession(TOY, alone), alone, **kw)
        got = batched[b * rows:(b + 1) * rows, :single.shape[1]]
        assert got.tolist() == single.tolist()
        assert (batched[b * rows:(b + 1) * rows, single.shape[1]:] == 1).all()  # only padding beyond


def test_prompt_ids_only_feed_the_repetition_penalty():
    """The session holds the prompt; prompt_ids (possibly (B, 0)) only give the batch size and the ids that
    the repetition penalty sees."""
    ids, mask = toy_prompts(BATCH, pad_id=1)
    kw = dict(max_new_tokens=10, eos_token_id=2, pad_token_id=1, num_beams=3)
    with_ids = decode.generate(ToySession(TOY, ids, mask), ids, **kw)
    without = decode.generate(ToySession(TOY, ids, mask), ids[:, :0], **kw)
    assert with_ids.tolist() == without.tolist()
    penalised = decode.generate(ToySession(TOY, ids, mask), ids, repetition_penalty=3.0, **kw)
    assert penalised.tolist() != with_ids.tolist()


def test_sampling_is_reproducible_with_a_generator():
    ids, mask = toy_prompts(BATCH, pad_id=1)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return decode.generate(ToySession(TOY, ids, mask), ids, max_new_tokens=12, do_sample=True, temperature=1.5,
                               num_return_sequences=2, eos_token_id=2, pad_token_id=1, generator=g).tolist()

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_session_protocol_call_order():
    ids, mask = toy_prompts(SINGLE, pad_id=1)
    session = ToySession(TOY, ids, mask)
    out = decode.generate(session, ids, max_new_tokens=4, min_new_tokens=4, num_beams=3, eos_token_id=2,
                          pad_token_id=1)
    assert out.shape == (1, 4)
    # The prompt runs once; its cache is then copied into the 3 beams (the first reorder).
    assert session.calls == [("prefill",), ("reorder", (3,))] + [("reorder", (3,)), ("step", (3,))] * 3
    session = ToySession(TOY, ids, mask)
    decode.generate(session, ids, max_new_tokens=3, min_new_tokens=3, eos_token_id=2, pad_token_id=1)
    assert session.calls == [("prefill",), ("step", (1,)), ("step", (1,))]  # one row: nothing to copy


# ---- processors and filters on crafted distributions --------------------------------------------------------


class FixedLogits:
    """A session whose next-token logits are always the same row."""

    def __init__(self, logits, batch):
        self.logits, self.n = logits, batch

    def prefill(self):
        return self.logits.expand(self.n, -1)

    def step(self, tokens):
        return self.logits.expand(self.n, -1)

    def reorder(self, index):
        self.n = len(index)


def sample_fixed(probs, n=400, **kwargs):
    logits = torch.tensor(probs).log()
    g = torch.Generator().manual_seed(0)
    out = decode.generate(FixedLogits(logits, n), torch.zeros(n, 0, dtype=torch.long), max_new_tokens=5,
                          do_sample=True, eos_token_id=None, pad_token_id=0, generator=g, **kwargs)
    return set(out.flatten().tolist())


PROBS = [0.05, 0.4, 0.02, 0.25, 0.15, 0.08, 0.05]  # best first: 1, 3, 4, 5, then 0 and 6 tied, then 2


def test_top_k_and_top_p_never_emit_a_filtered_token():
    assert sample_fixed(PROBS) == set(range(7))  # unfiltered: everything shows up in 2000 draws
    assert sample_fixed(PROBS, top_k=3) == {1, 3, 4}
    assert sample_fixed(PROBS, top_k=5) == {1, 3, 4, 5, 0, 6}  # ties with the k-th token are kept
    assert sample_fixed(PROBS, top_p=0.6) == {1, 3}  # 0.4 + 0.25 >= 0.6
    assert sample_fixed(PROBS, top_p=0.85) == {1, 3, 4, 5}  # 0.4 + 0.25 + 0.15 = 0.8 < 0.85 <= 0.88
    assert sample_fixed(PROBS, top_p=0.0) == {1}  # at least one token survives
    assert sample_fixed(PROBS, top_k=4, top_p=0.6) == {1, 3}
    # temperature acts before the filters (it does not move the ranking, only the mass)
    assert sample_fixed(PROBS, temperature=0.3, top_p=0.6) == {1}


def test_filters_keep_min_keep_tokens():
    scores = torch.tensor([[3.0, 0.0, 2.0, 1.0]])
    assert decode.top_p_filter(scores, 0.0, min_keep=2).tolist() == [[3.0, -torch.inf, 2.0, -torch.inf]]
    assert decode.top_k_filter(scores, 1, min_keep=3).tolist() == [[3.0, -torch.inf, 2.0, 1.0]]


def test_repetition_penalty_by_hand():
    scores = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    seen = torch.tensor([[0, 1, 1, 3]])
    out = decode.repetition_penalty(scores, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 2.0]]  # each seen token once; negative scores multiplied
    out = decode.repetition_penalty(scores, seen, 2.0, skip=torch.tensor([2]))
    assert out.tolist() == [[2.0, -2.0, 0.5, 2.0]]  # the leading two positions are skipped
    out = decode.repetition_penalty(scores, torch.tensor([[9, 3]]), 2.0)  # an id beyond the head is ignored
    assert out.tolist() == [[2.0, -1.0, 0.5, 2.0]]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_repetition_penalty_skips_left_padding_in_generation(num_beams):
    """The padding id is the favourite here: penalising it because it pads the prompt would change the first
    token (3.0 / 2 = 1.5 < 2.5), so greedy and beam search must pass each row's padding to the penalty."""
    logits = torch.tensor([0.0, 3.0, 2.5, 0.0, 0.0, 0.0])
    ids, mask = torch.tensor([[1, 1, 5]]), torch.tensor([[0, 0, 1]])
    out = decode.generate(FixedLogits(logits, 1), ids, prompt_mask=mask, max_new_tokens=2, num_beams=num_beams,
                          repetition_penalty=2.0, eos_token_id=None, pad_token_id=1)
    assert out[0, 0].item() == 1
    unmasked = decode.generate(FixedLogits(logits, 1), ids, max_new_tokens=2, num_beams=num_beams,
                               repetition_penalty=2.0, eos_token_id=None, pad_token_id=1)
    assert unmasked[0, 0].item() == 2  # without the mask the padding counts as seen: the test can tell


def test_top_p_keeps_the_token_that_reaches_p_exactly():
    """top_p keeps the smallest set whose mass reaches p: with [.5, .25, .25] and p = .5 the first token alone
    (its mass equals p), with p = .75 the first two (a tie at the boundary is not needed to reach p)."""
    scores = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(decode.top_p_filter(scores, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(decode.top_p_filter(scores, 0.75)).tolist() == [[True, True, False]] or \
        torch.isfinite(decode.top_p_filter(scores, 0.75)).tolist() == [[True, False, True]]


def test_min_new_tokens_suppresses_every_eos():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])  # EOS ids 1 and 2 are the favourites
    out = decode.generate(FixedLogits(logits, 1), torch.zeros(1, 0, dtype=torch.long), max_new_tokens=6,
                          min_new_tokens=3, eos_token_id=[1, 2], pad_token_id=0)
    assert out.tolist() == [[3, 3, 3, 1]]


# ---- errors -------------------------------------------------------------------------------------------------


def session_and_ids():
    ids, mask = toy_prompts(SINGLE, pad_id=1)
    return ToySession(TOY, ids, mask), ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=torch.zeros(3, dtype=torch.long)), "prompt_ids must be a \\(B, T0\\) long tensor"),
    (dict(prompt_ids=torch.zeros(1, 2)), "prompt_ids must be a \\(B, T0\\) long tensor"),
    (dict(prompt_ids=torch.zeros(0, 2, dtype=torch.long)), "prompt_ids has batch size 0"),
    (dict(prompt_mask=torch.ones(1, 3)), "prompt_mask \\(1, 3\\) does not match"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(min_new_tokens=31), "min_new_tokens must be in"),
    (dict(min_new_tokens=-1), "min_new_tokens must be in"),
    (dict(num_beams=0), "num_beams and num_return_sequences must be >= 1"),
    (dict(num_return_sequences=2), "greedy search gives one answer"),
    (dict(num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    (dict(num_beams=2, early_stopping="always"), "early_stopping must be"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(eos_token_id=[]), "eos_token_id is an empty list"),
    (dict(pad_token_id=None), "pad_token_id must be an int"),
])
def test_argument_errors(kwargs, message):
    session, ids = session_and_ids()
    args = dict(prompt_ids=ids, eos_token_id=2, pad_token_id=1) | kwargs
    with pytest.raises(ValueError, match=f"^generate: .*{message}"):
        decode.generate(session, args.pop("prompt_ids"), **args)


def test_session_returning_wrong_shape():
    class FlatLogits(FixedLogits):
        def prefill(self):
            return self.logits  # (V,) instead of (N, V)

    ids = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"session.prefill\(\) returned logits of shape \(1, 4\); expected \(2, V\)"):
        decode.generate(FixedLogits(torch.zeros(4), 1), ids, eos_token_id=2, pad_token_id=1)
    with pytest.raises(ValueError, match=r"session.prefill\(\) returned logits of shape \(4,\); expected \(1, V\)"):
        decode.generate(FlatLogits(torch.zeros(4), 1), ids[:1], eos_token_id=2, pad_token_id=1)


# ---- live: against the reference on the spot ----------------------------------------------------------------


@pytest.mark.live
def test_toy_fixtures_are_current():
    """The stored answers are what the installed reference gives now, for every case."""
    from build_decode_fixtures import reference_generate

    for name, case in CASES.items():
        assert reference_generate(TOY, case) == case["expected"], name


class HFOPTSession:
    """A transformers OPTForCausalLM as a decoding session: positions from the attention mask (left padding),
    DynamicCache reordered with `reorder_cache`; the mask is dropped when it has no padding, as generate does."""

    def __init__(self, model, ids, mask):
        self.model, self.ids, self.mask, self.cache = model, ids, mask, None

    def _run(self, ids, positions):
        mask = None if bool((self.mask == 1).all()) else self.mask
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def prefill(self):
        return self._run(self.ids, (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0))

    def step(self, tokens):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._run(tokens[:, None], self.mask.sum(-1, keepdim=True) - 1)

    def reorder(self, index):
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)


class HFT5Session:
    """A transformers T5ForConditionalGeneration as a session: encoder once (then repeated per row, as
    generate does; here by reorder), decoder from the start token 0 with an EncoderDecoderCache."""

    def __init__(self, model, ids, mask):
        self.model, self.mask, self.cache = model, mask, None
        self.encoded = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def _run(self, decoder_ids):
        out = self.model(encoder_outputs=(self.encoded,), attention_mask=self.mask, decoder_input_ids=decoder_ids,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def prefill(self):
        return self._run(torch.zeros(self.encoded.shape[0], 1, dtype=torch.long))

    def step(self, tokens):
        return self._run(tokens[:, None])

    def reorder(self, index):
        self.cache.reorder_cache(index)
        self.encoded, self.mask = self.encoded.index_select(0, index), self.mask.index_select(0, index)


def hf_opt(seed=1):
    """A random OPT with scaled weights. Its head is untied (std 0.5): a tiny random model with a tied head
    mostly repeats its input token, which would not tell decoders apart; this seed also ends some answers early."""
    import transformers
    from hf_models import scale_weights

    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=68, max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=2,
                                    eos_token_id=2, pad_token_id=1, dropout=0.0, attention_dropout=0.0,
                                    tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(config)
    scale_weights(model, seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def hf_t5(seed=0):
    from build_t5_fixtures import reference_t5

    return reference_t5(dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                             num_heads=4), seed)


def hf_prompts(family):
    """Three prompts of lengths 6, 3, 5: left-padded for OPT (with BOS first), right-padded for T5. OPT's
    padding slots hold id 5, a token this model likes to generate, rather than the pad id: masked positions
    must change nothing, and the repetition penalty must skip them (the reference skips leading padding)."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (6, 3, 5)]
    T = 7
    if family == "opt":
        ids = torch.tensor([[5] * (T - 1 - len(r)) + [2] + r for r in rows])
        mask = torch.tensor([[0] * (T - 1 - len(r)) + [1] * (len(r) + 1) for r in rows])
    else:
        ids = torch.tensor([r + [1] + [0] * (T - 1 - len(r)) for r in rows])
        mask = torch.tensor([[1] * (len(r) + 1) + [0] * (T - 1 - len(r)) for r in rows])
    return ids, mask


HF_CASES = {
    "greedy": dict(),
    "greedy-min8-rep1.3": dict(min_new_tokens=8, repetition_penalty=1.3),
    "greedy-eos-list": dict(eos_token_id=[1, 2, 11]),  # T5's EOS 1, OPT's EOS 2, and one more
    "sample-t0.8-k10-p0.9-nrs2": dict(do_sample=True, temperature=0.8, top_k=10, top_p=0.9,
                                      num_return_sequences=2, seed=5),
    "beam2": dict(num_beams=2),
    "beam3-lp-1-nrs3": dict(num_beams=3, length_penalty=-1.0, num_return_sequences=3),
    "beam4-lp0-nrs2": dict(num_beams=4, length_penalty=0.0, num_return_sequences=2),
    "beam5-lp2-min4": dict(num_beams=5, length_penalty=2.0, min_new_tokens=4),
    "beam5-lp1-rep1.5-eos-list": dict(num_beams=5, repetition_penalty=1.5, eos_token_id=[1, 2, 11]),
    "beam3-early": dict(num_beams=3, early_stopping=True, num_return_sequences=2),
    "beam3-never-lp1.5": dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    "beam-sample3-k8": dict(num_beams=3, do_sample=True, top_k=8, temperature=1.3, seed=2),
}


def hf_generate(model, family, ids, mask, kwargs):
    """The reference: model.generate with every setting explicit; returns only the new tokens."""
    import transformers

    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", None)
    eos = 2 if family == "opt" else 1
    config = dict(max_new_tokens=16, min_new_tokens=0, num_beams=1, length_penalty=1.0, do_sample=False,
                  temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, num_return_sequences=1,
                  eos_token_id=eos, pad_token_id=1 if family == "opt" else 0, early_stopping=False,
                  bos_token_id=2 if family == "opt" else None, decoder_start_token_id=0) | kwargs
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask,
                         generation_config=transformers.GenerationConfig(**config))
    return out[:, ids.shape[1] if family == "opt" else 1:], config, seed


@pytest.mark.live
@pytest.mark.parametrize("family", ["opt", "t5"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_matches_reference_generate(family, case):
    model = hf_opt() if family == "opt" else hf_t5()
    ids, mask = hf_prompts(family)
    expected, config, seed = hf_generate(model, family, ids, mask, HF_CASES[case])
    session = (HFOPTSession if family == "opt" else HFT5Session)(model, ids, mask)
    kwargs = {k: config[k] for k in ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty",
                                     "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                     "num_return_sequences", "eos_token_id", "pad_token_id", "early_stopping")}
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if family == "opt":  # the reference penalises the whole decoder-only prompt, skipping its left padding
        prompt_ids, prompt_mask = ids, mask
    else:  # ... and only the decoder's ids for T5: the start token
        prompt_ids, prompt_mask = torch.zeros(3, 1, dtype=torch.long), None
    got = decode.generate(session, prompt_ids, prompt_mask=prompt_mask, generator=generator, **kwargs)
    assert got.tolist() == expected.tolist()
    assert len(set(got.flatten().tolist())) >= 3


@pytest.mark.live
@pytest.mark.parametrize("family", ["opt", "t5"])
def test_greedy_equals_naive_live(family):
    model = hf_opt() if family == "opt" else hf_t5()
    ids, mask = hf_prompts(family)
    eos = 2 if family == "opt" else 1

    def full_logits(new):
        if family == "opt":
            all_mask = torch.cat([mask, torch.ones_like(new)], 1)
            return model(input_ids=torch.cat([ids, new], 1), attention_mask=all_mask,
                         position_ids=(all_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits[:, -1]
        start = torch.zeros(3, 1, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.cat([start, new], 1),
                     use_cache=False).logits[:, -1]

    session = (HFOPTSession if family == "opt" else HFT5Session)(model, ids, mask)
    cached = decode.generate(session, ids[:, :0], max_new_tokens=16, eos_token_id=eos, pad_token_id=1)
    naive = decode.generate_naive(full_logits, 3, max_new_tokens=16, eos_token_id=eos, pad_token_id=1)
    assert cached.tolist() == naive.tolist()
    assert len(set(cached.flatten().tolist())) >= 3


@pytest.mark.live
def test_processors_match_reference_classes():
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g) * 3
    seen = torch.randint(0, 55, (6, 9), generator=g)  # some ids beyond the 50-wide head
    skip = torch.tensor([0, 2, 0, 5, 9, 1])
    cases = [
        (decode.repetition_penalty(scores, seen, 1.7), lp.RepetitionPenaltyLogitsProcessor(1.7)),
        (decode.repetition_penalty(scores, seen, 0.6, skip),
         lp.RepetitionPenaltyLogitsProcessor(0.6, prompt_ignore_length=skip)),
        (decode.suppress_tokens(scores, torch.tensor([3, 7])),
         lp.MinNewTokensLengthLogitsProcessor(0, 20, [3, 7])),
        (decode.top_k_filter(scores, 5), lp.TopKLogitsWarper(5)),
        (decode.top_k_filter(scores, 1, min_keep=3), lp.TopKLogitsWarper(1, min_tokens_to_keep=3)),
        (decode.top_p_filter(scores, 0.7), lp.TopPLogitsWarper(0.7)),
        (decode.top_p_filter(scores, 0.05, min_keep=2), lp.TopPLogitsWarper(0.05, min_tokens_to_keep=2)),
    ]
    for ours, processor in cases:
        assert torch.equal(ours, processor(seen, scores.clone())), processor
