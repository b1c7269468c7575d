"""Vectorised NumPy generator of synthetic multi-object scenes (no TensorFlow needed).

A scene holds M..N opaque 2-D objects (M = `min_objects`, 1 unless asked) painted back to front over a smooth colour-gradient background
(random per scene, or one fixed backdrop shared by every scene). Each
object has one of several shape kinds, a saturated random colour that keeps a minimum RGB distance from every
colour of the background gradient and from the objects painted before it, a random size (14-30 % of the image
side), position and rotation. Scenes in which an object keeps fewer than `min_visible` visible pixels after
occlusion are redrawn, so every object of a scene is visible and the label map has the values 0..num_objects,
where label j is the j-th object in depth order (1 = farthest back).

The textured variant fills objects and background with stripes, checks or value noise, and adds a little pixel
noise to the background.

Everything is drawn from one `numpy.random.Generator` seeded with `seed`, so `generate(num, seed, ...)` is
deterministic. Scenes are rendered in chunks of images with array operations over [chunk, N, h, w].

Example:
    >>> from datasets.shapes import generator
    >>> scenes = generator.generate(8, seed=0, image_size=64, max_objects=4)
    >>> scenes["image"].shape, scenes["segmentation"].max() <= 4
    ((8, 64, 64, 3), True)
"""

from collections.abc import Sequence

import numpy as np

SHAPE_NAMES = ("square", "circle", "triangle", "diamond", "ellipse", "cross")
TEXTURE_NAMES = ("flat", "stripes", "checks", "noise")

# Object radius range (half extent) as a fraction of the image side: diameters of 14 % to 30 %.
_MIN_RADIUS = 0.07
_MAX_RADIUS = 0.15
# Minimum RGB distance (colours in [0, 1]) from the background gradient and from earlier objects.
_MIN_BG_DISTANCE = 0.45
_MIN_OBJECT_DISTANCE = 0.3
# The backdrop of `fixed_background` scenes: a blue-grey gradient from the top row to the bottom row.
FIXED_BACKGROUND = np.array([[0.62, 0.64, 0.68], [0.36, 0.38, 0.42]], np.float32)
# Candidate colours drawn per object; the first one meeting the distances is kept.
_COLOUR_CANDIDATES = 48


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Converts [..., 3] HSV values in [0, 1] to RGB in [0, 1]."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _segment_distance(
    points: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Distance from points [..., 3] to the RGB segments start-end [..., 3] (broadcast)."""
    direction = end - start
    length2 = np.maximum(np.sum(direction**2, axis=-1, keepdims=True), 1e-12)
    t = np.clip(
        np.sum((points - start) * direction, axis=-1, keepdims=True) / length2, 0, 1
    )
    return np.linalg.norm(points - (start + t * direction), axis=-1)


def _pattern(
    kind: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    frequency: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """Texture values in [0, 1] for texture kinds (indices into TEXTURE_NAMES).

    Args:
      kind: int [...] texture kind, broadcastable against u.
      u, v: float [..., h, w] pattern coordinates in pixels (already rotated).
      frequency: float [...] spatial frequency in cycles per pixel.
      noise: float [..., h, w] smooth noise in [0, 1].

    Returns:
      float32 [..., h, w] in [0, 1]; 0 for the flat kind.
    """
    f = frequency[..., None, None]
    stripes = (np.sin(2 * np.pi * f * u) > 0).astype(np.float32)
    checks = ((np.sin(2 * np.pi * f * u) > 0) ^ (np.sin(2 * np.pi * f * v) > 0)).astype(
        np.float32
    )
    kind = kind[..., None, None]
    out = np.where(kind == 1, stripes, 0.0)
    out = np.where(kind == 2, checks, out)
    return np.where(kind == 3, noise, out).astype(np.float32)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple, size: int, cells: int
) -> np.ndarray:
    """Value noise in [0, 1]: a random [cells, cells] grid bilinearly upsampled to [size, size]."""
    grid = rng.random(shape + (cells + 1, cells + 1), dtype=np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    rows = grid[..., i0, :] * (1 - frac)[:, None] + grid[..., i0 + 1, :] * frac[:, None]
    return rows[..., i0] * (1 - frac) + rows[..., i0 + 1] * frac


def _shape_masks(
    kind: np.ndarray, u: np.ndarray, v: np.ndarray, aspect: np.ndarray
) -> np.ndarray:
    """Inside-tests for each shape kind in normalised object coordinates.

    Args:
      kind: int [c, n] shape index into SHAPE_NAMES.
      u, v: float [c, n, h, w] pixel coordinates relative to the object centre, rotated and divided by the
        radius (the shape's circumscribed extent is about 1).
      aspect: float [c, n] minor/major axis ratio of ellipses.

    Returns:
      bool [c, n, h, w].
    """
    au, av = np.abs(u), np.abs(v)
    square = np.maximum(au, av) <= 0.8
    circle = u**2 + v**2 <= 1.0
    # Equilateral triangle with circumradius 1.15 (inradius 0.575), apex up.
    c30, s30 = np.cos(np.pi / 6), 0.5
    tri = (-v <= 0.575) & (c30 * u + s30 * v <= 0.575) & (-c30 * u + s30 * v <= 0.575)
    diamond = au + av <= 1.05
    ellipse = u**2 + (v / aspect[..., None, None]) ** 2 <= 1.0
    cross = ((au <= 1.0) & (av <= 0.36)) | ((au <= 0.36) & (av <= 1.0))
    kind = kind[..., None, None]
    out = np.zeros(u.shape, dtype=bool)
    for index, mask in enumerate((square, circle, tri, diamond, ellipse, cross)):
        out |= (kind == index) & mask
    return out


def _draw_colours(
    rng: np.random.Generator, bg_start: np.ndarray, bg_end: np.ndarray, max_objects: int
) -> np.ndarray:
    """Object colours [c, n, 3] far enough from the background gradient and from earlier objects."""
    chunk = bg_start.shape[0]
    colours = np.zeros((chunk, max_objects, 3), np.float32)
    for k in range(max_objects):
        hsv = np.stack(
            [
                rng.random((chunk, _COLOUR_CANDIDATES)),
                rng.uniform(0.55, 1.0, (chunk, _COLOUR_CANDIDATES)),
                rng.uniform(0.55, 1.0, (chunk, _COLOUR_CANDIDATES)),
            ],
            axis=-1,
        )
        candidates = _hsv_to_rgb(hsv)  # [c, m, 3]
        score = (
            _segment_distance(candidates, bg_start[:, None], bg_end[:, None])
            / _MIN_BG_DISTANCE
        )
        if k > 0:
            dist = np.linalg.norm(
                candidates[:, :, None] - colours[:, None, :k], axis=-1
            )
            score = np.minimum(score, dist.min(axis=-1) / _MIN_OBJECT_DISTANCE)
        ok = score >= 1.0
        # First candidate meeting both distances, or the best one if none does.
        choice = np.where(ok.any(axis=1), ok.argmax(axis=1), score.argmax(axis=1))
        colours[:, k] = candidates[np.arange(chunk), choice]
    return colours


def _render_chunk(
    rng: np.random.Generator,
    chunk: int,
    size: int,
    max_objects: int,
    textured: bool,
    min_visible: int,
    fixed_background: bool = False,
    min_objects: int = 1,
) -> dict[str, np.ndarray]:
    """Renders `chunk` scenes; returns float images, labels, metadata and a per-scene `ok` flag."""
    n = max_objects
    num_objects = rng.integers(min_objects, n + 1, size=chunk)
    active = np.arange(n)[None, :] < num_objects[:, None]  # [c, n]

    # Background: linear gradient between two muted colours along a random direction.
    bg_hsv = np.stack(
        [
            rng.random((chunk, 2)),
            rng.uniform(0.0, 0.45, (chunk, 2)),
            rng.uniform(0.15, 0.85, (chunk, 2)),
        ],
        axis=-1,
    )
    bg_colours = _hsv_to_rgb(bg_hsv).astype(np.float32)  # [c, 2, 3]
    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = coords[:, None], coords[None, :]  # [h, 1], [1, w]
    angle = rng.uniform(0, 2 * np.pi, chunk).astype(np.float32)
    if fixed_background:
        # Drawn above all the same, so the other draws do not depend on this choice.
        bg_colours = np.broadcast_to(FIXED_BACKGROUND, bg_colours.shape).copy()
        angle = np.full_like(angle, np.pi / 2)
    bg_start, bg_end = bg_colours[:, 0], bg_colours[:, 1]
    proj = np.cos(angle)[:, None, None] * (xs - size / 2) + np.sin(angle)[
        :, None, None
    ] * (ys - size / 2)  # [c, h, w]
    lo = proj.min(axis=(1, 2), keepdims=True)
    hi = proj.max(axis=(1, 2), keepdims=True)
    t = (proj - lo) / np.maximum(hi - lo, 1e-6)
    image = bg_start[:, None, None] + t[..., None] * (bg_end - bg_start)[:, None, None]

    if textured:
        bg_kind = rng.integers(1, len(TEXTURE_NAMES), chunk)
        bg_freq = rng.uniform(1 / 12, 1 / 5, chunk).astype(np.float32) * 64 / size
        bg_rot = rng.uniform(0, np.pi, chunk).astype(np.float32)
        bu = np.cos(bg_rot)[:, None, None] * xs + np.sin(bg_rot)[:, None, None] * ys
        bv = -np.sin(bg_rot)[:, None, None] * xs + np.cos(bg_rot)[:, None, None] * ys
        bg_noise = _smooth_noise(rng, (chunk,), size, 12)
        pattern = _pattern(bg_kind, bu, bv, bg_freq, bg_noise)
        image = image * (1.0 - 0.3 * pattern[..., None])
        image = image + rng.normal(0, 0.02, image.shape).astype(np.float32)

    # Objects: kind, radius, rotation, aspect, centre fully inside the image.
    kind = rng.integers(0, len(SHAPE_NAMES), (chunk, n))
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS, (chunk, n)).astype(np.float32) * size
    rotation = rng.uniform(0, 2 * np.pi, (chunk, n)).astype(np.float32)
    aspect = rng.uniform(0.45, 0.7, (chunk, n)).astype(np.float32)
    centre = rng.uniform(radius, size - radius).astype(np.float32)  # x
    centre = np.stack(
        [centre, rng.uniform(radius, size - radius).astype(np.float32)], axis=-1
    )
    colours = _draw_colours(rng, bg_start, bg_end, n)

    # Rasterise each object on a [p, p] patch around its centre, then paint the patches back to front into a
    # canvas padded by p on every side (so no patch index leaves it). Object k covers objects 0..k-1.
    p = int(np.ceil(2 * 1.15 * _MAX_RADIUS * size)) + 2
    origin = (
        np.floor(centre).astype(np.int64) - p // 2
    )  # [c, n, 2] (x, y) of the patch's first pixel
    local = np.arange(p, dtype=np.float32) + 0.5
    dx = (
        origin[..., 0, None, None] + local[None, :] - centre[..., 0, None, None]
    )  # [c, n, 1, p]
    dy = (
        origin[..., 1, None, None] + local[:, None] - centre[..., 1, None, None]
    )  # [c, n, p, 1]
    cos, sin = np.cos(rotation)[..., None, None], np.sin(rotation)[..., None, None]
    r = radius[..., None, None]
    u = (cos * dx + sin * dy) / r  # [c, n, p, p]
    v = (-sin * dx + cos * dy) / r
    inside = _shape_masks(kind, u, v, aspect) & active[..., None, None]

    if textured:
        obj_kind = rng.integers(1, len(TEXTURE_NAMES), (chunk, n))
        obj_freq = rng.uniform(1 / 6, 1 / 3, (chunk, n)).astype(np.float32) * 64 / size
        obj_noise = _smooth_noise(rng, (chunk, n), p, max(2, round(16 * p / size)))
        pattern = _pattern(obj_kind, u * r, v * r, obj_freq, obj_noise)  # [c, n, p, p]
        fill = colours[..., None, None, :] * (1.0 - 0.45 * pattern[..., None])
    else:
        obj_kind = np.zeros((chunk, n), np.int64)
        fill = np.broadcast_to(colours[..., None, None, :], inside.shape + (3,))

    canvas = np.zeros((chunk, size + 2 * p, size + 2 * p, 3), np.float32)
    canvas[:, p : p + size, p : p + size] = image
    label_canvas = np.zeros((chunk, size + 2 * p, size + 2 * p), np.uint8)
    batch_idx = np.arange(chunk)[:, None, None]
    steps = np.arange(p)
    for k in range(n):
        rows = (origin[:, k, 1, None] + p + steps)[:, :, None]  # [c, p, 1]
        cols = (origin[:, k, 0, None] + p + steps)[:, None, :]  # [c, 1, p]
        m = inside[:, k]
        canvas[batch_idx, rows, cols] = np.where(
            m[..., None], fill[:, k], canvas[batch_idx, rows, cols]
        )
        label_canvas[batch_idx, rows, cols] = np.where(
            m, np.uint8(k + 1), label_canvas[batch_idx, rows, cols]
        )
    image = canvas[:, p : p + size, p : p + size]
    labels = label_canvas[:, p : p + size, p : p + size]

    offsets = (np.arange(chunk) * (n + 1))[:, None, None]
    area = np.bincount((labels + offsets).ravel(), minlength=chunk * (n + 1))
    area = area.reshape(chunk, n + 1)[:, 1:]  # [c, n] visible pixels per object
    ok = np.all((area >= min_visible) | ~active, axis=1)
    visible = labels[:, None] == (np.arange(n, dtype=np.uint8) + 1)[None, :, None, None]

    rows, cols = visible.any(axis=3), visible.any(axis=2)  # [c, n, h], [c, n, w]
    first = lambda a: np.where(a.any(-1), a.argmax(-1), -1)
    last = lambda a: np.where(a.any(-1), a.shape[-1] - 1 - a[..., ::-1].argmax(-1), -1)
    bbox = np.stack([first(rows), first(cols), last(rows), last(cols)], axis=-1)
    return {
        "image": image,
        "segmentation": labels,
        "num_objects": num_objects,
        "active": active,
        "shape": kind,
        "texture": obj_kind,
        "centre": centre,
        "bbox": bbox,
        "colour": colours,
        "ok": ok,
    }


def generate(
    num: int,
    seed: int | Sequence[int],
    *,
    image_size: int = 64,
    max_objects: int = 4,
    textured: bool = False,
    min_visible: int | None = None,
    fixed_background: bool = False,
    min_objects: int = 1,
) -> dict[str, np.ndarray]:
    """Generates `num` synthetic scenes, deterministically for `seed`.

    Args:
      num: number of scenes.
      seed: seed (or sequence of ints) of the numpy random generator; the same arguments give the same
        arrays.
      image_size: side of the square images in pixels.
      max_objects: N, the largest number of objects in a scene (each scene has min_objects..N,
        uniformly).
      textured: fill objects and background with stripes / checks / noise and add background pixel noise.
      min_visible: fewest visible pixels an object may keep after occlusion; scenes below it are redrawn.
        Defaults to 16 pixels at 64x64, scaled with the image area.
      fixed_background: every scene gets the same backdrop (`FIXED_BACKGROUND`, top to bottom), as the
        scenes of CLEVR share one backdrop; False draws two colours and a direction per scene.
      min_objects: M, the smallest number of objects in a scene (1 <= M <= N).

    Returns:
      A dict of numpy arrays (n = num, k = max_objects; unused object slots hold -1 / 0):
        image: uint8 [n, s, s, 3].
        segmentation: uint8 [n, s, s]; 0 = background, j = j-th object from the back (1..num_objects).
        num_objects: int32 [n], number of objects in the scene (all visible).
        shape: int32 [n, k], index into SHAPE_NAMES, -1 for unused slots.
        texture: int32 [n, k], index into TEXTURE_NAMES (0 = flat), -1 for unused slots.
        centre: float32 [n, k, 2], shape centre (x, y) in pixels (pixel i spans [i, i+1)).
        bbox: int32 [n, k, 4], (y_min, x_min, y_max, x_max) of the visible part, inclusive pixel indices.
        colour: uint8 [n, k, 3], base RGB colour of the object.

    Raises:
      ValueError: for a negative count, an image side under 8, max_objects < 1, or min_objects outside
        1..max_objects.
    """
    if num < 0 or image_size < 8 or max_objects < 1:
        raise ValueError(
            f"generate needs num >= 0, image_size >= 8 and max_objects >= 1, got num={num}, "
            f"image_size={image_size}, max_objects={max_objects}."
        )
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"generate needs 1 <= min_objects <= max_objects, got min_objects={min_objects}, "
            f"max_objects={max_objects}."
        )
    if max_objects > 255:
        raise ValueError(f"max_objects={max_objects} does not fit a uint8 label map.")
    if min_visible is None:
        min_visible = max(1, round(16 * (image_size / 64) ** 2))
    if num == 0:
        return _empty(image_size, max_objects)
    rng = np.random.default_rng(seed)
    # Keep the [chunk, N, h, w] float temporaries around 4M elements.
    chunk = max(1, min(512, 2**22 // (max_objects * image_size * image_size)))
    keys = (
        "image",
        "segmentation",
        "num_objects",
        "active",
        "shape",
        "texture",
        "centre",
        "bbox",
        "colour",
    )
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    remaining = num
    while remaining > 0:
        scenes = _render_chunk(
            rng,
            chunk,
            image_size,
            max_objects,
            textured,
            min_visible,
            fixed_background,
            min_objects,
        )
        keep = np.flatnonzero(scenes["ok"])[:remaining]
        for key in keys:
            parts[key].append(scenes[key][keep])
        remaining -= len(keep)
    out = {
        key: np.concatenate(value) if value else None for key, value in parts.items()
    }
    if num == 0:
        out = {
            key: scenes_empty
            for key, scenes_empty in _empty(image_size, max_objects).items()
        }
        return out
    active = out.pop("active")
    image = np.clip(np.round(out["image"] * 255.0), 0, 255).astype(np.uint8)
    return {
        "image": image,
        "segmentation": out["segmentation"].astype(np.uint8),
        "num_objects": out["num_objects"].astype(np.int32),
        "shape": np.where(active, out["shape"], -1).astype(np.int32),
        "texture": np.where(active, out["texture"], -1).astype(np.int32),
        "centre": np.where(active[..., None], out["centre"], 0).astype(np.float32),
        "bbox": np.where(active[..., None], out["bbox"], -1).astype(np.int32),
        "colour": np.where(
            active[..., None], np.round(out["colour"] * 255.0), 0
        ).astype(np.uint8),
    }


def _empty(image_size: int, max_objects: int) -> dict[str, np.ndarray]:
    """Zero-length arrays with the shapes and dtypes of `generate`'s output."""
    s, k = image_size, max_objects
    return {
        "image": np.zeros((0, s, s, 3), np.uint8),
        "segmentation": np.zeros((0, s, s), np.uint8),
        "num_objects": np.zeros((0,), np.int32),
        "shape": np.zeros((0, k), np.int32),
        "texture": np.zeros((0, k), np.int32),
        "centre": np.zeros((0, k, 2), np.float32),
        "bbox": np.zeros((0, k, 4), np.int32),
        "colour": np.zeros((0, k, 3), np.uint8),
    }
