"""Stage 2, vision-to-language generative learning: the Q-Former talks to the frozen OPT (paper 3.3, Fig. 3).

The projected query outputs become Q "soft visual prompt" vectors in front of the text, and the *frozen* OPT is
asked to continue with the caption. Only the queries, the Q-Former and the projection are trained: the loss's
gradient flows back *through* OPT's frozen layers into them. Two kinds of training strings, both in the layout
the checkpoint's processor writes at inference (`<image>` x Q, then BOS):

    caption      <image>*Q </s> a small red circle on the left </s>          loss on every caption token + EOS
    prefix LM    <image>*Q </s> Question: what colour is the circle? Answer: red </s>
                 the prompt is context, the loss is on " red" and EOS only (the paper's prefix variant, used
                 there for Flan-T5: the prefix goes to the encoder, the suffix is generated)

Stage 1 matters because the queries arrive having already learned to extract the text-relevant content of the
image; the ablation (run.py step 4, reported in eval.json; `--no-ablation` skips it) starts stage 2 from a
random Q-Former.

The Q-Former's text side (embeddings, text FFNs) is not used here; the exported stage-2 checkpoint drops it,
as the published OPT/Flan-T5 checkpoints do.

Notation: B batch, Q queries, T text tokens, L = Q + T, Dq Q-Former width, Dlm OPT width, V vocabulary.
"""

import random

import torch
import torch.nn.functional as F

from ..data.shapes import vqa_prompt
from ..model import Blip2
from .common import Progress, adamw, cosine_lr, pad_batch


def stage2_example(tokenizer, num_queries: int, image_token_id: int, prompt: str, target: str):
    """ids and labels of one training string: `<image>`*Q BOS prompt target EOS, loss on target + EOS only."""
    context = [image_token_id] * num_queries + tokenizer.encode(prompt)  # encode() prepends BOS
    answer = tokenizer.encode((" " if prompt else "") + target, add_special_tokens=False) + [tokenizer.eos_token_id]
    return context + answer, [-100] * len(context) + answer


def sample_batch(items, tokenizer, num_queries, image_token_id, batch_size, rng: random.Random, vqa_share=0.5):
    """Draw `batch_size` (image index, text) examples: a caption, or with probability `vqa_share` one of the
    image's questions. `items` is a list of (caption, [(question, answer), ...]) per training image."""
    indices, seqs, labels = [], [], []
    for _ in range(batch_size):
        i = rng.randrange(len(items))
        caption, qa = items[i]
        if qa and rng.random() < vqa_share:
            question, answer = rng.choice(qa)
            ids, lab = stage2_example(tokenizer, num_queries, image_token_id, vqa_prompt(question), answer)
        else:
            ids, lab = stage2_example(tokenizer, num_queries, image_token_id, "", caption)
        indices.append(i)
        seqs.append(ids)
        labels.append(lab)
    ids = pad_batch(seqs, tokenizer.pad_token_id)
    labels = pad_batch(labels, -100)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # (B, T): 1 on real tokens
    return torch.tensor(indices), ids, mask, labels


def stage2_loss(model: Blip2, image_embeds, ids, mask, labels):
    """LM loss of OPT continuing [soft visual prompt; text]; image_embeds are the frozen ViT's (B, P, Dv)."""
    visual_prompt = model.project(model.query(image_embeds))  # (B, Q, Dq) -> (B, Q, Dlm)
    embeds, mask = model.language_model_inputs(visual_prompt, ids, mask)  # queries into the <image> slots
    logits = model.language_model(embeds, mask)  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def train_stage2(model: Blip2, image_embeds: torch.Tensor, items, tokenizer, steps: int, batch_size: int = 32,
                 lr: float = 1e-3, seed: int = 0, title: str = "stage 2: LM loss through the frozen OPT",
                 quiet: bool = False) -> Progress:
    """Train query_tokens, the Q-Former and language_projection of `model` (its ViT and OPT stay frozen) on
    cached frozen-ViT features `image_embeds` (N, P, Dv) and `items` [(caption, qa pairs)] of the same images."""
    rng = random.Random(seed)
    Q, image_token_id = model.config.num_query_tokens, model.config.image_token_index
    trained = [("query_tokens", model.query_tokens), *model.qformer.named_parameters(),
               *model.language_projection.named_parameters()]
    params = [p for _, p in trained]
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    optimizer = adamw(trained, lr=lr, weight_decay=0.05)
    progress = Progress(title, steps, every=25, quiet=quiet)
    model.train()
    model.language_model.eval()
    for step in range(1, steps + 1):
        idx, ids, mask, labels = sample_batch(items, tokenizer, Q, image_token_id, batch_size, rng)
        loss = stage2_loss(model, image_embeds[idx], ids, mask, labels)
        cosine_lr(optimizer, step - 1, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.log(step, loss=loss.item())
    model.eval()
    return progress
