"""Image-text retrieval with the stage-1 Q-Former (BLIP-2 sections 3.2 and 4.4; the `blip2-itm-vit-g` checkpoints).

Before any language model is attached, the Q-Former pre-trained in stage 1 already relates images and texts in
two ways, with very different costs (the model methods are `Blip2.itc` and `Blip2.itm`):

    ITC  s(I, T) = max_q  z_q(I) . t(T)           image-text contrastive similarity, in [-1, 1]
         z_q: the Q query outputs projected to E = 256 dims and normalised; t: the text's [CLS] output, same.
         Image and text are encoded *separately*: a gallery is encoded once, and each new query costs one
         text pass and one (N, Q, E) @ (E,) product. Cheap, but the two sides never look at each other.
    ITM  p(match | I, T) = softmax(mean_q itm_head(h_q(I, T)))[1]             image-text matching
         The queries and the text attend to each other inside the Q-Former (h_q: query outputs of that joint
         pass), then a 2-way classifier says match / no match. One full pass *per pair*: precise but costly.

The paper's retrieval recipe (section 4.4) combines them: "we first select k = 128 candidates based on the
image-text feature similarity, followed by a re-ranking based on pairwise ITM scores". In the original code
(LAVIS, `compute_sim_matrix`) the re-ranking score of a candidate is its ITM *match logit* (averaged over the
queries, before any softmax) plus its ITC similarity; the candidates outside the top k get -100, below them
all. `retrieve` below is that recipe for one query; `rank_images` applies it to a folder of images and returns
the k re-ranked ones. The probabilities it reports are the softmax of the two ITM logits, easier to read than
a logit; the order is the recipe's, so with a poorly calibrated head they need not decrease down the list.

Notation: N gallery images, k candidates re-ranked, Q queries, E shared embedding size (256), T text tokens.
"""

import torch

# ---- the recipe on tensors ------------------------------------------------------------------------------


def retrieve(itc_sims: torch.Tensor, itm_fn, k: int):
    """Re-rank the k best candidates of one query by ITM, as the paper and LAVIS do.

    itc_sims  (N,) ITC similarity of the query with each of the N candidates
    itm_fn    function: candidate indices (k,) -> (k, 2) ITM logits [no match, match] of those pairs
    k         how many candidates to re-rank (all N if k >= N)

    Returns (indices (k,), scores (k,), itm_logits (k, 2)), best first; score = ITM match logit + ITC.
    """
    if itc_sims.ndim != 1 or itc_sims.numel() == 0:
        raise ValueError(f"retrieve: expected a non-empty (N,) vector of ITC similarities, got {tuple(itc_sims.shape)}")
    if k < 1:
        raise ValueError(f"retrieve: k must be at least 1, got {k}")
    top_itc, candidates = itc_sims.topk(min(k, itc_sims.numel()))  # (k,), (k,): the ITC short list
    itm_logits = itm_fn(candidates)  # (k, 2)
    if itm_logits.shape != (candidates.numel(), 2):
        raise ValueError(f"retrieve: itm_fn returned {tuple(itm_logits.shape)}, expected ({candidates.numel()}, 2)")
    scores = itm_logits[:, 1].float() + top_itc.float()  # LAVIS: score_matrix[i, topk_idx] = itm + topk_sim
    order = scores.argsort(descending=True, stable=True)  # ties keep the ITC order
    return candidates[order], scores[order], itm_logits[order]


# ---- the recipe on images and texts ---------------------------------------------------------------------


def _check_texts(texts) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("give at least one text")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty text {text!r}: every text needs at least one word")
    return texts


def _tokenize(processor, texts: list[str], device):
    """Plain Q-Former ids "[CLS] ... [SEP] [PAD]..." (B, T) and their mask, on `device`: padded on the right
    whatever the processor's side, since each text is read at its first token."""
    tokenizer, side = processor.tokenizer, processor.tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _pixels(processor, images, device):
    return processor(images=list(images), return_tensors="pt")["pixel_values"].to(device)  # (B, 3, H, W)


@torch.no_grad()
def match_scores(model, processor, image, texts, device="cpu") -> list[tuple[str, float, float]]:
    """How well does each text describe the image? [(text, ITM match probability, ITC similarity)], in the
    order of `texts`. The probability is softmax over the ITM head's [no match, match] logits."""
    texts = _check_texts(texts)
    pixel_values = _pixels(processor, [image], device)  # (1, 3, H, W)
    input_ids, attention_mask = _tokenize(processor, texts, device)  # (B, T)
    itm = model.itm(pixel_values, input_ids, attention_mask).float().softmax(dim=-1)[:, 1]  # one image, B texts
    itc = model.itc(pixel_values, input_ids, attention_mask).float()[0]  # (1, B) -> (B,)
    return [(text, p, s) for text, p, s in zip(texts, itm.tolist(), itc.tolist())]


@torch.no_grad()
def rank_images(model, processor, images, query: str, top_k: int = 5, batch_size: int = 16, device="cpu",
                on_progress=None) -> list[tuple[object, float, float]]:
    """Rank a gallery of images for a text query: ITC over all of them, then the `top_k` best re-ranked by ITM.

    images       [(name or path, PIL image)]
    on_progress  called as on_progress(done, total) after each batch of images is embedded
    Returns [(name, ITC similarity, ITM match probability)] for the top_k images, best first.
    """
    (query,) = _check_texts([query])
    if not images:
        raise ValueError("rank: no images to rank")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"rank: top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in images):
        raise ValueError("rank: images must be (name, image) pairs, e.g. [(path, load_image(path)), ...]")
    names, pictures = zip(*images)
    input_ids, attention_mask = _tokenize(processor, [query], device)  # (1, T)

    # 1. ITC against every image, a batch at a time (the text pass is repeated per batch: it is tiny next to
    #    the ViT, and it keeps this the same `model.itc` that `match` reports).
    sims = []
    for start in range(0, len(pictures), batch_size):
        batch = pictures[start:start + batch_size]
        sims.append(model.itc(_pixels(processor, batch, device), input_ids, attention_mask)[:, 0].float())  # (b,)
        if on_progress is not None:
            on_progress(start + len(batch), len(pictures))
    itc = torch.cat(sims)  # (N,)

    # 2. ITM for the short list only: one joint pass per (image, query) pair.
    def itm_fn(candidates):
        logits = []
        for start in range(0, len(candidates), batch_size):
            chosen = candidates[start:start + batch_size].tolist()
            pixel_values = _pixels(processor, [pictures[i] for i in chosen], device)  # (b, 3, H, W)
            ids, mask = input_ids.expand(len(chosen), -1), attention_mask.expand(len(chosen), -1)  # (b, T)
            logits.append(model.itm(pixel_values, ids, mask).float())
        return torch.cat(logits)  # (k, 2)

    order, _, itm_logits = retrieve(itc, itm_fn, top_k)
    probs = itm_logits.softmax(dim=-1)[:, 1]
    return [(names[i], itc[i].item(), p) for i, p in zip(order.tolist(), probs.tolist())]
