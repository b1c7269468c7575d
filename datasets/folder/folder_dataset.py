"""Users' own images, read straight from a folder tree with tf.data (no TFDS build step).

Layout:
    DIR/train/images/*.png|jpg|jpeg     training images (any size, any PIL mode; converted to RGB)
    DIR/test/images/*                   evaluation images
    DIR/{train,test}/masks/<stem>.png   optional label maps (0 = background), palette or grayscale PNGs; if a
                                        split has a masks/ folder, every image of that split needs its mask.

Images are sorted by file name; `index` is the position in that order. With `image_size=(h, w)` every image is
cropped to the target aspect ratio around its centre (crop="center") or not (crop="none") and resized with PIL
BILINEAR (masks: same box, NEAREST). Without `image_size` all images of a split must share one size.
Every file's header is checked when the dataset is opened, so unreadable files and mismatched mask sizes fail
early with the file named.
"""

import os

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from ast_seg_jax import preprocessing

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class FolderDataset:
    """Reads DIR/<split>/images (and masks) into tf.data datasets of uint8 examples.

    Args:
      root: dataset folder.
      image_size: (height, width) to resize to, or None to keep the stored size (which must then be common).
      crop: "center" or "none" (see the module docstring).
    """

    def __init__(
        self, root: str, image_size: tuple[int, int] | None = None, crop: str = "center"
    ):
        if not root:
            raise ValueError(
                "The folder dataset needs its root directory (data_config.dir)."
            )
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Folder dataset root {root} does not exist.")
        if crop not in ("center", "none"):
            raise ValueError(f"Unknown crop mode {crop!r}; use 'center' or 'none'.")
        self.root = root
        self.image_size = tuple(image_size) if image_size else None
        self.crop = crop
        self._files: dict[str, tuple[list[str], list[str] | None, tuple[int, int]]] = {}

    def files(self, split: str) -> tuple[list[str], list[str] | None, tuple[int, int]]:
        """Sorted image paths, matching mask paths (or None) and the output (height, width) of a split."""
        if split not in self._files:
            self._files[split] = self._scan(split)
        return self._files[split]

    def num_examples(self, split: str) -> int:
        """Number of images in a split."""
        return len(self.files(split)[0])

    def has_masks(self, split: str) -> bool:
        """Whether the split has label maps."""
        return self.files(split)[1] is not None

    def _scan(self, split: str):
        folder = os.path.join(self.root, split, "images")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{folder} does not exist: a folder dataset needs {split}/images/ with .png/.jpg files."
            )
        names = sorted(
            n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not names:
            raise FileNotFoundError(f"{folder} holds no .png/.jpg images.")
        images = [os.path.join(folder, n) for n in names]
        mask_folder = os.path.join(self.root, split, "masks")
        masks = None
        if os.path.isdir(mask_folder):
            masks = [
                os.path.join(mask_folder, os.path.splitext(n)[0] + ".png")
                for n in names
            ]
        sizes = set()
        for i, path in enumerate(images):
            size = _header_size(path)
            sizes.add(size)
            if masks is not None:
                if not os.path.exists(masks[i]):
                    raise FileNotFoundError(
                        f"Mask {masks[i]} for image {path} is missing."
                    )
                mask_size = _header_size(masks[i])
                if mask_size != size:
                    raise ValueError(
                        f"Mask {masks[i]} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {path} is "
                        f"{size[0]}x{size[1]}; they must be the same size."
                    )
        if self.image_size is None:
            if len(sizes) > 1:
                raise ValueError(
                    f"Images in {folder} have different sizes {sorted(sizes)[:4]}; set image_size=(h, w)."
                )
            width, height = sizes.pop()
            out_hw = (height, width)
        else:
            out_hw = self.image_size
        return images, masks, out_hw

    def load(self, split: str, index: int) -> dict[str, np.ndarray]:
        """One example as numpy: image uint8 [h, w, 3], segmentation uint8 [h, w] (if masks), index int64."""
        images, masks, out_hw = self.files(split)
        image = _open(images[index])
        example = {
            "image": preprocessing.resize_image_to(image, out_hw, self.crop),
            "index": np.int64(index),
        }
        if masks is not None:
            mask = _open(masks[index])
            if mask.mode not in ("P", "L"):
                raise ValueError(
                    f"{masks[index]} has PIL mode {mask.mode!r}; label maps must be palette or grayscale PNGs."
                )
            example["segmentation"] = preprocessing.resize_labels_to(
                mask, out_hw, self.crop
            )
        return example

    def as_dataset(
        self, split: str, start: int = 0, end: int | None = None
    ) -> tf.data.Dataset:
        """tf.data dataset of the split's examples [start, end) in index order (images decoded lazily).

        The dataset's elements are the example indices until `decode` is mapped over them, so that shuffling,
        sharding and skipping happen before any file is read; use `ds.map(folder.decode)`.
        """
        end = self.num_examples(split) if end is None else end
        return tf.data.Dataset.range(start, end)

    def decoder(self, split: str):
        """A tf function mapping an int64 index to the example dict (reads the files with PIL)."""
        _, masks, (height, width) = self.files(split)
        with_masks = masks is not None

        def load(index):
            example = self.load(split, int(index))
            if with_masks:
                return example["image"], example["segmentation"]
            return (example["image"],)

        def decode(index):
            out_types = (tf.uint8, tf.uint8) if with_masks else (tf.uint8,)
            values = tf.numpy_function(load, [index], out_types, stateful=False)
            example = {
                "image": tf.ensure_shape(values[0], (height, width, 3)),
                "index": index,
            }
            if with_masks:
                example["segmentation"] = tf.ensure_shape(values[1], (height, width))
            return example

        return decode


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header; ValueError naming the file if it is not an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image file ({error}).") from error


def _open(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image file ({error}).") from error
    return image
