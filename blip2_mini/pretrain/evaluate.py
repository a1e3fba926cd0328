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

    python -m blip2_mini evaluate [--weights DIR] [--retrieval-weights DIR] [--n-images N] [--json FILE]
"""

import argparse
import json
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m blip2_mini evaluate",
                                     description="Caption / VQA / retrieval metrics of a toy BLIP-2 on the "
                                                 "held-out Shapes test split.")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="stage-2 checkpoint directory")
    parser.add_argument("--retrieval-weights", type=Path, default=None,
                        help="stage-1 retrieval checkpoint (default: WEIGHTS-itm if it exists)")
    parser.add_argument("--n-images", type=int, default=500, help="test images for captions and VQA")
    parser.add_argument("--n-retrieval", type=int, default=1000, help="test images for retrieval (galleries of 100)")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    from ..loader import load_model
    from ..tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_model(args.weights, progress=False)
    metrics, _ = evaluate_generation(model, load_tokenizer(args.weights), args.n_images)
    retrieval = args.retrieval_weights or args.weights.with_name(args.weights.name + "-itm")
    if retrieval.exists():
        metrics |= evaluate_retrieval(load_model(retrieval, progress=False), load_tokenizer(retrieval), args.n_retrieval)
    elif args.retrieval_weights:
        sys.exit(f"error: {retrieval}: no such directory")
    for k, v in metrics.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    print(f"({time.time() - start:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
