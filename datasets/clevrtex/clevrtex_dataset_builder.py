"""TFDS builder `ast_clevrtex`: CLEVRTEX v1 (full / outd / camo) with the benchmark's crop, resize and splits.

Reads the files as the official archives unpack (`clevrtex_full/0/CLEVRTEX_full_000000.png`, `..._flat.png`,
`....json`) from `manual_dir`; if only the `.tar.gz` archives are there, they are first extracted into
`manual_dir/extracted/`. Preprocessing (ClevrTex `CLEVRTEX.__getitem__` with crop=True, resize=(128, 128)):
PIL crop box (64, 24, 256, 216) of the 320x240 RGBA image, PIL BILINEAR resize to 128x128, alpha dropped; the
palette mask gets the same box and PIL NEAREST. Splits by index fraction of the N images: test [0, 0.1N),
validation [0.1N, 0.2N), train [0.2N, N); `outd` is evaluation-only and all N images form `test`.
"""

import dataclasses
import glob
import json
import os
import re
import tarfile
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from ast_seg_jax import preprocessing
from datasets import common

_README = "datasets/clevrtex/README.md"
_INSTRUCTIONS = (
    "Download the CLEVRTEX v1 archives from https://www.robots.ox.ac.uk/~vgg/data/clevrtex/ "
    "(clevrtex_full_part1..5.tar.gz, clevrtex_outd.tar.gz, clevrtex_camo.tar.gz) into manual_dir, extracted "
    "(`tar -xzf clevrtex_full_part1.tar.gz` ...) or as .tar.gz files."
)


@dataclasses.dataclass
class ClevrtexConfig(tfds.core.BuilderConfig):
    """One CLEVRTEX variant.

    Attributes:
      variant: file-name variant (full, outd, camo, pbg, vbg, grassbg).
      test_only: all images form the `test` split (the OOD set).
      image_size: output side after the 192 crop.
      max_objects: K, the largest object label allowed.
    """

    variant: str = "full"
    test_only: bool = False
    image_size: int = 128
    max_objects: int = 10


class AstClevrtex(tfds.core.GeneratorBasedBuilder):
    """CLEVRTEX v1 at 128x128 with label maps (0 = background, 1..10 objects)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        ClevrtexConfig(
            name="full",
            description="50,000 images; train 40k / val 5k / test 5k.",
            variant="full",
        ),
        ClevrtexConfig(
            name="outd",
            description="10,000 out-of-distribution images, all in test.",
            variant="outd",
            test_only=True,
        ),
        ClevrtexConfig(
            name="camo",
            description="20,000 camouflaged scenes; test = first 2,000.",
            variant="camo",
        ),
    ]
    DEFAULT_CONFIG_NAME = "full"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "CLEVRTEX (Karazija et al. 2021) cropped to the central 192x192 square and resized to "
                f"{size}x{size} (PIL bilinear image, nearest mask), as the ClevrTex benchmark does."
            ),
            features=common.example_features(
                size, size, num_objects=tfds.features.Scalar(dtype=np.int32)
            ),
            homepage="https://www.robots.ox.ac.uk/~vgg/data/clevrtex/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = common.manual_dir(dl_manager, "the CLEVRTEX archives", _README)
        paths = _find_images(root, self.builder_config.variant)
        n = len(paths)
        if self.builder_config.test_only:
            return {"test": self._generate_examples(paths, 0, n)}
        a, b = int(0.1 * n), int(0.2 * n)
        return {
            "train": self._generate_examples(paths, b, n),
            "validation": self._generate_examples(paths, a, b),
            "test": self._generate_examples(paths, 0, a),
        }

    def _generate_examples(self, paths: list[str], start: int, end: int):
        config = self.builder_config
        size = (config.image_size, config.image_size)
        for position, index in enumerate(range(start, end)):
            path = paths[index]
            mask_path = path[: -len(".png")] + "_flat.png"
            if not os.path.exists(mask_path):
                raise FileNotFoundError(f"Mask {mask_path} of image {path} is missing.")
            image = common.open_image(path)
            mask = common.open_image(mask_path)
            common.check_same_size(image.size, mask.size, mask_path)
            labels = common.label_array(mask, mask_path)
            common.check_max_label(labels, config.max_objects, mask_path)
            box = preprocessing.clevr_crop_box(*image.size)
            json_path = path[: -len(".png")] + ".json"
            num_objects = int(labels.max())
            if os.path.exists(json_path):
                with open(json_path) as f:
                    num_objects = int(json.load(f).get("num_objects", num_objects))
            yield (
                index,
                {
                    "image": common.encode_png(
                        preprocessing.resize_image(image, size, box)
                    ),
                    "segmentation": preprocessing.resize_labels(labels, size, box),
                    "index": position,
                    "num_objects": num_objects,
                },
            )


def _find_images(root: str, variant: str) -> list[str]:
    """Paths of CLEVRTEX_<variant>_NNNNNN.png under root, ordered by index (indices must be 0..N-1)."""
    pattern = re.compile(rf"CLEVRTEX_{variant}_(\d{{6}})\.png$")
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            match = pattern.match(name)
            if match:
                found[int(match.group(1))] = os.path.join(dirpath, name)
    if not found:
        archives = sorted(glob.glob(os.path.join(root, f"clevrtex_{variant}*.tar.gz")))
        if archives:
            target = os.path.join(root, "extracted")
            for archive in archives:
                print(f"Extracting {archive} into {target} ...", flush=True)
                with tarfile.open(archive) as tar:
                    tar.extractall(target, filter="data")
            return _find_images(target, variant)
        raise FileNotFoundError(
            f"No CLEVRTEX_{variant}_NNNNNN.png images (and no clevrtex_{variant}*.tar.gz archives) found under "
            f"{root}. {_INSTRUCTIONS}"
        )
    missing = sorted(set(range(len(found))) - set(found))
    if missing:
        raise FileNotFoundError(
            f"CLEVRTEX_{variant} images under {root} are not numbered 0..N-1: e.g. index {missing[0]} is "
            f"missing ({len(missing)} missing in all). Extract every archive part."
        )
    return [found[i] for i in range(len(found))]
