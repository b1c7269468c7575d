"""Users' own images, read straight from a folder tree with tf.data (no TFDS build step).

Layout:
    DIR/train/images/*.png|jpg|jpeg     training images (any size, any PIL mode; converted to RGB)
    DIR/test/images/*                   evaluation images
    DIR/{train,test}/masks/<stem>.png   optional label maps (0 = background), palette or grayscale PNGs; if a
                                        split has a masks/ folder, every image of that split needs its mask.

Images are sorted by file name; `index` is the position in that order. With `image_size=(h, w)` every image is
cropped to the target aspect ratio around its centre (crop="center") or not (crop="none") and resized with PIL
BILINEAR (masks: same box, NEAREST). Without `image_size` all images of a split must share one size.
Images are decoded by `ast_seg_jax.image_io.decode_image`, exactly as `experiments.segment` decodes them
(16-bit greyscale scaled by 1/257; palette, greyscale, RGBA to RGB).

Validation: the first time a split is read, every image (and mask) is decoded once; the verdict of each file
is cached in DIR/<split>/.ast_seg_checked.json (keyed by name, size and modification time, so only new or
changed files are decoded again; nothing is cached when the folder cannot be written). A corrupt, truncated
or unreadable image, an unsupported mode, or an image over `max_image_side` pixels on a side (unless
large_images="downscale") is reported by name and skipped with a count (bad_images="skip", the default) or
stops with an error listing them (bad_images="error"). A missing mask or a mask whose size differs from its
image is always an error.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

from ast_seg_jax import image_io, preprocessing
from ast_seg_jax.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
VERDICT_FILE = ".ast_seg_checked.json"
# This process's verdicts (for read-only folders) and the skip warnings it has printed (each once).
_VERDICTS: dict[str, dict] = {}
_WARNED: set[str] = set()
BAD_IMAGES = ("skip", "error")
LARGE_IMAGES = ("reject", "downscale")


class FolderDataset:
    """Reads DIR/<split>/images (and masks) into tf.data datasets of uint8 examples.

    Args:
      root: dataset folder.
      image_size: (height, width) to resize to, or None to keep the stored size (which must then be common).
      crop: "center" or "none" (see the module docstring).
      bad_images: "skip" (report and leave out) or "error" (stop) for files that cannot be used.
      max_image_side: larger images are bad files, unless `large_images` is "downscale".
      large_images: "reject" or "downscale" (shrink to `max_image_side` when decoding).
    """

    def __init__(
        self,
        root: str,
        image_size: tuple[int, int] | None = None,
        crop: str = "center",
        *,
        bad_images: str = "skip",
        max_image_side: int = image_io.MAX_IMAGE_SIDE,
        large_images: str = "reject",
    ):
        if not root:
            raise ValueError(
                "The folder dataset needs its root directory (data_config.dir)."
            )
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Folder dataset root {root} does not exist.")
        if crop not in ("center", "none"):
            raise ValueError(f"Unknown crop mode {crop!r}; use 'center' or 'none'.")
        if bad_images not in BAD_IMAGES:
            raise UserError(
                f"config.data.bad_images={bad_images!r}; use one of {', '.join(BAD_IMAGES)}."
            )
        if large_images not in LARGE_IMAGES:
            raise UserError(
                f"config.data.large_images={large_images!r}; use one of {', '.join(LARGE_IMAGES)}."
            )
        if max_image_side < 1:
            raise UserError(
                f"config.data.max_image_side={max_image_side} must be positive."
            )
        self.bad_images = bad_images
        self.max_image_side = max_image_side
        self.downscale = large_images == "downscale"
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
        mask_folder = os.path.join(self.root, split, "masks")
        has_masks = os.path.isdir(mask_folder)

        def mask_of(name):
            return os.path.join(mask_folder, os.path.splitext(name)[0] + ".png")

        if has_masks:
            for name in names:
                if not os.path.exists(mask_of(name)):
                    raise FileNotFoundError(
                        f"Mask {mask_of(name)} for image {os.path.join(folder, name)} is missing."
                    )
        verdicts = self._validate(split, folder, names, mask_of if has_masks else None)
        good, bad = [], []
        for name in names:
            verdict = verdicts[name]
            if verdict["error"]:
                bad.append(verdict["error"])
            else:
                good.append(name)
        if bad:
            listed = "\n".join(bad[:10]) + (
                f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""
            )
            if self.bad_images == "error" or not good:
                raise UserError(
                    f"{len(bad)} of {len(names)} images in {folder} cannot be used "
                    "(config.data.bad_images='skip' leaves them out):\n" + listed
                )
            warning = (
                f"warning: skipping {len(bad)} of {len(names)} images in {folder} that cannot be "
                "used (config.data.bad_images='error' stops instead):\n" + listed
            )
            if warning not in _WARNED:
                _WARNED.add(warning)
                print(warning, file=sys.stderr, flush=True)
        images = [os.path.join(folder, n) for n in good]
        masks = [mask_of(n) for n in good] if has_masks else None
        sizes = set()
        for name in good:
            verdict = verdicts[name]
            size = tuple(verdict["size"])
            sizes.add(size)
            if has_masks and tuple(verdict["mask_size"]) != size:
                mw, mh = verdict["mask_size"]
                raise ValueError(
                    f"Mask {mask_of(name)} is {mw}x{mh} (WxH) but its image "
                    f"{os.path.join(folder, name)} is {size[0]}x{size[1]}; they must be the same size."
                )
        if self.image_size is None:
            if len(sizes) > 1:
                raise ValueError(
                    f"Images in {folder} have different sizes {sorted(sizes)[:4]}; set image_size=(h, w)."
                )
            width, height = sizes.pop()
            if self.downscale and max(width, height) > self.max_image_side:
                factor = self.max_image_side / max(width, height)
                width, height = round(width * factor), round(height * factor)
            out_hw = (height, width)
        else:
            out_hw = self.image_size
        return images, masks, out_hw

    def _validate(self, split: str, folder: str, names, mask_of) -> dict:
        """{name: {"error": message or None, "size": (w, h), "mask_size": (w, h)}}, every file decoded once
        (the verdicts of unchanged files come from the split's verdict file)."""
        cache_path = os.path.join(self.root, split, VERDICT_FILE)
        settings = [self.max_image_side, self.downscale]
        memory_key = json.dumps([os.path.abspath(cache_path), settings])
        cached = _VERDICTS.get(memory_key)
        if cached is None:
            cached = {}
            try:
                with open(cache_path) as f:
                    stored = json.load(f)
                if stored.get("settings") == settings:
                    cached = stored.get("files", {})
            except (OSError, ValueError):
                pass
        verdicts, changed = {}, False
        for name in names:
            path = os.path.join(folder, name)
            key = _stamp(path) + (_stamp(mask_of(name)) if mask_of else [])
            entry = cached.get(name)
            if entry is None or entry.get("stamp") != key:
                entry = {
                    "stamp": key,
                    **self._check_file(path, mask_of and mask_of(name)),
                }
                changed = True
            verdicts[name] = entry
        if changed:
            try:
                tmp = f"{cache_path}.tmp.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump({"settings": settings, "files": verdicts}, f)
                os.replace(tmp, cache_path)
            except OSError:
                pass  # A read-only dataset: validated again by the next process.
        _VERDICTS[memory_key] = verdicts
        return verdicts

    def _check_file(self, path: str, mask_path: str | None) -> dict:
        try:
            image = image_io.decode_image(
                path, max_side=self.max_image_side, downscale=False
            )
            size = [image.shape[1], image.shape[0]]
        except image_io.ImageError as error:
            if not (self.downscale and "over the limit" in str(error)):
                return {"error": str(error), "size": None, "mask_size": None}
            size = list(image_io.image_size(path))
            try:
                image_io.decode_image(
                    path, max_side=self.max_image_side, downscale=True
                )
            except image_io.ImageError as error2:
                return {"error": str(error2), "size": None, "mask_size": None}
        mask_size = None
        if mask_path is not None:
            try:
                mask = _open(mask_path)
                if mask.mode not in ("P", "L"):
                    return {
                        "error": f"{mask_path} has PIL mode {mask.mode!r}; label maps must be palette "
                        "or grayscale PNGs.",
                        "size": size,
                        "mask_size": None,
                    }
                mask_size = list(mask.size)
            except ValueError as error:
                return {"error": str(error), "size": size, "mask_size": None}
        return {"error": None, "size": size, "mask_size": mask_size}

    def load(self, split: str, index: int) -> dict[str, np.ndarray]:
        """One example as numpy: image uint8 [h, w, 3], segmentation uint8 [h, w] (if masks), index int64."""
        images, masks, out_hw = self.files(split)
        image = Image.fromarray(
            image_io.decode_image(
                images[index], max_side=self.max_image_side, downscale=self.downscale
            )
        )
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


def _stamp(path: str) -> list:
    """[size in bytes, modification time in ns] of a file: what the verdict cache keys on."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _open(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise image_io.ImageError(
            f"{path} is not a readable image file ({error})."
        ) from error
    return image
