"""Stage 2: the Querying Transformer (Q-Former), BLIP-2's bridge between image and text (section 3.1, Fig. 2).

The Q-Former is a BERT-base sized transformer (initialised from BERT) that owns Q = 32 *learned query
vectors*. The queries read the frozen image features through cross-attention and come out as Q vectors
of width Dq: a fixed-size summary of the image, whatever its resolution. That bottleneck is the paper's
central idea: the frozen LLM later only ever sees these Q vectors.

Each layer is a BERT layer (post-LayerNorm: `LN(x + sublayer(x))`) with three twists:
1. Self-attention runs over the concatenation [queries; text tokens]. An attention mask decides who may see
   whom; the three masks of the stage-1 objectives (Fig. 2, right) are built in `stage1_attention_mask`.
2. Cross-attention to the image features is inserted only every `cross_attention_frequency` layers
   (layers 0, 2, 4, ... for the published checkpoints), and only the *query* positions take part in it.
3. Query positions and text positions have separate feed-forward networks (`ffn_query`, `ffn_text`):
   the same layer acts as an image transformer for the queries and a text transformer for the text.
The stage-2 checkpoints (OPT / Flan-T5) were trained with queries only, so they carry neither the text
embeddings nor the text feed-forward weights; the retrieval checkpoints carry both.

Notation: B batch, Q queries, T text tokens, L = Q + T, P image tokens, Dv image width, Dq Q-Former width,
nh heads, hs = Dq / nh head size.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend, bias_from_allowed, merge_heads, padding_bias, split_heads
from .config import QFormerConfig


class QFormerAttention(nn.Module):
    """BERT attention block: multi-head attention, output projection, then LayerNorm(residual + output).

    Self-attention when `context` is None; cross-attention (queries read the image) when `context` holds
    the image features, whose width Dv differs from Dq, hence the separate key/value input size.
    """

    def __init__(self, config: QFormerConfig, context_size: int | None = None):
        super().__init__()
        D, Dkv = config.hidden_size, context_size or config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(Dkv, D)
        self.value = nn.Linear(Dkv, D)
        self.dense = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x, context=None, bias=None, return_weights=False):
        source = x if context is None else context  # (B, L, Dq) or the image (B, P, Dv)
        q = split_heads(self.query(x), self.num_heads)  # (B, nh, L, hs)
        k = split_heads(self.key(source), self.num_heads)  # (B, nh, S, hs), S = L or P
        v = split_heads(self.value(source), self.num_heads)
        out = attend(q, k, v, bias, return_weights=return_weights)
        out, weights = out if return_weights else (out, None)
        return self.norm(x + self.dense(merge_heads(out))), weights  # post-LN, as in BERT


class FeedForward(nn.Module):
    """BERT feed-forward: LayerNorm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.self_attn = QFormerAttention(config)
        has_cross = layer_idx % config.cross_attention_frequency == 0
        self.cross_attn = QFormerAttention(config, context_size=config.encoder_hidden_size) if has_cross else None
        self.ffn_query = FeedForward(config)
        self.ffn_text = FeedForward(config) if config.use_qformer_text_input else None

    def forward(self, x, image_embeds, bias, num_queries, return_weights=False):
        x, self_weights = self.self_attn(x, bias=bias, return_weights=return_weights)  # (B, L, Dq)
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Q, Dq), (B, T, Dq)
        cross_weights = None
        if self.cross_attn is not None and num_queries > 0:
            # Only the queries look at the image; every image token is valid, so no mask is needed.
            queries, cross_weights = self.cross_attn(queries, context=image_embeds, return_weights=return_weights)
        parts = []
        if num_queries > 0:
            parts.append(self.ffn_query(queries))
        if text.shape[1] > 0:
            if self.ffn_text is None:
                raise ValueError("Q-Former: this checkpoint has no text weights (stage-2 checkpoints are query-only)")
            parts.append(self.ffn_text(text))
        return torch.cat(parts, dim=1), self_weights, cross_weights  # (B, L, Dq)


class TextEmbeddings(nn.Module):
    """BERT word + learned absolute position embeddings for the Q-Former's text side (retrieval checkpoints).
    BERT's embedding LayerNorm is the Q-Former's `layernorm`, applied to queries and text alike."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"Q-Former text: {T} tokens is longer than the position table "
                             f"({self.position_embeddings.num_embeddings}); truncate the text")
        positions = torch.arange(T, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, Dq)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"Q-Former: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        if config.hidden_act != "gelu":
            raise ValueError(f"Q-Former: hidden_act {config.hidden_act!r} is not supported (BERT's is 'gelu')")
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.embeddings = TextEmbeddings(config) if config.use_qformer_text_input else None

    def forward(self, query_embeds=None, image_embeds=None, input_ids=None, attention_mask=None,
                output_hidden_states=False, output_attentions=False):
        """Run the Q-Former on [queries; text].

        query_embeds   (B, Q, Dq) the learned queries (expanded to the batch), or None for text only
        image_embeds   (B, P, Dv) frozen image features for cross-attention, or None (text only)
        input_ids      (B, T) Q-Former (BERT) token ids, or None (queries only)
        attention_mask (B, T) or (B, L) padding mask of 1/0, or a boolean (B, L, L) "who may see whom" matrix
                       from `stage1_attention_mask`. None: everyone sees everyone.
        Returns the last hidden state (B, L, Dq); with output_* flags also a dict of the per-layer
        "hidden_states" (num_layers + 1), "attentions" and "cross_attentions" (None on layers without).
        """
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            if self.embeddings is None:
                raise ValueError("Q-Former: this checkpoint has no text embeddings (stage-2 checkpoints are query-only)")
            parts.append(self.embeddings(input_ids).to(self.layernorm.weight.dtype))
        if not parts:
            raise ValueError("Q-Former: give query_embeds, input_ids or both")
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        x = self.layernorm(torch.cat(parts, dim=1))  # (B, L, Dq); dropout is off at inference
        B, L, _ = x.shape
        if num_queries > 0 and image_embeds is None and any(layer.cross_attn for layer in self.layers):
            raise ValueError("Q-Former: queries need image_embeds (B, P, Dv) to cross-attend to")

        bias = None
        if attention_mask is not None:
            if attention_mask.ndim == 2 and attention_mask.shape[1] == L - num_queries:
                # A text padding mask: the queries are always visible.
                attention_mask = F.pad(attention_mask, (num_queries, 0), value=1)
            if attention_mask.ndim == 2:
                bias = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, L)
            elif attention_mask.ndim == 3 and attention_mask.dtype == torch.bool:
                bias = bias_from_allowed(attention_mask[:, None], x.dtype)  # (B, 1, L, L)
            else:
                raise ValueError(f"Q-Former: attention_mask must be (B, T), (B, Q+T) or a boolean (B, L, L); "
                                 f"got {tuple(attention_mask.shape)} {attention_mask.dtype}")

        hidden_states, self_attns, cross_attns = [x], [], []
        for layer in self.layers:
            x, self_w, cross_w = layer(x, image_embeds, bias, num_queries, return_weights=output_attentions)
            hidden_states.append(x)
            self_attns.append(self_w)
            cross_attns.append(cross_w)
        if not (output_hidden_states or output_attentions):
            return x
        extras = {}
        if output_hidden_states:
            extras["hidden_states"] = hidden_states
        if output_attentions:
            extras["attentions"], extras["cross_attentions"] = self_attns, cross_attns
        return x, extras


def stage1_attention_mask(kind: str, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The three self-attention masks of BLIP-2 stage 1 (Fig. 2, right), as a boolean (B, L, L) "row may see
    column" matrix over [queries; text]. `text_mask` (B, T) marks real (1) vs padding (0) text tokens.

    "bidirectional"      image-text matching (ITM): every token sees every token. Queries and text fuse.
    "multimodal_causal"  image-grounded text generation (ITG): queries see only queries (they must not peek
                         at the text they help to generate); text sees all queries and the text before it.
    "unimodal"           image-text contrastive (ITC): queries see only queries, text sees only text, so the
                         two sides are encoded independently and can be compared.
    """
    B, T = text_mask.shape
    Q, L = num_queries, num_queries + text_mask.shape[1]
    idx = torch.arange(L, device=text_mask.device)
    row_is_query = (idx < Q)[:, None]  # (L, 1)
    col_is_query = (idx < Q)[None, :]  # (1, L)
    if kind == "bidirectional":
        allowed = torch.ones(L, L, dtype=torch.bool, device=text_mask.device)
    elif kind == "multimodal_causal":
        causal = idx[None, :] <= idx[:, None]  # (L, L) column not after row
        allowed = torch.where(row_is_query, col_is_query, col_is_query | causal)
    elif kind == "unimodal":
        allowed = row_is_query == col_is_query
    else:
        raise ValueError(f"unknown mask kind {kind!r}: use 'bidirectional', 'multimodal_causal' or 'unimodal'")
    key_valid = F.pad(text_mask.bool(), (Q, 0), value=True)  # (B, L): padding columns are never seen
    allowed = allowed[None] & key_valid[:, None, :]  # (B, L, L)
    # Every row also sees itself: a row whose allowed columns are all padding (an all-padding text under the
    # unimodal mask) would otherwise have no key at all, and its softmax would be undefined.
    return allowed | torch.eye(L, dtype=torch.bool, device=text_mask.device)[None]
