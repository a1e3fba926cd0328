"""Text generation: greedy search, sampling and beam search, shared by both language-model families.

BLIP-2 turns an image into a soft prompt for a frozen language model and lets that model continue the text
(paper section 3.3). Continuing the text is this file: a loop that asks the model for the next-token logits,
picks a token, feeds it back, and stops at the end-of-sequence token (EOS). It is the same loop for OPT
(decoder-only: the prompt and the answer share one sequence) and for Flan-T5 (encoder-decoder: the encoder
reads the prompt once and the decoder writes the answer), so it never touches a model directly. It talks to a
*session* (see `DecodingSession`): "run the prompt", "here are the tokens just chosen, give me the next
logits", and, for beam search, "keep these rows of your cache". model.py builds the session for each family.

Three ways to pick tokens, all with the semantics of Hugging Face `transformers` 5.x `generate`, which the
tests pin token for token:

    greedy       the most likely token at each step (argmax)
    sampling     draw from softmax(logits), optionally sharpened by a temperature and cut to the top-k tokens
                 or to the smallest set holding probability top-p
    beam search  keep the K best partial answers by summed log-probability; an answer that emits EOS is set
                 aside with score  sum_logprob / new_length ** length_penalty  and the best finished ones win

Before a token is picked the logits go through "processors", in the reference's order: repetition penalty,
EOS suppression until `min_new_tokens`, then (sampling only) temperature, top-k, top-p.

Notation: B prompts in the batch, K beams, N rows the model runs (B, B*num_return_sequences or B*K),
T0 prompt length, t new tokens so far, V vocabulary size, C candidates per prompt in beam search (2K).
"""

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

# The reference marks "impossible" beams with this score instead of -inf, so that sums stay finite.
BEAM_MASK = -1.0e9


class DecodingSession(Protocol):
    """The language model as the decoding loop sees it: a prompt already given, plus a growing cache.

    Call order: `prefill` once, then `step` once per new token; `reorder` comes right after `prefill` when
    each prompt needs several rows (K beams, several samples), and between steps in beam search.
    """

    def prefill(self) -> Tensor:
        """Run the whole prompt through the model, fill the cache, return (N, V) logits for the first new
        token. (For T5: run the encoder, then the decoder on its start token.)"""

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (N,): the token just chosen for each row. Append it to the cache and return (N, V) logits
        for the token after it."""

    def reorder(self, index: Tensor) -> None:
        """The new row i continues old row index[i] (index (N,), long), so every cached tensor becomes
        `cached.index_select(0, index)`. After `prefill`, index may be longer than the batch: rows
        b*n .. b*n+n-1 then become copies of prompt b (its K beams)."""


@dataclass
class Settings:
    """The checked arguments of `generate`, in one place (internal)."""

    max_new_tokens: int
    min_new_tokens: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_return_sequences: int
    eos: Tensor | None  # (n_eos,) long, or None: then generation only stops at max_new_tokens
    pad_token_id: int
    generator: torch.Generator | None
    min_tokens_to_keep: int  # top-k / top-p never cut below this many tokens (beam sampling needs a spare)


# ---- logits processors: each maps scores (N, V) to scores (N, V) ------------------------------------------


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: float, skip: Tensor | None = None) -> Tensor:
    """Make every token already present in `seen` (N, T) less likely (CTRL, Keskar et al. 2019): a positive
    score is divided by the penalty, a negative one multiplied (so it always moves down for penalty > 1).
    Each token is penalised once however often it occurs. `skip` (N,): leading positions of each row to
    ignore (the reference skips the left padding of a decoder-only prompt)."""
    V = scores.shape[-1]
    # Ids that the head cannot produce (an embedding table larger than the head) and skipped positions go to
    # a spare column V, which is dropped at the end; the reference does the same.
    ids = seen.clamp(max=V)
    if skip is not None:
        position = torch.arange(seen.shape[1], device=seen.device)
        ids = ids.masked_fill(position[None, :] < skip[:, None], V)
    padded = F.pad(scores, (0, 1))  # (N, V + 1)
    picked = padded.gather(1, ids)  # (N, T)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[:, :V]


def suppress_tokens(scores: Tensor, token_ids: Tensor) -> Tensor:
    """Forbid `token_ids` (score -inf): used for EOS while fewer than `min_new_tokens` tokens exist."""
    forbidden = torch.isin(torch.arange(scores.shape[-1], device=scores.device), token_ids)  # (V,)
    return torch.where(forbidden, -torch.inf, scores)


def top_k_filter(scores: Tensor, k: int, min_keep: int = 1) -> Tensor:
    """Keep the k best tokens of each row (ties with the k-th included), -inf for the rest."""
    k = min(max(k, min_keep), scores.shape[-1])
    kth_best = torch.topk(scores, k).values[:, -1:]  # (N, 1)
    return scores.masked_fill(scores < kth_best, -torch.inf)


def top_p_filter(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of best tokens whose probability sums to
    at least p. Computed as the reference does, from the *unlikely* end: sort ascending and drop tokens while
    the accumulated probability stays <= 1 - p."""
    ascending, order = torch.sort(scores, descending=False)  # (N, V)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[:, -min_keep:] = False  # the best min_keep tokens always survive
    drop = drop.scatter(1, order, drop)  # back to vocabulary order
    return scores.masked_fill(drop, -torch.inf)


def process_scores(scores: Tensor, seqs: Tensor, new_len: int, s: Settings, skip: Tensor | None) -> Tensor:
    """The reference's processor chain (transformers/generation/utils.py `_get_logits_processor`), in its
    order. scores (N, V) float32; seqs (N, T0 + new_len): prompt ids and the tokens chosen so far."""
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seqs, s.repetition_penalty, skip)
    if s.eos is not None and new_len < s.min_new_tokens:
        scores = suppress_tokens(scores, s.eos)
    if s.do_sample:  # the "warpers" only shape a distribution that will be sampled
        if s.temperature != 1.0:
            scores = scores / s.temperature
        if s.top_k != 0:
            scores = top_k_filter(scores, s.top_k, s.min_tokens_to_keep)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p, s.min_tokens_to_keep)
    return scores


# ---- the public entry point ---------------------------------------------------------------------------------


@torch.no_grad()
def generate(session: DecodingSession, prompt_ids: Tensor, *, max_new_tokens: int = 30, min_new_tokens: int = 0,
             num_beams: int = 1, length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, num_return_sequences: int = 1,
             eos_token_id: int | list[int] | None, pad_token_id: int, generator: torch.Generator | None = None,
             early_stopping: bool | str = False, prompt_mask: Tensor | None = None,
             vocab_size: int | None = None) -> Tensor:
    """Generate text after the prompt held by `session`; returns only the new tokens, (B *
    num_return_sequences, T_new) long, each row right-padded after its EOS.

    prompt_ids (B, T0): the ids the reference applies the repetition penalty to, and the batch size. For a
        decoder-only model that is the whole prompt (for BLIP-2 OPT: the image-token slots, BOS, the text);
        for an encoder-decoder model only the decoder's ids (the start token). T0 may be 0.
    prompt_mask (B, T0), optional: the prompt's attention mask; as in the reference, the repetition penalty
        skips each row's *leading* padding (left padding).
    eos_token_id: one id or several (an int, a list, a tensor); None generates exactly max_new_tokens.
    pad_token_id: fills rows that finished early. (Beam search fills with EOS when the pad id is 0, a quirk
        of the reference kept for parity; see `_beam_search`.)
    top_k=0 and top_p=1.0 switch those filters off (the reference's own default is top_k=50).
    generator: for sampling, on the logits' device; None uses torch's global generator (as the reference).
    temperature, top_k, top_p and generator only matter with do_sample=True; length_penalty and
    early_stopping (False, True or "never", as in the reference) only with num_beams > 1.
    vocab_size: when given, eos_token_id must lie in the vocabulary (an id past it would never stop generation).
    """
    s = _check_arguments(prompt_ids, prompt_mask, max_new_tokens, min_new_tokens, num_beams, length_penalty,
                         early_stopping, do_sample, temperature, top_k, top_p, repetition_penalty,
                         num_return_sequences, eos_token_id, pad_token_id, generator, vocab_size)

    # Every prompt becomes `rows` identical rows (beams, or independent samples), as in the reference.
    rows = max(num_beams, num_return_sequences)
    seqs = prompt_ids.repeat_interleave(rows, dim=0)  # (N, T0)
    skip = None
    if prompt_mask is not None:
        # Index of the first real token = number of leading pads (argmax finds the first 1).
        skip = (prompt_mask != 0).int().argmax(dim=1).repeat_interleave(rows, dim=0)  # (N,)

    if num_beams == 1:
        return _greedy_or_sample(session, seqs, s, skip, rows)
    return _beam_search(session, seqs, s, skip, rows)


def _prefill(session: DecodingSession, N: int, rows: int) -> Tensor:
    """Run the B = N / rows prompts once, then make `rows` copies of each: its cached keys/values and its
    logits (N, V). The reference repeats the prompts first and runs all N rows, which costs `rows` times the
    compute for the same numbers: 5-beam captions of OPT-2.7b spent most of their time there."""
    logits = _checked(session.prefill(), N // rows, "prefill")  # (B, V)
    if rows == 1:
        return logits
    copies = torch.arange(N // rows, device=logits.device).repeat_interleave(rows)  # (N,): 0,0,..,1,1,..
    session.reorder(copies)
    return logits.index_select(0, copies)


# ---- greedy search and sampling -----------------------------------------------------------------------------


def _greedy_or_sample(session: DecodingSession, seqs: Tensor, s: Settings, skip: Tensor | None,
                      rows: int) -> Tensor:
    """One token per row per step; a row that has emitted EOS keeps receiving the pad token until every row
    is done (the batch stays rectangular, and the model keeps running those rows: simpler than shrinking)."""
    N, T0 = seqs.shape
    unfinished = torch.ones(N, dtype=torch.bool, device=seqs.device)
    logits = _prefill(session, N, rows)
    for t in range(s.max_new_tokens):
        scores = process_scores(logits.float(), seqs, t, s, skip)  # the reference decides in float32
        if s.do_sample:
            probs = F.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1, generator=s.generator).squeeze(1)  # (N,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (N,)
        if s.eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, s.pad_token_id)
            unfinished &= ~torch.isin(next_tokens, s.eos)
        seqs = torch.cat([seqs, next_tokens[:, None]], dim=1)  # (N, T0 + t + 1)
        if not unfinished.any() or t + 1 == s.max_new_tokens:
            break
        logits = _checked(session.step(next_tokens), N, "step")
    return seqs[:, T0:]


# ---- beam search --------------------------------------------------------------------------------------------


def _beam_search(session: DecodingSession, seqs: Tensor, s: Settings, skip: Tensor | None, rows: int) -> Tensor:
    """Beam search as in transformers 5.x `_beam_search`, written with one explicit loop.

    Each prompt keeps K running beams with their summed log-probabilities. At each step:
      1. every beam proposes every token: K*V candidates scored  beam_score + log p(token); keep the best
         C = 2K (with several EOS ids: (n_eos + 1) * K), so that at least K of them do not end in EOS;
      2. a candidate among the best K that ends in EOS (or reaches max_new_tokens) becomes a finished
         hypothesis with score  beam_score / new_length ** length_penalty ; new_length counts the new tokens
         including EOS, never the prompt (5.x counts from `decoder_prompt_len`, for OPT as for T5). Each
         prompt keeps its K best hypotheses;
      3. the best K candidates that did not finish become the running beams (cache rows reordered to match);
      4. a prompt is done once it holds K hypotheses and its best running beam, scored as if it ended now
         (length t + 1; early_stopping="never" with length_penalty > 0: max_new_tokens), cannot beat the
         worst of them (early_stopping=True: as soon as it holds K). With length_penalty > 0 a longer answer
         could in fact still win: a heuristic, kept for parity. The loop ends when every prompt is done or
         at max_new_tokens.
    Returns the num_return_sequences best hypotheses of each prompt, best first.
    """
    N, T0 = seqs.shape
    K, device = s.num_beams, seqs.device
    B = N // K
    n_eos = 0 if s.eos is None else s.eos.numel()
    C = max(2, 1 + n_eos) * K
    first_row = torch.arange(B, device=device)[:, None] * K  # (B, 1): row of beam 0 of each prompt

    # All K beams start as copies of the prompt; only beam 0 may propose at the first step, otherwise the
    # same continuation would appear K times.
    running = torch.zeros(B, K, device=device)
    running[:, 1:] = BEAM_MASK
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]  # per prompt, best first, at most K
    done = [False] * B

    logits = _prefill(session, N, rows)
    for t in range(s.max_new_tokens):
        log_probs = F.log_softmax(logits.float(), dim=-1)  # processors act on log-probabilities here
        log_probs = process_scores(log_probs, seqs, t, s, skip)
        V = log_probs.shape[-1]
        totals = (log_probs.view(B, K, V) + running[:, :, None]).view(B, K * V)  # candidate = (beam, token)

        # 1. the C best candidates of each prompt (beam sampling: C drawn without replacement instead)
        if s.do_sample:
            picked = torch.multinomial(F.softmax(totals, dim=-1), C, generator=s.generator)  # (B, C)
            scores = totals.gather(1, picked)
        else:
            scores, picked = torch.topk(totals, C)  # (B, C), best first
        beam, token = picked // V, picked % V
        parent = first_row + beam  # (B, C) row of seqs each candidate extends
        last_step = t + 1 == s.max_new_tokens
        ends = torch.full_like(token, last_step, dtype=torch.bool)
        if s.eos is not None:
            ends |= torch.isin(token, s.eos)

        # 2. finished hypotheses: only the first K candidates may finish (the rest are spares for step 3);
        #    "first" is rank order, or draw order when sampling, as in the reference
        normalised = (scores / ((t + 1) ** s.length_penalty)).tolist()
        ends_list = ends.tolist()
        for b in range(B):
            if done[b]:
                continue
            for c in range(K):
                if ends_list[b][c]:
                    tokens = torch.cat([seqs[parent[b, c], T0:], token[b, c, None]])
                    _add_hypothesis(finished[b], normalised[b][c], tokens, K)

        # 3. the K best unfinished candidates continue (finished ones pushed to the bottom)
        open_scores = scores + ends.float() * BEAM_MASK  # (B, C)
        running, kept = torch.topk(open_scores, K)  # (B, K), best first
        rows = parent.gather(1, kept).view(-1)  # (N,)
        next_tokens = token.gather(1, kept).view(-1)  # (N,)
        seqs = torch.cat([seqs[rows], next_tokens[:, None]], dim=1)  # (N, T0 + t + 1)

        # 4. which prompts can no longer improve
        if s.early_stopping == "never" and s.length_penalty > 0:
            best_length = s.max_new_tokens
        else:
            best_length = t + 1
        best_possible = (running[:, :1] / (best_length ** s.length_penalty))[:, 0].tolist()
        for b in range(B):
            if not done[b] and len(finished[b]) == K:
                done[b] = s.early_stopping is True or not best_possible[b] > finished[b][-1][0]
        if all(done) or last_step:
            break

        session.reorder(rows)
        logits = _checked(session.step(next_tokens), N, "step")

    best = [tokens for hyps in finished for _, tokens in hyps[:s.num_return_sequences]]
    # The reference fills with `pad_token_id or eos_token_id[0]`: Python's `or` takes a pad id of 0 (Flan-T5)
    # for "no pad id", so T5 beams are filled with EOS. Without EOS all hypotheses have the same length.
    fill = s.pad_token_id if s.pad_token_id != 0 or s.eos is None else int(s.eos[0])
    out = torch.full((len(best), max(len(x) for x in best)), fill, dtype=torch.long, device=device)
    for i, tokens in enumerate(best):
        out[i, :len(tokens)] = tokens
    return out


def _add_hypothesis(hyps: list[tuple[float, Tensor]], score: float, tokens: Tensor, K: int):
    """Insert into a best-first list that keeps at most K entries."""
    hyps.append((score, tokens))
    hyps.sort(key=lambda h: -h[0])
    del hyps[K:]


# ---- the naive decoder --------------------------------------------------------------------------------------


@torch.no_grad()
def generate_naive(full_logits_fn: Callable[[Tensor], Tensor], batch_size: int, *, max_new_tokens: int = 30,
                   eos_token_id: int | list[int] | None, pad_token_id: int) -> Tensor:
    """Greedy decoding with no cache, obviously right: at every step recompute the model on the prompt plus
    everything generated so far. full_logits_fn(new_tokens (B, t)) -> (B, V) logits for the next token (the
    prompt is inside the function; new_tokens is on the CPU). Same output as generate(..., num_beams=1)."""
    eos = None if eos_token_id is None else torch.tensor(_as_list(eos_token_id))
    new_tokens = torch.zeros(batch_size, 0, dtype=torch.long)
    finished = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_new_tokens):
        next_tokens = full_logits_fn(new_tokens).float().argmax(dim=-1).cpu()  # (B,)
        next_tokens[finished] = pad_token_id
        new_tokens = torch.cat([new_tokens, next_tokens[:, None]], dim=1)
        if eos is not None:
            finished |= torch.isin(next_tokens, eos)
            if finished.all():
                break
    return new_tokens


# ---- argument checks ----------------------------------------------------------------------------------------


def _as_list(ids) -> list[int]:
    """One id or several, as an int, a list or tuple, a NumPy integer or a tensor -> [int, ...]."""
    if isinstance(ids, Tensor):
        ids = ids.reshape(-1).tolist()
    given = ids
    ids = [ids] if isinstance(ids, (numbers.Integral, str)) else list(ids)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"generate: eos_token_id must be token ids (ints), got {given!r}")
    return [int(i) for i in ids]


def _checked(logits: Tensor, N: int, call: str) -> Tensor:
    if logits.ndim != 2 or logits.shape[0] != N:
        raise ValueError(f"session.{call}() returned logits of shape {tuple(logits.shape)}; expected ({N}, V)")
    return logits


def _check_arguments(prompt_ids, prompt_mask, max_new_tokens, min_new_tokens, num_beams, length_penalty,
                     early_stopping, do_sample, temperature, top_k, top_p, penalty, num_return_sequences,
                     eos_token_id, pad_token_id, generator, vocab_size=None) -> Settings:
    def fail(message):
        raise ValueError(f"generate: {message}")

    for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens),
                        ("num_beams", num_beams), ("top_k", top_k), ("num_return_sequences", num_return_sequences)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # 2.0 would fail deep in torch
            fail(f"{name} must be an int, got {value!r}")
    if not isinstance(do_sample, bool):  # do_sample="no" is truthy
        fail(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("length_penalty", length_penalty), ("temperature", temperature), ("top_p", top_p)):
        if not math.isfinite(value):
            fail(f"{name} must be a finite number, got {value}")
    if generator is not None and not isinstance(generator, torch.Generator):
        fail(f"generator must be a torch.Generator (or None), got {generator!r}")
    if not isinstance(prompt_ids, Tensor) or prompt_ids.ndim != 2 or prompt_ids.dtype != torch.long:
        fail(f"prompt_ids must be a (B, T0) long tensor, got {getattr(prompt_ids, 'shape', type(prompt_ids))}")
    if prompt_ids.shape[0] == 0:
        fail("prompt_ids has batch size 0")
    if prompt_mask is not None and prompt_mask.shape != prompt_ids.shape:
        fail(f"prompt_mask {tuple(prompt_mask.shape)} does not match prompt_ids {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        fail(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        fail(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if num_beams < 1 or num_return_sequences < 1:
        fail(f"num_beams and num_return_sequences must be >= 1, got {num_beams} and {num_return_sequences}")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        fail(f"greedy search gives one answer per prompt; num_return_sequences={num_return_sequences} needs "
             "num_beams > 1 or do_sample=True")
    if num_beams > 1 and num_return_sequences > num_beams:
        fail(f"num_return_sequences ({num_return_sequences}) cannot exceed num_beams ({num_beams})")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        fail(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    if do_sample and not temperature > 0:
        fail(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0:
        fail(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 <= top_p <= 1:
        fail(f"top_p must be in [0, 1] (1 = off), got {top_p}")
    if not (penalty > 0 and math.isfinite(penalty)):
        fail(f"repetition_penalty must be > 0 and finite (1 = off), got {penalty}")
    if generator is not None and generator.device.type != prompt_ids.device.type:
        fail(f"generator is on {generator.device}, the model on {prompt_ids.device}: create it there, "
             f"torch.Generator({prompt_ids.device.type!r})")
    eos = None
    if eos_token_id is not None:
        ids = _as_list(eos_token_id)
        if not ids:
            fail("eos_token_id is an empty list; pass None to generate without EOS")
        if any(i < 0 or (vocab_size is not None and i >= vocab_size) for i in ids):
            last = "V - 1" if vocab_size is None else vocab_size - 1
            fail(f"eos_token_id {ids} has ids outside the vocabulary (0..{last}): it would never stop generation")
        eos = torch.tensor(ids, device=prompt_ids.device)
    if not isinstance(pad_token_id, int):
        fail(f"pad_token_id must be an int, got {pad_token_id!r}")
    # Beam sampling must leave at least one non-EOS token for every beam after top-k / top-p.
    keep = (2 if eos is None else eos.numel() + 1) if num_beams > 1 else 1
    return Settings(max_new_tokens, min_new_tokens, num_beams, float(length_penalty), early_stopping, do_sample,
                    float(temperature), top_k, float(top_p), float(penalty), num_return_sequences, eos,
                    pad_token_id, generator, keep)
