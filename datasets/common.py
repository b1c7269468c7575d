"""Pieces shared by the dataset builders: features, manual_dir checks, image reading with clear errors."""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError


def example_features(
    height: int, width: int, with_segmentation: bool = True, **extra
) -> tfds.features.FeaturesDict:
    """The features every builder writes: `image`, `segmentation` (optional), `index`, plus `extra`.

    Args:
      height, width: image size.
      with_segmentation: whether examples carry a uint8 [h, w] label map (0 = background).
      **extra: further feature connectors.
    """
    features = {
        "image": tfds.features.Image(shape=(height, width, 3), encoding_format="png"),
        "index": tfds.features.Scalar(
            dtype=np.int64, doc="Position of the example within its split."
        ),
    }
    if with_segmentation:
        features["segmentation"] = tfds.features.Tensor(
            shape=(height, width), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
        )
    features.update(extra)
    return tfds.features.FeaturesDict(features)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [h, w, 3] image (fast zlib level; lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def manual_dir(
    dl_manager: tfds.download.DownloadManager, what: str, readme: str
) -> str:
    """Returns the manual directory or raises FileNotFoundError saying what to download and where.

    Args:
      dl_manager: the builder's download manager.
      what: short description of the files expected in the directory.
      readme: repository path of the README with download instructions.
    """
    path = getattr(dl_manager, "_manual_dir", None)
    if path is None or not os.path.isdir(path) or not os.listdir(path):
        raise FileNotFoundError(
            f"The manual directory {path or '(not given)'} does not exist or is empty. Download {what} and put "
            f"it there (see {readme}), then run `python -m experiments.prepare_data --dataset=... "
            "--manual_dir=DIR`."
        )
    return os.fspath(path)


def open_image(path: str) -> Image.Image:
    """Opens an image file with PIL, raising ValueError naming the file if it is not a readable image."""
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image file ({error}).") from error
    return image


def label_array(image: Image.Image, path: str) -> np.ndarray:
    """uint8 [h, w] labels of a single-channel ("P", "L") label image; raises ValueError otherwise."""
    if image.mode not in ("P", "L"):
        raise ValueError(
            f"{path} has PIL mode {image.mode!r}; a label map must be a palette ('P') or grayscale ('L') PNG "
            "whose pixel values are the object labels (0 = background)."
        )
    return np.asarray(image, dtype=np.uint8)


def check_max_label(labels: np.ndarray, max_objects: int, path: str) -> None:
    """Raises ValueError if a label map holds more object labels than the dataset's K."""
    top = int(labels.max()) if labels.size else 0
    if top > max_objects:
        raise ValueError(
            f"{path} has label {top}, more objects than the {max_objects} this dataset allows "
            f"(labels must be 0..{max_objects})."
        )


def check_same_size(
    image_size: tuple[int, int], mask_size: tuple[int, int], path: str
) -> None:
    """Raises ValueError if a mask's (width, height) differs from its image's."""
    if tuple(image_size) != tuple(mask_size):
        raise ValueError(
            f"Mask {path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image is "
            f"{image_size[0]}x{image_size[1]}; they must be the same size."
        )
