"""Reading users' image files: the one decode function of the folder dataset (training, evaluation) and of
`experiments.segment`, so that a file means the same pixels everywhere.

`decode_image(path)` returns RGB uint8 [h, w, 3]:

  * 8-bit RGB, greyscale (L, 1), palette (P, with or without transparency), RGBA / LA: converted to RGB
    (alpha is dropped, as the model sees opaque images);
  * 16-bit greyscale (PIL modes I;16*, and I with values in 0..65535): scaled to 8 bits by 1/257, so
    65535 -> 255 (16-bit colour PNGs are already reduced to 8 bits per channel by PIL);
  * other modes (CMYK, float, 32-bit integer): refused with the mode named;
  * a file whose side exceeds `max_side` (MAX_IMAGE_SIDE by default) is refused before it is decoded,
    or, with downscale=True, decoded and shrunk (aspect kept) to fit;
  * an unreadable, truncated or corrupt file: `ImageError` naming the file.
"""

import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ast_seg_jax.cli import UserError

# Larger sides are refused (or downscaled on request): 8192 x 8192 x 3 bytes is 192 MiB decoded.
MAX_IMAGE_SIDE = 8192
# Modes converted by PIL itself; the 16-bit ones are scaled here.
PIL_RGB_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "YCbCr")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SUPPORTED_MODES = PIL_RGB_MODES + SIXTEEN_BIT_MODES
_LARGE_OPEN_LOCK = threading.Lock()


class ImageError(UserError):
    """An image file that cannot be used (named in the message)."""


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header (nothing decoded); ImageError if it is not an image."""
    try:
        with _open(path, allow_large=True) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not a readable image file ({error}).") from error


def _open(path: str, allow_large: bool) -> Image.Image:
    if not allow_large:
        return Image.open(path)
    # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS when it opens them; the size is checked by the
    # caller instead (briefly lifted under a lock: PIL reads the limit when it opens a file).
    with _LARGE_OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def to_rgb(image: Image.Image, path: str = "image") -> np.ndarray:
    """RGB uint8 [h, w, 3] of a loaded PIL image (see the module docstring for the modes)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.dtype.kind == "f" or (
            values.size and (values.min() < 0 or values.max() > 65535)
        ):
            raise ImageError(
                f"{path}: image mode {mode!r} holds values outside 0..65535; only 8- and 16-bit "
                "images are supported."
            )
        grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if mode not in PIL_RGB_MODES:
        raise ImageError(
            f"{path}: image mode {mode!r} is not supported (use 8-bit RGB, RGBA, greyscale or palette, "
            "or 16-bit greyscale)."
        )
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), np.uint8)


def decode_image(
    path: str, *, max_side: int = MAX_IMAGE_SIDE, downscale: bool = False
) -> np.ndarray:
    """RGB uint8 [h, w, 3] of the image file `path` (see the module docstring).

    Raises:
      ImageError: unreadable, truncated or corrupt file, unsupported mode, or larger than `max_side`
        on a side without `downscale`.
    """
    try:
        with _open(path, allow_large=downscale) as image:
            width, height = image.size
            if max(width, height) > max_side and not downscale:
                raise ImageError(
                    f"{path}: the image is {width}x{height} pixels, over the limit of {max_side} per "
                    "side; shrink it first, or ask for it to be downscaled (segment: "
                    "--downscale_large_images; folder dataset: --config.data.large_images=downscale)."
                )
            if max(width, height) > max_side:
                image.draft(
                    "RGB", (max_side, max_side)
                )  # JPEG: decode at a reduced scale.
            image.load()
            if max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.BILINEAR)
            return to_rgb(image, path)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(
            f"{path}: the image is too large to decode safely ({error}); shrink it first, or ask for it "
            "to be downscaled."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(
            f"{path}: not a readable image (corrupt, truncated or not an image: {error})."
        ) from error
