"""Measure a toy BLIP-2 on the held-out test split of the Shapes world.

Every test scene contains at least one (colour, kind) pair that never occurs in training (shapes.HELD_OUT_PAIRS),
so these numbers measure compositional generalisation, not memorisation.

    captions   greedy captions vs the scene: exact match (every shape, every attribute) and per-attribute
               accuracy (shapes.caption_metrics)
    VQA        "Question: ... Answer:" -> greedy answer, normalised exact match (shapes.vqa_accuracy)
    retrieval  (stage-1 model) galleries of 100 test images and their 100 captions: recall@1 image->text and
               text->image by ITC similarity, and image->text after re-ranking ITC's top 8 with ITM (as the
               BLIP-2 paper does). A retrieved caption counts as right when its text equals the true caption
               (a few scenes share a caption word for word).
    frozen     checks that the frozen parts can do what stage 2 relies on (run.py records them in eval.json):
               `token_position_probe` (does the ViT's output say where each token is?),
               `lm_restating_accuracy` (can the OPT restate a description given in context?) and
               `lm_answering_accuracy` (can it answer a question about a caption given in context?)

    python -m blip2_mini evaluate [--weights DIR] [--retrieval-weights DIR] [--n-images N] [--json FILE]
"""

import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..data.shapes import ShapesDataset, caption_metrics, question_type, questions, vqa_accuracy, vqa_prompt
from ..model import Blip2
from .common import pixel_values

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "blip2-shapes-tiny"
TEST_SEED = 0  # the data seed; the test split's scenes are disjoint from train by construction


def test_set(n: int, image_size: int):
    ds = ShapesDataset("test", n=n, seed=TEST_SEED, image_size=image_size)
    return ds, pixel_values(ds.images())


@torch.no_grad()
def evaluate_generation(model: Blip2, tokenizer, n_images: int = 500, batch_size: int = 100,
                        max_questions: int | None = None) -> dict:
    """Caption and VQA metrics of a stage-2 (OPT) model on the first `n_images` test scenes."""
    ds, pixels = test_set(n_images, model.config.vision_config.image_size)
    captions = []
    for start in range(0, n_images, batch_size):
        ids = model.generate(pixels[start:start + batch_size], max_new_tokens=40)
        captions += tokenizer.batch_decode(ids)
    metrics = {f"caption_{k}": v for k, v in caption_metrics(captions, ds.scenes).items()}

    # VQA: every question of every scene, batched by prompt length (so no padding is needed).
    Q, image_id = model.config.num_query_tokens, model.config.image_token_index
    by_length = defaultdict(list)
    for i, scene in enumerate(ds.scenes):
        for question, answer in questions(scene)[:max_questions]:
            prompt = [image_id] * Q + tokenizer.encode(vqa_prompt(question))
            by_length[len(prompt)].append((i, prompt, question, answer))
    predictions, golds, types = [], [], []
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            idx = torch.tensor([c[0] for c in chunk])
            prompts = torch.tensor([c[1] for c in chunk])
            new = model.generate(pixels[idx], input_ids=prompts, max_new_tokens=5)
            predictions += tokenizer.batch_decode(new)
            golds += [c[3] for c in chunk]
            types += [question_type(c[2]) for c in chunk]
    metrics["vqa_accuracy"] = vqa_accuracy(predictions, golds)
    for qtype in sorted(set(types)):
        picked = [(p, g) for p, g, t in zip(predictions, golds, types) if t == qtype]
        metrics[f"vqa_{qtype}"] = vqa_accuracy(*zip(*picked))
    metrics["n_images"], metrics["n_questions"] = n_images, len(golds)
    return metrics, captions


@torch.no_grad()
def evaluate_retrieval(model: Blip2, tokenizer, n_images: int = 1000, gallery: int = 100, rerank: int = 8) -> dict:
    """Recall@1 of a retrieval-layout model (stage 1) on galleries of `gallery` test images and captions."""
    from .stage1 import qformer_text

    ds, pixels = test_set(n_images, model.config.vision_config.image_size)
    texts = ds.captions()
    hits = defaultdict(int)
    for start in range(0, n_images - gallery + 1, gallery):
        caps = texts[start:start + gallery]
        px = pixels[start:start + gallery]
        ids, mask = qformer_text(tokenizer, caps)
        img = model.image_embeds(px)  # (G, Q, E)
        txt = model.text_embeds(ids, mask)[:, 0]  # (G, E)
        sim = (img @ txt.T).max(dim=1).values  # (G, G) image x text
        i2t, t2i = sim.argmax(dim=1), sim.argmax(dim=0)
        hits["itc_i2t"] += sum(caps[j] == caps[i] for i, j in enumerate(i2t.tolist()))
        hits["itc_t2i"] += sum(caps[i] == caps[j] for j, i in enumerate(t2i.tolist()))
        # ITM re-ranking of ITC's top candidates for each image.
        top = sim.topk(rerank, dim=1).indices  # (G, k)
        rows = torch.arange(gallery).repeat_interleave(rerank)
        scores = model.itm(px[rows], ids[top.flatten()], mask[top.flatten()]).softmax(-1)[:, 1]  # (G*k,)
        best = top.gather(1, scores.view(gallery, rerank).argmax(dim=1, keepdim=True)).squeeze(1)
        hits["itm_i2t"] += sum(caps[j] == caps[i] for i, j in enumerate(best.tolist()))
    n = (n_images // gallery) * gallery
    return {f"retrieval_r1_{k}": v / n for k, v in hits.items()} | {"retrieval_gallery": gallery,
                                                                     "retrieval_n_images": n}


# ---- can the frozen parts do what stage 2 needs? ---------------------------------------------------------


@torch.no_grad()
def lm_restating_accuracy(language_model, tokenizer, scenes, shuffled: bool = False, seed: int = 0) -> dict:
    """How well the frozen OPT restates a scene it was given in context: on "</s> description </s> caption",
    teacher-forced, the share of the caption's size / colour / kind / position words it predicts right. The
    description is the caption itself, or (`shuffled`) its phrases in random order. Near 1.0 means the LM can
    look back and copy, which a soft visual prompt needs; ~0.5 on size means it guesses (there are two sizes)."""
    from ..data.shapes import COLOURS, KINDS, POSITIONS, SIZES, caption
    from .frozen import shuffled_description

    rng = random.Random(seed)
    word_ids = {name: {tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words}
                for name, words in (("size", SIZES), ("colour", COLOURS), ("kind", KINDS), ("position", POSITIONS))}
    hits, counts = defaultdict(int), defaultdict(int)
    for scene in scenes:
        first = shuffled_description(scene, rng) if shuffled else caption(scene)
        context = tokenizer.encode(first) + [tokenizer.eos_token_id]
        ids = torch.tensor([context + tokenizer.encode(caption(scene), add_special_tokens=False)])  # (1, T)
        predicted = language_model(language_model.embed_tokens(ids), torch.ones_like(ids))[0].argmax(-1)  # (T,)
        for t in range(len(context), ids.shape[1]):
            for name, ids_of_kind in word_ids.items():
                if ids[0, t].item() in ids_of_kind:
                    counts[name] += 1
                    hits[name] += predicted[t - 1].item() == ids[0, t].item()
    return {name: hits[name] / max(counts[name], 1) for name in word_ids}


@torch.no_grad()
def lm_answering_accuracy(language_model, tokenizer, scenes, max_questions: int = 4, seed: int = 0) -> dict:
    """How well the frozen OPT answers a question about a scene it was given *as text*: on
    "</s> caption </s> Question: ... Answer:", the share of questions whose answer's first token is the LM's
    most likely next token, per question type. This is the ceiling that VQA through a soft visual prompt can
    expect: the prompt stands in for the caption, and the LM still has to find the answer in it."""
    from ..data.shapes import caption, question_type, questions, vqa_prompt

    rng = random.Random(seed)
    hits, counts = defaultdict(int), defaultdict(int)
    for scene in scenes:
        qa = questions(scene)
        for question, answer in rng.sample(qa, min(max_questions, len(qa))):
            ids = tokenizer.encode(caption(scene)) + [tokenizer.eos_token_id] + tokenizer.encode(
                vqa_prompt(question), add_special_tokens=False)
            ids = torch.tensor([ids])  # (1, T)
            logits = language_model(language_model.embed_tokens(ids), torch.ones_like(ids))[0, -1]  # (V,)
            kind = question_type(question)
            counts[kind] += 1
            hits[kind] += logits.argmax().item() == tokenizer.encode(" " + answer, add_special_tokens=False)[0]
    return {kind: hits[kind] / counts[kind] for kind in sorted(counts)} | {
        "all": sum(hits.values()) / max(sum(counts.values()), 1)}


def token_position_probe(vision_model, train_pixels, eval_pixels, steps: int = 300, seed: int = 0) -> float:
    """Can a token's place in the image be read from the frozen ViT's output token alone? A linear probe is
    trained to name each token's index (0 = CLS, 1.. = patches) from its features; returns its accuracy on
    `eval_pixels`. The Q-Former's cross-attention sees the tokens as a set, so this is all it can know of where
    something is (1 / P = chance)."""
    with torch.no_grad():
        train_tokens, eval_tokens = vision_model(train_pixels), vision_model(eval_pixels)  # (N, P, Dv)
    P, Dv = train_tokens.shape[1:]
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(Dv, P)
    torch.nn.init.normal_(probe.weight, std=0.02, generator=generator)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    target = torch.arange(P).repeat(len(train_tokens))
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(train_tokens.flatten(0, 1)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return (probe(eval_tokens).argmax(-1) == torch.arange(P)).float().mean().item()


def main(argv=None):
    from ..__main__ import OneLineParser, positive_int, UsageError

    parser = OneLineParser(prog="python -m blip2_mini evaluate",
                           description="Caption / VQA / retrieval metrics of a toy BLIP-2 on the held-out Shapes "
                                       "test split.")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="stage-2 checkpoint directory")
    parser.add_argument("--retrieval-weights", type=Path, default=None,
                        help="stage-1 retrieval checkpoint (default: WEIGHTS-itm if it exists)")
    parser.add_argument("--n-images", type=positive_int, default=300,
                        help="test images for captions and VQA (default 300, as the recipe's eval.json)")
    parser.add_argument("--n-retrieval", type=positive_int, default=1000,
                        help="test images for retrieval, in galleries of 100 (at least 100)")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    from ..loader import load_model
    from ..tokenizer import load_tokenizer

    # Everything that can be wrong with the arguments is found before minutes of evaluation, not after.
    retrieval = args.retrieval_weights or args.weights.with_name(args.weights.name + "-itm")
    if args.retrieval_weights and not retrieval.exists():
        raise UsageError(f"{retrieval}: no such directory")
    if retrieval.exists() and args.n_retrieval < 100:
        raise UsageError(f"--n-retrieval {args.n_retrieval}: retrieval needs at least one gallery of 100 images")
    if args.json and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: the folder {args.json.parent} does not exist")
    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_model(args.weights, progress=False)
    retrieval_model = load_model(retrieval, progress=False) if retrieval.exists() else None
    if retrieval_model is not None and retrieval_model.language_model is not None:
        raise UsageError(f"{retrieval}: a captioning checkpoint; --retrieval-weights needs a stage-1 (-itm) one")
    print(f"captions and VQA on {args.n_images} test images ...", file=sys.stderr, flush=True)
    metrics, _ = evaluate_generation(model, load_tokenizer(args.weights), args.n_images)
    if retrieval_model is not None:
        print(f"retrieval on {args.n_retrieval} test images ...", file=sys.stderr, flush=True)
        metrics |= evaluate_retrieval(retrieval_model, load_tokenizer(retrieval), args.n_retrieval)
    for k, v in metrics.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"({time.time() - start:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
