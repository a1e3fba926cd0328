"""Rebuild the complete-checkpoint fixtures: tiny random models WITH processor and tokenizer files, exactly as
a published directory has them (config.json, weights, preprocessor_config.json, processor_config.json,
tokenizer files), for the tests of `blip2_mini.load`, the processor round trip and the command line.

    python tests/reference/build_pipeline_fixtures.py

Writes tests/fixtures/pipeline/<name>/ and, in reference.json, what the reference pipeline (processor +
generate + decode) produces for the bundled example images with and without a prompt.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import Blip2Processor, BlipImageProcessor
from transformers.image_utils import load_image

from hf_models import REFERENCE_VERSION, build_reference, make_config
from tokenizer_files import make_opt_tokenizer, make_t5_tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "pipeline"
IMAGES = sorted((ROOT / "examples").glob("*.png"))
PROMPTS = {"opt": "Question: what is the colour of the circle? Answer:",
           "t5": "Question: what is the colour of the circle? Short answer:"}


def build(name, family):
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tok_dir = directory / "tokenizer-build"
    tokenizer = (make_opt_tokenizer if family == "opt" else make_t5_tokenizer)(tok_dir, vocab_size=400)
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = make_config(family, vocab_size=len(processor.tokenizer), image_token_index=image_token,
                         **({"lm_heads": 2} if family == "t5" else {}))
    model = build_reference(config, seed=3)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    shutil.rmtree(tok_dir)

    images = [load_image(str(p)) for p in IMAGES]  # the reference's loader: EXIF transpose + plain RGB
    outputs = {}
    for label, text in (("caption", None), ("prompt", PROMPTS[family])):
        kwargs = dict(images=images, return_tensors="pt")
        if text is not None:
            kwargs.update(text=[text] * len(images), padding=True)
        elif family == "t5":  # the reference cannot caption T5 without text (see hf_models.reference_generate)
            kwargs.update(text=[""] * len(images))
        inputs = processor(**kwargs)
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, num_beams=1, do_sample=False)
        new = ids[:, 1:] if family == "t5" else ids[:, (inputs["input_ids"].shape[1] if "input_ids" in inputs
                                                       else config.num_query_tokens + 1):]
        outputs[label] = {"token_ids": new.tolist(), "text": processor.batch_decode(new, skip_special_tokens=True)}
    (directory / "reference.json").write_text(json.dumps({
        "images": [p.name for p in IMAGES], "prompt": PROMPTS[family], "outputs": outputs,
        "reference": f"transformers {REFERENCE_VERSION}"}, indent=1))
    size_kb = sum(f.stat().st_size for f in directory.iterdir()) / 1024
    print(f"{name}: {size_kb:.0f} KB, captions {outputs['caption']['text']}")


if __name__ == "__main__":
    if not IMAGES:
        sys.exit("no examples/*.png: run examples/make_examples.py first")
    build("opt-pipeline", "opt")
    build("t5-pipeline", "t5")
