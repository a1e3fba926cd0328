"""Draw the example images in this folder (synthetic: no photos can be shipped or downloaded here).

    python examples/make_examples.py

    shapes.png       224 x 224 RGB: a scene of the synthetic "shapes world" the bundled toy model was trained on
                     (blip2_mini.data.shapes), so that its caption can be checked; it is printed when this runs
    gradient.jpg     224 x 160 RGB JPEG: hue from left to right, brightness from top to bottom (not square:
                     the processor squashes it to 224 x 224 rather than cropping it)
    grey.png         160 x 160 greyscale (mode L): a bright disc on rings, to see grey copied to three channels
    transparent.png  192 x 192 RGBA: an orange square and a blue circle on a fully transparent background whose
                     hidden colour is black. Opened and passed to the processor as an image, the background is
                     laid on white; given as a path it goes through `load_image`, which (like the reference's)
                     drops the alpha channel, so the model sees black

Every file is deterministic and under 60 KB.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from blip2_mini.data import shapes  # noqa: E402


def shapes_scene() -> tuple[Image.Image, str]:
    """Two shapes, and the first seed whose background has no noise (noise would not compress to < 60 KB)."""
    seed = 2024
    while (scene := shapes.make_scene(np.random.default_rng(seed), n_shapes=2)).background.kind.endswith("noise"):
        seed += 1
    return shapes.render(scene, size=224, supersample=4), shapes.caption(scene)


def gradient() -> Image.Image:
    width, height = 224, 160
    hue = np.linspace(0, 360, width, endpoint=False)[None, :]  # (1, W) degrees
    value = np.linspace(1.0, 0.25, height)[:, None]  # (H, 1) bright at the top
    # HSV -> RGB with full saturation: each channel is a clipped triangle wave of the hue.
    channels = [np.clip(np.abs((hue / 60 + shift) % 6 - 3) - 1, 0, 1) for shift in (0, 4, 2)]  # R, G, B: (1, W)
    rgb = np.stack([c * value for c in channels], axis=-1)  # (H, W, 3)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8))


def grey() -> Image.Image:
    side = 160
    y, x = np.mgrid[0:side, 0:side] + 0.5 - side / 2
    r = np.hypot(x, y)  # (side, side) distance from the centre
    rings = 110 + 60 * np.cos(r / 5)
    pixels = np.where(r < 36, 235.0, rings)  # a bright disc in the middle
    return Image.fromarray(np.round(pixels).astype(np.uint8))  # 2-D uint8: mode L


def transparent() -> Image.Image:
    side, scale = 192, 4  # drawn 4x larger, then shrunk: smooth edges
    big = Image.new("RGBA", (side * scale, side * scale), (0, 0, 0, 0))  # transparent black
    draw = ImageDraw.Draw(big)
    s = scale
    draw.rectangle([20 * s, 30 * s, 100 * s, 110 * s], fill=(240, 140, 20, 255))
    draw.ellipse([90 * s, 80 * s, 170 * s, 160 * s], fill=(30, 90, 220, 255))
    return big.resize((side, side), Image.Resampling.LANCZOS)


def main():
    scene, caption = shapes_scene()
    scene.save(HERE / "shapes.png", optimize=True)
    gradient().save(HERE / "gradient.jpg", quality=90)
    grey().save(HERE / "grey.png", optimize=True)
    transparent().save(HERE / "transparent.png", optimize=True)
    for path in sorted(HERE.glob("*.*")):
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as image:
                size_kb = path.stat().st_size / 1024
                print(f"{path.name:16s} {image.mode:5s} {image.width}x{image.height}  {size_kb:5.1f} KB")
    print(f"shapes.png shows: {caption}")


if __name__ == "__main__":
    main()
