"""The two frozen parts, pre-trained first: a small ViT and a small OPT, each with an objective of its own.

BLIP-2 starts from an image encoder trained elsewhere (EVA-CLIP, contrastive on 2 B image-text pairs) and a
language model trained elsewhere (OPT, next-token prediction on 180 B tokens), and never updates either. The
toy recipe makes the same two models at toy size, with the same architectures as vit.py and opt.py:

- The ViT learns to *see* the Shapes world: from each cell's output token, a throw-away linear head names what
  sits in that cell (nothing, or a kind, a colour and a size), and from every token which token it is (so its
  features say *where*; see `CellHead`). The head is discarded; only the ViT is kept, frozen, exactly as
  BLIP-2 keeps EVA's features and not CLIP's text tower. The ViT never reads a caption.
- The OPT learns to *write* the Shapes language: next-token prediction on captions and on the
  "Question: ... Answer: ..." strings, with a byte-level BPE vocabulary learned by our own trainer (bpe.py).
  It never sees an image. Most of its training strings are small "documents" about one scene: a caption
  followed by questions and answers about it (`scene_documents`), and a description followed by a restatement
  (`paired_documents`). Both mean looking back at earlier text. A real LLM has learned such in-context look-up
  and copying from its web text, and BLIP-2 relies on it: the soft visual prompt is context that the LLM must
  read. A toy LM trained on isolated sentences never learns to look back, and stage 2 then cannot teach it,
  since the LM is frozen (we measured this: without documents the stage-2 model ignores the image; without
  restatements it never names a size right). `evaluate.lm_restating_accuracy` measures the skill.

Neither objective mentions the other modality: connecting them is the Q-Former's job (stages 1 and 2).

Notation: B batch, S image side, P image tokens incl. CLS, Dv ViT width, T text tokens, V vocabulary,
C = 5 cells.
"""

import json
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..bpe import OPT_TOKENIZER_CONFIG, train_bpe
from ..config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig
from ..data.shapes import COLOURS, KINDS, POSITIONS, SIZES
from ..opt import OPT
from ..tokenizer import load_tokenizer
from ..vit import VisionTransformer
from .common import IMAGE_MEAN, IMAGE_STD, Progress, cosine_lr, pad_batch

# OPT's special tokens, at OPT's ids: <s> 0, <pad> 1, </s> 2 (BOS and EOS), <unk> 3. `<image>` is added after
# the learned vocabulary, like the published processors add it after OPT's 50265 tokens.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"


# ---- sizes -----------------------------------------------------------------------------------------------


def toy_config(vocab_size: int, image_token_index: int, text_input: bool = True) -> Blip2Config:
    """The toy BLIP-2: every stage a few layers of width 128 (the real one: 1408 / 768 / 2560 wide).

    72 px images in 24 px patches: the 3x3 patch grid is exactly the Shapes world's 3x3 grid of cells, so
    P = 3*3 + 1 = 10 image tokens, each patch holding at most one shape (BLIP-2: 16*16 + 1 = 257 tokens, and
    objects straddle patches). Q = 32 queries, as in BLIP-2, although 10 image tokens hold far less than 32
    queries can carry: the frozen OPT reads the soft prompt the way it reads text, by looking back at it token
    by token, and a caption is up to ~30 tokens long. Stage 2 alone on the same frozen parts, test split:
    with Q = 8, caption colour 74 %, kind 59 %, size 93 %, exact 27 %; with Q = 32: 96 %, 75 %, 100 %, 51 %.
    The widths are what a 2-core CPU trains in minutes: the cost of every stage grows with the number of tokens.
    `text_input`: the Q-Former's text side (embeddings + text FFNs), needed in stage 1 only.
    """
    vision = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                          image_size=72, patch_size=24)
    qformer = QFormerConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                            cross_attention_frequency=2, encoder_hidden_size=vision.hidden_size,
                            vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=1,
                            use_qformer_text_input=text_input)
    text = OPTConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     ffn_dim=512, max_position_embeddings=96, word_embed_proj_dim=128,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
                       image_text_hidden_size=64, image_token_index=image_token_index)


def init_weights(module: nn.Module, std: float = 0.02):
    """BERT/OPT-style initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms, and BLIP-2's learned
    queries normal(0, 0.02) too. The queries must not stay at their constructor's zeros: the Q-Former's first
    LayerNorm divides by their (zero) spread, so their gradient comes out ~1e13 and, after gradient clipping,
    every other parameter's update is ~0 (stage 1 then learns nothing: ITM sits at its class prior)."""
    for m in module.modules():
        if isinstance(getattr(m, "query_tokens", None), nn.Parameter):
            nn.init.normal_(m.query_tokens, std=std)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def freeze(module: nn.Module) -> nn.Module:
    """BLIP-2's frozen parts: no gradients, eval mode (LAVIS keeps its ViT in eval mode; these modules have no
    dropout, so the mode changes nothing here)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# ---- the tokenizer ---------------------------------------------------------------------------------------


def train_tokenizer(texts, out_dir, vocab_size: int = 400):
    """Learn a byte-level BPE vocabulary on the training text and write a complete OPT-style tokenizer
    directory (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) with `<image>` added
    after the learned tokens. Returns the loaded tokenizer (tokenizer.py reads the files back)."""
    out_dir = Path(out_dir)
    vocab, _ = train_bpe(texts, vocab_size, SPECIAL_TOKENS, out_dir)
    image_id = len(vocab)
    added = {i: t for t, i in vocab.items() if t in SPECIAL_TOKENS}
    added[image_id] = IMAGE_TOKEN

    def entry(content):  # the reference's added-token record
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    config = {**OPT_TOKENIZER_CONFIG, "model_max_length": 96, "padding_side": "right",
              "added_tokens_decoder": {str(i): entry(t) for i, t in sorted(added.items())}}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return load_tokenizer(out_dir)


# ---- the frozen image encoder ----------------------------------------------------------------------------

# The ViT's own objective: for each of the five cells, three classifications (index 0 = "empty cell").
CELL_TARGETS = {"kind": len(KINDS) + 1, "colour": len(COLOURS) + 1, "size": len(SIZES) + 1}


def cell_labels(scenes) -> torch.Tensor:
    """(N, C, 3) long: for each scene and cell (in POSITIONS order), kind / colour / size index + 1, or 0."""
    labels = torch.zeros(len(scenes), len(POSITIONS), 3, dtype=torch.long)
    for n, scene in enumerate(scenes):
        for shape in scene.shapes:
            c = POSITIONS.index(shape.position)
            labels[n, c] = torch.tensor([KINDS.index(shape.kind) + 1, COLOURS.index(shape.colour) + 1,
                                         SIZES.index(shape.size) + 1])
    return labels


class CellHead(nn.Module):
    """Names every cell's kind, colour and size from that cell's own output token, and, from every token, which
    token it is. The patch grid is the cell grid (see `toy_config`): patch (row, col) is token 1 + 3*row + col,
    after the CLS token.

    Why the second target ("where"): the Q-Former reads the image tokens through cross-attention, which sees
    them as an unordered *set*: a token's place in the sequence is invisible to it, so "on the left" must be
    written in the token itself. A ViT keeps a trace of its position embeddings in its outputs when its
    objective needs them (EVA's do); ours, naming each cell from that cell's own token, did not need them and
    dropped them (a linear probe named a token's cell from its features 35 % of the time), and stage 2 then
    could not say where a shape is, nor list the shapes in reading order (position in captions: 32 %)."""

    CELL_TOKENS = [1 + 3 * r + c for r, c in ((0, 1), (1, 0), (1, 1), (1, 2), (2, 1))]  # POSITIONS order

    def __init__(self, width: int, num_tokens: int):
        super().__init__()
        self.out = nn.Linear(width, sum(CELL_TARGETS.values()))
        self.where = nn.Linear(width, num_tokens)

    def forward(self, tokens):  # (B, P, Dv) -> {attribute: (B, C, classes)}, (B, P, P)
        logits = self.out(tokens[:, self.CELL_TOKENS])  # (B, C, Dv) -> (B, C, 5 + 7 + 3)
        return dict(zip(CELL_TARGETS, logits.split(list(CELL_TARGETS.values()), dim=-1))), self.where(tokens)


def grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, S, S) -> the same images in shades of grey (luminance on every channel), normalised."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    rgb = pixels * std + mean  # (B, 3, S, S) in [0, 1]
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, S, S)
    return (luma - mean) / std


def pretrain_vision(vit: VisionTransformer, pixels: torch.Tensor, labels: torch.Tensor, steps: int,
                    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, quiet: bool = False,
                    grey_share: float = 0.8) -> Progress:
    """Train `vit` (in place) to name the shapes of every cell; returns the loss history.

    Why `grey_share`: the training split never shows a red square (shapes.HELD_OUT_PAIRS), and a ViT trained
    on colour images alone learns "square" as "a square of one of the colours squares come in": on the test
    split it named the kind of a held-out pair almost never (kind probe 94 % on val, 50 % on test). Showing most
    images in grey, with the colour target dropped, makes the kind and size of a shape recognisable from its
    outline alone, so it carries over to unseen colours (kind probe on test: 62 % with a grey share of 0.5
    after 800 steps, 75 % with 0.8 after 1200). No held-out pair is shown: a grey square has no colour."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens = vit.embeddings.position_embedding.shape[1]  # P: patches + CLS
    head = CellHead(vit.config.hidden_size, num_tokens)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    progress = Progress("frozen ViT: name the shape in every cell", steps, quiet=quiet)
    vit.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(pixels), (batch_size,), generator=generator)
        grey = torch.rand(batch_size, generator=generator) < grey_share  # (B,)
        images = torch.where(grey[:, None, None, None], grayscale(pixels[idx]), pixels[idx])
        logits, where = head(vit(images))  # where: (B, P, P)
        target = labels[idx].clone()  # (B, C, 3)
        colour = list(CELL_TARGETS).index("colour")
        # A grey image still shows which cells are empty (colour class 0), but not the colour of a shape.
        target[..., colour].masked_fill_(grey[:, None] & (target[..., colour] > 0), -100)
        losses = [F.cross_entropy(logits[a].flatten(0, 1), target[..., i].flatten(), ignore_index=-100)
                  for i, a in enumerate(CELL_TARGETS)]
        losses.append(F.cross_entropy(where.flatten(0, 1), torch.arange(num_tokens).repeat(batch_size)))
        loss = sum(losses) / len(losses)
        cosine_lr(optimizer, step - 1, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            acc = torch.stack([(logits[a].argmax(-1) == target[..., i]).float().sum() / (target[..., i] >= 0).sum()
                               for i, a in enumerate(CELL_TARGETS)]).mean()
        progress.log(step, loss=loss.item(), cell_acc=acc.item())
    freeze(vit)
    return progress


# ---- the frozen language model ---------------------------------------------------------------------------


def scene_documents(scenes, seed: int = 0, questions_per_scene: int = 2) -> list[str]:
    """One short document per scene: its caption, then a few of its questions with their answers."""
    from ..data.shapes import caption, questions, vqa_text

    rng = random.Random(seed)
    docs = []
    for scene in scenes:
        qa = questions(scene)
        picked = rng.sample(qa, min(questions_per_scene, len(qa)))
        docs.append(" ".join([caption(scene)] + [vqa_text(q, a) for q, a in picked]))
    return docs


def shuffled_description(scene, rng: random.Random) -> str:
    """The scene's shapes described in a random order: the caption's facts, not its reading order."""
    from ..data.shapes import describe

    shapes = list(scene.shapes)
    rng.shuffle(shapes)
    return describe(shapes)


def paired_documents(scenes, n: int, seed: int = 1, caption_share: float = 0.75) -> list[str]:
    """`n` two-part documents about one scene each, joined by `</s>` the way OPT's pre-training text packs
    documents: first a description (the caption, or half of the time its phrases in shuffled order), then the
    canonical caption again (`caption_share` of the time) or one question with its answer.

        a small red circle at the top and a large blue cross on the left</s>a large blue cross on the left and ...

    Why: stage 2 asks the frozen LM to *re-describe* something it was given in context, the soft visual prompt.
    A web-trained OPT has seen text that restates, reorders and answers from earlier text countless times; a
    toy OPT trained on captions and Q/A documents alone had not: given a true caption and `</s>`, it went on
    with unrelated questions, and made to repeat the caption word by word it guessed every size (53 %).
    With 18000 of these documents (and 2500+ steps) it restates every attribute (100 %; evaluate.py,
    `lm_restating_accuracy`), and stage 2 on it named sizes 95 % right instead of 53 % (val, same ViT)."""
    from ..data.shapes import caption, questions, vqa_text

    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        scene = rng.choice(scenes)
        if len(scene.shapes) > 1 and rng.random() < 0.5:
            first = shuffled_description(scene, rng)
        else:
            first = caption(scene)
        if rng.random() < caption_share:
            second = caption(scene)
        else:
            second = vqa_text(*rng.choice(questions(scene)))
        docs.append(first + "</s>" + second)
    return docs


def lm_batch(token_lists: list[list[int]], pad_id: int):
    """Ids already framed as BOS ... EOS -> (inputs (B, T), labels (B, T) with -100 on padding)."""
    ids = pad_batch(token_lists, pad_id)
    lengths = torch.tensor([len(t) for t in token_lists])
    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
    labels = ids.masked_fill(~real, -100)
    return ids, real.long(), labels


def lm_loss(logits, labels):
    """Next-token cross-entropy: position t predicts token t+1; -100 labels are ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def pretrain_language_model(opt: OPT, tokenizer, texts: list[str], steps: int, batch_size: int = 64,
                            lr: float = 2e-3, seed: int = 0, quiet: bool = False) -> Progress:
    """Train `opt` (in place) as a language model on `texts`: "</s> text </s>" (OPT's BOS is its EOS)."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]  # encode() prepends BOS
    positions = opt.config.max_position_embeddings
    too_long = [len(e) for e in encoded if len(e) > positions]
    if too_long:  # OPT has learned positions: a longer text would index past its position table
        raise ValueError(f"{len(too_long)} of the language model's training texts are longer than its "
                         f"{positions} positions (the longest: {max(too_long)} tokens): learn a larger BPE "
                         f"vocabulary (fewer tokens per text) or give the model more positions")
    optimizer = torch.optim.AdamW(opt.parameters(), lr=lr, weight_decay=0.01)
    progress = Progress("frozen OPT: next-token prediction on captions and answers", steps, quiet=quiet)
    opt.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        ids, mask, labels = lm_batch([encoded[i] for i in idx], tokenizer.pad_token_id)
        logits = opt(opt.embed_tokens(ids), mask)  # (B, T, V)
        loss = lm_loss(logits, labels)
        cosine_lr(optimizer, step - 1, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.parameters(), 1.0)
        optimizer.step()
        progress.log(step, loss=loss.item())
    freeze(opt)
    return progress
