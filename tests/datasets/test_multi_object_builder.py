"""Tests of the multi_object builder on GZIP TFRecords with DeepMind's feature keys and 1-byte strings."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from datasets.multi_object import CLEVR_WITH_MASKS, OBJECTS_ROOM, AstMultiObject


def _bytes_feature(array):
    # DeepMind's encoding: every uint8 value is its own 1-byte string.
    return tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[bytes([v]) for v in array.ravel()])
    )


def _float_feature(array):
    return tf.train.Feature(
        float_list=tf.train.FloatList(value=np.asarray(array, np.float32).ravel())
    )


def _write(path, scenes, clevr):
    with tf.io.TFRecordWriter(
        path, options=tf.io.TFRecordOptions(compression_type="GZIP")
    ) as writer:
        for image, masks in scenes:
            feature = {"image": _bytes_feature(image), "mask": _bytes_feature(masks)}
            if clevr:
                e = masks.shape[0]
                for key in ("x", "y", "z", "rotation", "visibility"):
                    feature[key] = _float_feature(np.zeros(e))
                feature["pixel_coords"] = _float_feature(np.zeros((e, 3)))
                for key in ("size", "material", "shape", "color"):
                    feature[key] = _bytes_feature(np.zeros(e, np.uint8))
            writer.write(
                tf.train.Example(
                    features=tf.train.Features(feature=feature)
                ).SerializeToString()
            )


def _scenes(rng, n, h, w, entities):
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        owner = rng.integers(0, entities, (h, w))
        masks = (np.arange(entities)[:, None, None] == owner[None]).astype(np.uint8)[
            ..., None
        ] * 255
        out.append((image, masks))
    return out


def _build(config, manual_dir, data_dir):
    builder = AstMultiObject(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def test_objects_room(tmp_path):
    rng = np.random.default_rng(0)
    scenes = _scenes(rng, 6, 64, 64, 7)
    os.makedirs(tmp_path / "m" / "objects_room")
    _write(
        str(tmp_path / "m" / "objects_room" / "objects_room_train.tfrecords"),
        scenes,
        clevr=False,
    )
    config = dataclasses.replace(
        OBJECTS_ROOM, name="tiny_objects_room", num_test=2, num_validation=1
    )
    builder = _build(config, tmp_path / "m", tmp_path / "d")
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {
        "train": 3,
        "validation": 1,
        "test": 2,
    }
    train = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert [int(e["index"]) for e in train] == [0, 1, 2]
    for example, (image, masks) in zip(train, scenes[3:]):
        np.testing.assert_array_equal(example["image"], image)
        expected = np.maximum(masks[..., 0].argmax(0) - 3, 0)
        np.testing.assert_array_equal(example["segmentation"], expected)
        assert set(np.unique(example["segmentation"])) == {0, 1, 2, 3}


def test_clevr_with_masks_crop_and_resize(tmp_path):
    rng = np.random.default_rng(1)
    scenes = _scenes(rng, 3, 240, 320, 11)
    os.makedirs(tmp_path / "m")
    _write(str(tmp_path / "m" / "clevr_with_masks_train.tfrecords"), scenes, clevr=True)
    config = dataclasses.replace(
        CLEVR_WITH_MASKS, name="tiny_clevr", num_test=1, num_validation=1
    )
    builder = _build(config, tmp_path / "m", tmp_path / "d")
    (test,) = list(tfds.as_numpy(builder.as_dataset(split="test")))
    image, masks = scenes[0]
    box = (64, 24, 256, 216)
    expected = np.asarray(
        Image.fromarray(image).crop(box).resize((128, 128), Image.BILINEAR)
    )
    np.testing.assert_array_equal(test["image"], expected)
    labels = Image.fromarray(masks[..., 0].argmax(0).astype(np.uint8))
    np.testing.assert_array_equal(
        test["segmentation"],
        np.asarray(labels.crop(box).resize((128, 128), Image.NEAREST)),
    )
    assert test["segmentation"].max() == 10 and int(test["index"]) == 0
    assert builder.info.splits["train"].num_examples == 1


def test_missing_file_and_bad_records(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "other.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError, match="objects_room_train.tfrecords not found"
    ):
        _build(
            dataclasses.replace(OBJECTS_ROOM, name="tiny_missing"),
            tmp_path / "m",
            tmp_path / "d",
        )
    # A TFRecord with the wrong image size is reported with the file and the expected format.
    rng = np.random.default_rng(2)
    _write(
        str(tmp_path / "m" / "objects_room_train.tfrecords"),
        _scenes(rng, 2, 32, 32, 7),
        clevr=False,
    )
    with pytest.raises(
        ValueError, match="record [01] is not a tiny_wrong record.*Key: (image|mask)"
    ):
        _build(
            dataclasses.replace(
                OBJECTS_ROOM, name="tiny_wrong", num_test=1, num_validation=0
            ),
            tmp_path / "m",
            tmp_path / "d",
        )
    assert not list((tmp_path / "d").rglob("1.0.0"))
