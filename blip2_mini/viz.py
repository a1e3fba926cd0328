"""Small drawing helpers for the notebooks: grids of images, heatmaps, attention overlays, masks, bar charts.

Pillow and NumPy only (no matplotlib), and every function returns a PIL image, which a notebook displays
by itself. Arrays may be NumPy arrays, CPU torch tensors or nested lists.

    image_grid(images, cols, labels)        images side by side, in rows, with a caption under each
    heatmap(values)                         a 2-D array as coloured cells (viridis by default)
    overlay_heatmap(image, values, alpha)   a patch grid of values (e.g. attention over 16 x 16 patches) laid
                                            over the image: each value colours the pixels of its patch
    draw_patch_grid(image, patch_size)      the ViT's patch boundaries drawn on the image
    mask_grid(masks, labels, split)         boolean attention masks ("row may attend to column") as cell grids
    bar_chart(values, labels, title)        horizontal bars, e.g. the top-k next-token probabilities

Colours: a colormap is a list of anchor colours spread evenly over [0, 1], with straight-line interpolation
in RGB between neighbours. Viridis is given by its colours at every eighth of the range, so its ends are
exact: (68, 1, 84) for the lowest value, (253, 231, 37) for the highest; between anchors it is a close
approximation of the full 256-entry table, which is all a picture of attention needs.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORMAPS = {
    # viridis at 0, 1/8, ..., 1 (#440154 #472D7B #3B528B #2C728E #21908C #27AD81 #5DC863 #AADC32 #FDE725)
    "viridis": [(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 144, 140), (39, 173, 129),
                (93, 200, 99), (170, 220, 50), (253, 231, 37)],  # fmt: skip
    "gray": [(0, 0, 0), (255, 255, 255)],
    # blue (low) - white - red (high): for signed values such as differences
    "coolwarm": [(59, 76, 192), (221, 221, 221), (180, 4, 38)],
}
WHITE, BLACK, INK = (255, 255, 255), (0, 0, 0), (40, 40, 40)
MASK_ALLOWED, MASK_BLOCKED, MASK_SPLIT = (49, 104, 142), (235, 235, 235), (214, 39, 40)
BAR_COLOR = (49, 104, 142)


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()  # the old fixed bitmap font


FONT = _font()


# ---- colours ------------------------------------------------------------------------------------------------


def apply_colormap(t: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Values in [0, 1], any shape (...) -> uint8 colours (..., 3)."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colormap {cmap!r}: use one of {', '.join(COLORMAPS)}")
    anchors = np.array(COLORMAPS[cmap], dtype=np.float64)  # (n, 3)
    t = np.asarray(t, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError("apply_colormap: values contain NaN or infinite values")
    position = np.clip(t, 0, 1) * (len(anchors) - 1)  # (...) in [0, n - 1]
    left = np.minimum(np.floor(position).astype(int), len(anchors) - 2)  # the anchor at or below
    frac = (position - left)[..., None]  # (..., 1) how far towards the next anchor
    return np.round((1 - frac) * anchors[left] + frac * anchors[left + 1]).astype(np.uint8)


def _as_array(values) -> np.ndarray:
    """NumPy arrays, nested lists and torch tensors (any float dtype, on any device, with or without gradients:
    an attention map of a bf16 model on a GPU) -> a float64 NumPy array."""
    if hasattr(values, "detach"):  # a torch tensor; torch itself is not imported for the notebooks' sake
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _as_2d(values, name: str = "values") -> np.ndarray:
    array = _as_array(values)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def normalize(values: np.ndarray, vmin=None, vmax=None) -> np.ndarray:
    """Map [vmin, vmax] (default: the array's own range) to [0, 1]; a constant array maps to 0."""
    given = [float(v) for v in (vmin, vmax) if v is not None]
    if not all(np.isfinite(given)):
        raise ValueError(f"vmin and vmax must be finite numbers, got {vmin} and {vmax}")
    if vmin is not None and vmax is not None and float(vmin) > float(vmax):
        raise ValueError(f"vmin {float(vmin)} is above vmax {float(vmax)}")
    vmin = float(values.min()) if vmin is None else float(vmin)
    vmax = float(values.max()) if vmax is None else float(vmax)
    if vmax <= vmin:
        return np.zeros_like(values)
    return np.clip((values - vmin) / (vmax - vmin), 0, 1)


def _to_rgb(image) -> Image.Image:
    """A PIL image or uint8 array -> RGB; transparency laid on white."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if "A" in image.getbands() or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE + (255,))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=FONT) <= width:
        return text
    while text and draw.textlength(text + "…", font=FONT) > width:
        text = text[:-1]
    return text + "…"


def _text_height() -> int:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=FONT)
    return bottom + 2


# ---- the helpers --------------------------------------------------------------------------------------------


def image_grid(images, cols: int | None = None, labels=None, pad: int = 4, background=WHITE) -> Image.Image:
    """Images in rows of `cols` (default: all in one row, at most 6), each in a cell as large as the largest
    image, its top-left corner at the cell's; `labels` are written under the images."""
    images = [_to_rgb(image) for image in images]
    if not images:
        raise ValueError("image_grid: no images")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid: {len(labels)} labels for {len(images)} images")
    cols = min(len(images), 6) if cols is None else cols
    if cols < 1:
        raise ValueError(f"image_grid: cols must be at least 1, got {cols}")
    rows = -(-len(images) // cols)  # ceiling division
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    label_h = _text_height() if labels is not None else 0
    canvas = Image.new("RGB", (pad + cols * (cell_w + pad), pad + rows * (cell_h + label_h + pad)), background)
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (cell_h + label_h + pad)
        canvas.paste(image, (x, y))
        if labels is not None:
            draw.text((x, y + cell_h + 1), _fit_text(draw, str(labels[i]), cell_w), fill=INK, font=FONT)
    return canvas


def _cell_size(shape, size: int | None) -> int:
    """Whole pixels per cell so that the longer side is about `size` (256 by default), at least 1."""
    if size is not None and size < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")
    return max(1, (256 if size is None else size) // max(shape))


def heatmap(values, cmap: str = "viridis", size: int | None = None, vmin=None, vmax=None) -> Image.Image:
    """A 2-D array (h, w) -> an image of h x w square cells, each coloured by its value.

    size: about the longer side in pixels (rounded down to whole cells; default 256). The colours span
    [vmin, vmax], by default the array's own range.
    """
    array = _as_2d(values)
    colours = apply_colormap(normalize(array, vmin, vmax), cmap)  # (h, w, 3)
    cell = _cell_size(array.shape, size)
    return Image.fromarray(colours.repeat(cell, axis=0).repeat(cell, axis=1))  # (h * cell, w * cell, 3)


def overlay_heatmap(image, values, alpha: float = 0.5, cmap: str = "viridis", size: int | None = None,
                    vmin=None, vmax=None) -> Image.Image:  # fmt: skip
    """Lay a grid of values (h, w) over the image: cell (i, j) colours the pixels of patch (i, j).

    Each pixel becomes round((1 - alpha) * image + alpha * colour). The grid is stretched over the whole image
    (nearest neighbour, so each patch keeps one flat colour); for a ViT pass the (g, g) values of the g x g
    patches of the resized image. size: resize the image first so that its longer side is `size` pixels.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay_heatmap: alpha must be in [0, 1], got {alpha}")
    image = _to_rgb(image)
    if size is not None:
        if size < 1:
            raise ValueError(f"overlay_heatmap: size must be at least 1 pixel, got {size}")
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)  # fmt: skip
    array = _as_2d(values)
    colours = Image.fromarray(apply_colormap(normalize(array, vmin, vmax), cmap))  # (h, w) pixels
    colours = np.asarray(colours.resize(image.size, Image.Resampling.NEAREST), dtype=np.float64)  # (H, W, 3)
    blended = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colours
    return Image.fromarray(np.round(blended).astype(np.uint8))


def draw_patch_grid(image, patch_size: int, color=WHITE, scale: int = 1) -> Image.Image:
    """The image (enlarged `scale` times, nearest neighbour) with a 1-pixel line on every boundary between
    patches: the line takes the first row / column of pixels of each patch after the first."""
    if patch_size < 1 or scale < 1:
        raise ValueError(f"draw_patch_grid: patch_size and scale must be at least 1, got {patch_size}, {scale}")
    image = _to_rgb(image)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    pixels = np.array(image)  # (H, W, 3), a copy to draw on
    step = patch_size * scale
    pixels[step::step, :] = color  # horizontal lines
    pixels[:, step::step] = color  # vertical lines
    return Image.fromarray(pixels)


def _mask_panel(mask: np.ndarray, cell: int, split, row_labels, col_labels) -> Image.Image:
    """One (R, C) mask: cells of `cell` px (a 1 px white gap on their right and bottom), labels around it."""
    R, C = mask.shape
    colours = np.round((1 - mask[..., None]) * np.array(MASK_BLOCKED) + mask[..., None] * np.array(MASK_ALLOWED))
    grid = np.full((R * cell, C * cell, 3), 255, dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            grid[r * cell:(r + 1) * cell - 1, c * cell:(c + 1) * cell - 1] = colours[r, c]
    if split is not None:  # a red line on the boundary between rows/columns split-1 and split (queries | text)
        grid[split * cell - 1, :] = MASK_SPLIT
        grid[:, split * cell - 1] = MASK_SPLIT
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max((probe.textlength(str(t), font=FONT) for t in row_labels), default=0)) + 4 if row_labels else 0
    top = int(max((probe.textlength(str(t), font=FONT) for t in col_labels), default=0)) + 4 if col_labels else 0
    panel = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), WHITE)
    panel.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(panel)
    th = _text_height()
    for r, text in enumerate(row_labels or []):
        draw.text((0, top + r * cell + (cell - th) // 2), str(text), fill=INK, font=FONT)
    for c, text in enumerate(col_labels or []):  # written sideways: draw horizontally, then rotate
        w = int(probe.textlength(str(text), font=FONT)) + 2
        strip = Image.new("RGB", (w, th), WHITE)
        ImageDraw.Draw(strip).text((0, 0), str(text), fill=INK, font=FONT)
        strip = strip.rotate(90, expand=True)  # reads bottom to top
        panel.paste(strip, (left + c * cell + (cell - th) // 2, top - 2 - strip.height))
    return panel


def mask_grid(masks, labels=None, split: int | None = None, row_labels=None, col_labels=None,
              cell: int = 14) -> Image.Image:  # fmt: skip
    """Attention masks as grids: row r, column c is dark blue when position r may attend to position c,
    light grey when it may not (values between 0 and 1 are shaded in between).

    masks: one (R, C) mask or a list of them (boolean, or numbers in [0, 1]; an additive mask of 0 / -inf
    must be turned into `mask == 0` first). labels: a caption per mask. split: draw a red line before
    row and column `split` (e.g. Q, between the queries and the text). row_labels / col_labels: token names.
    """
    if cell < 3:
        raise ValueError(f"mask_grid: cell must be at least 3 pixels, got {cell}")
    single = not isinstance(masks, (list, tuple)) and np.asarray(masks).ndim == 2
    masks = [masks] if single else list(masks)  # a list, or a stack (N, R, C)
    arrays = []
    for i, mask in enumerate(masks):
        array = _as_2d(np.asarray(mask, dtype=np.float64), f"mask {i}")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"mask {i}: values must be booleans or lie in [0, 1], got [{array.min()}, {array.max()}] "
                             "(for an additive mask pass mask == 0)")  # fmt: skip
        if split is not None and not 0 < split < min(array.shape):
            raise ValueError(f"mask {i}: split must be between 1 and {min(array.shape) - 1}, got {split}")
        for what, names, n in (("row_labels", row_labels, array.shape[0]), ("col_labels", col_labels, array.shape[1])):
            if names is not None and len(names) != n:
                raise ValueError(f"mask {i}: {len(names)} {what} for {n} {what.split('_')[0]}s")
        arrays.append(array)
    panels = [_mask_panel(a, cell, split, row_labels, col_labels) for a in arrays]
    if single and labels is None:
        return panels[0]
    return image_grid(panels, cols=len(panels), labels=labels, pad=8)


def bar_chart(values, labels=None, title: str | None = None, width: int = 320, vmax: float | None = None,
              bar_height: int = 16, color=BAR_COLOR) -> Image.Image:  # fmt: skip
    """Horizontal bars, one per value, top to bottom, labels on the left and the value on the right.

    A bar is round(value / vmax * bar area width) pixels long; vmax defaults to the largest value (pass 1.0 to
    draw probabilities on an absolute scale). Values must be >= 0.
    """
    values = _as_array(values)
    if values.ndim > 1:
        raise ValueError(f"bar_chart: one value per bar (a 1-D array), got shape {values.shape}")
    values = values.reshape(-1)
    if values.size == 0:
        raise ValueError("bar_chart: no values")
    if vmax is not None and not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"bar_chart: vmax must be a positive number, got {vmax}")
    if not np.isfinite(values).all() or values.min() < 0:
        raise ValueError(f"bar_chart: values must be finite and >= 0, got [{values.min()}, {values.max()}]")
    labels = [str(t) for t in labels] if labels is not None else [str(i) for i in range(len(values))]
    if len(labels) != len(values):
        raise ValueError(f"bar_chart: {len(labels)} labels for {len(values)} values")
    vmax = float(values.max()) if vmax is None else float(vmax)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = min(int(max(probe.textlength(t, font=FONT) for t in labels)) + 6, width // 3)
    value_w = int(probe.textlength("0.000", font=FONT)) + 6
    area = width - label_w - value_w  # pixels for a bar of length vmax
    if area < 10:
        raise ValueError(f"bar_chart: width {width} leaves no room for the bars")
    title_h = _text_height() + 4 if title else 0
    gap = 4
    chart = Image.new("RGB", (width, title_h + len(values) * (bar_height + gap) + gap), WHITE)
    draw = ImageDraw.Draw(chart)
    if title:
        draw.text((2, 2), _fit_text(draw, title, width - 4), fill=INK, font=FONT)
    th = _text_height()
    for i, (value, label) in enumerate(zip(values, labels)):
        y = title_h + gap + i * (bar_height + gap)
        length = int(round(min(value, vmax) / vmax * area)) if vmax > 0 else 0
        if length:
            chart.paste(color, (label_w, y, label_w + length, y + bar_height))  # box: right and bottom excluded
        text_y = y + (bar_height - th) // 2
        draw.text((2, text_y), _fit_text(draw, label, label_w - 6), fill=INK, font=FONT)
        draw.text((label_w + length + 3, text_y), f"{value:.3g}", fill=INK, font=FONT)
    return chart
