"""Stage 1b: the frozen image encoder, EVA-CLIP ViT-g/14 (BLIP-2 section 3.1 and Fig. 2, left).

A stack of standard pre-LayerNorm transformer blocks over the patch tokens of patch_embed.py:

    x = x + Attention(LN1(x))        every token attends to every token (no mask)
    x = x + MLP(LN2(x))              Dv -> intermediate_size -> Dv with exact GELU

What is unusual here:
- The fused qkv projection has a bias for q and v but *none for k* (EVA's choice; a k bias would be pointless
  anyway: it adds the same number to every score of a row, which softmax ignores). We store `q_bias` and
  `v_bias` as the two learned vectors and build the fused bias [q_bias, 0, v_bias] on the fly.
- BLIP-2 removes the last of EVA's 40 layers and uses the output of layer 39 ("we remove the last layer of the
  ViT and use the second last layer's output features, which leads to slightly better performance").
- The output goes through a final LayerNorm (`post_layernorm`; LAVIS calls it `ln_vision`) with eps 1e-6 from
  the config. LAVIS used nn.LayerNorm's default 1e-5 here: a known, tiny difference from the original.

Notation: B batch, P tokens (257 at 224 px), Dv width, nh heads, hs = Dv / nh head size (88 for ViT-g).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend, merge_heads
from .config import VisionConfig
from .patch_embed import PatchEmbedding


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(D)) if config.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(D)) if config.qkv_bias else None
        self.projection = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        B, P, D = x.shape
        qkv = self.qkv(x)  # (B, P, Dv) -> (B, P, 3*Dv)
        if self.q_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # k gets no bias
        qkv = qkv.view(B, P, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, P, hs)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = attend(q, k, v, return_weights=return_weights)  # (B, nh, P, hs) [, weights (B, nh, P, P)]
        out, weights = out if return_weights else (out, None)
        return self.projection(merge_heads(out)), weights  # (B, P, Dv)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # (B, P, Dv) -> (B, P, 4.4*Dv) -> (B, P, Dv)


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        attn_out, weights = self.attn(self.norm1(x), return_weights)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, weights


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"vision: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        if config.hidden_act != "gelu":
            raise ValueError(f"vision: hidden_act {config.hidden_act!r} is not supported (EVA ViT uses 'gelu')")
        self.config = config
        self.embeddings = PatchEmbedding(config)
        self.layers = nn.ModuleList([VisionBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False):
        """(B, 3, H, W) -> image embeddings (B, P, Dv), after the final LayerNorm.

        With `output_hidden_states` / `output_attentions` also returns a dict with "hidden_states" (the
        embeddings, then the output of every block: num_layers + 1 tensors of (B, P, Dv)) and/or
        "attentions" (num_layers tensors of (B, nh, P, P)) for notebooks and tests.
        """
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, P, Dv)
        hidden_states, attentions = [x], []
        for block in self.layers:
            x, weights = block(x, return_weights=output_attentions)
            hidden_states.append(x)
            attentions.append(weights)
        x = self.post_layernorm(x)
        if not (output_hidden_states or output_attentions):
            return x
        extras = {}
        if output_hidden_states:
            extras["hidden_states"] = hidden_states
        if output_attentions:
            extras["attentions"] = attentions
        return x, extras
