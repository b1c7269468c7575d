"""Pictures of what the model sees: numpy + PIL image grids, no plotting library.

`sample_figure` draws one row per sample: input, reconstruction, background,
predicted segmentation (`labels` if given, else the argmax of the compositing
weights), ground truth if given, every object layer (its colour times its mask on a checkerboard, framed in the
slot's colour) and, when the model sowed them, the attention maps as heatmaps with
their soft-argmax points. Slot i (0-based) is drawn everywhere in `palette()[i + 1]`,
the colour of label i + 1 in the segmentation; label 0 (background) is black.

Positions `xy` are in [-1, 1] with the spatial transformer's convention
(align_corners=False): -1 is the left / top edge of the image, +1 the right /
bottom edge.
"""

import colorsys
import os

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image, ImageDraw, ImageFont

# Hand-picked, well separated colours for labels 1..20; label 0 (background) is black.
_BASE_COLORS = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
# Anchors of the heatmap colour ramp (dark purple -> red -> orange -> pale yellow).
_HEAT_ANCHORS = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
    np.float32,
)
_GAP = 4  # pixels between tiles
_BORDER = 3  # width of the slot-colour frame around layer and attention tiles
_MIN_TILE = 128  # small images are upscaled by an integer factor to at least this side
_GAP_COLOR = (255, 255, 255)
_REQUIRED = (
    "image",
    "reconstruction",
    "background",
    "weights",
    "layers",
    "masks",
    "xy",
)


def palette(num_colors: int) -> UInt8[np.ndarray, "n 3"]:
    """`num_colors` distinct RGB colours; colour 0 is black (background).

    The colour of a label never depends on `num_colors`; beyond the 21 fixed colours
    further ones are spread around the hue circle by the golden angle.
    """
    if num_colors < 0:
        raise ValueError(f"num_colors must be >= 0, got {num_colors}.")
    colors = list(_BASE_COLORS[:num_colors])
    for i in range(len(_BASE_COLORS), num_colors):
        hue = (i * 0.618033988749895) % 1.0
        value = 0.95 if i % 2 else 0.75
        colors.append(
            tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.8, value))
        )
    return np.array(colors, np.uint8).reshape(num_colors, 3)


def colorize(
    labels: Int[np.ndarray, "... h w"], num_colors: int | None = None
) -> UInt8[np.ndarray, "... h w 3"]:
    """Maps integer labels to the colours of `palette` (label 0 = black).

    Args:
      labels: integer label map(s), any leading axes.
      num_colors: number of labels the palette must cover; defaults to max label + 1.

    Returns:
      uint8 RGB image(s) of shape labels.shape + (3,).
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must be integers, got dtype {labels.dtype}.")
    top = int(labels.max()) if labels.size else -1
    if labels.size and labels.min() < 0:
        raise ValueError(f"`labels` must be >= 0, got min {labels.min()}.")
    if num_colors is None:
        num_colors = top + 1
    if top >= num_colors:
        raise ValueError(f"label {top} does not fit into num_colors={num_colors}.")
    return palette(max(num_colors, 1))[labels]


def to_uint8(image: np.ndarray) -> UInt8[np.ndarray, "..."]:
    """Float images in [0, 1] (clipped) or uint8 images to uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def overlay(
    image: Float[np.ndarray, "... h w 3"],
    labels: Int[np.ndarray, "... h w"],
    alpha: float = 0.5,
    num_colors: int | None = None,
) -> UInt8[np.ndarray, "... h w 3"]:
    """Blends label colours over an image; background (label 0) pixels stay as they are.

    Args:
      image: RGB image(s), float in [0, 1] or uint8.
      labels: integer label map(s) with the image's leading shape.
      alpha: opacity of the label colours on foreground pixels.
      num_colors: passed to `colorize`.

    Returns:
      uint8 RGB image(s) with the image's shape.
    """
    image = to_uint8(image)
    labels = np.asarray(labels)
    if image.shape[-1] != 3 or image.shape[:-1] != labels.shape:
        raise ValueError(
            f"overlay needs image [..., h, w, 3] and labels [..., h, w], got "
            f"{image.shape} and {labels.shape}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    colors = colorize(labels, num_colors).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    out = np.where(labels[..., None] > 0, blended, image.astype(np.float32))
    return np.round(out).astype(np.uint8)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes an image array as PNG, creating missing parent folders.

    Args:
      path: destination file.
      array: [h, w, 3] or [h, w] (grey), uint8 or float in [0, 1].
    """
    array = to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"save_png needs an [h, w], [h, w, 3] or [h, w, 4] array, got {array.shape}."
        )
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def heatmap(values: Float[np.ndarray, "h w"]) -> UInt8[np.ndarray, "h w 3"]:
    """Colours a map normalised by its maximum with a dark-to-bright heat ramp."""
    values = np.asarray(values, np.float32)
    top = float(values.max()) if values.size else 0.0
    scaled = values / top if top > 0 else np.zeros_like(values)
    pos = np.clip(scaled, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.minimum(np.floor(pos).astype(np.int32), len(_HEAT_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    rgb = (1 - frac) * _HEAT_ANCHORS[low] + frac * _HEAT_ANCHORS[low + 1]
    return np.round(rgb).astype(np.uint8)


def _checkerboard(h: int, w: int, cell: int) -> UInt8[np.ndarray, "h w 3"]:
    ys, xs = np.mgrid[:h, :w]
    light = ((ys // cell + xs // cell) % 2) == 0
    return np.where(light[..., None], np.uint8(200), np.uint8(150)).repeat(3, -1)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of the two leading axes."""
    if factor == 1:
        return image
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _resize(values: Float[np.ndarray, "h w"], hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width)."""
    if values.shape == hw:
        return values.astype(np.float32)
    resized = Image.fromarray(values.astype(np.float32)).resize(
        (hw[1], hw[0]), resample=Image.BILINEAR
    )
    return np.asarray(resized, np.float32)


def _frame(tile: np.ndarray, color: np.ndarray) -> np.ndarray:
    tile = tile.copy()
    tile[:_BORDER], tile[-_BORDER:] = color, color
    tile[:, :_BORDER], tile[:, -_BORDER:] = color, color
    return tile


def _to_pixel(xy: np.ndarray, hw: tuple[int, int]) -> tuple[float, float]:
    """[-1, 1] position (align_corners=False) to (column, row) pixel coordinates."""
    h, w = hw
    return (float(xy[0]) + 1.0) * 0.5 * w - 0.5, (float(xy[1]) + 1.0) * 0.5 * h - 0.5


def _mark(
    tile: np.ndarray, points: list[tuple[np.ndarray, str, tuple[int, ...]]]
) -> np.ndarray:
    """Draws markers ("cross" or "dot") at [-1, 1] positions on an image tile."""
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    h, w = tile.shape[:2]
    r = max(3, min(h, w) // 24)
    for xy, kind, color in points:
        if not np.all(np.isfinite(xy)):
            continue
        x, y = _to_pixel(xy, (h, w))
        if kind == "cross":
            for dx, dy in ((r, r), (r, -r)):
                draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=(0, 0, 0), width=4)
                draw.line(
                    [(x - dx, y - dy), (x + dx, y + dy)], fill=tuple(color), width=2
                )
        else:
            draw.ellipse(
                [(x - r, y - r), (x + r, y + r)],
                fill=tuple(color),
                outline=(0, 0, 0),
                width=2,
            )
    return np.asarray(img)


def _check_sample(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [key for key in _REQUIRED if key not in sample]
    if missing:
        raise ValueError(
            f"sample is missing required key(s) {missing}; it has {sorted(sample)}."
        )
    arrays = {key: np.asarray(value) for key, value in sample.items()}
    image = arrays["image"]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"sample['image'] must be [b, h, w, 3], got {image.shape}.")
    b, h, w, _ = image.shape
    k = arrays["layers"].shape[1] if arrays["layers"].ndim == 5 else -1
    expected = {
        "reconstruction": (b, h, w, 3),
        "background": (b, h, w, 3),
        "weights": (b, k + 1, h, w),
        "layers": (b, k, h, w, 3),
        "masks": (b, k, h, w),
        "xy": (b, k, 2),
        "xy_pooled": (b, k, 2),
        "segmentation": (b, h, w),
        "labels": (b, h, w),
    }
    for key, shape in expected.items():
        if key in arrays and arrays[key].shape != shape:
            raise ValueError(
                f"sample[{key!r}] has shape {arrays[key].shape}, expected {shape} "
                f"(from image {image.shape} and layers {arrays['layers'].shape})."
            )
    if "attention" in arrays:
        att = arrays["attention"]
        if att.ndim != 4 or att.shape[0] != b or att.shape[-1] != k:
            raise ValueError(
                f"sample['attention'] must be [b, h', w', k] = [{b}, h', w', {k}], "
                f"got {att.shape}."
            )
    for key in ("segmentation", "labels"):
        if key in arrays and not np.issubdtype(arrays[key].dtype, np.integer):
            raise ValueError(f"sample[{key!r}] must hold integer labels.")
    return arrays


def sample_tiles(
    sample: dict[str, np.ndarray], max_samples: int = 6
) -> tuple[list[str], list[list[UInt8[np.ndarray, "H W 3"]]]]:
    """The tiles of `sample_figure`: column titles and one list of tiles per sample.

    Args:
      sample: numpy arrays with the batch axis first (see `sample_figure`).
      max_samples: at most this many samples (the first ones) are drawn.

    Returns:
      (titles, rows): one title per column and, per sample, uint8 tiles of equal size
      [H, W, 3], H = h * s and W = w * s with the integer upscale factor s.
    """
    arrays = _check_sample(sample)
    b, h, w, _ = arrays["image"].shape
    k = arrays["layers"].shape[1]
    n = max(0, min(b, max_samples))
    scale = max(1, -(-_MIN_TILE // max(h, w)))
    tile_hw = (h * scale, w * scale)
    colors = palette(k + 1)
    checker = _checkerboard(*tile_hw, cell=max(4, 4 * scale))
    has_gt = "segmentation" in arrays
    predicted = (
        arrays["labels"] if "labels" in arrays else np.argmax(arrays["weights"], axis=1)
    )
    has_att = "attention" in arrays

    titles = ["input", "reconstruction", "background", "segmentation"]
    if has_gt:
        titles.append("ground truth")
    titles += [f"slot {i + 1}" for i in range(k)]
    if has_att:
        titles += [f"attention {i + 1}" for i in range(k)]

    def up(array: np.ndarray) -> np.ndarray:
        return _upscale(array, scale)

    rows = []
    for j in range(n):
        row = [
            up(to_uint8(arrays["image"][j])),
            up(to_uint8(arrays["reconstruction"][j])),
            up(to_uint8(arrays["background"][j])),
            up(colors[predicted[j]]),
        ]
        if has_gt:
            gt = arrays["segmentation"][j]
            row.append(up(colorize(gt, max(k + 1, int(gt.max()) + 1))))
        for i in range(k):
            mask = up(np.clip(arrays["masks"][j, i], 0.0, 1.0)[..., None])
            layer = up(np.clip(arrays["layers"][j, i], 0.0, 1.0) * 255.0)
            tile = mask * layer + (1.0 - mask) * checker
            tile = _frame(np.round(tile).astype(np.uint8), colors[i + 1])
            if not has_att:
                tile = _mark(tile, [(arrays["xy"][j, i], "dot", colors[i + 1])])
            row.append(tile)
        if has_att:
            att = arrays["attention"][j].astype(np.float32)
            gray = up(to_uint8(arrays["image"][j]).mean(-1, keepdims=True))
            for i in range(k):
                heat = heatmap(_resize(att[..., i], tile_hw)).astype(np.float32)
                tile = np.round(0.7 * heat + 0.3 * gray).astype(np.uint8)
                tile = _frame(tile, colors[i + 1])
                points = []
                if "xy_pooled" in arrays:
                    points.append((arrays["xy_pooled"][j, i], "cross", (255, 255, 255)))
                points.append((arrays["xy"][j, i], "dot", colors[i + 1]))
                row.append(_mark(tile, points))
        rows.append(row)
    return titles, rows


def sample_figure(
    sample: dict[str, np.ndarray], max_samples: int = 6
) -> UInt8[np.ndarray, "H W 3"]:
    """One figure with a row per sample showing everything the model produced.

    Columns: input, reconstruction, background, predicted segmentation (`labels`, or the
    argmax of `weights` without them; label colours of `palette`), ground truth (if `segmentation` is
    given), one tile per object layer (layer colour x mask on a checkerboard,
    framed in the slot colour) and, if `attention` is given, one heatmap per slot
    (upsampled to the image size, normalised by its maximum) with the soft-argmax
    point before the transformer (`xy_pooled`, white cross) and the final position
    (`xy`, dot in the slot colour). Without attention maps the final position is
    marked on the layer tiles. Images smaller than 128 pixels are upscaled by an
    integer factor.

    Args:
      sample: numpy arrays with the batch axis first. Required: `image`,
        `reconstruction`, `background` [b, h, w, 3] in [0, 1]; `weights`
        [b, k+1, h, w]; `layers` [b, k, h, w, 3]; `masks` [b, k, h, w]; `xy`
        [b, k, 2]. Optional: `attention` [b, h', w', k], `xy_pooled` [b, k, 2],
        `segmentation` [b, h, w] ground-truth labels, `labels` [b, h, w] the predicted
        labels (`compositing.segment`).
      max_samples: at most this many rows (the first samples).

    Returns:
      uint8 [H, W, 3] figure with a one-line header of column titles.
    """
    titles, rows = sample_tiles(sample, max_samples)
    _, h, w, _ = np.asarray(sample["image"]).shape
    scale = max(1, -(-_MIN_TILE // max(h, w)))
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    header = 16
    cols = len(titles)
    width = cols * tw + (cols + 1) * _GAP
    height = header + len(rows) * (th + _GAP) + _GAP
    canvas = np.full((height, width, 3), _GAP_COLOR, np.uint8)
    for r, row in enumerate(rows):
        y = header + _GAP + r * (th + _GAP)
        for c, tile in enumerate(row):
            x = _GAP + c * (tw + _GAP)
            canvas[y : y + th, x : x + tw] = tile
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for c, title in enumerate(titles):
        draw.text((_GAP + c * (tw + _GAP) + 2, 2), title, fill=(0, 0, 0), font=font)
    return np.asarray(img).copy()
