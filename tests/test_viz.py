"""viz.py: the drawings' actual pixels (colormap values worked out by hand, blending arithmetic, line and cell
positions, bar lengths), not just their sizes."""

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_mini import viz

VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)  # viridis' published end colours


def pixel(image: Image.Image, x: int, y: int) -> tuple:
    return tuple(int(v) for v in image.getpixel((x, y)))


# ---- colormaps -----------------------------------------------------------------------------------------------------


def test_colormap_values():
    t = np.array([0.0, 1.0, 0.125, 0.2, -3.0, 7.0])
    colours = viz.apply_colormap(t, "viridis")
    assert tuple(colours[0]) == VIRIDIS_LOW and tuple(colours[1]) == VIRIDIS_HIGH
    assert tuple(colours[2]) == (71, 45, 123)  # an anchor (viridis at 1/8, #472D7B)
    # 0.2 lies 0.6 of the way from the 1/8 anchor (71, 45, 123) to the 2/8 one (59, 82, 139):
    # (71*0.4 + 59*0.6, 45*0.4 + 82*0.6, 123*0.4 + 139*0.6) = (63.8, 67.2, 132.6)
    assert tuple(colours[3]) == (64, 67, 133)
    assert tuple(colours[4]) == VIRIDIS_LOW and tuple(colours[5]) == VIRIDIS_HIGH  # clipped
    assert viz.apply_colormap(np.array([0.0, 0.25, 1.0]), "gray").tolist() == [[0] * 3, [64] * 3, [255] * 3]
    with pytest.raises(ValueError, match="unknown colormap 'jet'"):
        viz.apply_colormap(t, "jet")


# ---- heatmap -------------------------------------------------------------------------------------------------------


def test_heatmap_cells():
    values = np.arange(6.0).reshape(2, 3)  # 0..5: cell (0, 1) is 1/5 = 0.2 of the range
    image = viz.heatmap(values, size=60)  # 60 // 3 = 20 px per cell
    assert image.size == (60, 40)
    assert pixel(image, 0, 0) == pixel(image, 19, 19) == VIRIDIS_LOW
    assert pixel(image, 59, 39) == pixel(image, 40, 20) == VIRIDIS_HIGH
    assert pixel(image, 20, 0) == pixel(image, 39, 19) == (64, 67, 133)  # 0.2, as in test_colormap_values


def test_heatmap_range_and_inputs():
    values = torch.tensor([[0.0, 0.5], [1.0, 2.0]])  # a tensor is fine
    image = viz.heatmap(values, size=2, vmin=0, vmax=1, cmap="gray")  # 1 px per cell; 2.0 is clipped to 1
    assert [pixel(image, x, y)[0] for y in range(2) for x in range(2)] == [0, 128, 255, 255]
    assert np.all(np.asarray(viz.heatmap(np.full((3, 3), 7.0))) == VIRIDIS_LOW)  # a constant array is all "low"
    assert viz.heatmap(np.zeros((4, 2))).size == (128, 256)  # default: longer side 256


@pytest.mark.parametrize(("values", "message"), [(np.zeros(5), "2-D"), (np.zeros((0, 3)), "2-D"),
                                                 (np.array([[0, np.nan]]), "NaN")])  # fmt: skip
def test_heatmap_errors(values, message):
    with pytest.raises(ValueError, match=message):
        viz.heatmap(values)


def test_maps_from_a_bf16_model_or_with_gradients_are_drawn():
    values = torch.tensor([[0.0, 0.5], [1.0, 2.0]])
    want = np.asarray(viz.heatmap(values))
    assert np.array_equal(np.asarray(viz.heatmap(values.bfloat16())), want)  # 0, .5, 1, 2 are exact in bf16
    assert np.array_equal(np.asarray(viz.heatmap(values.clone().requires_grad_())), want)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: viz.apply_colormap(np.array([np.nan, 0.5])), "NaN or infinite"),
    (lambda: viz.heatmap(np.ones((2, 2)), vmin=np.nan), "vmin and vmax must be finite"),
    (lambda: viz.heatmap(np.ones((2, 2)), vmin=1, vmax=0), "vmin 1.0 is above vmax 0.0"),
    (lambda: viz.heatmap(np.ones((2, 2)), size=0), "size must be at least 1"),
    (lambda: viz.bar_chart([1, 2], vmax=float("nan")), "vmax must be a positive number"),
    (lambda: viz.bar_chart([1, 2], vmax=0), "vmax must be a positive number"),
    (lambda: viz.bar_chart([[1, 2]]), "one value per bar"),
], ids=["colormap-nan", "vmin-nan", "vmin-above-vmax", "size-0", "bar-vmax-nan", "bar-vmax-0", "bar-2d"])
def test_arguments_that_would_draw_nothing_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- overlay -------------------------------------------------------------------------------------------------------


def test_overlay_blends_each_patch():
    image = Image.new("RGB", (4, 4), (100, 150, 200))
    values = np.array([[0.0, 1.0], [1.0, 0.0]])  # each value covers a 2 x 2 patch
    out = viz.overlay_heatmap(image, values, alpha=0.25)
    # round(0.75 * image + 0.25 * colour):
    # low (68, 1, 84) -> (92, 112.75, 171); high (253, 231, 37) -> (138.25, 170.25, 159.25)
    low, high = (92, 113, 171), (138, 170, 159)
    assert [pixel(out, x, 0) for x in range(4)] == [low, low, high, high]
    assert [pixel(out, x, 3) for x in range(4)] == [high, high, low, low]
    assert viz.overlay_heatmap(image, values, alpha=0.0).tobytes() == image.tobytes()
    assert pixel(viz.overlay_heatmap(image, values, alpha=1.0), 3, 0) == VIRIDIS_HIGH


def test_overlay_resizes_and_checks_alpha():
    out = viz.overlay_heatmap(Image.new("RGB", (224, 112)), np.random.rand(16, 16), size=128)
    assert out.size == (128, 64)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        viz.overlay_heatmap(Image.new("RGB", (4, 4)), np.zeros((2, 2)), alpha=1.5)


# ---- patch grid ----------------------------------------------------------------------------------------------------


def test_patch_grid_lines():
    image = Image.new("RGB", (8, 6), (90, 90, 90))
    out = viz.draw_patch_grid(image, 2, color=(255, 0, 0))
    red, grey = (255, 0, 0), (90, 90, 90)
    assert [pixel(out, x, 1) for x in range(8)] == [grey, grey, red, grey, red, grey, red, grey]
    assert [pixel(out, 1, y) for y in range(6)] == [grey, grey, red, grey, red, grey]
    scaled = viz.draw_patch_grid(image, 2, color=(255, 0, 0), scale=2)  # 16 x 12, lines every 4 px
    assert scaled.size == (16, 12)
    assert [x for x in range(16) if pixel(scaled, x, 1) == red] == [4, 8, 12]
    with pytest.raises(ValueError, match="at least 1"):
        viz.draw_patch_grid(image, 0)


# ---- image grid ----------------------------------------------------------------------------------------------------


def test_image_grid_places_images():
    red, blue = Image.new("RGB", (3, 2), (255, 0, 0)), Image.new("RGB", (2, 4), (0, 0, 255))
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    grid = viz.image_grid([red, blue, transparent], cols=2, pad=4)  # cells 3 x 4, 2 columns, 2 rows
    assert grid.size == (4 + 2 * (3 + 4), 4 + 2 * (4 + 4))
    assert pixel(grid, 4, 4) == pixel(grid, 6, 5) == (255, 0, 0)  # red at the first cell's corner
    assert pixel(grid, 4, 6) == (255, 255, 255)  # below the 2-px-high red image: background
    assert pixel(grid, 11, 4) == pixel(grid, 12, 7) == (0, 0, 255)  # second cell starts at 4 + 3 + 4
    assert pixel(grid, 4, 12) == (255, 255, 255)  # transparent -> white


def test_image_grid_labels_are_drawn():
    images = [Image.new("RGB", (40, 10), (255, 255, 255))] * 2
    plain, labelled = viz.image_grid(images), viz.image_grid(images, labels=["dog", "cat"])
    assert labelled.height > plain.height
    below = np.asarray(labelled)[4 + 10:, 4:44]  # the strip under the first image
    assert (below.min(axis=-1) < 128).any()  # some ink


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(images=[]), "no images"),
    (dict(images=[Image.new("RGB", (2, 2))], labels=["a", "b"]), "2 labels for 1"),
    (dict(images=[Image.new("RGB", (2, 2))], cols=0), "cols must be"),
], ids=["empty", "labels", "cols"])  # fmt: skip
def test_image_grid_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.image_grid(**kwargs)


# ---- masks ---------------------------------------------------------------------------------------------------------


def test_mask_grid_cells():
    mask = np.array([[1.0, 0.0], [0.2, 1.0]])
    image = viz.mask_grid(mask, cell=10)  # 2 x 2 cells of 9 px + a 1 px white gap
    assert image.size == (20, 20)
    assert pixel(image, 2, 2) == pixel(image, 18, 18) == viz.MASK_ALLOWED
    assert pixel(image, 12, 2) == viz.MASK_BLOCKED
    # 0.2 of the way from blocked (235, 235, 235) to allowed (49, 104, 142): (197.8, 208.8, 216.4)
    assert pixel(image, 2, 12) == (198, 209, 216)
    assert pixel(image, 9, 2) == pixel(image, 2, 9) == (255, 255, 255)  # the gaps


def test_mask_grid_split_labels_and_panels():
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))  # a boolean tensor, as qformer.stage1_attention_mask
    image = viz.mask_grid(allowed, split=1, cell=10)
    assert pixel(image, 9, 25) == pixel(image, 25, 9) == viz.MASK_SPLIT  # after row/column 0
    named = viz.mask_grid(allowed, row_labels=["q0", "a", "b"], col_labels=["q0", "a", "b"], cell=10)
    assert named.width > 30 and named.height > 30  # room for the labels on the left and on top
    assert pixel(named, named.width - 3, named.height - 3) == viz.MASK_ALLOWED  # cell (2, 2) stays bottom-right
    assert pixel(named, named.width - 3, named.height - 23) == viz.MASK_BLOCKED  # cell (0, 2)
    panels = viz.mask_grid([allowed.numpy(), ~allowed.numpy()], labels=["causal", "its complement"], cell=10)
    assert panels.width >= 2 * 30 + 8


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(masks=np.array([[0.0, -np.inf]])), "NaN or infinite"),
    (dict(masks=np.array([[0.0, -10000.0]])), "pass mask == 0"),
    (dict(masks=np.ones((3, 3)), split=3), "split must be between 1 and 2"),
    (dict(masks=np.ones((3, 3)), row_labels=["a"]), "1 row_labels for 3 rows"),
    (dict(masks=np.ones(3)), "2-D"),
    (dict(masks=np.ones((3, 3)), cell=2), "cell must be at least 3"),
], ids=["inf", "additive", "split", "labels", "1d", "cell"])  # fmt: skip
def test_mask_grid_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.mask_grid(**kwargs)


# ---- bar chart -----------------------------------------------------------------------------------------------------


def bar_lengths(chart: Image.Image) -> list[tuple[int, int]]:
    """(first x, length) of each run of bar-coloured pixels, top to bottom, one per bar."""
    pixels = np.asarray(chart)
    is_bar = (pixels == np.array(viz.BAR_COLOR)).all(axis=-1)  # (H, W)
    rows = [y for y in range(len(is_bar)) if is_bar[y].any()]
    bars, seen = [], set()
    for y in rows:
        xs = np.flatnonzero(is_bar[y])
        if (y - 1) not in seen:  # the first row of a bar
            bars.append((int(xs[0]), len(xs)))
        seen.add(y)
    return bars


def test_bar_chart_lengths():
    chart = viz.bar_chart([1.0, 0.5, 0.25, 0.0], labels=["a", "b", "c", "d"], bar_height=12)
    (x0, full), (x1, half), (x2, quarter) = bar_lengths(chart)  # the 0.0 bar draws nothing
    assert x0 == x1 == x2  # all bars start after the label column
    assert half == round(full / 2) and quarter == round(full / 4)
    absolute = viz.bar_chart([1.0, 0.5, 0.0, 0.0], labels=["a", "b", "c", "d"], vmax=2.0)  # on a fixed scale
    (_, a), (_, b) = bar_lengths(absolute)
    assert a == round(full / 2) and b == round(full / 4)
    assert np.asarray(chart)[:, : x0 - 1].min() < 128  # labels were written on the left


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(values=[]), "no values"),
    (dict(values=[0.5, -0.1]), ">= 0"),
    (dict(values=[float("nan")]), "finite"),
    (dict(values=[0.5], labels=["a", "b"]), "2 labels for 1"),
], ids=["empty", "negative", "nan", "labels"])  # fmt: skip
def test_bar_chart_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.bar_chart(**kwargs)
