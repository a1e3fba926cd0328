"""The Shapes world (blip2_mini/data): determinism, the held-out split, captions <-> attributes, questions,
rendering and the text metrics. Fast (a few seconds), no transformers."""

import re
import time

import numpy as np
import pytest
import torch

from blip2_mini.data import (
    ALL_PAIRS,
    COLOURS,
    HELD_OUT_PAIRS,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    TRAIN_PAIRS,
    Background,
    Scene,
    Shape,
    ShapesDataset,
    all_texts,
    caption,
    caption_metrics,
    collate,
    make_scene,
    make_split_scene,
    normalize_answer,
    parse_caption,
    question_type,
    questions,
    render,
    vocabulary,
    vqa_accuracy,
    vqa_prompt,
)
from blip2_mini.data.shapes import CELL_CENTRES, HALF_EXTENT


def random_scenes(n, seed=0):
    """Scenes from the full distribution (every pair allowed), one to three shapes."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n)]


def pairs_of(scene):
    return {(s.colour, s.kind) for s in scene.shapes}


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_same_data():
    a = ShapesDataset("train", n=50, seed=3, image_size=64)
    b = ShapesDataset("train", n=50, seed=3, image_size=64)
    assert torch.equal(a.images(), b.images())
    assert a.captions() == b.captions()
    assert [a[i]["qa"] for i in range(50)] == [b[i]["qa"] for i in range(50)]
    assert list(all_texts(20, seed=3)) == list(all_texts(20, seed=3))


def test_items_are_random_access_and_seeds_differ():
    ds = ShapesDataset("val", n=30, seed=1)
    assert ds.scenes[17] == make_split_scene("val", 1, 17)  # item i does not depend on the items before it
    assert np.array_equal(np.asarray(ds[17]["image"]), np.asarray(render(make_split_scene("val", 1, 17), 64)))
    other = ShapesDataset("val", n=30, seed=2)
    assert ds.captions() != other.captions()
    train = ShapesDataset("train", n=30, seed=1)
    assert ds.captions() != train.captions()  # splits use independent streams


# --- splits -----------------------------------------------------------------------------------------------


def test_held_out_pairs_never_reach_training():
    assert len(HELD_OUT_PAIRS) == 4 and set(HELD_OUT_PAIRS) <= set(ALL_PAIRS)
    assert set(TRAIN_PAIRS) | set(HELD_OUT_PAIRS) == set(ALL_PAIRS)
    train = ShapesDataset("train", n=3000, seed=0)
    val = ShapesDataset("val", n=500, seed=0)
    for scene in train.scenes + val.scenes:
        assert not pairs_of(scene) & set(HELD_OUT_PAIRS), scene
    # ...and every colour, every kind and every allowed pair is still seen in training.
    seen = set().union(*(pairs_of(s) for s in train.scenes))
    assert seen == set(TRAIN_PAIRS)
    # The tokenizer's texts never name a held-out pair either.
    held_out_phrases = [f"{c} {k}" for c, k in HELD_OUT_PAIRS]
    for text in all_texts(1000, seed=0):
        assert not any(p in text for p in held_out_phrases), text
    # Only the language model's `text` split does (as OPT's web text does), with every pair about equally often.
    text = ShapesDataset("text", n=3000, seed=0)
    counts = {pair: 0 for pair in ALL_PAIRS}
    for scene in text.scenes:
        for shape in scene.shapes:
            counts[(shape.colour, shape.kind)] += 1
    assert min(counts.values()) > 0.7 * max(counts.values()), counts
    assert text.captions() != train.captions()[:3000]


def test_every_test_scene_has_a_held_out_pair():
    test = ShapesDataset("test", n=1000, seed=0)
    assert all(pairs_of(s) & set(HELD_OUT_PAIRS) for s in test.scenes)
    seen = set().union(*(pairs_of(s) for s in test.scenes))
    assert set(HELD_OUT_PAIRS) <= seen
    assert {len(s.shapes) for s in test.scenes} == {1, 2, 3}


# --- scenes and captions ----------------------------------------------------------------------------------


def test_scene_layout():
    for scene in random_scenes(500):
        positions = [s.position for s in scene.shapes]
        assert 1 <= len(positions) <= 3
        assert positions == sorted(positions, key=POSITIONS.index)  # caption (reading) order, one per cell
        assert len(set(positions)) == len(positions)
        for s in scene.shapes:
            x0, y0 = CELL_CENTRES[s.position]  # the shape's box stays inside its own cell
            assert abs(s.cx - x0) + HALF_EXTENT[s.size] < 1 / 6 and abs(s.cy - y0) + HALF_EXTENT[s.size] < 1 / 6


def test_caption_examples():
    bg = Background("plain", (200, 200, 200), (200, 200, 200), 0.0, 0)
    one = Scene((Shape("circle", "red", "small", "left", 1 / 6, 0.5, PALETTE["red"]),), bg)
    assert caption(one) == "a small red circle on the left"
    two = Scene((Shape("square", "blue", "large", "top", 0.5, 1 / 6, PALETTE["blue"]),
                 Shape("triangle", "green", "small", "center", 0.5, 0.5, PALETTE["green"])), bg)
    assert caption(two) == "a large blue square at the top and a small green triangle in the center"
    three = Scene(two.shapes + (Shape("cross", "yellow", "small", "bottom", 0.5, 5 / 6, PALETTE["yellow"]),), bg)
    assert caption(three) == ("a large blue square at the top, a small green triangle in the center and "
                              "a small yellow cross at the bottom")


def test_parse_caption_inverts_caption():
    scenes = random_scenes(1000, seed=1)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}
    for scene in scenes:
        assert parse_caption(caption(scene)) == scene.attributes


def test_parse_caption_tolerates_junk():
    assert parse_caption("") == []
    assert parse_caption("the the of </s> ???") == []
    assert parse_caption("A Small RED circle, on the LEFT!!") == [
        {"kind": "circle", "colour": "red", "size": "small", "position": "left"}]
    # missing attributes are None; a dangling adjective with no noun is dropped; plurals are read.
    assert parse_caption("circle and a big blue") == [
        {"kind": "circle", "colour": None, "size": None, "position": None}]
    assert parse_caption("two green crosses in the middle right") == [
        {"kind": "cross", "colour": "green", "size": None, "position": "center"}]


# --- questions --------------------------------------------------------------------------------------------


def resolve(phrase, scene):
    """The scene shapes that a referring phrase ("the red circle on the left") describes."""
    (stated,) = parse_caption(phrase)
    return [s for s in scene.shapes if all(v is None or s.attributes[a] == v for a, v in stated.items())]


def test_questions_are_answerable_and_right():
    counts = {"colour": 0, "kind": 0, "count": 0, "position": 0, "size": 0}
    for scene in random_scenes(500, seed=2):
        qa = questions(scene)
        assert len({q for q, _ in qa}) == len(qa)  # no question asked twice
        for q, a in qa:
            qtype = question_type(q)
            counts[qtype] += 1
            assert len(a.split()) == 1
            if qtype == "count":
                m = re.fullmatch(r"how many (\w+) are there\?", q)
                noun = m.group(1)
                expected = len(scene.shapes) if noun == "shapes" else len(resolve(noun, scene))
                assert a == ("zero", "one", "two", "three")[expected], (q, a, scene)
                continue
            if qtype == "kind":  # "what shape is on the left?": named by position alone
                (where,) = [p for p in POSITIONS if q.endswith(f" {p}?") or q.endswith(f" {p}er?")]
                targets = [s for s in scene.shapes if s.position == where]
            else:  # "what colour is the circle on the left?": named by a phrase that leaves the answer out
                phrase = re.sub(r"^(what colour is|what size is|where is) ", "", q)
                assert parse_caption(phrase)[0][qtype] is None, q  # the question does not give its answer away
                targets = resolve(phrase, scene)
            assert len(targets) == 1, (q, scene)  # the phrase names exactly one shape
            assert a == targets[0].attributes[qtype], (q, a, scene)
    assert all(n > 100 for n in counts.values()), counts


def test_question_format():
    assert vqa_prompt("what colour is the circle?") == "Question: what colour is the circle? Answer:"
    assert question_type("Question: how many shapes are there? Answer:") == "count"
    texts = list(all_texts(50, seed=0))
    assert any(t.startswith("Question: what colour is") and t.endswith(tuple(COLOURS)) for t in texts)
    words = set(vocabulary())
    for t in texts:
        assert set(re.findall(r"[A-Za-z]+|[?:,]", t)) <= words, t


# --- rendering --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [56, 64])
def test_centre_pixel_has_the_shape_colour(size):
    palette = np.array([PALETTE[c] for c in COLOURS], np.float32)
    for scene in random_scenes(300, seed=size):
        pixels = np.asarray(render(scene, size))
        assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
        for s in scene.shapes:
            rgb = pixels[int(s.cy * size), int(s.cx * size)]
            assert tuple(int(v) for v in rgb) == s.rgb, (s, rgb)
            nearest = COLOURS[int(np.argmin(((palette - rgb) ** 2).sum(1)))]
            assert nearest == s.colour
            assert int(rgb.max()) - int(rgb.min()) > 100  # shapes are saturated...
        # ...the background is not (the image corners never hold a shape).
        for y, x in ((0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)):
            assert int(pixels[y, x].max()) - int(pixels[y, x].min()) < 80, pixels[y, x]


def test_large_shapes_look_larger():
    bg = Background("plain", (240, 240, 240), (240, 240, 240), 0.0, 0)
    for kind in KINDS:
        areas = {}
        for size in SIZES:
            scene = Scene((Shape(kind, "blue", size, "center", 0.5, 0.5, PALETTE["blue"]),), bg)
            areas[size] = int((np.asarray(render(scene, 64))[..., 0] < 200).sum())
        assert areas["large"] > 2.5 * areas["small"] > 0, (kind, areas)


def test_dataset_items_and_collate():
    ds = ShapesDataset("train", n=8, seed=0, image_size=56)
    item = ds[0]
    assert set(item) == {"image", "caption", "qa", "scene"}
    assert item["image"].size == (56, 56) and item["caption"] == caption(item["scene"])
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 56, 56) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    images = ds.images()
    assert images.shape == (8, 3, 56, 56) and images.dtype == torch.uint8
    assert torch.allclose(batch["image"], images[:4].float() / 255)
    with pytest.raises(ValueError):
        ShapesDataset("dev", n=1)


def test_generation_is_fast():
    start = time.perf_counter()
    ShapesDataset("train", n=1000, seed=0, image_size=64).images()
    assert time.perf_counter() - start < 5.0  # ~0.5 s on a 2-core CPU: 10k images take seconds


# --- metrics ----------------------------------------------------------------------------------------------


def scene_of(*shapes):
    bg = Background("plain", (200, 200, 200), (200, 200, 200), 0.0, 0)
    return Scene(tuple(Shape(k, c, s, p, *CELL_CENTRES[p], PALETTE[c]) for s, c, k, p in shapes), bg)


def test_caption_metrics_hand_computed():
    scenes = [
        scene_of(("small", "red", "circle", "left"), ("large", "blue", "square", "right")),
        scene_of(("large", "yellow", "triangle", "top"),),
        scene_of(("small", "green", "cross", "top"), ("small", "purple", "circle", "center"),
                 ("large", "orange", "square", "bottom")),
        scene_of(("large", "green", "triangle", "left"), ("small", "blue", "cross", "right")),
    ]
    predictions = [
        # one colour wrong -> kind 2/2, colour 1/2, size 2/2, position 2/2; count right; not exact
        "a small red circle on the left and a large green square on the right",
        # the gold shape is right, plus an extra shape -> all 1/1; count wrong; not exact
        "a large yellow triangle at the top and a small red circle on the left",
        # junk -> 0/3 everywhere; count wrong
        "the the </s> of",
        # right shapes in the other order -> all 2/2; count right; exact
        "a small blue cross on the right and a large green triangle on the left",
    ]
    m = caption_metrics(predictions, scenes)
    # gold shapes: 2 + 1 + 3 + 2 = 8
    assert m == pytest.approx({
        "exact_match": 1 / 4,
        "kind_acc": (2 + 1 + 0 + 2) / 8,
        "colour_acc": (1 + 1 + 0 + 2) / 8,
        "size_acc": (2 + 1 + 0 + 2) / 8,
        "position_acc": (2 + 1 + 0 + 2) / 8,
        "count_acc": 2 / 4,
    })


def test_caption_metrics_pairs_shapes_by_agreement():
    scene = scene_of(("small", "red", "circle", "left"), ("large", "blue", "square", "right"))
    # The first gold shape is missing; the square must still be credited to the square, not to the circle.
    m = caption_metrics(["a large blue square on the right"], [scene])
    assert m == pytest.approx({"exact_match": 0.0, "kind_acc": 0.5, "colour_acc": 0.5, "size_acc": 0.5,
                               "position_acc": 0.5, "count_acc": 0.0})
    # Missing attributes count as wrong: kind and position right, colour and size unknown.
    m = caption_metrics(["a circle on the left and a square on the right"], [scene])
    assert (m["kind_acc"], m["position_acc"], m["colour_acc"], m["size_acc"]) == (1.0, 1.0, 0.0, 0.0)
    assert m["count_acc"] == 1.0 and m["exact_match"] == 0.0


def test_caption_metrics_perfect_on_gold_captions():
    scenes = random_scenes(200, seed=5)
    m = caption_metrics([caption(s) for s in scenes], scenes)
    assert m == {"exact_match": 1.0, "colour_acc": 1.0, "kind_acc": 1.0, "size_acc": 1.0, "position_acc": 1.0,
                 "count_acc": 1.0}
    with pytest.raises(ValueError):
        caption_metrics(["a red circle"], scenes)


def test_vqa_accuracy():
    assert normalize_answer(" The Red.\nQuestion: ...") == "red"
    assert normalize_answer("2") == "two" and normalize_answer("centre") == "center"
    preds = ["red", "Red.", "a circle", "red circle", "3", "left side", ""]
    gold = ["red", "red", "circle", "red", "three", "left", "left"]
    assert vqa_accuracy(preds, gold) == pytest.approx(4 / 7)
    assert vqa_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy(["red"], [])
