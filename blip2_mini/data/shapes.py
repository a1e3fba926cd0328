"""Shapes: a synthetic image-text world small enough to pre-train a toy BLIP-2 on a 2-core CPU.

BLIP-2 is pre-trained on 129 M web image-text pairs. The toy reproduction replaces them with scenes of one to
three flat shapes whose every fact can be written down exactly, so that generated text can be *scored*, not
eyeballed. Everything here is deterministic from a seed and uses only NumPy, Pillow and torch.

The world
---------
A scene is drawn on an invisible 3x3 grid. Each shape sits in its own cell, and only the five "plus" cells are
used, so a shape's position word is never ambiguous and shapes never overlap:

        +--------+--------+--------+
        |        |  top   |        |
        +--------+--------+--------+
        |  left  | center | right  |
        +--------+--------+--------+
        |        | bottom |        |
        +--------+--------+--------+

Each shape has four attributes:

    kind      circle, square, triangle, cross                     (KINDS)
    colour    red, green, blue, yellow, purple, orange            (COLOURS; drawn with a little RGB jitter)
    size      small, large                                        (SIZES; about 15 % / 28 % of the image side)
    position  top, left, center, right, bottom                    (POSITIONS; jittered inside the cell)

The background is a neutral plain colour, a gentle gradient between two neutral tones, or either of those with
light Gaussian noise. Shape colours stay saturated (max - min channel >= ~107) and the background stays
unsaturated (<= ~63), so the pixels inside a shape always name its colour (the tests check the centre pixel).

Speed, on a 2-core CPU at 64 px: ~0.13 ms to draw a scene, ~0.3 ms to render it, so 10k items take ~4 s.
Render a split once (`ShapesDataset.images()`, a uint8 tensor: 10k x 3 x 64 x 64 = 123 MB) and reuse it.

Text
----
A caption lists the shapes in reading order of their cells (top, left, center, right, bottom), one phrase each:

    a small red circle on the left
    a large blue square at the top and a small green triangle in the center
    a small purple cross at the top, a large orange circle on the left and a small red square at the bottom

Questions use the prompt of BLIP-2's OPT models, "Question: {} Answer:", and every answer is one word:

    colour    Question: what colour is the circle? Answer: red
    kind      Question: what shape is on the left? Answer: triangle
    count     Question: how many shapes are there? Answer: two      (also "how many circles are there?")
    position  Question: where is the blue square? Answer: right
    size      Question: what size is the triangle? Answer: small

A shape is named by the first unambiguous description among "the circle", "the red circle", "the small
circle", "the circle on the left", "the small red circle" that does not contain the answer; a question is
asked only when such a description exists. The kind question names the shape by its position only.

Splits: what is held out
------------------------
Four (colour, kind) pairs never appear in the training split -- not in any image, caption or question:

    HELD_OUT_PAIRS = (red, square), (green, circle), (blue, triangle), (purple, cross)

Every colour and every kind still appears in training, just never in those combinations. The splits are

    train   scenes built only from the 20 other pairs
    val     the same distribution as train, independent scenes (in-distribution score)
    test    one shape of every scene has a held-out pair, the others any of the 24 pairs (compositional
            generalisation score)
    text    scenes over all 24 pairs whose *text* only the frozen language model reads; no image of this
            split is used for training

Why a `text` split: BLIP-2's OPT was trained on web text long before anyone paired it with images, and that
text names red squares too; what is held out is the *image-text* data. A toy LM that had never read "red
square" cannot write it, however well the Q-Former sees one: with an LM trained on training-split text only,
test-split caption kind accuracy was 60 % (val 82 %); with the text split added, 74 % (val 81 %), the same
ViT and stage 2. The held-out pairs still never reach the ViT, stage 1 or stage 2. `all_texts` (the text
the BPE vocabulary is learned from) is drawn from the training split.

Scoring generated text
----------------------
`parse_caption` reads a caption back into attribute dicts (the inverse of `caption`, tolerant of junk);
`caption_metrics` scores captions attribute by attribute; `vqa_accuracy` is normalised exact match.

    from blip2_mini.data import ShapesDataset, caption_metrics
    ds = ShapesDataset("train", n=10_000, seed=0, image_size=64)
    item = ds[0]          # {"image": PIL.Image, "caption": str, "qa": [(question, answer), ...], "scene": Scene}
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the world

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("top", "left", "center", "right", "bottom")  # reading order: captions list shapes in this order
NUMBERS = ("zero", "one", "two", "three")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

# Saturated, well separated RGB values (minimum pairwise distance ~80); each shape adds +-JITTER per channel.
PALETTE = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 30),
    "purple": (145, 50, 185),
    "orange": (245, 135, 15),
}
COLOUR_JITTER = 12

# Unsaturated tones for backgrounds: far from every PALETTE entry, so shapes always stand out.
BACKGROUND_TONES = (
    (245, 245, 245),  # near white
    (215, 215, 215),  # light grey
    (170, 170, 170),  # mid grey
    (75, 75, 75),  # dark grey
    (235, 228, 210),  # beige
    (210, 222, 232),  # pale blue-grey
    (222, 232, 214),  # pale green-grey
)
BACKGROUND_KINDS = ("plain", "gradient", "plain+noise", "gradient+noise")
NOISE_STD = 6.0  # in 0..255 units: "light" noise

# Cell centres (as fractions of the image side) of the five cells in use.
CELL = 1.0 / 3.0
CELL_CENTRES = {
    "top": (0.5, CELL / 2),
    "left": (CELL / 2, 0.5),
    "center": (0.5, 0.5),
    "right": (1 - CELL / 2, 0.5),
    "bottom": (0.5, 1 - CELL / 2),
}
# Half-extent of a shape's bounding box, as a fraction of the image side. A large shape nearly fills its cell
# (half a cell is 0.167); the margin keeps neighbouring shapes a pixel or two apart at 64 px.
HALF_EXTENT = {"small": 0.075, "large": 0.14}
CELL_MARGIN = 0.01

POSITION_PHRASES = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}

ALL_PAIRS = tuple((c, k) for c in COLOURS for k in KINDS)
HELD_OUT_PAIRS = (("red", "square"), ("green", "circle"), ("blue", "triangle"), ("purple", "cross"))
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
SPLITS = ("train", "val", "test", "text")

VQA_PROMPT = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt for OPT; the answer is the continuation


# ----------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    """One shape. Geometry is in fractions of the image side, so a scene renders at any size."""

    kind: str
    colour: str
    size: str
    position: str
    cx: float  # centre x in [0, 1]
    cy: float  # centre y in [0, 1]
    rgb: tuple[int, int, int]  # the exact fill: PALETTE[colour] plus jitter

    @property
    def attributes(self) -> dict[str, str]:
        """The four words a caption states about this shape (the format `parse_caption` returns)."""
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Background:
    kind: str  # one of BACKGROUND_KINDS
    tone_a: tuple[int, int, int]
    tone_b: tuple[int, int, int]  # end tone of a gradient (== tone_a for plain backgrounds)
    angle: float  # gradient direction in radians
    noise_seed: int  # picks the noise pattern, so rendering stays a pure function of the scene


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in caption order (POSITIONS order)
    background: Background

    @property
    def attributes(self) -> list[dict[str, str]]:
        return [s.attributes for s in self.shapes]


def make_scene(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]] = ALL_PAIRS,
    required_pairs: Sequence[tuple[str, str]] = (),
    n_shapes: int | None = None,
) -> Scene:
    """Draw a random scene of 1-3 shapes (uniform count unless `n_shapes` is given).

    Every shape's (colour, kind) comes from `pairs`; when `required_pairs` is non-empty, one randomly chosen
    shape takes its pair from `required_pairs` instead (used to build the held-out test split).
    """
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    cells = sorted(rng.permutation(len(POSITIONS))[:n].tolist())  # sorted: caption (reading) order
    required_slot = int(rng.integers(n)) if required_pairs else -1
    shapes = []
    for slot, cell in enumerate(cells):
        source = required_pairs if slot == required_slot else pairs
        colour, kind = source[int(rng.integers(len(source)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        position = POSITIONS[cell]
        slack = CELL / 2 - HALF_EXTENT[size] - CELL_MARGIN  # how far the centre may move inside its cell
        x0, y0 = CELL_CENTRES[position]
        dx, dy = rng.uniform(-slack, slack, size=2).tolist()
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3).tolist()
        rgb = tuple(_clip_byte(v + j) for v, j in zip(PALETTE[colour], jitter))
        shapes.append(Shape(kind, colour, size, position, float(x0 + dx), float(y0 + dy), rgb))

    bg_kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    tone_a = _jitter_tone(rng, BACKGROUND_TONES[int(rng.integers(len(BACKGROUND_TONES)))])
    if bg_kind.startswith("gradient"):
        # A *gentle* gradient: towards a tone at most 40 levels away, the same shift on every channel (neutral).
        shift = int(rng.integers(-40, 41))
        tone_b = tuple(_clip_byte(v + shift) for v in tone_a)
    else:
        tone_b = tone_a
    background = Background(bg_kind, tone_a, tone_b, float(rng.uniform(0, 2 * math.pi)), int(rng.integers(2**31)))
    return Scene(tuple(shapes), background)


def _jitter_tone(rng: np.random.Generator, tone: tuple[int, int, int]) -> tuple[int, int, int]:
    shift = int(rng.integers(-8, 9))  # the same shift on all channels keeps the tone unsaturated
    return tuple(_clip_byte(v + shift) for v in tone)


def _clip_byte(value: int) -> int:
    return min(max(int(value), 0), 255)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for item `index` of a split: random access, and independent streams per split."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_split_scene(split: str, seed: int, index: int) -> Scene:
    """Item `index` of a split (see the module docstring for what each split holds)."""
    rng = scene_rng(seed, split, index)
    if split == "test":
        return make_scene(rng, pairs=ALL_PAIRS, required_pairs=HELD_OUT_PAIRS)
    if split == "text":
        return make_scene(rng, pairs=ALL_PAIRS)
    return make_scene(rng, pairs=TRAIN_PAIRS)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image.

    Shapes are drawn at `supersample` times the size and box-filtered down, which anti-aliases their edges
    while leaving their interior pixels exactly `shape.rgb`.
    """
    big = size * supersample
    # The background is smooth, so it is made at the final size and blown up with nearest-neighbour: the box
    # filter then gives back exactly the same background pixels, at a fraction of the cost.
    image = _background(scene.background, size)
    if supersample > 1:
        image = image.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, big)
    if supersample > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    return image


def _background(bg: Background, side: int) -> Image.Image:
    if bg.kind == "plain":
        return Image.new("RGB", (side, side), bg.tone_a)
    if bg.kind.startswith("gradient"):
        coords = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5  # (side,) in [-0.5, 0.5]
        c, s = math.cos(bg.angle), math.sin(bg.angle)  # Python floats keep the arrays float32
        proj = c * coords[None, :] + s * coords[:, None]  # (side, side), within +-(|c| + |s|) / 2
        t = proj / (abs(c) + abs(s)) + 0.5  # (side, side) in [0, 1]: 0 -> tone_a, 1 -> tone_b
        a = np.array(bg.tone_a, np.float32)
        b = np.array(bg.tone_b, np.float32)
        pixels = a + t[..., None] * (b - a)  # (side, side, 3)
    else:
        pixels = np.array(bg.tone_a, np.float32)  # (3,), broadcast by the noise below
    if bg.kind.endswith("noise"):
        pixels = pixels + _noise(bg.noise_seed, side)  # (side, side, 3)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")  # +0.5: round, not floor


_NOISE_TILE_SIDE = 512
_noise_tile: np.ndarray | None = None


def _noise(noise_seed: int, side: int) -> np.ndarray:
    """(side, side, 3) Gaussian noise of std NOISE_STD: a window of one fixed tile, placed by the seed.

    Slicing a precomputed tile is much faster than drawing fresh normals for every image; neighbouring
    windows are shifted copies of each other, which does not matter for light noise on a background.
    """
    global _noise_tile
    if _noise_tile is None:
        tile_rng = np.random.default_rng(20240601)
        _noise_tile = NOISE_STD * tile_rng.standard_normal((_NOISE_TILE_SIDE, _NOISE_TILE_SIDE, 3), np.float32)
    if side > _NOISE_TILE_SIDE:
        reps = -(-side // _NOISE_TILE_SIDE)
        return np.tile(_noise_tile, (reps, reps, 1))[:side, :side]
    span = _NOISE_TILE_SIDE - side + 1
    oy, ox = divmod(noise_seed % (span * span), span)
    return _noise_tile[oy : oy + side, ox : ox + side]  # (side, side, 3), a view


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int) -> None:
    cx, cy = shape.cx * side, shape.cy * side
    r = HALF_EXTENT[shape.size] * side
    fill = shape.rgb
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        h = 0.85 * r  # a square of side 2r would look much bigger than the circle of radius r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.kind == "triangle":
        # Pointing up; the base sits below the centre so that (cx, cy) is well inside the triangle.
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.75 * r), (cx - r, cy + 0.75 * r)], fill=fill)
    elif shape.kind == "cross":
        w = 0.35 * r  # half the width of an arm
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]. Mean/std normalisation is the model's business."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


# ----------------------------------------------------------------------------------------------------------
# Text: captions and questions


def shape_phrase(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} {POSITION_PHRASES[shape.position]}"


def describe(shapes: Sequence[Shape]) -> str:
    """The shapes' phrases in the order given: "A", "A and B" or "A, B and C"."""
    phrases = [shape_phrase(s) for s in shapes]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The scene's one caption: its shapes described in reading order."""
    return describe(scene.shapes)


def _refer(scene: Scene, shape: Shape, asked: str) -> str | None:
    """The shortest noun phrase that picks out `shape` alone without using the attribute being `asked` about.

    Tried in order: "the circle", "the red circle", "the small circle", "the circle on the left",
    "the small red circle". Returns None when none of them is unique.
    """
    options = (("kind",), ("colour", "kind"), ("size", "kind"), ("kind", "position"), ("size", "colour", "kind"))
    for attrs in options:
        if asked in attrs:
            continue
        key = [getattr(shape, a) for a in attrs]
        matches = sum(1 for other in scene.shapes if [getattr(other, a) for a in attrs] == key)
        if matches == 1:
            words = [getattr(shape, a) for a in attrs if a != "position"]
            phrase = "the " + " ".join(words)
            if "position" in attrs:
                phrase += " " + POSITION_PHRASES[shape.position]
            return phrase
    return None


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every question asked about `scene`, as (question, one-word answer) pairs; see `vqa_prompt`.

    Per shape: its colour, its size and its position (when it can be named unambiguously without that
    attribute), and its kind by position ("what shape is on the left?"). Per scene: the number of shapes, the
    number of each kind present, and the number of one absent kind (answer "zero"; the kind that follows the
    last present kind in KINDS, so the question is deterministic).
    """
    qa = []
    for shape in scene.shapes:
        if (ref := _refer(scene, shape, "colour")) is not None:
            qa.append((f"what colour is {ref}?", shape.colour))
        qa.append((f"what shape is {POSITION_PHRASES[shape.position]}?", shape.kind))
        if (ref := _refer(scene, shape, "size")) is not None:
            qa.append((f"what size is {ref}?", shape.size))
        if (ref := _refer(scene, shape, "position")) is not None:
            qa.append((f"where is {ref}?", shape.position))
    qa.append(("how many shapes are there?", NUMBERS[len(scene.shapes)]))
    present = [k for k in KINDS if any(s.kind == k for s in scene.shapes)]
    for kind in present:
        count = sum(s.kind == kind for s in scene.shapes)
        qa.append((f"how many {PLURALS[kind]} are there?", NUMBERS[count]))
    absent = KINDS[(KINDS.index(present[-1]) + 1) % len(KINDS)] if present else KINDS[0]
    if absent not in present:
        qa.append((f"how many {PLURALS[absent]} are there?", "zero"))
    return qa


QUESTION_TYPES = {"what colour": "colour", "what shape": "kind", "how many": "count", "where is": "position",
                  "what size": "size"}


def question_type(question: str) -> str:
    """'colour', 'kind', 'count', 'position' or 'size' (accepts a bare question or a full VQA prompt)."""
    question = question.removeprefix("Question: ")
    for prefix, qtype in QUESTION_TYPES.items():
        if question.startswith(prefix):
            return qtype
    raise ValueError(f"not a Shapes question: {question!r}")


def vqa_prompt(question: str) -> str:
    """ "what colour is the circle?" -> "Question: what colour is the circle? Answer:" """
    return VQA_PROMPT.format(question)


def vqa_text(question: str, answer: str) -> str:
    """The training string: prompt plus answer as its continuation."""
    return f"{vqa_prompt(question)} {answer}"


# ----------------------------------------------------------------------------------------------------------
# Dataset


class ShapesDataset(torch.utils.data.Dataset):
    """`n` scenes of one split; item i is a pure function of (seed, split, i).

    Scenes (cheap) are drawn up front; images are rendered on access (about 0.1 ms each at 64 px). Items are
    dicts: image (PIL RGB, image_size x image_size), caption (str), qa (list of (question, answer)),
    scene (Scene). Use `collate` with a DataLoader, or `images()` to render the whole split into one tensor.
    """

    def __init__(self, split: str = "train", n: int = 10_000, seed: int = 0, image_size: int = 64):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.n, self.seed, self.image_size = split, n, seed, image_size
        self.scenes = [make_split_scene(split, seed, i) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        scene = self.scenes[index]
        return {
            "image": render(scene, self.image_size),
            "caption": caption(scene),
            "qa": questions(scene),
            "scene": scene,
        }

    def images(self) -> torch.Tensor:
        """All images as one uint8 tensor (n, 3, S, S): 10k images at 64 px is 123 MB."""
        out = np.empty((self.n, self.image_size, self.image_size, 3), np.uint8)
        for i, scene in enumerate(self.scenes):
            out[i] = np.asarray(render(scene, self.image_size))
        return torch.from_numpy(out).permute(0, 3, 1, 2)  # (n, 3, S, S), a view

    def captions(self) -> list[str]:
        return [caption(s) for s in self.scenes]


def collate(items: list[dict]) -> dict:
    """DataLoader collate_fn: images stacked to (B, 3, S, S) floats in [0, 1]; everything else as lists."""
    return {
        "image": torch.stack([image_to_tensor(it["image"]) for it in items]),
        "caption": [it["caption"] for it in items],
        "qa": [it["qa"] for it in items],
        "scene": [it["scene"] for it in items],
    }


def all_texts(n: int = 10_000, seed: int = 0) -> Iterator[str]:
    """Text for the tokenizer and the toy language model: for each of `n` training scenes, its caption and
    every VQA string ("Question: ... Answer: red"). Training split only, so no held-out pair is ever read."""
    for i in range(n):
        scene = make_split_scene("train", seed, i)
        yield caption(scene)
        for q, a in questions(scene):
            yield vqa_text(q, a)


def vocabulary() -> list[str]:
    """Every word the captions and questions can use (punctuation and the prompt words included)."""
    words = set(KINDS) | set(COLOURS) | set(SIZES) | set(POSITIONS) | set(NUMBERS)
    words |= set(PLURALS.values())
    words |= {"a", "and", "at", "the", "on", "in", "what", "colour", "shape", "size", "is", "where", "how", "many",
              "shapes", "are", "there", "Question", "Answer", ":", "?", ","}
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------
# Scoring generated text

_WORD_TO_ATTRIBUTE = {}
for _attr, _values in (("kind", KINDS), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS)):
    for _v in _values:
        _WORD_TO_ATTRIBUTE[_v] = (_attr, _v)
for _k, _plural in PLURALS.items():
    _WORD_TO_ATTRIBUTE[_plural] = ("kind", _k)
_WORD_TO_ATTRIBUTE.update({"centre": ("position", "center"), "middle": ("position", "center"),
                           "big": ("size", "large"), "little": ("size", "small")})
ATTRIBUTES = ("kind", "colour", "size", "position")


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Read a caption back into one dict {kind, colour, size, position} per shape mentioned.

    The inverse of `caption` for every caption it writes, and lenient otherwise: each kind word ("circle",
    "circles") opens a shape; the size and colour words seen since the previous shape are its size and colour;
    the first position word after it is its position. Other words are ignored, and an attribute that is not
    stated is None (it never counts as correct).
    """
    shapes: list[dict[str, str | None]] = []
    pending: dict[str, str] = {}  # size/colour words waiting for their noun
    for word in re.findall(r"[a-z]+", text.lower()):
        attr, value = _WORD_TO_ATTRIBUTE.get(word, (None, None))
        if attr == "kind":
            shapes.append({"kind": value, "colour": pending.get("colour"), "size": pending.get("size"),
                           "position": None})
            pending = {}
        elif attr in ("colour", "size"):
            pending[attr] = value
        elif attr == "position" and shapes and shapes[-1]["position"] is None:
            shapes[-1]["position"] = value
    return shapes


MAX_PREDICTED_SHAPES = 8  # longer predictions are cut before matching (keeps the brute-force matching small)


def _match(gold: list[dict], pred: list[dict]) -> list[dict | None]:
    """For each gold shape, the predicted shape paired with it (or None): the one-to-one pairing with the most
    agreeing attributes; ties go to the pairing that keeps the predicted order (first in enumeration)."""
    pred = pred[:MAX_PREDICTED_SHAPES]
    candidates = list(range(len(pred))) + [None] * len(gold)
    best, best_score = [None] * len(gold), -1
    for choice in itertools.permutations(candidates, len(gold)):
        score = sum(sum(g[a] == pred[j][a] for a in ATTRIBUTES) for g, j in zip(gold, choice) if j is not None)
        if score > best_score:
            best, best_score = [None if j is None else pred[j] for j in choice], score
    return best


def caption_metrics(predictions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Score generated captions against their scenes.

    Each prediction is parsed with `parse_caption`. Its shapes are paired one-to-one with the scene's shapes
    so that the number of agreeing attributes is maximal (order does not matter; unpaired scene shapes stay
    unpaired). Then, summed over all scene shapes of all scenes (micro average):

        kind_acc, colour_acc, size_acc, position_acc
            fraction of scene shapes whose paired predicted shape has the same value of that attribute
            (a scene shape with no partner counts as wrong on all four)
        count_acc
            fraction of predictions that mention exactly as many shapes as the scene has
        exact_match
            fraction of predictions whose parsed shapes equal the scene's shapes as a multiset: every
            attribute right, nothing missing, nothing extra (the order of the phrases is free)

    Extra predicted shapes cost only count_acc and exact_match.
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions for {len(scenes)} scenes")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    n_shapes = n_count = n_exact = 0
    for text, scene in zip(predictions, scenes):
        gold, pred = scene.attributes, parse_caption(text)
        for g, p in zip(gold, _match(gold, pred)):
            for a in ATTRIBUTES:
                correct[a] += p is not None and p[a] == g[a]
        n_shapes += len(gold)
        n_count += len(pred) == len(gold)
        n_exact += _as_multiset(pred) == _as_multiset(gold)
    n = max(len(scenes), 1)
    metrics = {"exact_match": n_exact / n}
    metrics.update({f"{a}_acc": correct[a] / max(n_shapes, 1) for a in ("colour", "kind", "size", "position")})
    metrics["count_acc"] = n_count / n
    return metrics


def _as_multiset(shapes: list[dict]) -> list[tuple]:
    return sorted(tuple(str(s[a]) for a in ATTRIBUTES) for s in shapes)


_DIGITS = {str(i): w for i, w in enumerate(NUMBERS)}
_SYNONYMS = {"centre": "center", "middle": "center", "big": "large", "little": "small", "color": "colour"}


def normalize_answer(text: str) -> str:
    """Lower-case; keep the first line; drop punctuation and the articles a/an/the; digits 0-3 as words;
    a few spelling synonyms (centre -> center, big -> large); collapse spaces."""
    text = text.strip().split("\n")[0].lower()
    words = re.findall(r"[a-z0-9]+", text)
    words = [_SYNONYMS.get(w, _DIGITS.get(w, w)) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_accuracy(pred_answers: Sequence[str], gold_answers: Sequence[str]) -> float:
    """Fraction of predictions equal to the gold answer after `normalize_answer` (so "Red." matches "red",
    but "red circle" does not)."""
    if len(pred_answers) != len(gold_answers):
        raise ValueError(f"{len(pred_answers)} predictions for {len(gold_answers)} answers")
    if not gold_answers:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(pred_answers, gold_answers))
    return hits / len(gold_answers)
