"""Stage 1, vision-language representation learning: the Q-Former learns to read the frozen ViT (paper 3.2, Fig. 2).

The Q-Former's queries cross-attend to the frozen image features; its text side is a small BERT. Three losses,
computed on the same batch of (image, caption) pairs, pull the queries towards what the text says. They differ
in *who may attend to whom* inside the Q-Former's self-attention (qformer.stage1_attention_mask):

    ITC  image-text contrastive   "unimodal" mask: queries and text cannot see each other, so the two sides are
         encoded independently; the similarity of a pair is the highest cosine similarity between any of the
         Q query embeddings and the text's first ([CLS]) embedding; softmax over the batch in both directions
         with a fixed temperature (see Stage1Model).
    ITM  image-text matching      "bidirectional" mask: queries and text see each other and fuse; a linear head
         on every query output, averaged, says match / no match. The negatives are *hard*: for each image a
         wrong caption drawn with probability softmax(ITC similarity) over the wrong captions (half of the time;
         see negative_weights), and for each caption a wrong image.
    ITG  image-grounded text generation   "multimodal_causal" mask: the text is generated left to right and
         sees all queries; the queries do not see the text. The text's first token is replaced by a [DEC]
         token. Because text can reach the image *only through the queries*, the queries must carry
         everything the caption needs.

The published stage-1 code adds the three losses with equal weight; so do we.

Text side: the Q-Former here reads the same byte-level BPE ids as the language model. `<s>` (id 0, which OPT
never uses: its BOS is `</s>`) plays BERT's [CLS]; `<unk>` (id 3: byte-level BPE has no unknown words, so it
never occurs in text) plays [DEC]; `</s>` ends the text like BERT's [SEP].

Notation: B batch, Q queries, T text tokens, L = Q + T, P image tokens, Dv ViT width, Dq Q-Former width,
E shared embedding width (image_text_hidden_size), V vocabulary.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Blip2
from ..qformer import stage1_attention_mask
from .common import Progress, adamw, cosine_lr, pad_batch

CLS_ID, DEC_ID = 0, 3  # <s> and <unk>, see the module docstring


def qformer_text(tokenizer, texts: list[str]):
    """Captions -> Q-Former text ids (B, T) "[CLS] caption </s>", right-padded, and their mask (B, T)."""
    seqs = [[CLS_ID] + tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    ids = pad_batch(seqs, tokenizer.pad_token_id)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


class Stage1Model(nn.Module):
    """What stage 1 trains, around a retrieval-layout Blip2 (`text_config=None`): its query tokens, its Q-Former
    (query and text sides), `vision_projection` / `text_projection` into the shared space and `itm_head`; plus
    the ITC temperature and the ITG output head, which stage 1 needs and no published checkpoint keeps."""

    def __init__(self, blip2: Blip2):
        super().__init__()
        assert blip2.language_model is None and blip2.qformer.embeddings is not None
        self.blip2 = blip2
        # ITC temperature, fixed. BLIP-2 learns it (init 0.07) at its small peak lr of 1e-4; at our lr of 1e-3,
        # Adam moves this 0.07-sized number by ~1e-3 per step, and with it learned the ITC loss sat at ln(B)
        # (chance) for the first ~150 steps; fixed at 0.07 it was down to 2.2 (from 3.2) by step 75 (measured).
        self.register_buffer("temperature", torch.tensor(0.07), persistent=False)
        Dq, V = blip2.qformer.config.hidden_size, blip2.qformer.config.vocab_size
        self.itg_bias = nn.Parameter(torch.zeros(V))  # ITG head: scores against the word embeddings (tied)

    # ---- the three passes, one per mask ---------------------------------------------------------------

    def run_qformer(self, image_embeds, ids, mask, kind: str):
        """One Q-Former pass over [queries; text] under one of the three masks -> (B, L, Dq)."""
        b = self.blip2
        Q = b.config.num_query_tokens
        queries = b.query_tokens.expand(ids.shape[0], -1, -1)  # (B, Q, Dq)
        allowed = stage1_attention_mask(kind, Q, mask)  # (B, L, L)
        return b.qformer(queries, image_embeds, input_ids=ids, attention_mask=allowed)

    def itc_features(self, image_embeds, ids, mask):
        """Unimodal pass: image query embeddings (B, Q, E) and text [CLS] embeddings (B, E), L2-normalised."""
        b, Q = self.blip2, self.blip2.config.num_query_tokens
        h = self.run_qformer(image_embeds, ids, mask, "unimodal")  # (B, Q+T, Dq)
        image_feats = F.normalize(b.vision_projection(h[:, :Q]), dim=-1)  # (B, Q, E)
        text_feats = F.normalize(b.text_projection(h[:, Q]), dim=-1)  # (B, E): position Q is the [CLS]
        return image_feats, text_feats

    @staticmethod
    def similarity(image_feats, text_feats):
        """(Bi, Q, E), (Bt, E) -> (Bi, Bt): best query per pair (the paper's "max over queries")."""
        return (image_feats @ text_feats.T).max(dim=1).values  # (Bi, Q, Bt) -> (Bi, Bt)

    def itm_logits(self, image_embeds, ids, mask):
        """Bidirectional pass: (B, 2) [no match, match] from the query outputs, averaged over queries."""
        Q = self.blip2.config.num_query_tokens
        h = self.run_qformer(image_embeds, ids, mask, "bidirectional")
        return self.blip2.itm_head(h[:, :Q]).mean(dim=1)  # (B, Q, 2) -> (B, 2)

    def itg_loss(self, image_embeds, ids, mask):
        """Multimodal-causal pass: caption tokens predicted from the queries and the tokens before them."""
        Q = self.blip2.config.num_query_tokens
        dec_ids = ids.clone()
        dec_ids[:, 0] = DEC_ID  # [CLS] -> [DEC]: the same text side now acts as a decoder
        h = self.run_qformer(image_embeds, dec_ids, mask, "multimodal_causal")[:, Q:]  # (B, T, Dq)
        words = self.blip2.qformer.embeddings.word_embeddings.weight  # (V, Dq)
        logits = F.linear(h, words, self.itg_bias)  # (B, T, V)
        labels = ids.masked_fill(mask == 0, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    def itm_loss(self, image_embeds, ids, mask, sim_i2t, same, generator=None):
        """ITM on B positives, B hard negative images and B hard negative texts. sim_i2t (B, B) is the ITC
        similarity / temperature, same (B, B) marks pairs with identical captions (never negatives)."""
        B = ids.shape[0]
        with torch.no_grad():
            neg_text = torch.multinomial(negative_weights(sim_i2t, same), 1, generator=generator).squeeze(1)  # (B,)
            neg_image = torch.multinomial(negative_weights(sim_i2t.T, same.T), 1, generator=generator).squeeze(1)
        itm_images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])  # (3B, P, Dv)
        itm_ids = torch.cat([ids, ids, ids[neg_text]])  # (3B, T)
        itm_mask = torch.cat([mask, mask, mask[neg_text]])
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()  # positives, then the two negatives
        return F.cross_entropy(self.itm_logits(itm_images, itm_ids, itm_mask), itm_labels)

    # ---- the loss ---------------------------------------------------------------------------------------

    def forward(self, image_embeds, ids, mask, texts: list[str], generator=None):
        """The three stage-1 losses on a batch of B matching (image, caption) pairs."""
        image_feats, text_feats = self.itc_features(image_embeds, ids, mask)
        temp = self.temperature.clamp(0.001, 0.5)
        sim_i2t = self.similarity(image_feats, text_feats) / temp  # (B, B)
        # Identical captions in one batch are not negatives of each other (BLIP-2 masks pairs of the same image).
        same = torch.tensor([[a == b for b in texts] for a in texts])  # (B, B)
        targets = same.float() / same.float().sum(dim=1, keepdim=True)
        itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.T, targets)) / 2

        itm = self.itm_loss(image_embeds, ids, mask, sim_i2t, same, generator)
        itg = self.itg_loss(image_embeds, ids, mask)
        return itc + itm + itg, {"itc": itc.item(), "itm": itm.item(), "itg": itg.item()}


def negative_weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """(B, B) ITC similarities / temperature, row i for the item that needs a wrong partner, and `same` (B, B),
    the partners that are not wrong -> (B, B) probabilities of drawing each column as row i's negative.

    Half of the mass is softmax(similarity) over the wrong partners only: the right ones are masked out *before*
    the softmax, as in the BLIP-2 code, so the hard half stays half however sure ITC becomes (masked after it,
    a trained ITC's ~96 % on the right caption left the hard half ~4 % of the draws, measured). The other half is
    uniform over them. Why not all hard: from scratch (BLIP-2 starts from BERT), pure hard negatives (captions
    one word away) kept ITM at its class prior for the whole run; with uniform negatives the same model left the
    prior after ~200 steps (measured). The mixture keeps the hard ones and gives ITM an easy signal to start on."""
    wrong = ~same
    if not wrong.any(dim=1).all():
        raise ValueError("stage 1: a batch in which every caption is the same has no negatives for ITM")
    hard = F.softmax(sim.float().masked_fill(same, float("-inf")), dim=1)  # (B, B), 0 on the right partners
    uniform = wrong.float() / wrong.sum(dim=1, keepdim=True)
    return 0.5 * hard + 0.5 * uniform


def train_stage1(model: Stage1Model, image_embeds: torch.Tensor, captions: list[str], tokenizer, steps: int,
                 batch_size: int = 32, lr: float = 1e-3, seed: int = 0, quiet: bool = False) -> Progress:
    """Train the Q-Former side of `model` on cached frozen-ViT features `image_embeds` (N, P, Dv) and their
    captions. The ViT is frozen, so its output for each training image is computed once, outside this loop."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model.named_parameters(), lr=lr, weight_decay=0.05)
    progress = Progress("stage 1: ITC + ITM + ITG", steps, every=25, quiet=quiet)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(captions), (batch_size,), generator=generator)
        texts = [captions[i] for i in idx.tolist()]
        ids, mask = qformer_text(tokenizer, texts)
        loss, parts = model(image_embeds[idx], ids, mask, texts, generator=generator)
        cosine_lr(optimizer, step - 1, steps, lr, warmup=max(1, steps // 20))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        progress.log(step, loss=loss.item(), **parts)
    model.eval()
    return progress
