"""Preprocessing: images and a prompt -> the tensors BLIP-2 takes (`pixel_values`, `input_ids`, `attention_mask`).

Images (`ImageProcessor`) go through the steps of the reference's BlipImageProcessor (its Pillow backend),
which are also those of the BLIP-2 paper's evaluation code (LAVIS):

    image ─to RGB─> uint8 (H, W, 3) ─resize to (S, S), bicubic─> ─x / 255─> [0, 1] ─(x - mean) / std─> (3, S, S)

1. To RGB. Transparent pixels are laid on a white background first, then every mode (grey, palette, CMYK,
   16-bit, float, ...) goes through Pillow's own conversion, so the numbers are the reference's to the last bit.
2. Resize straight to the square the encoder was trained on (224 px, or 364 px for the COCO-finetuned
   checkpoints): no crop, a wide photo is squashed. Pillow's bicubic filter, which also anti-aliases when
   shrinking (torch's `interpolate` does not, which is why the image is resized here and not on the GPU).
3. Rescale to [0, 1] and normalise each channel with the mean and std of OpenAI CLIP's training images;
   EVA-CLIP, BLIP-2's image encoder, kept them, and so does every BLIP-2 `preprocessor_config.json`.

Text (`Blip2Processor`). The current checkpoints reserve Q = `num_query_tokens` slots for the Q-Former's output
in the language model's input: Q copies of an added `<image>` token, placed *before* the tokenised prompt
(before OPT's BOS), which the model overwrites with the projected queries. The prompts of a batch are padded
first and the image tokens put in front afterwards, so pads sit between the image tokens and the text:

    OPT (decoder-only, padded on the left):   <image> x Q  <pad> <pad>  </s> Question : ...      (B, Q + T)
    Flan-T5 (encoder-decoder, on the right):  <image> x Q  Question : ... </s>  <pad> <pad>      (B, Q + T)

Older checkpoints (no `num_query_tokens` in processor_config.json) get the prompt alone; their model prepends
the queries itself.
"""

import http.client
import json
import os
import shutil
import urllib.request
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .tokenizer import check_padding

# OpenAI CLIP's per-channel statistics (RGB order), kept by EVA-CLIP and written in every BLIP-2 checkpoint.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"  # the image processor's settings
PROCESSOR_CONFIG = "processor_config.json"  # num_query_tokens (and, as transformers 5 saves it, the image settings)
IMAGE_TOKEN = "<image>"
# Files a tokenizer may be stored in (the official layouts of OPT, BERT and T5 repositories).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model")  # fmt: skip

# Pillow's filter numbers, which `resample` in preprocessor_config.json uses (3 = bicubic for BLIP-2).
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ---- reading images -----------------------------------------------------------------------------------------


def load_image(source) -> Image.Image:
    """A file path (str or Path) or an http(s) URL -> an RGB PIL image, as the reference's `load_image` reads it.

    The EXIF orientation of camera photos is applied, then the image is converted with a plain
    `convert("RGB")`. Note what that means for transparency (the reference does the same): an RGBA file loses its
    alpha channel, so whatever colour hides under transparent pixels shows; a palette or grey PNG with a
    transparent *colour* keeps that colour as `info["transparency"]`, and the image processor later lays those
    pixels on white. An image opened yourself and passed as is gets all its transparency laid on white.
    A PIL image is accepted too, as the reference accepts it: its EXIF orientation applied, converted to RGB.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(_loaded(source, "image")).convert("RGB")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path, a URL or a PIL image, got {type(source).__name__}")
    name = str(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                data = BytesIO(response.read())
        # URLError and HTTPError are OSErrors; a malformed URL (a space, a bad port) is http.client.InvalidURL, a
        # ValueError; a connection closed early is http.client.IncompleteRead, an HTTPException
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise ValueError(f"{name}: cannot download ({e})") from None
        return _open_rgb(data, name)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if path.is_dir():
        raise ValueError(f"{name}: is a directory, not an image file")
    return _open_rgb(path, name)


def _loaded(image: Image.Image, name: str) -> Image.Image:
    """A PIL image whose pixels can be read. Pillow reads a file's pixels lazily, at first use: a file closed
    since (an image used after its `with Image.open(...)` block) or cut short fails only then, deep in Pillow."""
    try:
        image.load()
    except (OSError, ValueError, AssertionError, AttributeError) as e:  # closed file: AssertionError, no message
        raise ValueError(f"{name}: cannot read this PIL image's pixels ({e or type(e).__name__}); use an image "
                         "opened with `with Image.open(...)` inside that block (or .load() it there), or pass the "
                         "path") from None
    return image


def _open_rgb(file, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 Mpx on (and refuses from 179): read, say nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as opened:
                image = ImageOps.exif_transpose(opened)  # reads the pixels: a truncated file fails here
                image = image.convert("RGB")
    except Image.DecompressionBombError as e:  # a small file that would decode into many GB
        size = str(e).split("(")[1].split(")")[0] if "(" in str(e) else "?"  # "Image size (N pixels) exceeds ..."
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise ValueError(f"{name}: too large to read safely ({size}; Pillow refuses more than {limit} pixels, "
                         "twice PIL.Image.MAX_IMAGE_PIXELS); downscale it first") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file (Pillow cannot identify its format)") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data; Pillow uses all three
        raise ValueError(f"{name}: cannot read the image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name}: the image is empty ({image.width}x{image.height} pixels)")
    return image


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode RGB, as the reference's `convert_to_rgb`: transparency is laid on white.

    "Transparency" means an alpha band (RGBA, LA, PA) or a transparent colour (`info["transparency"]`, which
    palette and grey PNGs can declare). Without either, Pillow's `convert("RGB")` does it all: grey is copied
    to the three channels, palette indices are looked up, CMYK becomes (255 - C)(255 - K) / 255 and so on,
    16-bit, 32-bit and float grey ("I;16", "I", "F") are clipped to 0..255 (floats also truncated).
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_rgb(array: np.ndarray, name: str = "array") -> np.ndarray:
    """A NumPy image -> uint8 (H, W, 3), as the reference converts arrays before handing them to Pillow.

    Accepted: (H, W) grey, (H, W, 1) grey, (H, W, 3) RGB, (H, W, 4) RGBA; dtype uint8 (0..255) or float.
    (H, W) is read as grey levels: for a palette image pass the PIL image, not np.asarray of it (its indices).
    Floats in [0, 1] are intensities, scaled by 255 and *truncated* to uint8 (Pillow only resizes 8-bit images),
    as the reference does; other floats must be whole numbers in [0, 255], read as 0..255 values. An array of
    only 0s and 1s (a white canvas, a mask) is read as intensities: the reference reads it as levels 0 and 1,
    nearly black by default (and with do_rescale=False resizes it as two levels, without its edges' greys).
    RGBA is laid on white with rounding (uint8) or without (floats, which must then lie in [0, 1]).
    """
    if not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
        fix = "(array * 255).astype(np.uint8) for black and white" if array.dtype == bool else \
            "array.astype(np.uint8) for 0..255 values"
        raise ValueError(f"{name}: expected a uint8 or float array, got dtype {array.dtype} (use {fix})")
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        hint = "; for channels-first use np.moveaxis(array, 0, -1)" if channels_first else ""
        raise ValueError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, "
                         f"got shape {tuple(array.shape)}{hint}")  # fmt: skip
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: the image is empty (shape {tuple(array.shape)})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ValueError(f"{name}: the array contains NaN or infinite values")

    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)  # grey -> (H, W, 3)
    elif array.shape[-1] == 4:
        if array.dtype == np.uint8:
            alpha = array[..., 3:4] / 255  # (H, W, 1) float64 in [0, 1]
            array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)  # laid on white
        else:
            if array.min() < 0 or array.max() > 1:
                raise ValueError(f"{name}: a float RGBA array must lie in [0, 1], got [{array.min()}, {array.max()}]")
            alpha = array[..., 3:4]
            array = (alpha * array[..., :3] + (1 - alpha) * 1.0).astype(array.dtype)

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.min() >= 0 and array.max() <= 1:
        # x 255 in float64, through float32, then truncated: the reference's exact rounding path.
        return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    if np.allclose(array, array.astype(np.int64)) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)  # whole numbers: already 0..255
    raise ValueError(f"{name}: float values must lie in [0, 1] (or be whole numbers in [0, 255]), "
                     f"got [{array.min()}, {array.max()}]")  # fmt: skip


# ---- the image processor ------------------------------------------------------------------------------------


class ImageProcessor:
    """Images -> `pixel_values` (B, 3, H, W) float32; the settings are those of `preprocessor_config.json`.

    Inputs: a PIL image of any mode, a NumPy array (see `array_to_rgb`), a path or URL (see `load_image`), or a
    list of these. A float array in [0, 1] is treated as already scaled to [0, 1]: it gives what the reference
    gives with `do_rescale=False` (but for an array of only 0s and 1s, see `array_to_rgb`). (The reference's
    default divides such an array by 255 a second time.)

    The defaults are those of the reference class (BLIP's 384 px); BLIP-2 checkpoints set `size` to 224 or 364.
    """

    def __init__(self, size=None, resample: int = 3, do_resize: bool = True, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, do_convert_rgb: bool = True):  # fmt: skip
        self.height, self.width = _parse_size({"height": 384, "width": 384} if size is None else size)
        if resample not in RESAMPLE_NAMES:
            raise ValueError(f"resample must be one of {RESAMPLE_NAMES} (Pillow's filter numbers), got {resample!r}")
        self.resample = int(resample)
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _per_channel(image_mean, "image_mean")
        self.image_std = _per_channel(image_std, "image_std")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        self.do_convert_rgb = bool(do_convert_rgb)

    # ---- settings ----

    CONFIG_KEYS = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                   "image_std", "do_convert_rgb")  # fmt: skip

    @classmethod
    def from_dict(cls, config: dict) -> "ImageProcessor":
        """From a preprocessor_config.json dict; keys it does not set keep the reference's defaults."""
        return cls(**{k: config[k] for k in cls.CONFIG_KEYS if config.get(k) is not None})

    @classmethod
    def from_pretrained(cls, directory) -> "ImageProcessor":
        return cls.from_dict(read_image_processor_config(directory))

    def to_dict(self) -> dict:
        """The preprocessor_config.json the reference writes for these settings."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.height, "width": self.width},
        }

    def __repr__(self):
        return (f"ImageProcessor(size={self.height}x{self.width}, resample={RESAMPLE_NAMES[self.resample]}, "
                f"mean={self.image_mean}, std={self.image_std})")  # fmt: skip

    # ---- processing ----

    def __call__(self, images) -> dict:
        """One image or a list -> {"pixel_values": (B, 3, H, W) float32}."""
        batch = _as_image_list(images)
        arrays = [self.preprocess(image, name) for image, name in batch]  # each (3, H, W)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(s[1:] for s in shapes)} cannot be batched "
                             "without resizing (do_resize is false)")  # fmt: skip
        return {"pixel_values": torch.from_numpy(np.stack(arrays))}  # (B, 3, H, W)

    def preprocess(self, image, name: str = "image") -> np.ndarray:
        """One image -> (3, H, W) float32 NumPy array. `name` is what error messages call it."""
        x = np.asarray(self.resized(image, name))  # (H, W, 3) uint8
        if self.do_rescale:
            # Multiplied in float64, then stored as float32 (the reference's order; float32 throughout could
            # differ in the last bit).
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)

    def resized(self, image, name: str = "image") -> Image.Image:
        """Steps 1 and 2: an RGB PIL image at the model's input size, all that the rest of `preprocess` reads
        (and preprocess gives the same numbers for it as for the original: Pillow's resize to the size an image
        already has is a copy). Keeping this instead of a 12 Mpx photo saves ~35 MB per image."""
        image = self.to_rgb(image, name)
        if self.do_resize:
            image = image.resize((self.width, self.height), resample=self.resample)  # Pillow takes (W, H)
        return image

    def to_rgb(self, image, name: str = "image") -> Image.Image:
        """Any accepted input -> a non-empty RGB PIL image (step 1)."""
        if isinstance(image, (str, os.PathLike)):
            # Then on as a PIL image: RGB already, but a transparent colour that load_image kept is laid on white.
            image = load_image(image)
        if isinstance(image, np.ndarray):
            if not self.do_convert_rgb and (image.ndim != 3 or image.shape[-1] != 3):
                raise ValueError(f"{name}: do_convert_rgb is false, so an (H, W, 3) array is needed, "
                                 f"got shape {tuple(image.shape)}")  # fmt: skip
            return Image.fromarray(array_to_rgb(image, name))
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"{name}: the image is empty ({image.width}x{image.height} pixels)")
            _loaded(image, name)
            if not self.do_convert_rgb:
                if image.mode != "RGB":
                    raise ValueError(f"{name}: do_convert_rgb is false, so an RGB image is needed, "
                                     f"got mode {image.mode}")  # fmt: skip
                return image
            try:
                return pil_to_rgb(image)
            except ValueError as e:  # a mode Pillow cannot convert, e.g. "La"
                raise ValueError(f"{name}: cannot convert a mode {image.mode} image to RGB ({e})") from None
        if isinstance(image, torch.Tensor):
            raise TypeError(f"{name}: torch tensors are not accepted (their layout is ambiguous); pass a PIL image, "
                            "an (H, W, C) NumPy array or a path")  # fmt: skip
        raise TypeError(f"{name}: expected a PIL image, a NumPy array or a path, got {type(image).__name__}")


def _parse_size(size) -> tuple[int, int]:
    """{"height": h, "width": w} or an int (a square) -> (h, w)."""
    if isinstance(size, int) and not isinstance(size, bool):
        height = width = size
    elif isinstance(size, dict) and set(size) == {"height", "width"}:
        height, width = size["height"], size["width"]
    else:
        raise ValueError(f'size must be {{"height": h, "width": w}} or an int, got {size!r}')
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise ValueError(f"size must be positive whole numbers, got {size!r}")
    return height, width


def _per_channel(values, name: str) -> tuple[float, float, float]:
    """A number or three numbers -> (R, G, B) floats."""
    if isinstance(values, (int, float)):
        values = [values] * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}")
    return values


def _as_image_list(images) -> list[tuple[object, str]]:
    """One image, a list of images or an (N, H, W, C) array -> [(image, name for errors)]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")

    def name(image, i):
        if isinstance(image, (str, os.PathLike)):
            return str(image)
        return "image" if len(images) == 1 else f"image {i}"

    return [(image, name(image, i)) for i, image in enumerate(images)]


# ---- configuration files --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_image_processor_config(directory) -> dict:
    """The image settings of a checkpoint directory.

    Published checkpoints keep them in preprocessor_config.json; transformers 5's `save_pretrained` writes them
    into processor_config.json under "image_processor" instead. Either is read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if (directory / PREPROCESSOR_CONFIG).is_file():
        return _read_json(directory / PREPROCESSOR_CONFIG)
    if (directory / PROCESSOR_CONFIG).is_file():
        nested = _read_json(directory / PROCESSOR_CONFIG).get("image_processor")
        if isinstance(nested, dict):
            return nested
    raise FileNotFoundError(f"{directory}: missing {PREPROCESSOR_CONFIG} (the image preprocessing settings)")


# ---- the processor ------------------------------------------------------------------------------------------


def _is_retrieval_checkpoint(directory: Path) -> bool:
    """Whether config.json next to the processor files describes a retrieval (stage-1) model, without an LLM."""
    from .config import Blip2Config, ConfigError

    try:
        return Blip2Config.from_json_file(directory / "config.json").text_config is None
    except ConfigError:  # no or another config.json: a processor on its own
        return False


def _is_decoder_only(tokenizer) -> bool:
    """OPT's byte-level BPE is the only decoder-only language model tokenizer BLIP-2 ships with."""
    from .bpe import ByteLevelBPETokenizer

    return isinstance(tokenizer, ByteLevelBPETokenizer)


class ProcessorOutput(dict):
    """The processor's dict of tensors, with `.to(...)` to move them all: `inputs.to("cuda")`,
    `inputs.to("cuda", torch.bfloat16)`. A dtype applies to floating tensors only (the pixels), never to ids."""

    def to(self, device=None, dtype=None) -> "ProcessorOutput":
        if isinstance(device, torch.dtype):  # .to(torch.float16)
            device, dtype = None, device
        out = ProcessorOutput()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            out[key] = value
        return out


class Blip2Processor:
    """Images and prompts -> {"input_ids", "attention_mask", "pixel_values"}, and ids -> text.

    num_query_tokens  Q `<image>` slots put before each prompt when images are given (None: the older layout,
                      no slots; the model then prepends the queries itself).
    padding_side      None: "left" for OPT, whose batched generation needs the prompts to end where generation
                      starts (the published OPT tokenizer config says nothing, so the reference pads on the
                      right unless told), and the tokenizer's own side (right) for T5 and BERT.
    """

    def __init__(self, image_processor: ImageProcessor, tokenizer, num_query_tokens: int | None = None,
                 padding_side: str | None = None):  # fmt: skip
        if num_query_tokens is not None and (not isinstance(num_query_tokens, int) or num_query_tokens < 1):
            raise ValueError(f"num_query_tokens must be a positive int or None, got {num_query_tokens!r}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        # Like the reference, the processor adds <image> to a tokenizer that lacks it: special (never split,
        # dropped when decoding) and given the next free id.
        tokenizer.add_special_tokens([IMAGE_TOKEN])
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if padding_side is None:
            padding_side = "left" if _is_decoder_only(tokenizer) else tokenizer.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
        self.source_directory = None  # where from_pretrained read the tokenizer files (save_pretrained copies them)

    @classmethod
    def from_pretrained(cls, directory, padding_side: str | None = None) -> "Blip2Processor":
        """Read preprocessor_config.json, processor_config.json (if any) and the tokenizer of a checkpoint."""
        from .tokenizer import load_tokenizer

        directory = Path(directory)
        image_processor = ImageProcessor.from_dict(read_image_processor_config(directory))
        config = _read_json(directory / PROCESSOR_CONFIG) if (directory / PROCESSOR_CONFIG).is_file() else {}
        if padding_side is None and _is_retrieval_checkpoint(directory):
            padding_side = "right"  # no language model: texts are read at their first token, whatever the tokenizer
        processor = cls(image_processor, load_tokenizer(directory), config.get("num_query_tokens"), padding_side)
        processor.source_directory = directory
        return processor

    def save_pretrained(self, directory):
        """Write preprocessor_config.json and processor_config.json (the published checkpoints' layout) and the
        tokenizer: with its own `save_pretrained` if it has one, else by copying the files it was read from."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        image_config = {**self.image_processor.to_dict(), "processor_class": "Blip2Processor"}
        (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(image_config, indent=2) + "\n", encoding="utf-8")
        config = {"processor_class": "Blip2Processor"}
        if self.num_query_tokens is not None:
            config["num_query_tokens"] = self.num_query_tokens
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(directory)
        elif self.source_directory is not None and self.source_directory.resolve() != directory.resolve():
            for name in TOKENIZER_FILES:
                if (self.source_directory / name).is_file():
                    shutil.copy(self.source_directory / name, directory / name)

    def __repr__(self):
        return (f"Blip2Processor({self.image_processor!r}, tokenizer={type(self.tokenizer).__name__} "
                f"({len(self.tokenizer)} tokens, pads {self.tokenizer.padding_side}), "
                f"num_query_tokens={self.num_query_tokens})")  # fmt: skip

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt") -> ProcessorOutput:
        """images: one image or a list (see ImageProcessor); text: a prompt or a list, one per image.

        Returns "input_ids" and "attention_mask" (B, Q + T) when text is given (Q = 0 without images or without
        num_query_tokens) and "pixel_values" (B, 3, H, W) when images are. Images alone (captioning with no
        prompt) give pixel_values only: the model writes the image slots and BOS itself.
        padding: pad the prompts to the longest (the default here; the reference's default is False).
        return_tensors: "pt" (torch tensors) or None (input_ids and attention_mask as lists).
        The result is a dict with `.to(device, dtype)`; `model.generate(**inputs)` takes it as it is.
        """
        if images is None and text is None:
            raise ValueError("give images, text or both")
        check_padding(padding)  # here too: with images alone the tokenizer is not called
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        out = ProcessorOutput()
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            encoded = self.tokenizer(list(texts), padding=bool(padding), add_special_tokens=True)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            if images is not None and self.num_query_tokens is not None:
                # The prompts are already padded: the image slots go in front of the pads, outside the padding.
                slots = [self.image_token_id] * self.num_query_tokens
                input_ids = [slots + ids for ids in input_ids]  # (B, Q + T)
                attention_mask = [[1] * self.num_query_tokens + mask for mask in attention_mask]
            if return_tensors == "pt":
                if len({len(ids) for ids in input_ids}) > 1:
                    raise ValueError("prompts of different lengths: pass padding=True to return tensors")
                input_ids, attention_mask = torch.tensor(input_ids), torch.tensor(attention_mask)
            out["input_ids"], out["attention_mask"] = input_ids, attention_mask
        if images is not None:
            out["pixel_values"] = self.image_processor(images)["pixel_values"]
            if text is not None and len(out["pixel_values"]) != len(out["input_ids"]):
                raise ValueError(f"got {len(out['pixel_values'])} image(s) but {len(out['input_ids'])} prompt(s): "
                                 "give one prompt per image")  # fmt: skip
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """One sequence of ids (T,) -> text, without `<image>`, BOS/EOS and pads, and without surrounding spaces."""
        if _depth(ids) != 1:
            raise ValueError("decode takes one sequence (T,); use batch_decode for several (B, T), e.g. the output "
                             "of model.generate")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """(B, T) ids (a tensor or lists) -> B texts."""
        if _depth(sequences) != 2 and len(sequences) > 0:
            raise ValueError("batch_decode takes sequences (B, T); use decode for one sequence (T,)")
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]


def _depth(ids) -> int:
    """How deeply ids are nested: 1 for one sequence (a list or a 1-D tensor), 2 for a batch."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.ndim
    depth = 0
    while isinstance(ids, (list, tuple)):
        depth += 1
        if not ids:
            break
        ids = ids[0]
    return depth + (1 if isinstance(ids, (torch.Tensor, np.ndarray)) and ids.ndim else 0)
