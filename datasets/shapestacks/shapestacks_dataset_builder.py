"""TFDS builder `ast_shapestacks`: ShapeStacks with GENESIS-v2 preprocessing (the loader AST reuses).

`manual_dir` holds (directly or in a `shapestacks/` sub-folder) the unpacked archives:
  * `recordings/<scenario>/rgb-w=<w>-f=<f>-l=<l>-c=<c>-cam_<n>-mono-0.png` (224x224 RGB), every file of a
    listed scenario starting with `rgb-` and ending with `-mono-0.png` being one sample;
  * `iseg/<scenario>/iseg-w=0-f=0-l=0-c=original-cam_<n>-mono-0.map`, one RGBA PNG per camera (the camera is
    the 6th `-`-separated field of the rgb file name), channel 0 = 32 * label;
  * `splits/default/{train,eval,test}.txt`, one scenario per line (empty lines ignored).

Preprocessing: image centre crop 196 (offset 14) and PIL BILINEAR to 64x64; mask read with PIL as uint8,
label = channel 0 // 32 (not matplotlib, whose float `imread` zeroes every mask), cropped [14:210, 14:210] and
resized with torch's legacy nearest (source index floor(i * 196 / 64)). Labels 0..6 (K = 6).
Within a split, samples are ordered by the split file's scenario order, then by sorted file name.
"""

import dataclasses
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ast_seg_jax import preprocessing
from datasets import common

_README = "datasets/shapestacks/README.md"
_INSTRUCTIONS = (
    "Download shapestacks-rgb.tar.gz and shapestacks-meta.tar.gz from "
    "http://shapestacks-file.robots.ox.ac.uk/static/download/v1/ and the `iseg` instance masks from the "
    "GENESIS Google Drive folder, and extract them into manual_dir so that it holds recordings/, iseg/ and "
    "splits/default/."
)
_SPLIT_FILES = {"train": "train.txt", "validation": "eval.txt", "test": "test.txt"}


@dataclasses.dataclass
class ShapestacksConfig(tfds.core.BuilderConfig):
    """ShapeStacks preprocessing.

    Attributes:
      crop: centre crop side.
      image_size: output side.
      max_objects: K, the largest label allowed.
    """

    crop: int = 196
    image_size: int = 64
    max_objects: int = 6


class AstShapestacks(tfds.core.GeneratorBasedBuilder):
    """ShapeStacks at 64x64 with instance label maps (0 = background, 1..6 shapes)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        ShapestacksConfig(
            name="default", description="GENESIS-v2 preprocessing, 64x64."
        )
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="ShapeStacks renders, centre crop 196, resized to 64x64, with instance label maps.",
            features=common.example_features(size, size),
            homepage="http://shapestacks.robots.ox.ac.uk",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = common.manual_dir(
            dl_manager, "the ShapeStacks rgb, meta and iseg archives", _README
        )
        if not os.path.isdir(os.path.join(root, "recordings")) and os.path.isdir(
            os.path.join(root, "shapestacks", "recordings")
        ):
            root = os.path.join(root, "shapestacks")
        for sub in ("recordings", "iseg", os.path.join("splits", "default")):
            if not os.path.isdir(os.path.join(root, sub)):
                raise FileNotFoundError(
                    f"{os.path.join(root, sub)} is missing. {_INSTRUCTIONS}"
                )
        return {
            split: self._generate_examples(root, _samples(root, filename))
            for split, filename in _SPLIT_FILES.items()
        }

    def _generate_examples(self, root: str, samples: list[tuple[str, str]]):
        config = self.builder_config
        size = (config.image_size, config.image_size)
        for position, (image_path, mask_path) in enumerate(samples):
            image = common.open_image(image_path)
            mask = common.open_image(mask_path)
            common.check_same_size(image.size, mask.size, mask_path)
            values = np.asarray(mask, dtype=np.uint8)
            labels = (values[..., 0] if values.ndim == 3 else values) // 32
            common.check_max_label(labels, config.max_objects, mask_path)
            box = preprocessing.centre_crop_box(*image.size, config.crop)
            cropped = labels[box[1] : box[3], box[0] : box[2]]
            yield (
                os.path.relpath(image_path, root),
                {
                    "image": common.encode_png(
                        preprocessing.resize_image(image, size, box)
                    ),
                    "segmentation": preprocessing.legacy_nearest_resize(
                        cropped, config.image_size
                    ),
                    "index": position,
                },
            )


def _samples(root: str, split_file: str) -> list[tuple[str, str]]:
    """(rgb path, iseg path) pairs of a split, in split-file order then sorted file name order."""
    list_path = os.path.join(root, "splits", "default", split_file)
    if not os.path.exists(list_path):
        raise FileNotFoundError(f"Split list {list_path} is missing. {_INSTRUCTIONS}")
    with open(list_path) as f:
        scenarios = [line.strip() for line in f if line.strip()]
    samples = []
    for scenario in scenarios:
        folder = os.path.join(root, "recordings", scenario)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"Scenario folder {folder} (listed in {list_path}) is missing."
            )
        for name in sorted(os.listdir(folder)):
            if not (name.startswith("rgb-") and name.endswith("-mono-0.png")):
                continue
            fields = name.split("-")
            if len(fields) < 8 or not fields[5].startswith("cam_"):
                raise ValueError(
                    f"Unexpected ShapeStacks file name {os.path.join(folder, name)}."
                )
            mask_name = f"iseg-w=0-f=0-l=0-c=original-{fields[5]}-mono-0.map"
            mask_path = os.path.join(root, "iseg", scenario, mask_name)
            if not os.path.exists(mask_path):
                raise FileNotFoundError(
                    f"Mask {mask_path} of {os.path.join(folder, name)} is missing."
                )
            samples.append((os.path.join(folder, name), mask_path))
    return samples
