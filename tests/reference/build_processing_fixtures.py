"""Reference answers of transformers' BlipImageProcessor (Pillow backend) and Blip2Processor.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_processing_fixtures.py     # rewrites tests/fixtures/processing/

Writes tests/fixtures/processing/:
    images.json          one entry per image case: how to rebuild the input (a PIL image from its raw bytes,
                         a NumPy array, or a file), the image processor settings, and how the reference was called
    images.npz           the inputs' raw data (PIL bytes or arrays) and the reference's pixel_values (3, H, W);
                         the 224 x 224 case is stored as levels: `levels.<key>` (3, 224, 224) uint8 indexes
                         `table.<key>` (3, 256), the reference's output for each 8-bit level of each channel
                         (a quarter of the size; the builder checks that it gives the reference's output exactly)
    files/               image files read through a path (RGBA and transparent-colour PNGs, an EXIF-rotated PNG)
    processor/<name>/    checkpoint-like directories: tokenizer files + image and processor settings. "t5" holds
                         only processor_config.json: its tokenizer is tests/fixtures/tokenizers/t5 (620 KB, not
                         copied; processor.json keeps its files' sha256 so that a rebuilt one is noticed)
    processor.json       per directory, what the reference Blip2Processor returns for padded batches with and
                         without images, with OPT padded on each side, and the decoded text. Its pixel_values
                         are checked here to be those of the image cases, so they are not stored twice.

The inputs are made once, here, from seeded random data, and then stored byte for byte: the tests rebuild the
very same images instead of regenerating them (Pillow's own conversions could change between versions).
Targets are small (24 x 32, height x width: a non-square target also catches a swapped H and W), plus one
224 x 224 case; the 364 px path and many more random cases are checked by the live tests.
"""

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "reference")]

import transformers  # noqa: E402
from tokenizer_files import make_bert_tokenizer, make_opt_tokenizer  # noqa: E402
from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessorPil  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "processing"
SMALL = {"height": 24, "width": 32}


# ---- inputs ---------------------------------------------------------------------------------------------------


def pattern(height: int, width: int, channels: int, seed: int, noise: float = 25) -> np.ndarray:
    """uint8 (H, W, C): smooth waves plus noise, so that resizing has edges and gradients to work on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=channels)
    freq = rng.uniform(0.2, 0.9, size=(channels, 2))
    waves = [np.sin(freq[c, 0] * y + freq[c, 1] * x + phase[c]) for c in range(channels)]
    image = 127.5 + 90 * np.stack(waves, axis=-1) + rng.normal(0, noise, size=(height, width, channels))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def palette(seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, size=768).tolist()


def pil_cases() -> dict[str, Image.Image]:
    """PIL images of every mode the reference handles, built from arrays with Pillow's raw constructors."""
    h, w = 9, 13
    rgb, rgba = pattern(h, w, 3, 1), pattern(h, w, 4, 2)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255  # fully transparent and fully opaque rows
    grey = pattern(h, w, 1, 3)[..., 0]
    index = (pattern(h, w, 1, 4)[..., 0] // 8).astype(np.uint8)  # 32 palette entries in use
    cases = {}
    cases["mode_1"] = Image.fromarray(grey > 127)
    cases["mode_L"] = Image.fromarray(grey)
    cases["mode_LA"] = Image.frombytes("LA", (w, h), np.stack([grey, rgba[..., 3]], -1).tobytes())
    cases["mode_P"] = Image.frombytes("P", (w, h), index.tobytes())
    cases["mode_P_transparent_index"] = Image.frombytes("P", (w, h), index.tobytes())
    cases["mode_PA"] = Image.frombytes("PA", (w, h), np.stack([index, rgba[..., 3]], -1).tobytes())
    for name in ("mode_P", "mode_P_transparent_index", "mode_PA"):
        cases[name].putpalette(palette(5))
    cases["mode_P_transparent_index"].info["transparency"] = int(index[2, 3])
    cases["mode_RGB"] = Image.fromarray(rgb)
    keyed = rgb.copy()
    keyed[3:5, 2:9] = (10, 200, 30)
    cases["mode_RGB_transparent_colour"] = Image.fromarray(keyed)
    cases["mode_RGB_transparent_colour"].info["transparency"] = (10, 200, 30)
    grey_keyed = grey.copy()
    grey_keyed[4:7, 1:6] = 77
    cases["mode_L_transparent_grey"] = Image.fromarray(grey_keyed)
    cases["mode_L_transparent_grey"].info["transparency"] = 77
    cases["mode_RGBA"] = Image.fromarray(rgba)
    for mode in ("RGBa", "RGBX", "CMYK"):
        cases[f"mode_{mode}"] = Image.frombytes(mode, (w, h), rgba.tobytes())
    for mode in ("YCbCr", "HSV", "LAB"):
        cases[f"mode_{mode}"] = Image.frombytes(mode, (w, h), rgb.tobytes())
    wide = np.random.default_rng(6).integers(-300, 70000, size=(h, w))
    cases["mode_I"] = Image.frombytes("I", (w, h), wide.astype("<i4").tobytes())
    cases["mode_I;16"] = Image.frombytes("I;16", (w, h), wide.clip(0, 65535).astype("<u2").tobytes())
    cases["mode_I;16B"] = Image.frombytes("I;16B", (w, h), wide.clip(0, 65535).astype(">u2").tobytes())
    floats = np.random.default_rng(7).uniform(-50, 400, size=(h, w))
    cases["mode_F"] = Image.frombytes("F", (w, h), floats.astype("<f4").tobytes())
    # Sizes: a single pixel, one-pixel-thin strips both ways, a large shrink (Pillow's antialiasing), odd primes.
    cases["size_1x1"] = Image.fromarray(pattern(1, 1, 3, 8))
    cases["size_1x1_RGBA"] = Image.fromarray(np.array([[[200, 40, 90, 100]]], dtype=np.uint8))
    cases["size_3x500"] = Image.fromarray(pattern(3, 500, 3, 9))
    cases["size_500x3"] = Image.fromarray(pattern(500, 3, 3, 10))
    cases["size_67x83_shrink"] = Image.fromarray(pattern(67, 83, 3, 11))
    cases["size_37x29_to_224"] = Image.fromarray(pattern(37, 29, 3, 12, noise=4))
    return cases


def array_cases() -> dict[str, tuple[np.ndarray, dict]]:
    """NumPy inputs: name -> (array, how the reference is called differently, if at all).

    Heights of 1, 3 or 4 are avoided: the reference would take such an (H, W, C) array for channels-first.
    """
    h, w = 11, 7
    rgba = pattern(h, w, 4, 21)
    rgba[0, :, 3] = 0
    grey = pattern(h, w, 1, 22)
    rng = np.random.default_rng(23)
    unit = rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32)
    return {
        "array_uint8_rgb": (pattern(h, w, 3, 20), {}),
        "array_uint8_rgba": (rgba, {}),
        "array_uint8_grey_hw1": (grey, {}),
        # The reference refuses (H, W): it is given (H, W, 1), which must mean the same.
        "array_uint8_grey_hw": (grey[..., 0], {"reference_input": "add a channel axis"}),
        # Whole numbers stored as floats are 0..255 values to the reference, as to us.
        "array_float64_whole_numbers": (pattern(h, w, 3, 24).astype(np.float64), {}),
        # [0, 1] floats: ours = the reference told not to rescale again (its default divides by 255 twice).
        "array_float32_unit": (unit, {"do_rescale": False}),
        "array_float32_unit_rgba": (np.concatenate([unit, rng.uniform(0, 1, (h, w, 1)).astype(np.float32)], -1),
                                    {"do_rescale": False}),  # fmt: skip
        "array_float16_unit_grey": (rng.uniform(0, 1, size=(h, w, 1)).astype(np.float16), {"do_rescale": False}),
    }


def file_cases(directory: Path) -> dict[str, Path]:
    """Files read through a path: the reference's load_image applies EXIF orientation, then convert("RGB")."""
    directory.mkdir(parents=True)
    rgba = pattern(10, 14, 4, 30)
    rgba[:4, :, 3] = 0  # transparent rows: from a path their hidden colour shows (alpha is dropped)
    Image.fromarray(rgba).save(directory / "rgba.png")
    index = (pattern(10, 14, 1, 31)[..., 0] // 16).astype(np.uint8)
    image = Image.frombytes("P", (14, 10), index.tobytes())
    image.putpalette(palette(32))
    image.save(directory / "palette_transparent.png", transparency=int(index[0, 0]))
    grey = pattern(10, 14, 1, 33)[..., 0]
    grey[5:, :5] = 99
    Image.fromarray(grey).save(directory / "grey_transparent.png", transparency=99)
    rotated = Image.fromarray(pattern(10, 14, 3, 34))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated.save(directory / "exif_rotated.png", exif=exif)
    Image.fromarray(pattern(12, 12, 3, 35)).save(directory / "plain.png")
    return {f"file_{p.stem}": p for p in sorted(directory.iterdir())}


# Image processor settings besides the default BLIP-2 ones (each run on a few inputs).
SETTINGS = {
    "blip2": dict(size=SMALL),
    "bilinear_no_normalize": dict(size=SMALL, resample=2, do_normalize=False),
    "custom_mean_std_no_rescale": dict(size={"height": 17, "width": 9}, do_rescale=False,
                                       image_mean=[0.5, 0.25, 0.125], image_std=[0.2, 0.3, 0.4]),  # fmt: skip
    "full_224": dict(size={"height": 224, "width": 224}),
}


def reference_pixels(image, settings: dict) -> np.ndarray:
    processor = BlipImageProcessorPil(**settings)
    return processor(image, return_tensors="np")["pixel_values"][0]  # (3, H, W)


def build_images(arrays: dict) -> list[dict]:
    cases = []
    for name, image in pil_cases().items():
        raw = np.frombuffer(image.tobytes(), dtype=np.uint8)
        transparency = image.info.get("transparency")
        entry = dict(name=name, kind="pil", mode=image.mode, size=list(image.size), palette=image.getpalette()
                     if image.mode in ("P", "PA") else None,
                     transparency=list(transparency) if isinstance(transparency, tuple) else transparency)  # fmt: skip
        rebuilt = rebuild_pil(entry, raw)  # what the test will see, byte for byte
        assert rebuilt.tobytes() == image.tobytes()
        arrays[f"input.{name}"] = raw
        cases.append((entry, rebuilt, {}))
    for name, (array, how) in array_cases().items():
        arrays[f"input.{name}"] = array
        given = array[..., None] if how.get("reference_input") == "add a channel axis" else array
        cases.append((dict(name=name, kind="array", reference_call=how), given, how))
    for name, path in file_cases(OUT / "files").items():
        cases.append((dict(name=name, kind="file", path=str(path.relative_to(OUT))), str(path), {}))

    out = []
    for entry, given, how in cases:
        names = ["blip2"]
        if entry["name"] in ("mode_RGBA", "mode_P", "array_uint8_rgb", "size_67x83_shrink"):
            names += ["bilinear_no_normalize", "custom_mean_std_no_rescale"]
        if entry["name"] == "size_37x29_to_224":
            names = ["full_224"]
        for settings_name in names:
            settings = dict(SETTINGS[settings_name])
            key = f"{entry['name']}.{settings_name}"
            ours = dict(settings)
            if "do_rescale" in how:
                settings["do_rescale"] = how["do_rescale"]
            pixels = reference_pixels(given, settings)
            if settings_name == "full_224":
                arrays[f"table.{key}"], arrays[f"levels.{key}"] = as_levels(pixels, settings)
            else:
                arrays[f"reference.{key}"] = pixels
            out.append(dict(entry, key=key, settings=ours))
        print(f"{entry['name']:32s} {', '.join(names)}")
    return out


def as_levels(pixels: np.ndarray, settings: dict) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) reference output -> (table (3, 256) float32, levels (3, H, W) uint8), exact.

    Every output value is what the reference makes of one 8-bit level in its channel; the table holds the
    reference's output for all 256 levels (from an image that has each level once).
    """
    # (2, 256, 3): every level; two rows, as the reference would take a height of 1 for a channel axis
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=-1).repeat(2, axis=0)
    table = reference_pixels(ramp, dict(settings, do_resize=False))[:, 0, :]  # (3, 256)
    levels = np.stack([np.searchsorted(-table[c], -pixels[c]) if table[c, 0] > table[c, -1]
                       else np.searchsorted(table[c], pixels[c]) for c in range(3)]).astype(np.uint8)  # fmt: skip
    assert np.array_equal(np.take_along_axis(table, levels.reshape(3, -1), 1).reshape(pixels.shape), pixels)
    return table, levels


# The test's rebuild_pil is the one definition of how a stored entry becomes an image again.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_processing import rebuild_pil  # noqa: E402


# ---- the processor --------------------------------------------------------------------------------------------

TEXTS = ["a photo of", "Question: which city is this? Answer:", "", "two  spaces and a </s> inside"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_processor_dir(name: str, directory: Path) -> dict:
    """Fill a checkpoint-like directory; returns what processor.json should know about it."""
    image_settings = {**BlipImageProcessorPil(size=SMALL).to_dict(), "processor_class": "Blip2Processor"}
    files = {"preprocessor_config.json": image_settings}
    info = {}
    if name == "opt":  # the published layout, a tokenizer that already has <image> (as blip2-opt-2.7b's has)
        make_opt_tokenizer(directory, vocab_size=400, image_token=True)
        files["processor_config.json"] = {"num_query_tokens": 4, "processor_class": "Blip2Processor"}
    elif name == "opt-legacy":  # an older checkpoint: no processor_config.json, no <image> in the tokenizer
        make_opt_tokenizer(directory, vocab_size=400)
    elif name == "t5":  # processor_config.json as the reference's own save_pretrained writes it (transformers 5)
        shared = ROOT / "tests" / "fixtures" / "tokenizers" / "t5"
        tokenizer = AutoTokenizer.from_pretrained(shared)
        reference = Blip2Processor(BlipImageProcessorPil(size=SMALL), tokenizer, num_query_tokens=3)
        reference.save_pretrained(directory / "saved")
        shutil.move(directory / "saved" / "processor_config.json", directory)
        shutil.rmtree(directory / "saved")
        files = {}
        info["tokenizer_from"] = "tests/fixtures/tokenizers/t5"
        info["tokenizer_sha256"] = {p.name: sha256(p) for p in sorted(shared.iterdir())}
    elif name == "bert":  # the retrieval checkpoint's Q-Former tokenizer
        make_bert_tokenizer(directory, vocab_size=300)
        files["processor_config.json"] = {"num_query_tokens": 4, "processor_class": "Blip2Processor"}
    for file, content in files.items():
        (directory / file).write_text(json.dumps(content, indent=2))
    return info


def assemble(name: str, info: dict, into: Path) -> Path:
    """The directory as the tests see it (the stored files, plus the shared tokenizer files for t5)."""
    shutil.copytree(OUT / "processor" / name, into)
    if "tokenizer_from" in info:
        for path in (ROOT / info["tokenizer_from"]).iterdir():
            shutil.copy(path, into)
    return into


def build_processors(images: dict, arrays: dict) -> dict:
    result = {}
    for name in ("opt", "opt-legacy", "t5", "bert"):
        (OUT / "processor" / name).mkdir(parents=True)
        entry = write_processor_dir(name, OUT / "processor" / name)
        with tempfile.TemporaryDirectory() as tmp:
            reference = Blip2Processor.from_pretrained(assemble(name, entry, Path(tmp) / name))
        assert isinstance(reference.image_processor, BlipImageProcessorPil)
        entry.update(num_query_tokens=reference.num_query_tokens, vocab_size=len(reference.tokenizer),
                     image_token_id=reference.tokenizer.convert_tokens_to_ids("<image>"), calls={})  # fmt: skip
        sides = ["left", "right"] if name.startswith("opt") else [reference.tokenizer.padding_side]
        for side in sides:
            reference.tokenizer.padding_side = side  # ours pads OPT on the left by default; both are checked
            calls = {
                "batch": dict(images=["mode_RGB", "mode_L"], text=TEXTS[:2]),
                "batch4": dict(images=["mode_RGB"] * 4, text=TEXTS),
                "text_only": dict(text=TEXTS),
                "single": dict(images="mode_RGBA", text=TEXTS[1]),
            }
            for call, kwargs in calls.items():
                given = dict(kwargs)
                if "images" in given:
                    given["images"] = [images[n] for n in kwargs["images"]] if isinstance(kwargs["images"], list) \
                        else images[kwargs["images"]]
                out = reference(**given, padding=True, return_tensors="pt")
                record = dict(kwargs, keys=sorted(out.keys()))
                record.update({k: out[k].tolist() for k in ("input_ids", "attention_mask")})
                decoded = reference.batch_decode(out["input_ids"], skip_special_tokens=True)
                record["decoded"] = [t.strip() for t in decoded]
                if "images" in kwargs:  # the same pixels as the image cases: checked here, not stored again
                    names = kwargs["images"] if isinstance(kwargs["images"], list) else [kwargs["images"]]
                    expected = np.stack([arrays[f"reference.{n}.blip2"] for n in names])
                    assert np.array_equal(out["pixel_values"].numpy(), expected)
                entry["calls"][f"{side}.{call}"] = record
        out = reference(images=[images["mode_RGB"]], return_tensors="pt")
        entry["images_only_keys"] = sorted(out.keys())
        result[name] = entry
        print(f"processor {name}: files {sorted(p.name for p in (OUT / 'processor' / name).iterdir())}")
    return result


def dump(value, indent: str = "") -> str:
    """JSON with one line per innermost record (ids, masks, settings), so that a rebuild gives a readable diff."""
    inner = indent + " "
    if isinstance(value, dict) and value and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + dump(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    arrays = {}
    cases = build_images(arrays)
    images = {c["name"]: rebuild_pil(c, arrays[f"input.{c['name']}"]) for c in cases if c["kind"] == "pil"}
    processors = build_processors(images, arrays)
    versions = dict(transformers=transformers.__version__, pillow=PIL.__version__, numpy=np.__version__)
    (OUT / "images.json").write_text(dump(dict(reference=versions, cases=cases)) + "\n")
    (OUT / "processor.json").write_text(dump(dict(reference=versions, texts=TEXTS, processors=processors)) + "\n")
    np.savez_compressed(OUT / "images.npz", **arrays)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
