"""Small fake datasets in the real on-disk formats, prepared through the project's own builders.

Each `prepare_*` function writes a handful of random scenes the way the downloaded dataset stores them
(CLEVRTEX PNG + palette mask + json, DeepMind GZIP TFRecords of 1-byte strings, ShapeStacks recordings /
iseg maps / split lists, an image folder), runs the real TFDS builder over them where there is one, and
returns the config overrides (dotted keys) that point a config at the result. The images are noise with a
few rectangular "objects" in the label maps: enough for the input pipeline, the model and the metrics to
take every code path, meaningless for learning.

`prepare_dataset(name, root)` dispatches on an experiment config's `data.name`.
"""

import contextlib
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image


def _label_map(rng, height: int, width: int, num_objects: int) -> np.ndarray:
    """uint8 [h, w] labels: background 0 and `num_objects` random rectangles labelled 1..n."""
    labels = np.zeros((height, width), np.uint8)
    for label in range(1, num_objects + 1):
        h = int(rng.integers(height // 6, height // 2))
        w = int(rng.integers(width // 6, width // 2))
        top = int(rng.integers(0, height - h))
        left = int(rng.integers(0, width - w))
        labels[top : top + h, left : left + w] = label
    return labels


def _noise(rng, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _download_and_prepare(builder, manual_dir: str):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


# ----------------------------------------------------------------------------------------------------------
# CLEVRTEX: clevrtex_full/<i // 1000>/CLEVRTEX_full_NNNNNN{.png,_flat.png,.json}, 320x240 RGBA.


def prepare_clevrtex(root: str, num_scenes: int = 10, seed: int = 0) -> dict:
    """The `full` variant (train 80 %, validation 10 %, test 10 % of `num_scenes`)."""
    from datasets.clevrtex import AstClevrtex

    rng = np.random.default_rng(seed)
    manual = os.path.join(root, "clevrtex_manual")
    for index in range(num_scenes):
        folder = os.path.join(manual, "clevrtex_full", str(index // 1000))
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, f"CLEVRTEX_full_{index:06d}")
        rgba = _noise(rng, 240, 320, 4)
        rgba[..., 3] = 255
        Image.fromarray(rgba, mode="RGBA").save(stem + ".png")
        labels = _label_map(rng, 240, 320, num_objects=3)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(list(range(256)) * 3)
        mask.save(stem + "_flat.png")
        with open(stem + ".json", "w") as f:
            json.dump({"num_objects": int(labels.max()), "image_index": index}, f)
    data_dir = os.path.join(root, "tfds")
    _download_and_prepare(AstClevrtex(config="full", data_dir=data_dir), manual)
    return {"data.data_dir": data_dir}


# ----------------------------------------------------------------------------------------------------------
# DeepMind multi_object_datasets: GZIP TFRecords, every uint8 its own 1-byte string.


def _bytes_feature(array: np.ndarray) -> tf.train.Feature:
    values = [bytes((v,)) for v in np.asarray(array, np.uint8).ravel().tolist()]
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _float_feature(array) -> tf.train.Feature:
    values = np.asarray(array, np.float32).ravel()
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def write_multi_object_records(
    path: str,
    rng,
    num_records: int,
    height: int,
    width: int,
    entities: int,
    clevr: bool,
) -> None:
    """`num_records` random scenes with DeepMind's feature keys (and CLEVR's extra keys when `clevr`)."""
    with tf.io.TFRecordWriter(
        path, options=tf.io.TFRecordOptions(compression_type="GZIP")
    ) as writer:
        for _ in range(num_records):
            owner = _label_map(rng, height, width, num_objects=entities - 1)
            masks = (np.arange(entities)[:, None, None] == owner[None]).astype(np.uint8)
            feature = {
                "image": _bytes_feature(_noise(rng, height, width)),
                "mask": _bytes_feature(masks[..., None] * 255),
            }
            if clevr:
                for key in ("x", "y", "z", "rotation", "visibility"):
                    feature[key] = _float_feature(np.zeros(entities))
                feature["pixel_coords"] = _float_feature(np.zeros((entities, 3)))
                for key in ("size", "material", "shape", "color"):
                    feature[key] = _bytes_feature(np.zeros(entities, np.uint8))
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


@contextlib.contextmanager
def _changed(config, **changes):
    """Temporarily changes fields of a registered builder config (TFDS refuses a custom config that
    reuses a registered name, and the pipeline looks the dataset up under the registered name)."""
    old = {key: getattr(config, key) for key in changes}
    for key, value in changes.items():
        setattr(config, key, value)
    try:
        yield config
    finally:
        for key, value in old.items():
            setattr(config, key, value)


def _prepare_multi_object(root: str, config, num_records: int, seed: int) -> dict:
    """Builds the registered `config` from `num_records` fake records.

    The split sizes written to the prepared dataset's metadata are what the input pipeline reads back,
    so a registered config built with small splits reads like the real one.
    """
    from datasets.multi_object import AstMultiObject

    rng = np.random.default_rng(seed)
    manual = os.path.join(root, f"{config.name}_manual")
    os.makedirs(manual, exist_ok=True)
    write_multi_object_records(
        os.path.join(manual, config.filename),
        rng,
        num_records,
        config.height,
        config.width,
        config.num_entities,
        clevr=config.crop_resize > 0,
    )
    data_dir = os.path.join(root, "tfds")
    _download_and_prepare(AstMultiObject(config=config.name, data_dir=data_dir), manual)
    return {"data.data_dir": data_dir}


def prepare_objects_room(root: str, seed: int = 0) -> dict:
    """objects_room at its real 64x64 with 7 entity masks: test 2, validation 1, train 5 records."""
    from datasets.multi_object import OBJECTS_ROOM

    with _changed(OBJECTS_ROOM, num_test=2, num_validation=1) as config:
        return _prepare_multi_object(root, config, num_records=8, seed=seed)


def prepare_clevr(root: str, seed: int = 0) -> dict:
    """clevr_with_masks with 11 entity masks, cropped and resized to the real 128x128.

    The fake source images are 60x80 instead of 240x320 (one byte string per value makes full-size
    records slow to write); the builder's crop box follows the source size.
    """
    from datasets.multi_object import CLEVR_WITH_MASKS

    with _changed(
        CLEVR_WITH_MASKS, height=60, width=80, num_test=2, num_validation=1
    ) as config:
        return _prepare_multi_object(root, config, num_records=8, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# ShapeStacks: recordings/<scenario>/rgb-...-cam_<n>-mono-0.png, iseg/<scenario>/iseg-...-cam_<n>-mono-0.map,
# splits/default/{train,eval,test}.txt.


def prepare_shapestacks(root: str, seed: int = 0) -> dict:
    """Two train scenarios and one each for eval and test, 2 cameras x 2 lights each (8 / 4 / 4)."""
    from datasets.shapestacks import AstShapestacks

    rng = np.random.default_rng(seed)
    manual = os.path.join(root, "shapestacks_manual", "shapestacks")
    splits = {"train": ["env_a", "env_b"], "eval": ["env_c"], "test": ["env_d"]}
    os.makedirs(os.path.join(manual, "splits", "default"))
    for split, scenarios in splits.items():
        with open(os.path.join(manual, "splits", "default", f"{split}.txt"), "w") as f:
            f.write("".join(s + "\n" for s in scenarios))
        for scenario in scenarios:
            recordings = os.path.join(manual, "recordings", scenario)
            iseg = os.path.join(manual, "iseg", scenario)
            os.makedirs(recordings)
            os.makedirs(iseg)
            for cam in (1, 2):
                # The renderer's gray colormap (vmin 0, vmax 8): channel 0 = 32 * label, saved as PNG.
                value = _label_map(rng, 224, 224, num_objects=3) * 32
                rgba = np.stack([value, value, value, np.full_like(value, 255)], -1)
                mask_name = f"iseg-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.map"
                with open(os.path.join(iseg, mask_name), "wb") as f:
                    Image.fromarray(rgba, mode="RGBA").save(f, format="PNG")
                for light in (0, 1):
                    name = f"rgb-w=0-f=0-l={light}-c=original-cam_{cam}-mono-0.png"
                    Image.fromarray(_noise(rng, 224, 224)).save(
                        os.path.join(recordings, name)
                    )
    data_dir = os.path.join(root, "tfds")
    _download_and_prepare(
        AstShapestacks(config="default", data_dir=data_dir), os.path.dirname(manual)
    )
    return {"data.data_dir": data_dir}


# ----------------------------------------------------------------------------------------------------------
# Image folder: DIR/{train,test}/images/*.png with masks/<stem>.png.


def prepare_folder(
    root: str, num_images: int = 6, size: tuple[int, int] = (48, 40), seed: int = 0
) -> dict:
    """`num_images` PNGs of `size` (width, height) per split, with label masks."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "folder")
    width, height = size
    for split in ("train", "test"):
        os.makedirs(os.path.join(folder, split, "images"))
        os.makedirs(os.path.join(folder, split, "masks"))
        for i in range(num_images):
            Image.fromarray(_noise(rng, height, width)).save(
                os.path.join(folder, split, "images", f"img_{i:02d}.png")
            )
            Image.fromarray(_label_map(rng, height, width, 3), mode="L").save(
                os.path.join(folder, split, "masks", f"img_{i:02d}.png")
            )
    return {"data.dir": folder}


def prepare_shapes(root: str) -> dict:
    """The built-in `tiny` shapes dataset (generated, not faked)."""
    from ast_seg_jax import input_pipeline

    data_dir = os.path.join(root, "tfds")
    input_pipeline.prepare("shapes", "tiny", data_dir)
    return {"data.config": "tiny", "data.data_dir": data_dir}


_PREPARE = {
    "shapes": prepare_shapes,
    "clevrtex": prepare_clevrtex,
    "clevr": prepare_clevr,
    "objects_room": prepare_objects_room,
    "shapestacks": prepare_shapestacks,
    "folder": prepare_folder,
}


def prepare_dataset(name: str, root: str) -> dict:
    """Prepares a small dataset for config `data.name == name` under `root`; returns config overrides."""
    os.makedirs(root, exist_ok=True)
    return _PREPARE[name](root)
