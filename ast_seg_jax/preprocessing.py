"""Offline image / label-map preprocessing with PIL, exactly as the benchmark loaders do it.

The dataset builders call these functions once, when a dataset is prepared; the input pipeline never resizes.
All functions take and return numpy uint8 arrays (or PIL images) and import neither TensorFlow nor JAX.

Conventions reproduced (see the metrics_and_datasets spec, section 2):
  * CLEVRTEX / CLEVR: centre square of side int(0.8 * min(w, h)) (192 for 320x240) cut with the PIL box
    (64, 24, 256, 216), then PIL BILINEAR (antialiased when shrinking) for images and PIL NEAREST (pixel-centre
    sampling, source columns 0, 2, 3, 5, ...) for label maps, to 128x128.
  * ShapeStacks (GENESIS): centre crop 196 (offset 14) and PIL BILINEAR to 64 for images; label maps cropped
    with numpy and resized with torch's legacy `nearest` (source index floor(i * 196 / 64)).
"""

import numpy as np
from PIL import Image


def centre_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of the centred `size` x `size` square.

    Matches the ClevrTex loader (offsets (w - size) // 2 and (h - size) // 2) and torchvision's CenterCrop for
    even differences (torchvision rounds (w - size) / 2; they agree whenever w - size is even).
    """
    if size > min(width, height):
        raise ValueError(f"Crop size {size} exceeds the image size {width}x{height}.")
    left = (width - size) // 2
    top = (height - size) // 2
    return left, top, left + size, top + size


def clevr_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The CLEVRTEX / CLEVR benchmark crop: centred square of side int(0.8 * min(w, h)).

    For 320x240 images this is (64, 24, 256, 216): rows 24..215 and columns 64..255.
    """
    return centre_crop_box(width, height, int(0.8 * min(width, height)))


def resize_image(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Crops (optional) and resizes an image with PIL BILINEAR, then keeps RGB.

    RGBA images are resized as RGBA (PIL premultiplies alpha) and the alpha channel is dropped afterwards, as
    the ClevrTex loader does; other modes are converted to RGB first.

    Args:
      image: PIL image of any mode.
      size: output (width, height), PIL order.
      box: optional PIL crop box (left, top, right, bottom) applied before resizing.

    Returns:
      uint8 [height, width, 3].
    """
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    if box is not None:
        image = image.crop(box)
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)[..., :3].copy()


def resize_labels(
    labels: np.ndarray | Image.Image,
    size: tuple[int, int],
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Crops (optional) and resizes a label map with PIL NEAREST.

    Args:
      labels: uint8 [h, w] label map, or a single-channel ("P" or "L") PIL image.
      size: output (width, height), PIL order.
      box: optional PIL crop box applied before resizing.

    Returns:
      uint8 [height, width].
    """
    if isinstance(labels, np.ndarray):
        labels = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L")
    if box is not None:
        labels = labels.crop(box)
    if labels.size != tuple(size):
        labels = labels.resize(tuple(size), Image.NEAREST)
    return np.asarray(labels, dtype=np.uint8).copy()


def legacy_nearest_resize(labels: np.ndarray, size: int) -> np.ndarray:
    """Square resize with PyTorch's legacy `F.interpolate(mode='nearest')` rule.

    Output pixel i samples input index floor(i * in_size / size) (for 196 -> 64: 0, 3, 6, 9, ...), which is not
    PIL's pixel-centre NEAREST.

    Args:
      labels: [h, w] array with h == w.
      size: output side.

    Returns:
      [size, size] array of the input dtype.
    """
    if labels.ndim != 2 or labels.shape[0] != labels.shape[1]:
        raise ValueError(
            f"legacy_nearest_resize expects a square [h, w] map, got {labels.shape}."
        )
    index = np.floor(np.arange(size) * (labels.shape[0] / size)).astype(np.int64)
    return labels[index[:, None], index[None, :]]


def resize_image_to(
    image: Image.Image, size_hw: tuple[int, int], crop: str = "center"
) -> np.ndarray:
    """Resizes an image to (height, width), optionally cropping the centre to the target aspect first.

    Args:
      image: PIL image.
      size_hw: output (height, width).
      crop: "center" keeps the largest centred region with the target aspect ratio before resizing;
        "none" resizes the whole image (the aspect ratio may change).

    Returns:
      uint8 [height, width, 3] (PIL BILINEAR).
    """
    return resize_image(
        image, (size_hw[1], size_hw[0]), aspect_crop_box(image.size, size_hw, crop)
    )


def resize_labels_to(
    labels: Image.Image, size_hw: tuple[int, int], crop: str = "center"
) -> np.ndarray:
    """Label-map counterpart of `resize_image_to` (same box, PIL NEAREST); returns uint8 [height, width]."""
    return resize_labels(
        labels, (size_hw[1], size_hw[0]), aspect_crop_box(labels.size, size_hw, crop)
    )


def aspect_crop_box(
    image_wh: tuple[int, int], size_hw: tuple[int, int], crop: str
) -> tuple[int, int, int, int] | None:
    """The centred box with the aspect ratio of `size_hw` (crop="center"), or None (crop="none")."""
    if crop == "none":
        return None
    if crop != "center":
        raise ValueError(f"Unknown crop mode {crop!r}; use 'center' or 'none'.")
    width, height = image_wh
    target_h, target_w = size_hw
    # Largest centred box with width / height == target_w / target_h.
    if width * target_h > height * target_w:
        box_w, box_h = round(height * target_w / target_h), height
    else:
        box_w, box_h = width, round(width * target_h / target_w)
    left, top = (width - box_w) // 2, (height - box_h) // 2
    return left, top, left + box_w, top + box_h
