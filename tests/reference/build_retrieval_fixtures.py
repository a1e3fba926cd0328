"""Rebuild the retrieval fixtures (ITC / ITM with the stage-1 checkpoints) from the reference.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_retrieval_fixtures.py

Writes tests/fixtures/retrieval/:
    checkpoint/   a tiny blip2-itm-vit-g look-alike in the official layout, everything saved by the reference:
                  Blip2ForImageTextRetrieval random weights (config.json, model.safetensors), a trained uncased
                  BERT WordPiece tokenizer with [DEC] as BOS (the Q-Former's), and the Blip2Processor that adds
                  `<image>` (tokenizer.json, tokenizer_config.json, vocab.txt, processor_config.json). As in the
                  published checkpoint, the Q-Former vocabulary is the tokenizer's including [DEC] and
                  `image_token_index` is the next id, the one the processor gives `<image>`.
    odd/          weights only: odd head size, cross-attention every 3rd layer, 5 queries, image_token_index None.
    gallery/      five small PNG images of different sizes (the `rank` command's folder).
    reference.safetensors  per case "<case>.input.*" and "<case>.output.*" (see `reference_outputs`).
    reference.json         the cases, and the numbers `match` and `rank` must print, from the reference pipeline
                           (reference processor -> reference Blip2ForImageTextRetrieval).

The model-level outputs come from four reference classes loaded from the same directory: Blip2ForImageText-
Retrieval with and without the ITM head, Blip2TextModelWithProjection and Blip2VisionModelWithProjection (their
parameter names are a subset of the retrieval model's, checked here, so no remapping is needed).
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from hf_models import REFERENCE_VERSION, build_reference, make_config

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "retrieval"

MATCH_TEXTS = ["a red dog on the beach", "Two cats, sitting on a bench!", "sky", "a large white truck parked near "
               "the old wooden building in the city"]
RANK_QUERIES = ["a dog running on the grass", "red car", "a small bird flying over the river", "people on a boat",
                "a pizza on a table"]
RANK_TOP_K = 3
# The "odd" case: hf_models.make_config overrides (odd head size, cross-attention every 3rd layer, 5 queries).
ODD = dict(qformer_width=30, qformer_heads=3, qformer_layers=4, cross_attention_frequency=3, num_query_tokens=5,
           vision_width=24, vision_heads=3, image_size=42, image_token_index=None)


# ---- the reference side, shared with the live tests ------------------------------------------------------


def load_reference_classes(directory):
    """The four reference classes from one saved Blip2ForImageTextRetrieval directory, checking that the text
    and vision classes received exactly the retrieval model's tensors (the reference would silently
    initialise any parameter whose name did not line up)."""
    from transformers import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # each partial class prints a table of the retrieval-only keys it skips
    try:
        retrieval = Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
        text = Blip2TextModelWithProjection.from_pretrained(directory).eval()
        vision = Blip2VisionModelWithProjection.from_pretrained(directory).eval()
    finally:
        logging.set_verbosity(verbosity)
    full = retrieval.state_dict()
    for part in (text, vision):
        for name, tensor in part.state_dict().items():
            assert name in full and torch.equal(tensor, full[name]), f"{type(part).__name__}: {name} not loaded"
    return retrieval, text, vision


def processor_layout(input_ids, attention_mask, num_query_tokens, image_token_index):
    """Plain ids -> what Blip2Processor writes given images and text: Q `<image>` ids first (always attended)."""
    B = input_ids.shape[0]
    ids = torch.cat([torch.full((B, num_query_tokens), image_token_index), input_ids], dim=1)
    mask = torch.cat([torch.ones(B, num_query_tokens, dtype=attention_mask.dtype), attention_mask], dim=1)
    return ids, mask


@torch.no_grad()
def reference_outputs(directory, pixel_values, input_ids, attention_mask, image_token_index) -> dict:
    """Everything blip2_mini's retrieval methods must reproduce, for B images and B plain-layout texts:

    image_embeds  (B, Q, E)  Blip2VisionModelWithProjection
    text_embeds   (B, T, E)  Blip2TextModelWithProjection (plain ids)
    itc_plain     (B, B)     Blip2ForImageTextRetrieval, no ITM head, image_token_index None, plain ids
    itm_plain     (B, 2)     ... with the ITM head
    itc_processor, itm_processor   the same with image_token_index set and the processor layout
    itm_one_image (B, 2)     image 0 with every text (processor layout)
    The last three only when `image_token_index` is given.
    """
    retrieval, text, vision = load_reference_classes(directory)
    config = retrieval.config
    out = {"image_embeds": vision(pixel_values=pixel_values).image_embeds,
           "text_embeds": text(input_ids=input_ids, attention_mask=attention_mask).text_embeds}

    config.image_token_index = None  # the plain layout: the reference then uses the ids as they are
    for head, name in ((False, "itc_plain"), (True, "itm_plain")):
        out[name] = retrieval(pixel_values, input_ids, attention_mask, use_image_text_matching_head=head).logits_per_image

    if image_token_index is None:
        return out
    config.image_token_index = image_token_index  # the processor layout: the reference drops the first Q ids
    ids, mask = processor_layout(input_ids, attention_mask, config.num_query_tokens, image_token_index)
    out["itc_processor"] = retrieval(pixel_values, ids, mask, use_image_text_matching_head=False).logits_per_image
    out["itm_processor"] = retrieval(pixel_values, ids, mask, use_image_text_matching_head=True).logits_per_image
    one = pixel_values[:1].expand_as(pixel_values)
    out["itm_one_image"] = retrieval(one, ids, mask, use_image_text_matching_head=True).logits_per_image
    return out


def random_texts(batch_lengths, vocab_size, seed):
    """Random plain-layout ids "[CLS]=2 ... [SEP]=3", right-padded with 0 as BERT pads: (B, T) ids and mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(batch_lengths) + 2
    ids = torch.zeros(len(batch_lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(batch_lengths):
        words = torch.randint(5, vocab_size, (n,), generator=g)
        ids[b, :n + 2] = torch.cat([torch.tensor([2]), words, torch.tensor([3])])
        mask[b, :n + 2] = 1
    return ids, mask


# ---- the fixture files -----------------------------------------------------------------------------------


def make_gallery(directory: Path):
    """Five small images: a coloured background, noise and a few rectangles; sizes differ so resizing matters."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (28, 28), (50, 60), (33, 47), (64, 20)]):
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255)
        for _ in range(3):
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            pixels[y0:y0 + rng.integers(4, 12), x0:x0 + rng.integers(4, 12)] = rng.integers(0, 256, 3)
        Image.fromarray(pixels.astype(np.uint8)).save(directory / f"image{i}.png")


def build_checkpoint(directory: Path):
    """The retrieval checkpoint directory with tokenizer and processor. Returns the reference processor."""
    from tokenizer_files import make_bert_tokenizer
    from transformers import Blip2Processor, BlipImageProcessor

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_bert_tokenizer(tmp)
        vocab_txt = (Path(tmp) / "vocab.txt").read_text(encoding="utf-8")
    qformer_vocab = len(tokenizer)  # BERT vocabulary + [DEC]; the processor adds `<image>` right after
    config = make_config("itm", qformer_vocab=qformer_vocab, image_token_index=qformer_vocab)
    build_reference(config, seed=11).save_pretrained(directory)
    size = config.vision_config.image_size
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                               tokenizer=tokenizer, num_query_tokens=config.num_query_tokens)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    processor.save_pretrained(directory)
    (directory / "vocab.txt").write_text(vocab_txt, encoding="utf-8")
    return processor, config


@torch.no_grad()
def pipeline_numbers(directory, processor, gallery: Path) -> dict:
    """What `match` and `rank` must output, computed with the reference processor and model alone."""
    from transformers import Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
    paths = sorted(gallery.iterdir())
    images = [Image.open(p).convert("RGB") for p in paths]

    def scores(image_list, texts):  # pairs (image i, text i): ITM logits (n, 2) and ITC (n,)
        enc = processor(images=image_list, text=texts, padding=True, return_tensors="pt")
        itm = model(**enc, use_image_text_matching_head=True).logits_per_image
        itc = model(**enc, use_image_text_matching_head=False).logits_per_image.diagonal()
        return itm, itc

    itm, itc = scores([images[0]] * len(MATCH_TEXTS), MATCH_TEXTS)
    match = {"image": paths[0].name, "texts": MATCH_TEXTS, "itm_probability": itm.softmax(-1)[:, 1].tolist(),
             "itc": itc.tolist()}

    # rank: the paper's recipe by hand (ITC top k, re-scored by ITM match logit + ITC), for a query whose ITM
    # re-ranking changes the ITC order *and* whose ITC short list excludes the image ITM alone would pick first,
    # so that a test sees both steps.
    for query in RANK_QUERIES:
        itm, itc = scores(images, [query] * len(images))
        top = sorted(range(len(images)), key=lambda i: -itc[i].item())[:RANK_TOP_K]
        reranked = sorted(top, key=lambda i: -(itm[i, 1] + itc[i]).item())
        best_itm_alone = max(range(len(images)), key=lambda i: itm[i, 1].item())
        if reranked != top and best_itm_alone not in top:
            break
    else:
        raise RuntimeError("no query exercises both steps of the recipe; add queries to RANK_QUERIES")
    probs = itm.softmax(-1)[:, 1]
    rank = {"query": query, "top_k": RANK_TOP_K, "itc_order": [paths[i].name for i in top],
            "ranked": [[paths[i].name, itc[i].item(), probs[i].item()] for i in reranked],
            "all_itc": {p.name: itc[i].item() for i, p in enumerate(paths)}}
    return {"match": match, "rank": rank}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    make_gallery(OUT / "gallery")
    processor, config = build_checkpoint(OUT / "checkpoint")

    tensors, cases = {}, {}
    # case "checkpoint": three gallery images through the reference processor, three captions through its
    # tokenizer; the processor layout is checked against what the reference processor writes.
    images = [Image.open(p).convert("RGB") for p in sorted((OUT / "gallery").iterdir())[:3]]
    texts = MATCH_TEXTS[:3]
    plain = processor.tokenizer(texts, padding=True, return_tensors="pt")
    joint = processor(images=images, text=texts, padding=True, return_tensors="pt")
    expected_layout = processor_layout(plain["input_ids"], plain["attention_mask"], config.num_query_tokens,
                                       config.image_token_index)
    assert torch.equal(joint["input_ids"], expected_layout[0])
    assert torch.equal(joint["attention_mask"], expected_layout[1])
    inputs = {"pixel_values": joint["pixel_values"], "input_ids": plain["input_ids"],
              "attention_mask": plain["attention_mask"]}
    cases["checkpoint"] = {"directory": "checkpoint", "image_token_index": config.image_token_index}

    # case "odd": weights only, random ids in a batch of 3 with padding.
    odd_config = make_config("itm", **ODD)
    build_reference(odd_config, seed=12).save_pretrained(OUT / "odd")
    g = torch.Generator().manual_seed(5)
    odd_ids, odd_mask = random_texts([1, 6, 3], odd_config.qformer_config.vocab_size, seed=6)
    odd_inputs = {"pixel_values": torch.randn(3, 3, 42, 42, generator=g), "input_ids": odd_ids,
                  "attention_mask": odd_mask}
    cases["odd"] = {"directory": "odd", "image_token_index": None, "overrides": ODD}

    for name, case_inputs in (("checkpoint", inputs), ("odd", odd_inputs)):
        outputs = reference_outputs(OUT / cases[name]["directory"], **case_inputs,
                                    image_token_index=cases[name]["image_token_index"])
        tensors.update({f"{name}.input.{k}": v.contiguous() for k, v in case_inputs.items()})
        tensors.update({f"{name}.output.{k}": v.contiguous() for k, v in outputs.items()})
    save_file(tensors, OUT / "reference.safetensors")

    numbers = pipeline_numbers(OUT / "checkpoint", processor, OUT / "gallery")
    (OUT / "reference.json").write_text(json.dumps(
        {"reference": f"transformers {REFERENCE_VERSION}", "cases": cases, **numbers}, indent=1))
    size_kb = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file()) / 1024
    print(f"retrieval fixtures: {len(tensors)} tensors, rank query {numbers['rank']['query']!r}, {size_kb:.0f} KB")


if __name__ == "__main__":
    main()
