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
    """Keys and values of every layer for the tokens seen so far: lists of (B, nh, S, hs) tensors."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def seq_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this call's k, v (B, nh, T, hs) for `layer`; return all of them so far (B, nh, S, hs)."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.Tensor):
        """Keep batch rows `index` (beam search picks which hypotheses survive, possibly several times)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
