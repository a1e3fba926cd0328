"""Stage 4 (encoder-decoder family): the frozen Flan-T5 language model (Raffel et al., 2020; Chung et al., 2022).

BLIP-2 with Flan-T5 (paper section 3.3, Fig. 3 bottom) splits the text in two: the projected queries and the
prompt ("Question: ... Short answer:") go into the T5 *encoder*, and the answer comes out of the T5 *decoder*,
which reads the encoder's output through cross-attention (stage 2's "prefix language modelling" loss). The
encoder takes embeddings rather than token ids because its input starts with the 32 soft-prompt vectors,
which no token id stands for.

    encoder:  x = inputs_embeds                                     [projected queries; prompt embeddings]
              for each layer:  x = x + SelfAttention(norm(x))       bidirectional, relative position bias
                               x = x + FFN(norm(x))
              encoded = norm(x)
    decoder:  y = shared[decoder_input_ids]                         starts with decoder_start_token_id (0)
              for each layer:  y = y + SelfAttention(norm(y))       causal, relative position bias
                               y = y + CrossAttention(norm(y), encoded)
                               y = y + FFN(norm(y))
              logits = lm_head(norm(y))

What is unusual, compared with GPT-style models (T5 v1.1 as Flan-T5 uses it):
- The norm is RMS-only: x / sqrt(mean(x^2) + eps) * weight; no mean subtraction, no bias.
- There are no position embeddings. Each head adds to its attention score a learned scalar that depends only on
  the bucketed distance key - query (`relative_position_bucket`). The table lives in layer 0 of each stack and
  that one bias is reused by every layer of the stack; cross-attention has none.
- Scores are not scaled by 1/sqrt(hs): T5 folded that factor into the initialisation of q.
- The FFN is gated: wo(gelu_tanh(wi_0 x) * wi_1 x).
- The output head is its own matrix (Flan-T5 has tie_word_embeddings=False) and is applied to the decoder output
  as is. Original T5 (v1.0) tied it to `shared` and scaled the decoder output by d_model**-0.5 first; that
  variant is not supported (the constructor says so).
- Precision: Flan-T5 was trained in bf16, and its FFN outputs exceed fp16's range (65504), so in pure fp16 the
  residual stream overflows to inf and the logits turn into NaN: **do not run Flan-T5 in pure fp16**; bf16 is
  safe. The reference's fp16 recipe keeps every FFN's `wo` in fp32; the FFN then casts its input to wo's dtype,
  and the residual stream is fp32 from the first FFN on (fp16 + fp32 promotes to fp32). Our FFN casts the same
  way, so that mixed layout computes what the reference computes. (The reference also clamps fp16 activations to
  +-(65504 - 1000) once one of them is inf, a training-time hack that turns an overflow into silently wrong
  numbers; we leave an overflow visible instead.)

Notation: B batch, S source (encoder) length, t target tokens in this call, T = past + t target tokens so far
(the keys of the decoder's self-attention), D = d_model, nh heads, hs = d_kv head size (nh * hs need not equal
D), F = d_ff, V vocabulary.
"""

import math

import torch
import torch.nn as nn

from .attention import KVCache, attend, bias_from_allowed, merge_heads, padding_bias, split_heads
from .config import T5Config


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket ids in [0, num_buckets) for integer distances `relative_position` = key position - query position.

    Encoder (bidirectional): half of the buckets are for keys after the query, half for keys before it.
    Decoder (causal): keys after the query are masked anyway, so every bucket goes to distances into the past.
    Within a half, the first `max_exact` distances get one bucket each; larger distances share buckets whose
    width grows logarithmically up to `max_distance`, and everything beyond falls into the last bucket.
    With Flan-T5's 32 buckets and max distance 128: the encoder is exact up to 7 tokens each way, the decoder
    up to 15 tokens back.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets  # keys after the query use the upper half
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)  # keys after the query (masked) share bucket 0 with distance 0
    max_exact = num_buckets // 2
    # The same float operations in the same order as the reference, so that a distance on a bucket boundary
    # lands in the same bucket. (log(0) = -inf at distance 0 is discarded by the `where` below.)
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation ("gelu_new"), written out as the reference computes it. In bf16 every op
    below rounds, while torch's fused F.gelu(x, approximate="tanh") rounds once: the two differ in the last bit."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: T5's LayerNorm, without mean subtraction or bias (Zhang & Sennrich's
    RMSNorm). The mean of squares is taken in fp32 even for half-precision inputs; the result is cast back to
    the weight's dtype (when that is a half type) before the weight multiplies it, as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        x = x * torch.rsqrt(variance + self.eps)  # fp32 from here on (a half x promotes)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5GatedFFN(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): the gated-GELU feed-forward of T5 v1.1 (Shazeer, 2020)."""

    def __init__(self, config: T5Config):
        super().__init__()
        D, F = config.d_model, config.d_ff
        self.wi_0 = nn.Linear(D, F, bias=False)  # gate
        self.wi_1 = nn.Linear(D, F, bias=False)  # value
        self.wo = nn.Linear(F, D, bias=False)
        # quantize.py puts one int8 matrix (2F, D) here in place of wi_0 and wi_1: both read the same x, and
        # one call instead of two makes an int8 decoding step cheaper (measured there).
        self.wi = None

    def forward(self, x):
        if self.wi is not None:
            gate, value = self.wi(x).chunk(2, dim=-1)  # (B, T, 2F) -> 2 x (B, T, F)
        else:
            gate, value = self.wi_0(x), self.wi_1(x)  # (B, T, F) each
        h = gelu_tanh(gate) * value  # (B, T, F)
        # wo may be kept in fp32 while the rest is fp16 (see the module docstring): compute it in wo's dtype.
        # (An int8 wo, quantize.Int8Linear, has no float weight and takes any float input.)
        if isinstance(self.wo, nn.Linear):
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)  # (B, T, D)


class T5Attention(nn.Module):
    """Multi-head attention with unscaled scores: softmax(q k^T + bias) v, where `bias` carries the relative
    position bias and the masks. Self-attention when `context` is None, else cross-attention from the decoder
    to the encoder output `context`. Layer 0 of each stack also owns the relative position bias table."""

    def __init__(self, config: T5Config, has_relative_bias: bool = False, cross_attention: bool = False):
        super().__init__()
        D, nh, hs = config.d_model, config.num_heads, config.d_kv
        self.num_heads = nh
        self.q = nn.Linear(D, nh * hs, bias=False)
        self.k = nn.Linear(D, nh * hs, bias=False)
        self.v = nn.Linear(D, nh * hs, bias=False)
        self.o = nn.Linear(nh * hs, D, bias=False)
        if not cross_attention:
            # quantize.py puts one int8 matrix (3 nh*hs, D) here in place of q, k and v, which read the same x
            # in self-attention (in cross-attention k and v read the encoder output: no such slot there).
            self.qkv = None
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, nh)
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance

    def position_bias(self, query_length: int, key_length: int, past: int, bidirectional: bool) -> torch.Tensor:
        """(1, nh, t, T): head h's learned bias for query i (at position past + i) attending to key j."""
        device = self.relative_attention_bias.weight.device
        query_position = torch.arange(past, past + query_length, device=device)[:, None]  # (t, 1)
        key_position = torch.arange(key_length, device=device)[None, :]  # (1, T)
        buckets = relative_position_bucket(key_position - query_position, bidirectional, self.num_buckets,
                                           self.max_distance)  # (t, T)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (t, T, nh) -> (1, nh, t, T)

    def forward(self, x, bias, context=None, cache: KVCache | None = None, layer: int = 0):
        """x (B, t, D) -> (B, t, D). `cache` (optional) keeps this attention's keys/values per `layer`: for
        self-attention the new tokens' are appended; for cross-attention they are computed once, on first use."""
        nh = self.num_heads
        if context is None:  # self-attention
            if self.qkv is not None:
                q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, t, 3 nh*hs) -> 3 x (B, t, nh*hs)
            else:
                q, k, v = self.q(x), self.k(x), self.v(x)  # (B, t, nh*hs) each
            q, k, v = (split_heads(t, nh) for t in (q, k, v))  # (B, nh, t, hs) each
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, nh, T, hs): the cached tokens and the new ones
        else:  # cross-attention
            q = split_heads(self.q(x), nh)  # (B, t, nh*hs) -> (B, nh, t, hs)
            if cache is not None and layer < len(cache.keys):  # later calls: reuse
                k, v = cache.get(layer)  # (B, nh, S, hs)
            else:  # first call (or no cache)
                k = split_heads(self.k(context), nh)  # (B, S, nh*hs) -> (B, nh, S, hs)
                v = split_heads(self.v(context), nh)
                if cache is not None:
                    cache.update(layer, k, v)
        # softmax(q k^T * 1 + bias) v: (B, nh, t, hs) @ (B, nh, hs, T or S) -> scores -> (B, nh, t, hs).
        # attention.attend writes the product out (fp32 softmax); its default path is torch's fused kernel.
        out = attend(q, k, v, bias, scale=1.0)
        return self.o(merge_heads(out))  # (B, nh, t, hs) -> (B, t, nh*hs) -> (B, t, D)


class T5Block(nn.Module):
    """Pre-norm residual sub-layers: self-attention, cross-attention (decoder only), gated FFN."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_bias: bool):
        super().__init__()
        D, eps = config.d_model, config.layer_norm_epsilon
        self.self_attn_norm = T5RMSNorm(D, eps)
        self.self_attn = T5Attention(config, has_relative_bias)
        if is_decoder:
            self.cross_attn_norm = T5RMSNorm(D, eps)
            self.cross_attn = T5Attention(config, cross_attention=True)
        self.ffn_norm = T5RMSNorm(D, eps)
        self.ffn = T5GatedFFN(config)

    def forward(self, x, self_bias, context=None, cross_bias=None, cache: "T5Cache | None" = None, layer: int = 0):
        self_cache = None if cache is None else cache.self_attn
        x = x + self.self_attn(self.self_attn_norm(x), self_bias, cache=self_cache, layer=layer)
        if context is not None:
            cross_cache = None if cache is None else cache.cross_attn
            x = x + self.cross_attn(self.cross_attn_norm(x), cross_bias, context, cross_cache, layer)
        return x + self.ffn(self.ffn_norm(x))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): layers, then a final norm."""

    def __init__(self, config: T5Config, is_decoder: bool):
        super().__init__()
        n = config.num_layers
        if is_decoder and config.num_decoder_layers is not None:
            n = config.num_decoder_layers
        self.is_decoder = is_decoder
        self.layers = nn.ModuleList(T5Block(config, is_decoder, has_relative_bias=i == 0) for i in range(n))
        self.final_norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x, mask=None, context=None, context_mask=None, cache: "T5Cache | None" = None,
                return_hidden_states: bool = False):
        """x (B, t, D) -> (B, t, D) after the final norm. `mask` (B, t) pads the encoder's own tokens;
        `context` (B, S, D) / `context_mask` (B, S) are the encoder output and its padding (decoder only).
        With `return_hidden_states`, also a list of L + 1 tensors: the input of every layer, then the output."""
        t = x.shape[1]
        past = 0 if cache is None else cache.seq_len
        # One bias for the whole stack, from layer 0's table: (1, nh, t, T), T = past + t (= t in the encoder).
        bias = self.layers[0].self_attn.position_bias(t, past + t, past, bidirectional=not self.is_decoder)
        if self.is_decoder:  # causal: the token at position past + i sees keys 0 .. past + i
            key_position = torch.arange(past + t, device=x.device)[None, :]  # (1, T)
            query_position = torch.arange(past, past + t, device=x.device)[:, None]  # (t, 1)
            bias = bias + bias_from_allowed(key_position <= query_position, bias.dtype)  # (1, nh, t, T)
        if mask is not None:
            bias = bias + padding_bias(mask, bias.dtype)  # + (B, 1, 1, t) -> (B, nh, t, t)
        cross_bias = None if context_mask is None else padding_bias(context_mask, bias.dtype)  # (B, 1, 1, S)

        hidden = []
        for i, layer in enumerate(self.layers):
            hidden.append(x)
            x = layer(x, bias, context, cross_bias, cache, i)
        x = self.final_norm(x)
        hidden.append(x)
        return (x, hidden) if return_hidden_states else x


class T5Cache:
    """What the decoder keeps between `decode` calls during generation, per layer:
        self_attn   keys/values of every target token so far, (B, nh, T, hs); grows by t tokens each call
        cross_attn  keys/values of the encoder output, (B, nh, S, hs); computed on the first call only, so later
                    calls must pass the same encoder output (its rows reordered along with the cache)
    """

    def __init__(self):
        self.self_attn = KVCache()
        self.cross_attn = KVCache()

    @property
    def seq_len(self) -> int:
        """Target tokens seen so far (the position of the next one)."""
        return self.self_attn.seq_len

    @property
    def batch_size(self) -> int | None:
        """Rows held (None before the first call)."""
        return self.self_attn.keys[0].shape[0] if self.self_attn.keys else None

    def reorder(self, index: torch.Tensor):
        """Keep batch rows `index` (beam search: the surviving hypotheses, possibly several times each)."""
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)


class T5(nn.Module):
    """Flan-T5: `encode` the source embeddings once, then `decode` target tokens into next-token logits."""

    def __init__(self, config: T5Config):
        super().__init__()
        if config.tie_word_embeddings:
            raise ValueError("T5: tie_word_embeddings=True (original T5: the head shares `shared` and the decoder "
                             "output is scaled by d_model**-0.5) is not supported; Flan-T5 uses False")
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # input embedding of encoder and decoder
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def embed_tokens(self, input_ids):
        """(B, T) token ids -> (B, T, D)."""
        return self.shared(input_ids)

    def new_cache(self) -> T5Cache:
        return T5Cache()

    def encode(self, inputs_embeds, attention_mask=None, return_hidden_states: bool = False):
        """(B, S, D) embeddings and (B, S) mask (1 = token, 0 = padding; None = no padding) -> (B, S, D).
        With `return_hidden_states`, also the list of every layer's input and the output (L + 1 tensors)."""
        self._check_source("encode", "inputs_embeds", inputs_embeds, "attention_mask", attention_mask)
        return self.encoder(inputs_embeds, attention_mask, return_hidden_states=return_hidden_states)

    def decode(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask=None,
               cache: T5Cache | None = None):
        """(B, t) target token ids -> (B, t, V) logits of each next token.

        Without a cache, `decoder_input_ids` is the whole target so far (from the start token). With a cache,
        only the tokens not yet seen: their positions continue from `cache.seq_len`, and the cache grows."""
        ids = decoder_input_ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"T5 decode: expected decoder_input_ids (B, t), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"T5 decode: decoder_input_ids (B, t) must be integer token ids, got {ids.dtype}")
        B = ids.shape[0]
        self._check_source("decode", "encoder_hidden_states", encoder_hidden_states, "encoder_attention_mask",
                           encoder_attention_mask, batch=B)
        if cache is not None and cache.batch_size not in (None, B):
            raise ValueError(f"T5 decode: the cache holds {cache.batch_size} rows but decoder_input_ids has {B}; "
                             "to keep or repeat rows (beam search), call cache.reorder(index) first")
        y = self.shared(ids)  # (B, t, D)
        y = self.decoder(y, context=encoder_hidden_states, context_mask=encoder_attention_mask, cache=cache)
        return self.lm_head(y)  # (B, t, D) -> (B, t, V)

    def forward(self, inputs_embeds, attention_mask, decoder_input_ids):
        """encode + decode without a cache: (B, S, D), (B, S), (B, t) -> (B, t, V) logits."""
        return self.decode(decoder_input_ids, self.encode(inputs_embeds, attention_mask), attention_mask)

    def _check_source(self, stage, name, x, mask_name, mask, batch=None):
        """One clear line for an encoder input / output of the wrong shape or dtype, naming the stage."""
        D, dtype = self.config.d_model, self.shared.weight.dtype
        B = "B" if batch is None else batch
        if x.ndim != 3 or x.shape[-1] != D or (batch is not None and x.shape[0] != batch):
            raise ValueError(f"T5 {stage}: expected {name} ({B}, S, {D}), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"T5 {stage}: {name} are {x.dtype} but the model is {dtype}; cast them with .to()")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"T5 {stage}: expected {mask_name} {tuple(x.shape[:2])} (1 = token, 0 = padding) "
                             f"to match {name} (B, S, D), got {tuple(mask.shape)}")
