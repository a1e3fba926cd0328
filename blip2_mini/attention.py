"""Multi-head attention, written out once and shared by the ViT, the Q-Former and OPT.

Every transformer stage of BLIP-2 computes the same thing (Vaswani et al., 2017, eq. 1):

    Attention(q, k, v) = softmax(q k^T * scale + bias) v

and differs only in *where q, k, v come from* (self- vs cross-attention), in the scale (1/sqrt(hs) for the
ViT, the Q-Former and OPT; T5 uses none, see t5.py) and in the additive `bias` (a padding or causal mask;
T5 adds relative position biases). The projections live in each stage's file; this file holds the part
they share: splitting heads, the scaled dot product, merging heads, the masks, and the key/value cache
that the language models keep while generating.

Notation: B batch, T query length, S key/value length, nh heads, hs head size, D = nh * hs.
"""

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, T, D) -> (B, nh, T, hs)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)  # (B, nh, T, hs) -> (B, T, D)


def attend(q, k, v, bias=None, scale=None, return_weights=False):
    """softmax(q k^T * scale + bias) v for q (B, nh, T, hs), k/v (B, nh, S, hs), bias broadcastable to (B, nh, T, S).

    Returns the output (B, nh, T, hs), and the attention weights (B, nh, T, S) when `return_weights` is set.
    The explicit path below is the definition; without `return_weights` we call PyTorch's fused
    `scaled_dot_product_attention`, which computes the same numbers (tests check both paths) without
    materialising the (T, S) matrix per head, and is much faster for the ViT's 257-677 tokens.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, hs) @ (B, nh, hs, S) -> (B, nh, T, S)
    if bias is not None:
        scores = scores + bias
    weights = scores.float().softmax(dim=-1).to(q.dtype)  # softmax in fp32: half-precision exp overflows
    return weights @ v, weights  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1 = attend / 0 = ignore  ->  additive bias (B, 1, 1, S): 0 where kept, a very negative number where masked.

    We use the dtype's most negative finite value rather than -inf so that a row with every key masked gives a
    uniform (finite) distribution instead of NaN, which would otherwise leak through later matmuls (0 * NaN).
    """
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def bias_from_allowed(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `allowed` (..., T, S) -> additive bias: 0 where allowed, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    Each layer's K and V live in a buffer with room to grow, (B, nh, capacity, hs), of which the first
    `seq_len` positions are filled. Appending a token writes one slice; concatenating instead (torch.cat) copies
    the whole cache at every step, and the ever larger copies fragment memory (measured: 5-beam search at
    OPT-2.7b's shape kept 0.34 GB more than greedy decoding)."""

    # Positions of room added whenever a buffer is full: a caption is ~20 tokens. Every spare position costs
    # 2 x layers x width floats per row: for OPT-2.7b's 5 beams 64 spare positions were 0.17 GB (fp32).
    GROW = 32

    def __init__(self):
        self.keys: list[torch.Tensor] = []  # per layer (B, nh, capacity, hs)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # filled positions per layer

    @property
    def seq_len(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values stored for `layer` so far, (B, nh, S, hs) each."""
        S = self.lengths[layer]
        return self.keys[layer][:, :, :S], self.values[layer][:, :, :S]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this call's k, v (B, nh, T, hs) for `layer`; return all of them so far (B, nh, S, hs)."""
        T = k.shape[2]
        if layer == len(self.keys):
            self.keys.append(k.new_empty(0))
            self.values.append(v.new_empty(0))
            self.lengths.append(0)
        S = self.lengths[layer]
        if self.keys[layer].numel() == 0 or S + T > self.keys[layer].shape[2]:  # full: a larger buffer
            B, nh, _, hs = k.shape
            for store, new in ((self.keys, k), (self.values, v)):
                grown = new.new_empty(B, nh, S + T + self.GROW, hs)
                if S:
                    grown[:, :, :S] = store[layer][:, :, :S]
                store[layer] = grown
        self.keys[layer][:, :, S:S + T] = k
        self.values[layer][:, :, S:S + T] = v
        self.lengths[layer] = S + T
        return self.get(layer)

    def reorder(self, index: torch.Tensor):
        """Keep batch rows `index` (beam search picks which hypotheses survive, possibly several times)."""
        if self.keys and len(index) == self.keys[0].shape[0]:
            # Same batch size (every beam step): rewrite in place, and only the rows that continue *another*
            # row. Many beams continue themselves (5-beam captions of the toy model: 62 % of rows per step),
            # and each copied row is (layers x 2 x nh x S x hs) numbers: the whole cache each step otherwise.
            moved = (index != torch.arange(len(index), device=index.device)).nonzero()[:, 0]  # (m,)
            if len(moved) == 0:
                return
            source = index[moved]  # (m,): row i of the cache becomes a copy of row source[i]
            for store in (self.keys, self.values):
                for layer, buffer in enumerate(store):
                    filled = buffer[:, :, :self.lengths[layer]]
                    filled.index_copy_(0, moved, filled.index_select(0, source))  # select first: rows may swap
        else:  # the batch grows (beams from each prompt) or shrinks: new buffers, one layer at a time
            for store in (self.keys, self.values):
                for layer, buffer in enumerate(store):
                    store[layer] = buffer.index_select(0, index)
