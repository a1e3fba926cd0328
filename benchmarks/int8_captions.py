"""Does int8 change what a *trained* model says? Greedy captions of the shipped toy model, fp32 vs int8.

    python benchmarks/int8_captions.py [--images 200] [--weights weights/blip2-shapes-tiny]

The full-size benchmark (bench.py) has random weights, so it can only compare logits. The toy BLIP-2 trained on
the Shapes world (weights/blip2-shapes-tiny) is the trained model available here: this script captions the
first N test scenes greedily (40 new tokens, as pretrain/evaluate.py does) with the fp32 model and with its
language model quantized (weight-only, and with int8 activations too), and reports the share of identical
captions (issue 8's target: >= 95 %). Prints one Markdown table.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blip2_mini import load_model  # noqa: E402
from blip2_mini.data.shapes import caption_metrics  # noqa: E402
from blip2_mini.processing import Blip2Processor  # noqa: E402
from blip2_mini.pretrain.evaluate import test_set  # noqa: E402
from blip2_mini.quantize import quantize_language_model  # noqa: E402


@torch.no_grad()
def captions(model, pixels, batch_size=100):
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        out += model.generate(pixels[start:start + batch_size], max_new_tokens=40).tolist()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--weights", default=str(ROOT / "weights" / "blip2-shapes-tiny"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.weights, progress=False)
    processor = Blip2Processor.from_pretrained(args.weights)
    ds, pixels = test_set(args.images, model.config.vision_config.image_size)
    reference = captions(model, pixels)

    def quality(ids):  # the toy world's caption metrics: is the changed caption still right?
        metrics = caption_metrics(processor.batch_decode(ids), ds.scenes)
        return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())

    print(f"| language model | identical greedy captions ({args.images} test scenes) | caption metrics |")
    print(f"|---|---|---|\n| fp32 | - | {quality(reference)} |")
    for activations in ("float", "int8"):
        quantized = quantize_language_model(load_model(args.weights, progress=False), activations)
        ours = captions(quantized, pixels)
        same = sum(a == b for a, b in zip(ours, reference))
        label = "int8 weight-only" if activations == "float" else "int8 weights + int8 activations (fbgemm)"
        print(f"| {label} | {same}/{args.images} = {same / args.images:.1%} | {quality(ours)} |")


if __name__ == "__main__":
    main()
