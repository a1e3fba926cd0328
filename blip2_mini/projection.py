"""Stage 3: project the Q-Former's query outputs into the language model's input space (BLIP-2 section 3.3).

One fully-connected layer (`Blip2.language_projection`, an nn.Linear in model.py) maps each of the Q query outputs (width Dq = 768) to the width of the frozen
language model's word embeddings (Dlm: 2560 for OPT-2.7b, 2048 for Flan-T5-XL). The paper calls the result
"soft visual prompts": to the LLM they look like Q extra word embeddings that happen to describe the image.

How those Q vectors enter the LLM's input differs between the two layouts of the published checkpoints:
- current layout: the checkpoint's config declares `image_token_index` and its processor writes Q copies of
  an `<image>` token in front of the prompt (before BOS). The embeddings of those placeholder slots are
  replaced, in order, by the projected queries (`insert_queries`).
- older layout (no `image_token_index`): the prompt has no placeholders; the Q vectors are prepended to the
  prompt's embeddings and the attention mask is extended with Q ones (`prepend_queries`).

Notation: B batch, Q queries, Dq Q-Former width, T prompt tokens, Dlm language-model width.
"""

import torch


def insert_queries(inputs_embeds, input_ids, query_embeds, image_token_index: int):
    """Write the projected queries into the `<image>` slots of the prompt.

    inputs_embeds (B, T, Dlm) embeddings of input_ids (B, T); query_embeds (B, Q, Dlm).
    Every row must hold exactly Q image tokens: the queries of row b fill row b's slots in order.
    """
    is_slot = input_ids == image_token_index  # (B, T)
    per_row = is_slot.sum(dim=1)
    Q = query_embeds.shape[1]
    if not bool((per_row == Q).all()):
        raise ValueError(f"projection: every prompt must contain exactly {Q} <image> tokens (id {image_token_index}) "
                         f"for the {Q} queries, found {per_row.tolist()}; build the prompt with the processor "
                         "(which writes them), without '<image>' in the text itself")
    out = inputs_embeds.clone()
    out[is_slot] = query_embeds.reshape(-1, query_embeds.shape[-1]).to(out.dtype)  # row-major: (B*Q, Dlm)
    return out


def prepend_queries(inputs_embeds, attention_mask, query_embeds):
    """Older layout: [queries; prompt] -> embeddings (B, Q+T, Dlm) and mask (B, Q+T)."""
    B, Q = query_embeds.shape[:2]
    embeds = torch.cat([query_embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
    ones = torch.ones(B, Q, dtype=attention_mask.dtype, device=attention_mask.device)
    return embeds, torch.cat([ones, attention_mask], dim=1)
