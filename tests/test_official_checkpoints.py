"""The published checkpoints against the reference's own golden outputs.

`transformers` pins its BLIP-2 classes with integration tests on the real weights: greedy and beam captions,
a VQA answer, ITM / ITC scores and projected embeddings, on its demo image (a woman and her dog on a beach),
recorded in fp16 on a GPU. The same inputs must give the same tokens here. Every other test in this folder
uses random weights; these are the only ones that show the trained models work end to end.

They run only where the weights and the image are on disk (nothing is downloaded at run time); otherwise
each test is skipped with what is missing and how to get it:

    hf download Salesforce/blip2-opt-2.7b --local-dir weights/blip2-opt-2.7b
    hf download Salesforce/blip2-flan-t5-xl --local-dir weights/blip2-flan-t5-xl
    hf download Salesforce/blip2-itm-vit-g --local-dir weights/blip2-itm-vit-g
    curl -L -o weights/demo.jpg https://huggingface.co/hf-internal-testing/blip-test-image/resolve/main/demo.jpg

(BLIP2_WEIGHTS=<folder> looks for them elsewhere than weights/.) On a GPU the captioning models run in fp16,
as the reference's tests did; on a CPU in fp32 (about 16 GB of memory per captioning model), and the OPT caption
is also checked with the language model in int8 (quantize="int8").
"""

import os
from pathlib import Path

import pytest
import torch

import blip2_mini

WEIGHTS = Path(os.environ.get("BLIP2_WEIGHTS", Path(__file__).resolve().parents[1] / "weights"))
DEMO_URL = "https://huggingface.co/hf-internal-testing/blip-test-image/resolve/main/demo.jpg"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines

# New tokens only (the reference's tests list the prompt's ids first: <image> x 32, BOS, the question).
OPT_CAPTION = [102, 693, 2828, 15, 5, 4105, 19, 10, 2335, 50118]  # "a woman sitting on the beach with a dog\n"
OPT_CAPTION_BEAMS = [102, 693, 2828, 15, 5, 4105, 19, 69, 2335, 50118]  # "... with her dog\n" (2 beams)
OPT_ANSWER = [24, 18, 45, 10, 343, 6, 24, 18, 10, 4105, 50118]  # "it's not a city, it's a beach\n"
OPT_CAPTION_500PX = [102, 693, 8, 2335, 15, 5, 4105, 50118]  # "a woman and dog on the beach\n"
T5_CAPTION = [2335, 1556, 28, 1782, 30, 8, 2608, 1]  # "woman playing with dog on the beach</s>"
T5_ANSWER = [3, 7, 152, 67, 839, 1]  # "san diego</s>"
QUESTION = "Question: which city is this? Answer:"


def checkpoint(name, dtype=DTYPE, **options):
    """(model, processor, demo image path) for Salesforce/`name`, or a skip that says what is missing."""
    path = WEIGHTS / name
    if not (path / "config.json").exists():
        pytest.skip(f"no {name} in {WEIGHTS}: hf download Salesforce/{name} --local-dir {path}")
    image = Path(os.environ.get("BLIP2_DEMO_IMAGE", WEIGHTS / "demo.jpg"))
    if not image.exists():
        pytest.skip(f"no demo image at {image}: save {DEMO_URL} there (or set BLIP2_DEMO_IMAGE)")
    model, processor = blip2_mini.load(path, dtype=dtype, device=DEVICE, progress=False, **options)
    return model, processor, image


def generate(model, processor, images, text=None, **options):
    inputs = processor(images=images, text=text, return_tensors="pt").to(DEVICE, DTYPE)
    return model.generate(**inputs, **options).tolist()


# (checkpoint, greedy caption, 2-beam caption, answer to QUESTION, the answer's text). In fp16 Flan-T5's FFN
# output projections stay fp32, as in the reference.
CAPTIONING = [("blip2-opt-2.7b", OPT_CAPTION, OPT_CAPTION_BEAMS, OPT_ANSWER, "it's not a city, it's a beach"),
              ("blip2-flan-t5-xl", T5_CAPTION, T5_CAPTION, T5_ANSWER, "san diego")]


@pytest.mark.parametrize("name, caption, beams, answer, answer_text", CAPTIONING)
def test_caption_answer_and_beam_search(name, caption, beams, answer, answer_text):
    model, processor, image = checkpoint(name)
    assert generate(model, processor, image, max_new_tokens=20) == [caption]
    ids = generate(model, processor, image, QUESTION, max_new_tokens=11)
    assert ids == [answer] and processor.batch_decode(ids)[0].strip() == answer_text
    assert generate(model, processor, [image, image], num_beams=2, max_new_tokens=20) == [beams] * 2


def test_opt_caption_text_and_larger_image():
    model, processor, image = checkpoint("blip2-opt-2.7b")
    assert processor.batch_decode([OPT_CAPTION])[0].strip() == "a woman sitting on the beach with a dog"
    processor.image_processor.height = processor.image_processor.width = 500  # 35 x 35 patches instead of 16 x 16
    assert generate(model, processor, image, max_new_tokens=20, interpolate_pos_encoding=True) == [OPT_CAPTION_500PX]


@pytest.mark.skipif(DEVICE == "cuda" or not FBGEMM, reason="int8 is the CPU path (fbgemm, x86)")
def test_opt_caption_with_int8_language_model():
    """The quantized language model (quantize.py) keeps the caption of the trained model."""
    model, processor, image = checkpoint("blip2-opt-2.7b", quantize="int8")
    assert generate(model, processor, image, max_new_tokens=20) == [OPT_CAPTION]


def test_itm_and_itc_scores():
    """Recorded by the reference in fp32: ITM [no match, match] probabilities and the ITC similarity."""
    model, processor, image = checkpoint("blip2-itm-vit-g", dtype=torch.float32)
    inputs = processor(images=image, text="A woman and her dog sitting in a beach", return_tensors="pt").to(DEVICE)
    with torch.no_grad():
        itm = model.itm(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).softmax(-1)
        itc = model.itc(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(itm.cpu(), torch.tensor([[0.0238, 0.9762]]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(itc.cpu(), torch.tensor([[0.4406]]), rtol=1e-3, atol=1e-3)


def test_projected_embeddings():
    """Recorded by the reference in fp16: the first numbers of the first query's image embedding and of the
    [CLS] text embedding, both L2-normalised in the shared 256-d space."""
    model, processor, image = checkpoint("blip2-itm-vit-g")
    pixels = processor(images=image, return_tensors="pt").to(DEVICE, DTYPE)["pixel_values"]
    text = processor(text="a woman sitting on the beach with a dog", return_tensors="pt").to(DEVICE)
    with torch.no_grad():
        image_embeds = model.image_embeds(pixels)[0, 0, :6].float().cpu()
        text_embeds = model.text_embeds(text["input_ids"], text["attention_mask"])[0, 0, :6].float().cpu()
    expected_image = [-0.093994140625, -0.075927734375, 0.031890869140625, 0.053009033203125, 0.0352783203125,
                      -0.01190185546875]
    expected_text = [-0.1082763671875, 0.053192138671875, -0.02825927734375, 0.0169830322265625, 0.08648681640625,
                     -0.04656982421875]
    torch.testing.assert_close(image_embeds, torch.tensor(expected_image), rtol=0, atol=1e-3)
    torch.testing.assert_close(text_embeds, torch.tensor(expected_text), rtol=0, atol=1e-3)
