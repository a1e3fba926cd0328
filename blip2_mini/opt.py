"""Stage 4 (decoder-only family): the frozen OPT language model (Zhang et al., 2022), with a KV cache.

BLIP-2 feeds OPT the projected queries as a soft visual prompt followed by the text prompt, and OPT continues
the text (section 3.3, Fig. 3 top). OPT is a GPT-style decoder:

    x = token embedding + learned position embedding
    for each layer:  x = x + SelfAttention(LN(x)) (causal);  x = x + fc2(relu(fc1(LN(x))))
    logits = LN(x) @ token_embedding^T                        (the output head is tied to the input embedding)

What is unusual here:
- Position embeddings have an offset of 2: row p+2 of the table holds position p (a leftover of fairseq's
  padding convention). Positions are counted from the attention mask (cumulative sum), not from the index, so
  a left-padded prompt starts at position 0 on its first real token: that is what makes batched generation
  with left padding give the same tokens as each prompt alone.
- Generation reuses keys/values: `KVCache` keeps every layer's K and V, so each new token costs one row of
  attention instead of recomputing the whole prefix (the "naive" decoder in decode.py shows the equivalence).

Notation: B batch, T new tokens this call, S = past + T total tokens, D = Dlm width, nh heads, hs head size,
V vocabulary.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, attend, bias_from_allowed, merge_heads, split_heads
from .config import OPTConfig
from .cpu import INTEL  # the few-row kernels below are chosen per CPU vendor

POSITION_OFFSET = 2


def row_blocks(rows: int, dtype: torch.dtype) -> int:
    """Into how many blocks of rows `linear` cuts W for an input of `rows` rows (1: plain F.linear).

    Decoding multiplies one row (greedy) or one row per beam (2-8) by every weight matrix: memory-bound work,
    fast only if both cores stream the weights. Whether the CPU's kernels do that depends on the kernel and
    the CPU (OPT-2.7b's fc1, 10240 x 2560, 2 threads, torch 2.13; fastest of 8 rounds, memory read ~20 GB/s
    on the Intel Xeon (AMX), 47-80 GB/s on the AMD EPYC (AVX-512)):
    - fp32, one row: MKL's matrix-vector product runs on both cores of an Intel CPU (4.95 ms: 21 GB/s, all
      that memory delivers; as 4 blocks 8.3 ms) but on one core of an AMD one (per OPT layer 13.3 ms; as 4
      blocks 8.5 ms).
    - fp32, 2-8 rows: x @ W^T takes a slow path on both (Intel, 5 rows: 10.3 ms, as 4 blocks 8.4 ms; an AVX2
      EPYC, 1 thread: 5 rows cost 5-6x one row, as blocks 2.5-3x); on the Intel Xeon only from 4 rows on:
      MKL's own product still wins for 2-3 rows (per OPT layer, best of 5: 2 rows 11.4 vs 21.1 ms as 4
      blocks, 3 rows 15.9 vs 21.8; 4 rows 22.4 vs 19.0).
    - bf16 (oneDNN) on the Intel Xeon: 2 blocks reach the bandwidth (1 row 4.19 -> 2.75 ms, 5 rows 3.60 ->
      2.74 ms); 4 blocks of one row were slower in every run (3.1-8.9 ms). They also win for prompts up to
      ~64 rows (per OPT layer, best of 6: 9 rows 8.2 -> 7.4 ms, 33 rows (BLIP-2's prefill) 11.9 -> 9.6 ms,
      48 rows 11.9 -> 10.7 ms; 96 rows 15.0 -> 16.1 ms). On the AMD EPYC plain F.linear was measured (35-38
      GB/s) and is kept.
    """
    if dtype == torch.bfloat16 and INTEL:
        return 2 if rows <= 64 else 1
    if rows > 8:
        return 1
    if dtype == torch.float32:
        return 1 if rows <= 3 and INTEL else 4
    return 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (y = x W^T + b) for OPT's layers and head; when x has a few rows (decoding), computed as k blocks
    of rows of W multiplied in parallel, as one batched product (torch.bmm) of (W_j @ x^T), so that both cores
    stream the weights (k from row_blocks above). Many rows (prompt, prefill) mostly keep F.linear. Same
    numbers up to the order of the float sums.
    """
    rows = x.numel() // x.shape[-1]
    O, I = weight.shape
    k = row_blocks(rows, x.dtype) if x.device.type == "cpu" else 1
    if k == 1 or O % k:
        return F.linear(x, weight, bias)
    # x2 row-major, so that x2.T is a transposed view: MKL is ~4x slower again if the (I, r) operand is a
    # row-major matrix of its own (measured). The result is made contiguous for the same reason downstream.
    x2 = x.reshape(rows, I).contiguous()  # (r, I)
    y = torch.bmm(weight.view(k, O // k, I), x2.T.expand(k, I, rows)).reshape(O, rows)  # k x (O/k, I) @ (I, r)
    y = y.T.contiguous()  # (r, O)
    if bias is not None:
        # Added in (r, O) layout, where each row is contiguous: in (O, r) layout, inner size r = 5, the same
        # add took 69 us instead of 7.5 (bf16, O = 2560; 218 vs 20 us at O = 10240): 16 ms per beam step.
        y += bias
    return y.reshape(*x.shape[:-1], O)  # (..., O)


class Linear(nn.Linear):
    """nn.Linear computed with `linear` above (same parameters, so checkpoints and quantize.py see a Linear)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        D, bias = config.hidden_size, config.enable_bias
        self.num_heads = config.num_attention_heads
        self.q_proj = Linear(D, D, bias=bias)
        self.k_proj = Linear(D, D, bias=bias)
        self.v_proj = Linear(D, D, bias=bias)
        self.out_proj = Linear(D, D, bias=bias)
        # quantize.py puts one int8 matrix (3D, D) here in place of q_proj, k_proj and v_proj: the three read
        # the same x, and one call instead of three makes an int8 decoding step cheaper (measured there).
        self.qkv_proj = None

    def forward(self, x, bias, cache: KVCache | None, layer_idx: int):
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # (B, T, 3D) -> 3 x (B, T, D)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, D) each
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, nh, S, hs): past and new
        return self.out_proj(merge_heads(attend(q, k, v, bias)))  # (B, T, D)


class OPTBlock(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        D, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn_norm = nn.LayerNorm(D, elementwise_affine=affine)
        self.self_attn = OPTAttention(config)
        self.ffn_norm = nn.LayerNorm(D, elementwise_affine=affine)
        self.fc1 = Linear(D, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = Linear(config.ffn_dim, D, bias=config.enable_bias)

    def forward(self, x, bias, cache, layer_idx):
        x = x + self.self_attn(self.self_attn_norm(x), bias, cache, layer_idx)
        return x + self.fc2(F.relu(self.fc1(self.ffn_norm(x))))  # (B, T, D) -> (B, T, ffn_dim) -> (B, T, D)


class OPT(nn.Module):
    def __init__(self, config: OPTConfig):
        super().__init__()
        if config.activation_function != "relu":
            raise ValueError(f"OPT: activation {config.activation_function!r} is not supported (OPT uses 'relu')")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"OPT: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        self.config = config
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, D)
        self.layers = nn.ModuleList([OPTBlock(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=config.layer_norm_elementwise_affine)
        # Tied head: the logits are scores against the input embedding table itself.
        self.lm_head = None if config.tie_word_embeddings else Linear(D, config.vocab_size, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def forward(self, inputs_embeds, attention_mask=None, cache: KVCache | None = None,
                output_hidden_states=False, last_only=False):
        """inputs_embeds (B, T, D) for the new tokens; attention_mask (B, S) over past + new tokens (1 real,
        0 padding; None = all real). Returns logits (B, T, V); the cache, if given, is extended in place.
        With `last_only`, logits (B, 1, V) of the last position only (what generation needs).
        With `output_hidden_states`, also returns the list of the embeddings and every layer's output."""
        B, T, D = inputs_embeds.shape
        if D != self.embed_tokens.embedding_dim:
            raise ValueError(f"OPT: expected inputs_embeds of width {self.embed_tokens.embedding_dim}, got {D}")
        past = cache.seq_len if cache is not None else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"OPT: attention_mask must cover past + new tokens: expected {(B, S)}, "
                             f"got {tuple(attention_mask.shape)}")

        # Position of each token = number of real tokens up to and including it, minus one (padding -> -1).
        positions = (attention_mask.cumsum(dim=1) * attention_mask - 1)[:, past:]  # (B, T)
        x = inputs_embeds + self.embed_positions(positions + POSITION_OFFSET).to(inputs_embeds.dtype)

        # Causal + padding mask: new token i (absolute index past+i) sees real tokens j <= past+i. Each token
        # also sees itself, so that padding rows (whose outputs are never used) never get an all-masked softmax.
        query_idx = torch.arange(past, S, device=x.device)[:, None]  # (T, 1)
        key_idx = torch.arange(S, device=x.device)[None, :]  # (1, S)
        allowed = (key_idx <= query_idx) & attention_mask[:, None, :].bool()  # (B, T, S)
        allowed = allowed | (key_idx == query_idx)
        bias = bias_from_allowed(allowed[:, None], x.dtype)  # (B, 1, T, S)

        hidden_states = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, cache, i)
            hidden_states.append(x)
        if last_only:
            # Generation reads only the next-token logits. The head (V x D, the largest matrix of the model)
            # would otherwise score every prompt position too: ~T times the work for nothing during prefill.
            x = x[:, -1:]  # (B, 1, D)
        x = self.final_norm(x)
        logits = linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        return (logits, hidden_states) if output_hidden_states else logits
