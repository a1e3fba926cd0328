"""processing.py against the reference's BlipImageProcessor (Pillow backend) and Blip2Processor.

Default tests use tests/fixtures/processing/ (built by tests/reference/build_processing_fixtures.py); the live
tests (`pytest --live`) compare with transformers on the spot, on many more random images, the 224 and 364 px
targets and freshly trained tokenizers.
"""

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_mini.loader import load_model
from blip2_mini.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, array_to_rgb, load_image

FIXTURES = Path(__file__).parent / "fixtures" / "processing"
ROOT = Path(__file__).resolve().parents[1]
IMAGE_CASES = json.loads((FIXTURES / "images.json").read_text())["cases"]
PROCESSORS = json.loads((FIXTURES / "processor.json").read_text())
TOL = 1e-6


@pytest.fixture(scope="module")
def stored():
    with np.load(FIXTURES / "images.npz") as data:
        return dict(data)


def rebuild_pil(entry: dict, raw: np.ndarray) -> Image.Image:
    """The image the builder gave the reference, byte for byte (the builder imports this function)."""
    image = Image.frombytes(entry["mode"], tuple(entry["size"]), raw.tobytes())
    if entry["palette"] is not None:
        image.putpalette(entry["palette"])
    if entry["transparency"] is not None:
        t = entry["transparency"]
        image.info["transparency"] = tuple(t) if isinstance(t, list) else t
    return image


def case_input(entry: dict, stored: dict):
    if entry["kind"] == "pil":
        return rebuild_pil(entry, stored[f"input.{entry['name']}"])
    if entry["kind"] == "array":
        return stored[f"input.{entry['name']}"]
    return FIXTURES / entry["path"]


def expected_pixels(entry: dict, stored: dict) -> np.ndarray:
    key = entry["key"]
    if f"levels.{key}" in stored:  # the 224 px case, stored as the reference's value of each 8-bit level
        table, levels = stored[f"table.{key}"], stored[f"levels.{key}"]
        return np.take_along_axis(table, levels.reshape(3, -1).astype(np.int64), 1).reshape(levels.shape)
    return stored[f"reference.{key}"]


# ---- images ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", IMAGE_CASES, ids=[c["key"] for c in IMAGE_CASES])
def test_pixel_values_match_reference(entry, stored):
    """Every PIL mode, odd sizes, arrays (grey, RGBA, floats) and files, under several settings."""
    ours = ImageProcessor(**entry["settings"])(case_input(entry, stored))["pixel_values"]
    expected = expected_pixels(entry, stored)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (1, *expected.shape)
    diff = np.abs(ours[0].numpy() - expected).max()
    assert diff <= TOL, f"{entry['key']}: max |ours - reference| = {diff:.2e}"


def test_mixed_batch_matches_reference(stored):
    """A list mixing a PIL image, an array and a path gives the stacked single results, in order."""
    names = ["mode_P", "array_uint8_grey_hw", "file_rgba", "size_500x3"]
    entries = [next(c for c in IMAGE_CASES if c["key"] == f"{n}.blip2") for n in names]
    ours = ImageProcessor(size={"height": 24, "width": 32})([case_input(e, stored) for e in entries])
    expected = np.stack([expected_pixels(e, stored) for e in entries])  # (4, 3, 24, 32)
    assert np.abs(ours["pixel_values"].numpy() - expected).max() <= TOL


def test_transparent_pixels_are_white_and_opaque_ones_unchanged():
    """Known values: a transparent pixel normalises to (1 - mean) / std, an opaque one to (x/255 - mean) / std."""
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))  # transparent black
    image.putpixel((1, 0), (51, 102, 204, 255))  # opaque
    x = ImageProcessor(size={"height": 1, "width": 2}, resample=0)(image)["pixel_values"][0]  # nearest: no mixing
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(x[:, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(x[:, 0, 1], (torch.tensor([51, 102, 204]) / 255 - mean) / std)


def test_arrays_are_channels_last_even_when_ambiguous():
    """(3, W, 3) is a 3-pixel-high RGB image here, like the same picture as a PIL image. (The reference would
    read an array whose first axis is 1, 3 or 4 long as channels-first.)"""
    array = np.random.default_rng(0).integers(0, 256, size=(3, 20, 3), dtype=np.uint8)
    processor = ImageProcessor(size=16)
    assert torch.equal(processor(array)["pixel_values"], processor(Image.fromarray(array))["pixel_values"])


def test_float_unit_array_is_not_divided_twice():
    """A [0, 1] float image gives the same pixels as its uint8 version (x 255, truncated)."""
    unit = np.random.default_rng(1).uniform(0, 1, size=(9, 7, 3)).astype(np.float32)
    as_uint8 = (unit.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    processor = ImageProcessor(size=8)
    assert torch.equal(processor(unit)["pixel_values"], processor(as_uint8)["pixel_values"])
    assert array_to_rgb(unit).dtype == np.uint8


def test_float_array_of_zeros_and_ones_is_intensities():
    """A float canvas of only 0s and 1s (white, a red square) is the picture its uint8 version shows, not levels
    0 and 1 (nearly black), which is how whole-number floats above 1 are read."""
    canvas = np.ones((32, 32, 3))
    canvas[8:24, 8:24] = [1.0, 0.0, 0.0]
    processor = ImageProcessor(size=16)
    assert torch.equal(processor(canvas)["pixel_values"], processor((canvas * 255).astype(np.uint8))["pixel_values"])
    white = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(processor(np.ones((4, 4), np.float32))["pixel_values"][0, :, 0, 0], white)
    assert array_to_rgb(np.full((2, 2, 3), 2.0)).max() == 2  # whole numbers above 1: 0..255 levels


def test_four_dimensional_array_is_a_batch(stored):
    batch = np.stack([stored["input.array_uint8_rgb"]] * 2)  # (2, H, W, 3)
    out = ImageProcessor(size={"height": 24, "width": 32})(batch)["pixel_values"]
    assert np.abs(out.numpy() - stored["reference.array_uint8_rgb.blip2"][None]).max() <= TOL and len(out) == 2


def test_load_image_takes_a_pil_image_as_the_reference_does():
    with Image.open(FIXTURES / "files" / "exif_rotated.png") as opened:
        loaded = load_image(opened)
    assert np.array_equal(np.asarray(loaded), np.asarray(load_image(FIXTURES / "files" / "exif_rotated.png")))
    with pytest.raises(TypeError, match="load_image takes a path, a URL or a PIL image, got ndarray"):
        load_image(np.zeros((2, 2, 3), np.uint8))


def test_pil_image_whose_file_is_closed_or_cut_short_is_one_line(tmp_path):
    """Pillow reads pixels lazily: an image used after its `with` block closed the file failed with an empty
    AssertionError deep in Pillow, a cut-short file with OSError."""
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:-30])
    with Image.open(tmp_path / "a.png") as closed:
        pass
    cut = Image.open(tmp_path / "cut.png")
    for image in (closed, cut):
        for read in (ImageProcessor(size=4), load_image):
            with pytest.raises(ValueError, match="image: cannot read this PIL image's pixels") as excinfo:
                read(image)
            assert "\n" not in str(excinfo.value)


def test_load_image_applies_exif_orientation():
    """exif_rotated.png is stored 14 wide x 10 high with orientation 6 (rotate 90 degrees clockwise to view)."""
    with Image.open(FIXTURES / "files" / "exif_rotated.png") as stored_image:
        stored_image.load()
    assert stored_image.size == (14, 10)
    loaded = load_image(FIXTURES / "files" / "exif_rotated.png")
    assert loaded.mode == "RGB" and loaded.size == (10, 14)
    upright = stored_image.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(loaded), np.asarray(upright))


def test_load_image_drops_alpha_as_the_reference_does():
    """From a path, an RGBA file's transparent pixels keep their hidden colour (reference's load_image)."""
    with Image.open(FIXTURES / "files" / "rgba.png") as image:
        raw = np.asarray(image)
    assert (raw[:4, :, 3] == 0).all()
    assert np.array_equal(np.asarray(load_image(str(FIXTURES / "files" / "rgba.png"))), raw[..., :3])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        if self.path.endswith("/short.png"):  # a download cut short: fewer bytes than Content-Length promises
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r\n")
            self.close_connection = True
            return
        super().do_GET()


def test_load_image_from_url(tmp_path):
    """http(s) URLs are downloaded (here from a local server); a failed download is one clear line."""
    shutil.copy(FIXTURES / "files" / "plain.png", tmp_path / "plain.png")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        downloaded = load_image(f"{url}/plain.png")
        assert np.array_equal(np.asarray(downloaded), np.asarray(load_image(tmp_path / "plain.png")))
        with pytest.raises(ValueError, match="missing.png: cannot download"):
            load_image(f"{url}/missing.png")
        with pytest.raises(ValueError, match="my photo.png: cannot download"):  # http.client.InvalidURL
            load_image(f"{url}/my photo.png")
        with pytest.raises(ValueError, match="short.png: cannot download"):  # http.client.IncompleteRead
            load_image(f"{url}/short.png")
    finally:
        server.shutdown()
        server.server_close()


# ---- settings ----------------------------------------------------------------------------------------------------


def test_settings_read_from_both_layouts():
    """preprocessor_config.json (published checkpoints) and processor_config.json["image_processor"] (what
    transformers 5 saves) give the same settings; to_dict writes back what the reference wrote."""
    published = json.loads((FIXTURES / "processor" / "opt" / "preprocessor_config.json").read_text())
    nested = json.loads((FIXTURES / "processor" / "t5" / "processor_config.json").read_text())["image_processor"]
    a = ImageProcessor.from_pretrained(FIXTURES / "processor" / "opt")
    b = ImageProcessor.from_pretrained(FIXTURES / "processor" / "t5")
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() == {k: v for k, v in published.items() if k != "processor_class"}
    assert a.to_dict() == nested
    assert (a.height, a.width, a.resample, a.rescale_factor) == (24, 32, 3, 1 / 255)


def test_defaults_are_the_reference_class_defaults():
    p = ImageProcessor()
    assert (p.height, p.width, p.resample) == (384, 384, 3)
    assert (p.image_mean, p.image_std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert ImageProcessor(size=224).to_dict()["size"] == {"height": 224, "width": 224}


# ---- errors: one clear line each ------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png: no such file"):
        ImageProcessor(size=8)(str(tmp_path / "nope.png"))


def test_error_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_error_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png: not an image file"):
        ImageProcessor(size=8)([tmp_path / "notes.png"])


def test_error_truncated_image(tmp_path):
    data = (FIXTURES / "files" / "plain.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: cannot read the image"):
        load_image(tmp_path / "cut.png")


@pytest.mark.parametrize("image", [Image.new("RGB", (0, 5)), Image.new("L", (5, 0)), np.zeros((0, 4, 3), np.uint8)],
                         ids=["pil_zero_width", "pil_zero_height", "array_zero_height"])  # fmt: skip
def test_error_empty_image(image):
    with pytest.raises(ValueError, match="image is empty"):
        ImageProcessor(size=8)(image)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, bool, np.complex64])
def test_error_wrong_dtype(dtype):
    fix = r"\(array \* 255\).astype" if dtype is bool else r"array.astype\(np.uint8\) for 0..255"  # bool: 0/1 -> 0/255
    with pytest.raises(ValueError, match=f"expected a uint8 or float array, got dtype {np.dtype(dtype)} \\(use {fix}"):
        ImageProcessor(size=8)(np.zeros((5, 5, 3), dtype=dtype))


@pytest.mark.parametrize(("shape", "message"), [((3, 8, 9), "channels-first use np.moveaxis"),
                                                ((5, 5, 2), r"got shape \(5, 5, 2\)"),
                                                ((5,), r"got shape \(5,\)")])  # fmt: skip
def test_error_wrong_shape(shape, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor(size=8)(np.zeros(shape, np.uint8))


@pytest.mark.parametrize(("array", "message"), [
    (np.full((5, 5, 3), 1.5, np.float32), r"must lie in \[0, 1\]"),
    (np.full((5, 5, 3), -3.0), r"must lie in \[0, 1\]"),
    (np.full((5, 5, 4), 200.0), r"float RGBA array must lie in \[0, 1\]"),
    (np.full((5, 5, 3), np.nan), "NaN"),
], ids=["above_one", "negative", "rgba_0_255", "nan"])  # fmt: skip
def test_error_float_range(array, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor(size=8)(array)


def test_error_unconvertible_mode():
    """Pillow cannot convert "La" (premultiplied grey + alpha); the reference fails too (live test)."""
    with pytest.raises(ValueError, match="image: cannot convert a mode La image to RGB"):
        ImageProcessor(size=8)(Image.new("La", (4, 4)))


def test_error_batch_names_the_image():
    with pytest.raises(ValueError, match="image 1: expected a uint8 or float array"):
        ImageProcessor(size=8)([Image.new("RGB", (4, 4)), np.zeros((4, 4, 3), np.int32)])


@pytest.mark.parametrize(("images", "error", "message"), [
    ([], ValueError, "no images given"),
    (torch.zeros(3, 8, 8), TypeError, "torch tensors are not accepted"),
    (42, TypeError, "expected a PIL image, a NumPy array or a path, got int"),
], ids=["empty", "tensor", "int"])  # fmt: skip
def test_error_wrong_input_type(images, error, message):
    with pytest.raises(error, match=message):
        ImageProcessor(size=8)(images)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(size={"shortest_edge": 224}), "size must be"),
    (dict(size=0), "positive whole numbers"),
    (dict(resample=7), "resample must be one of"),
    (dict(image_mean=[0.5, 0.5]), "image_mean must have 3 values"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std must be positive"),
], ids=["size_key", "size_zero", "resample", "mean", "std"])  # fmt: skip
def test_error_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageProcessor(**kwargs)


def test_error_no_convert_rgb_needs_rgb():
    with pytest.raises(ValueError, match="do_convert_rgb is false, so an RGB image is needed, got mode L"):
        ImageProcessor(size=8, do_convert_rgb=False)(Image.new("L", (4, 4)))


def test_error_unbatchable_without_resize():
    with pytest.raises(ValueError, match="different sizes"):
        ImageProcessor(do_resize=False)([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


def test_error_missing_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageProcessor.from_pretrained(tmp_path / "absent")
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)


# ---- the processor -----------------------------------------------------------------------------------------------
# These need blip2_mini.tokenizer; each test skips on its own while that module is missing.


def processor_dir(name: str, into: Path) -> Path:
    """The checkpoint-like directory as the builder gave it to the reference (t5's tokenizer is shared)."""
    entry = PROCESSORS["processors"][name]
    target = into / name
    shutil.copytree(FIXTURES / "processor" / name, target)
    if "tokenizer_from" in entry:
        shared = ROOT / entry["tokenizer_from"]
        for file, digest in entry["tokenizer_sha256"].items():
            found = hashlib.sha256((shared / file).read_bytes()).hexdigest()
            assert found == digest, (f"{shared / file} changed since the processor fixtures were built: "
                                     "rerun tests/reference/build_processing_fixtures.py")  # fmt: skip
            shutil.copy(shared / file, target)
    return target


def load_processor(name: str, tmp_path: Path, **kwargs):
    pytest.importorskip("blip2_mini.tokenizer")
    from blip2_mini.processing import Blip2Processor

    return Blip2Processor.from_pretrained(processor_dir(name, tmp_path), **kwargs)


PROCESSOR_CALLS = [(name, key) for name, entry in PROCESSORS["processors"].items() for key in entry["calls"]]


@pytest.mark.parametrize(("name", "key"), PROCESSOR_CALLS, ids=[f"{n}.{k}" for n, k in PROCESSOR_CALLS])
def test_processor_matches_reference(name, key, tmp_path, stored):
    """<image> x Q before the padded prompts, the attention mask, the pixels and the decoded text."""
    side = key.split(".")[0]
    processor = load_processor(name, tmp_path, padding_side=side)
    call = PROCESSORS["processors"][name]["calls"][key]
    images = None
    if "images" in call:
        by_name = {c["name"]: c for c in IMAGE_CASES if c["kind"] == "pil"}
        names = call["images"] if isinstance(call["images"], list) else [call["images"]]
        loaded = [rebuild_pil(by_name[n], stored[f"input.{n}"]) for n in names]
        images = loaded if isinstance(call["images"], list) else loaded[0]
    out = processor(images=images, text=call["text"])
    assert sorted(out) == call["keys"]
    assert out["input_ids"].tolist() == call["input_ids"]
    assert out["attention_mask"].tolist() == call["attention_mask"]
    if images is not None:
        expected = np.stack([stored[f"reference.{n}.blip2"] for n in names])
        assert np.abs(out["pixel_values"].numpy() - expected).max() <= TOL
    assert processor.batch_decode(out["input_ids"]) == call["decoded"]


@pytest.mark.parametrize(("name", "side"),
                         [("opt", "left"), ("opt-legacy", "left"), ("t5", "right"), ("bert", "right")])  # fmt: skip
def test_processor_default_padding_side(name, side, tmp_path):
    """OPT is padded on the left (for batched generation), T5 and BERT on the right."""
    processor = load_processor(name, tmp_path)
    assert processor.tokenizer.padding_side == side
    entry = PROCESSORS["processors"][name]
    assert processor.num_query_tokens == entry["num_query_tokens"]
    assert processor.image_token_id == entry["image_token_id"] and len(processor.tokenizer) == entry["vocab_size"]


@pytest.mark.parametrize("name", list(PROCESSORS["processors"]))
def test_processor_images_alone_give_pixels_only(name, tmp_path):
    out = load_processor(name, tmp_path)(images=Image.new("RGB", (5, 5)))
    assert sorted(out) == PROCESSORS["processors"][name]["images_only_keys"] == ["pixel_values"]


def test_processor_lists_without_tensors(tmp_path):
    processor = load_processor("opt", tmp_path)
    out = processor(text=["a photo of", "Question: which city is this? Answer:"], padding=False, return_tensors=None)
    call = PROCESSORS["processors"]["opt"]["calls"]["left.text_only"]
    unpadded = [[i for i, m in zip(ids, mask) if m] for ids, mask in zip(call["input_ids"], call["attention_mask"])]
    assert out["input_ids"] == unpadded[:2] and out["attention_mask"] == [[1] * len(ids) for ids in unpadded[:2]]


def test_processor_decode_strips(tmp_path):
    processor = load_processor("opt", tmp_path)
    ids = processor.tokenizer.encode(" a photo of ")  # BOS, then the words with their spaces
    assert processor.decode([processor.image_token_id] * 4 + ids) == "a photo of"
    assert processor.batch_decode(torch.tensor([ids, ids])) == ["a photo of"] * 2


def test_processor_output_to_casts_only_floats(tmp_path):
    """inputs.to(dtype) casts the pixels, never the ids; inputs.to(device) moves everything."""
    out = load_processor("opt", tmp_path)(images=Image.new("RGB", (5, 5)), text="a photo of")
    half = out.to(torch.float16)
    assert half["pixel_values"].dtype == torch.float16 and torch.equal(half["pixel_values"], out["pixel_values"].half())
    assert half["input_ids"].dtype == torch.long and torch.equal(half["input_ids"], out["input_ids"])
    moved = out.to("cpu", torch.bfloat16)
    assert moved["pixel_values"].dtype == torch.bfloat16 and moved["attention_mask"].dtype == torch.long
    assert sorted(moved) == sorted(out) == ["attention_mask", "input_ids", "pixel_values"]


def test_processor_save_and_reload(tmp_path):
    """save_pretrained writes the published layout; reading it back gives the same inputs."""
    processor = load_processor("t5", tmp_path)
    processor.save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert {"preprocessor_config.json", "processor_config.json", "spiece.model", "tokenizer.json"} <= set(files)
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["num_query_tokens"] == 3
    again = type(processor).from_pretrained(tmp_path / "saved")
    texts, images = ["a photo of", "Question: which city is this? Answer:"], [Image.new("L", (6, 9), 80)] * 2
    a, b = processor(images=images, text=texts), again(images=images, text=texts)
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(), ValueError, "give images, text or both"),
    (dict(images=[Image.new("RGB", (4, 4))], text=["a", "b"]), ValueError, r"1 image\(s\) but 2 prompt\(s\)"),
    (dict(text=[1, 2]), ValueError, "text must be a string or a non-empty list of strings"),
    (dict(text=[]), ValueError, "text must be a string or a non-empty list of strings"),
    (dict(text=["a", "a b c d"], padding=False), ValueError, "pass padding=True to return tensors"),
    (dict(text="a", padding="max_length"), ValueError, "padding must be"),
    (dict(text="a", return_tensors="np"), ValueError, "return_tensors must be"),
], ids=["nothing", "count_mismatch", "not_strings", "empty_list", "unpadded_tensors", "padding",
        "return_tensors"])  # fmt: skip
def test_processor_errors(kwargs, error, message, tmp_path):
    processor = load_processor("opt", tmp_path)
    with pytest.raises(error, match=message):
        processor(**kwargs)


def test_processor_error_missing_settings(tmp_path):
    pytest.importorskip("blip2_mini.tokenizer")
    from blip2_mini.processing import Blip2Processor

    shutil.copytree(FIXTURES / "processor" / "opt-legacy", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing preprocessor_config.json"):
        Blip2Processor.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="num_query_tokens must be a positive int"):
        Blip2Processor(ImageProcessor(), load_processor("opt", tmp_path).tokenizer, num_query_tokens=0)


# ---- live: against transformers on the spot ------------------------------------------------------------------------


def random_image(rng, mode: str, height: int, width: int) -> Image.Image:
    """A random image of `mode`, made from raw bytes (and a random palette / transparent colour where it applies)."""
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, size=(height, width)).astype(bool))
    probe = Image.new(mode, (1, 1))
    raw = rng.integers(0, 256, size=len(probe.tobytes()) * height * width, dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), raw.tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, size=768).tolist())
    if mode in ("P", "L") and rng.random() < 0.5:
        image.info["transparency"] = int(rng.integers(0, 256))
    if mode == "RGB" and rng.random() < 0.5:
        image.info["transparency"] = tuple(int(v) for v in image.getpixel((0, 0)))
    return image


LIVE_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16",
              "I;16B", "F"]  # fmt: skip


@pytest.mark.live
@pytest.mark.parametrize("target", [{"height": 224, "width": 224}, {"height": 364, "width": 364},
                                    {"height": 31, "width": 17}], ids=["224", "364", "31x17"])  # fmt: skip
def test_live_every_mode_and_size(target):
    from transformers import BlipImageProcessorPil

    rng = np.random.default_rng(sum(target.values()))
    reference, ours = BlipImageProcessorPil(size=target), ImageProcessor(size=target)
    sizes = [(1, 1), (3, 500), (500, 3), (2, 2), (1, 7)] + [tuple(rng.integers(1, 400, 2)) for _ in range(3)]
    worst = {}
    for mode in LIVE_MODES:
        for height, width in sizes:
            image = random_image(rng, mode, int(height), int(width))
            expected = reference(image, return_tensors="np")["pixel_values"]
            worst[mode] = max(worst.get(mode, 0), float(np.abs(ours(image)["pixel_values"].numpy() - expected).max()))
    print("max |ours - reference| per mode:", worst)
    assert max(worst.values()) <= TOL, worst


@pytest.mark.live
def test_live_arrays_and_files(tmp_path):
    from transformers import BlipImageProcessorPil

    rng = np.random.default_rng(5)
    target = {"height": 40, "width": 56}
    reference, ours = BlipImageProcessorPil(size=target), ImageProcessor(size=target)
    unscaled = BlipImageProcessorPil(size=target, do_rescale=False)
    for _ in range(10):
        h, w = (int(v) for v in rng.choice([2, 5, 9, 37, 120], size=2))  # no 1, 3 or 4: see the ambiguity test
        rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        unit = rng.uniform(0, 1, size=(h, w, 4)).astype(np.float32)
        cases = [
            (rgba[..., :3], rgba[..., :3], reference),
            (rgba, rgba, reference),
            (rgba[..., :1], rgba[..., :1], reference),
            (rgba[..., 0], rgba[..., :1], reference),  # (H, W): the reference needs (H, W, 1)
            (rgba[..., :3].astype(np.float64), rgba[..., :3].astype(np.float64), reference),
            (unit[..., :3], unit[..., :3], unscaled),  # [0, 1] floats: the reference told not to rescale again
            (unit, unit, unscaled),
        ]
        for mine, theirs, ref in cases:
            expected = ref(theirs, return_tensors="np")["pixel_values"]
            assert np.abs(ours(mine)["pixel_values"].numpy() - expected).max() <= TOL
        for mode in ("RGBA", "P", "L", "LA", "RGB"):
            path = tmp_path / f"{mode}_{h}x{w}.png"
            image = random_image(rng, mode, h, w)
            image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
            expected = reference(str(path), return_tensors="np")["pixel_values"]
            assert np.abs(ours(str(path))["pixel_values"].numpy() - expected).max() <= TOL, path.name


@pytest.mark.live
def test_live_reference_also_refuses_La():
    from transformers import BlipImageProcessorPil

    with pytest.raises(ValueError):
        BlipImageProcessorPil(size=8)(Image.new("La", (4, 4)))


@pytest.mark.live
@pytest.mark.parametrize("family", ["opt", "t5", "bert"])
def test_live_processor(family, tmp_path):
    """Freshly trained tokenizers, random texts in random batches: ours vs the reference Blip2Processor, and the
    reference reading what our save_pretrained wrote."""
    pytest.importorskip("blip2_mini.tokenizer")
    import tokenizer_files
    from transformers import Blip2Processor as ReferenceProcessor
    from transformers import BlipImageProcessorPil

    from blip2_mini.processing import Blip2Processor

    make = {"opt": tokenizer_files.make_opt_tokenizer, "t5": tokenizer_files.make_t5_tokenizer,
            "bert": tokenizer_files.make_bert_tokenizer}[family]  # fmt: skip
    tokenizer = make(tmp_path / "ckpt")
    image_processor = BlipImageProcessorPil(size={"height": 20, "width": 28})
    reference = ReferenceProcessor(image_processor, tokenizer, num_query_tokens=5)
    reference.save_pretrained(tmp_path / "ckpt")
    ours = Blip2Processor.from_pretrained(tmp_path / "ckpt")
    reference.tokenizer.padding_side = ours.tokenizer.padding_side  # left for OPT, as ours by default
    texts = tokenizer_files.random_texts(24, seed=7)
    rng = np.random.default_rng(0)
    images = [random_image(rng, "RGB", 9, 11) for _ in range(4)]
    for start in range(0, len(texts), 4):
        batch = texts[start:start + 4]
        for given in (dict(images=images[:len(batch)], text=batch), dict(text=batch)):
            a, b = ours(**given), reference(**given, padding=True, return_tensors="pt")
            assert sorted(a) == sorted(b)
            for key in a:
                assert torch.equal(a[key], b[key]), (key, batch)
            decoded = reference.batch_decode(b["input_ids"], skip_special_tokens=True)
            assert ours.batch_decode(a["input_ids"]) == [t.strip() for t in decoded]
    ours.save_pretrained(tmp_path / "ours")
    again = ReferenceProcessor.from_pretrained(tmp_path / "ours")
    again.tokenizer.padding_side = ours.tokenizer.padding_side
    assert again.num_query_tokens == 5
    a = ours(images=images[:2], text=texts[:2])
    b = again(images=images[:2], text=texts[:2], padding=True, return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the example images -------------------------------------------------------------------------------------------


def test_example_images():
    """Small, readable by the processor; transparent.png shows the two ways transparency is handled."""
    examples = ROOT / "examples"
    paths = sorted(p for p in examples.iterdir() if p.suffix in (".png", ".jpg"))
    assert [p.name for p in paths] == ["gradient.jpg", "grey.png", "shapes.png", "transparent.png"]
    assert all(p.stat().st_size < 60_000 for p in paths)
    assert tuple(ImageProcessor(size=224)(paths)["pixel_values"].shape) == (4, 3, 224, 224)
    with Image.open(examples / "transparent.png") as image:
        assert image.mode == "RGBA" and image.getpixel((0, 0)) == (0, 0, 0, 0)  # transparent black
        opened = ImageProcessor(size=192, resample=0).to_rgb(image)
    assert opened.getpixel((0, 0)) == (255, 255, 255)  # passed as an image: laid on white
    assert load_image(examples / "transparent.png").getpixel((0, 0)) == (0, 0, 0)  # from a path: alpha dropped


def test_error_image_too_large_to_read_safely(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses more than twice this (a decompression bomb)
    with pytest.raises(ValueError, match=r"big.png: too large to read safely \(10000 pixels; Pillow refuses more than"):
        load_image(tmp_path / "big.png")


def test_resized_is_the_first_half_of_preprocess():
    # What a caller may keep instead of a full-size photo (the CLI's rank does): preprocess gives the same numbers.
    processor = ImageProcessor()
    for image in (Image.open(ROOT / "examples" / "gradient.jpg"), Image.open(ROOT / "examples" / "transparent.png")):
        small = processor.resized(image)
        assert small.size == (processor.width, processor.height) and small.mode == "RGB"
        assert np.array_equal(processor.preprocess(small), processor.preprocess(image))


def test_decode_takes_one_sequence_and_batch_decode_several():
    from blip2_mini.processing import Blip2Processor

    processor = Blip2Processor.from_pretrained(ROOT / "weights" / "blip2-shapes-tiny")
    ids = processor(text=["a red circle"], return_tensors="pt")["input_ids"]  # (1, T)
    assert processor.decode(ids[0]) == processor.batch_decode(ids)[0] == "a red circle"
    with pytest.raises(ValueError, match=r"decode takes one sequence \(T,\); use batch_decode"):
        processor.decode(ids)
    with pytest.raises(ValueError, match=r"batch_decode takes sequences \(B, T\); use decode"):
        processor.batch_decode(ids[0])



def test_a_prompt_holding_the_image_placeholder_is_explained():
    # The reference's processor keeps "<image>" in a text too (one slot too many); generate says why it fails.
    import blip2_mini

    model, processor = blip2_mini.load(ROOT / "weights" / "blip2-shapes-tiny", progress=False)
    inputs = processor(images=Image.new("RGB", (8, 8)), text="<image> what is it?")
    with pytest.raises(ValueError, match=r"found \[33\]; build the prompt with the processor .*without '<image>'"):
        model.generate(**inputs, max_new_tokens=2)


# ---- prompts ---------------------------------------------------------------------------------------------------


def test_prompt_formats_of_the_paper():
    from blip2_mini.prompts import caption_prompt, chat_prompt, vqa_prompt

    assert caption_prompt() is None and caption_prompt(coco_style=True) == "a photo of"
    assert vqa_prompt(" what is it? ") == "Question: what is it? Answer:"
    assert vqa_prompt("what is it?", "t5") == "Question: what is it? Short answer:"
    assert chat_prompt([("what is this?", " a cat ")], "what colour is it?", "t5") == \
        "Question: what is this? Answer: a cat. Question: what colour is it? Short answer:"
    t5 = load_model(Path(__file__).parent / "fixtures" / "model" / "t5-base", progress=False)
    assert vqa_prompt("what is it?", t5) == "Question: what is it? Short answer:"  # the model decides
    for family in ("flan-t5", "T5", None):  # a typo must not silently give OPT's format
        with pytest.raises(ValueError, match="family must be 'opt', 't5' or the model"):
            vqa_prompt("what is it?", family)
    with pytest.raises(ValueError, match="the question is empty"):
        vqa_prompt("  ")
