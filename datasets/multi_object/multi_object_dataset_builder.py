"""TFDS builder `ast_multi_object`: DeepMind multi_object_datasets (objects_room, clevr_with_masks).

Reads DeepMind's GZIP TFRecords from `manual_dir` (`objects_room_train.tfrecords`,
`clevr_with_masks_train.tfrecords`, anywhere below it). Every uint8 of the byte features is stored as its own
1-byte string (`FixedLenFeature(shape, tf.string)`), decoded with `decode_raw(uint8)` and squeezed.

* objects_room: 64x64, 7 entity masks (0-3 background: sky, floor, two wall halves; 4-6 objects). Label map =
  max(0, argmax_k mask_k - 3), labels 0..3 (K = 3). No crop or resize. Splits by record position (GENESIS-v2
  convention): test = records 0-9,999, validation = 10,000-19,999, train = the rest (980,000).
* clevr_with_masks: 240x320 images, 11 entity masks (0 = background). Label map = argmax over the masks
  (0..10), then the CLEVRTEX crop box (64, 24, 256, 216) and PIL resize to 128x128 (BILINEAR image, NEAREST
  labels), in correct RGB order (the AST code swapped R and B; we do not). Splits as the AST code: test =
  records 0-9,999, validation = 10,000-19,999, train = 20,000-99,999.
"""

import dataclasses
import os
import re
from typing import ClassVar

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ast_seg_jax import preprocessing
from datasets import common

_README = "datasets/multi_object/README.md"
_INSTRUCTIONS = (
    "Download objects_room_train.tfrecords and/or clevr_with_masks_train.tfrecords from "
    "https://storage.googleapis.com/multi-object-datasets/ (objects_room/..., clevr_with_masks/...) into "
    "manual_dir."
)


@dataclasses.dataclass
class MultiObjectConfig(tfds.core.BuilderConfig):
    """One DeepMind dataset.

    Attributes:
      filename: TFRecord file looked up below manual_dir.
      height, width: stored image size.
      num_entities: number of masks per record.
      background_entities: entities 0..background_entities-1 are background (label 0).
      crop_resize: output side after the CLEVR crop (0 = keep the stored size).
      num_test: records 0..num_test-1 form the test split.
      num_validation: the next records form the validation split; the rest is train.
    """

    filename: str = "objects_room_train.tfrecords"
    height: int = 64
    width: int = 64
    num_entities: int = 7
    background_entities: int = 4
    crop_resize: int = 0
    num_test: int = 10_000
    num_validation: int = 10_000

    @property
    def max_objects(self) -> int:
        """K: the largest label of the label maps."""
        return self.num_entities - self.background_entities

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the prepared examples."""
        if self.crop_resize:
            return self.crop_resize, self.crop_resize
        return self.height, self.width


OBJECTS_ROOM = MultiObjectConfig(
    name="objects_room",
    description="ObjectsRoom 64x64, labels 0..3; test = first 10k records, validation = next 10k.",
)
CLEVR_WITH_MASKS = MultiObjectConfig(
    name="clevr_with_masks",
    description="CLEVR (with masks) cropped 192 at (24, 64) and resized to 128, labels 0..10.",
    filename="clevr_with_masks_train.tfrecords",
    height=240,
    width=320,
    num_entities=11,
    background_entities=1,
    crop_resize=128,
)


class AstMultiObject(tfds.core.GeneratorBasedBuilder):
    """objects_room and clevr_with_masks from DeepMind's TFRecords, with label maps."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        OBJECTS_ROOM,
        CLEVR_WITH_MASKS,
    ]
    DEFAULT_CONFIG_NAME = "objects_room"

    def _info(self) -> tfds.core.DatasetInfo:
        height, width = self.builder_config.output_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=common.example_features(height, width),
            homepage="https://github.com/google-deepmind/multi_object_datasets",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        root = common.manual_dir(dl_manager, config.filename, _README)
        path = _find_file(root, config.filename)
        a, b = config.num_test, config.num_test + config.num_validation
        return {
            "train": self._generate_examples(path, b, None),
            "validation": self._generate_examples(path, a, b),
            "test": self._generate_examples(path, 0, a),
        }

    def _generate_examples(self, path: str, start: int, end: int | None):
        config = self.builder_config
        h, w = config.height, config.width
        features = {
            "image": tf.io.FixedLenFeature([h, w, 3], tf.string),
            "mask": tf.io.FixedLenFeature([config.num_entities, h, w, 1], tf.string),
        }

        def parse(record):
            example = tf.io.parse_single_example(record, features)
            image = tf.squeeze(tf.io.decode_raw(example["image"], tf.uint8), -1)
            mask = tf.squeeze(tf.io.decode_raw(example["mask"], tf.uint8), [-1, -2])
            return image, mask

        records = tf.data.TFRecordDataset(path, compression_type="GZIP").skip(start)
        if end is not None:
            records = records.take(end - start)
        iterator = records.map(parse).as_numpy_iterator()
        position = 0
        while True:
            try:
                image, mask = next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError as error:
                raise ValueError(
                    f"{path}: record {start + position} is not a {config.name} record (expected GZIP "
                    f"TFRecords with 'image' [{h}, {w}, 3] and 'mask' [{config.num_entities}, {h}, {w}, 1] "
                    f"1-byte-string features): {_short(error.message)}"
                ) from error
            labels = mask.argmax(axis=0).astype(
                np.int64
            )  # [h, w]; all-zero pixels give entity 0
            labels = np.maximum(labels - (config.background_entities - 1), 0).astype(
                np.uint8
            )
            if config.crop_resize:
                size = (config.crop_resize, config.crop_resize)
                box = preprocessing.clevr_crop_box(w, h)
                image = preprocessing.resize_image(Image.fromarray(image), size, box)
                labels = preprocessing.resize_labels(labels, size, box)
            yield (
                start + position,
                {
                    "image": common.encode_png(image),
                    "segmentation": labels,
                    "index": position,
                },
            )
            position += 1


def _short(message: str) -> str:
    """The informative tail of a tf.data error message (drops the {{function_node ...}} prefix)."""
    message = re.sub(r"\{\{[^}]*\}\}", "", message.splitlines()[0])
    return (
        message.split("Iterator::Root::ParallelMapV2:")[-1]
        .split("Iterator::Root::MapDataset:")[-1]
        .strip()
    )


def _find_file(root: str, filename: str) -> str:
    """The first `filename` below root (sorted walk), or FileNotFoundError with download instructions."""
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        if filename in files:
            return os.path.join(dirpath, filename)
    raise FileNotFoundError(f"{filename} not found under {root}. {_INSTRUCTIONS}")
