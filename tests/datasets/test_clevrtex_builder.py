"""Tests of the CLEVRTEX builder on small files written in the real on-disk format."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets.clevrtex import AstClevrtex, ClevrtexConfig

N = 10


def _write_scene(folder, variant, index, rng, mask_size=(320, 240), max_label=4):
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"CLEVRTEX_{variant}_{index:06d}")
    rgba = rng.integers(0, 256, (240, 320, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(stem + ".png")
    labels = rng.integers(
        0, max_label + 1, (mask_size[1], mask_size[0]), dtype=np.uint8
    )
    mask = Image.fromarray(labels, mode="P")
    mask.putpalette(list(range(256)) * 3)
    mask.save(stem + "_flat.png")
    with open(stem + ".json", "w") as f:
        json.dump({"num_objects": int(labels.max()), "image_index": index}, f)
    # Extra passes the loader must ignore.
    Image.fromarray(rgba, mode="RGBA").save(stem + "_albedo_0001.png")


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clevrtex_manual")
    rng = np.random.default_rng(0)
    for i in range(N):
        _write_scene(
            os.path.join(root, "clevrtex_full", str(i // 1000)), "full", i, rng
        )
    return str(root)


def _build(config, manual_dir, data_dir):
    builder = AstClevrtex(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


@pytest.fixture(scope="module")
def built(manual_dir, tmp_path_factory):
    return _build(
        ClevrtexConfig(name="tiny_full", variant="full"),
        manual_dir,
        tmp_path_factory.mktemp("d"),
    )


def test_splits_by_index_fraction(built):
    splits = built.info.splits
    assert {s: splits[s].num_examples for s in splits} == {
        "train": 8,
        "validation": 1,
        "test": 1,
    }


def test_crop_resize_and_labels_match_pil(built, manual_dir):
    examples = list(tfds.as_numpy(built.as_dataset(split="train")))
    assert [int(e["index"]) for e in examples] == list(range(8))
    for position, example in enumerate(examples[:3]):
        stem = os.path.join(
            manual_dir, "clevrtex_full", "0", f"CLEVRTEX_full_{position + 2:06d}"
        )
        image = Image.open(stem + ".png")
        expected = np.asarray(
            image.crop((64, 24, 256, 216)).resize((128, 128), Image.BILINEAR)
        )[..., :3]
        np.testing.assert_array_equal(example["image"], expected)
        mask = Image.open(stem + "_flat.png")
        expected_mask = np.asarray(
            mask.crop((64, 24, 256, 216)).resize((128, 128), Image.NEAREST)
        )
        np.testing.assert_array_equal(example["segmentation"], expected_mask)
        # PIL NEAREST samples pixel centres: output column j reads crop column floor((j + 0.5) * 1.5).
        raw = np.asarray(mask)
        cols = np.floor((np.arange(128) + 0.5) * 1.5).astype(int)
        np.testing.assert_array_equal(
            example["segmentation"], raw[24 + cols[:, None], 64 + cols[None, :]]
        )
        assert example["image"].dtype == np.uint8 and example["image"].shape == (
            128,
            128,
            3,
        )
        assert example["segmentation"].max() <= 4


def test_outd_is_test_only(tmp_path):
    rng = np.random.default_rng(1)
    manual = tmp_path / "manual"
    for i in range(3):
        _write_scene(str(manual / "clevrtex_outd" / "0"), "outd", i, rng)
    builder = _build(
        ClevrtexConfig(name="tiny_outd", variant="outd", test_only=True),
        str(manual),
        tmp_path / "d",
    )
    assert (
        list(builder.info.splits) == ["test"]
        and builder.info.splits["test"].num_examples == 3
    )


def _assert_build_fails(tmp_path, manual, error, match):
    data_dir = tmp_path / "data"
    with pytest.raises(error, match=match):
        _build(ClevrtexConfig(name="tiny_bad", variant="full"), str(manual), data_dir)
    # Nothing half-written: no dataset version directory and no incomplete temp dir is left behind.
    # (TFDS keeps only a small `.config/metadata.json` about the builder class.)
    leftovers = [
        p
        for p in data_dir.rglob("*")
        if "incomplete" in p.name or p.name == "1.0.0" or "tfrecord" in p.name
    ]
    assert leftovers == []
    assert not AstClevrtex(
        config=ClevrtexConfig(name="tiny_bad", variant="full"), data_dir=str(data_dir)
    ).is_prepared()


def test_missing_manual_dir(tmp_path):
    _assert_build_fails(
        tmp_path, tmp_path / "nowhere", FileNotFoundError, "does not exist or is empty"
    )


def test_no_images_found(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "readme.txt").write_text("x")
    _assert_build_fails(
        tmp_path, tmp_path / "m", FileNotFoundError, "No CLEVRTEX_full_NNNNNN.png"
    )


def test_not_an_image(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "m" / "clevrtex_full" / "0"
    for i in range(10):
        _write_scene(str(folder), "full", i, rng)
    (folder / "CLEVRTEX_full_000005.png").write_bytes(b"not a png")
    _assert_build_fails(
        tmp_path,
        tmp_path / "m",
        ValueError,
        "CLEVRTEX_full_000005.png is not a readable image",
    )


def test_mask_size_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "m" / "clevrtex_full" / "0"
    for i in range(10):
        _write_scene(
            str(folder), "full", i, rng, mask_size=(160, 120) if i == 0 else (320, 240)
        )
    _assert_build_fails(
        tmp_path, tmp_path / "m", ValueError, "CLEVRTEX_full_000000_flat.png is 160x120"
    )


def test_too_many_objects(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "m" / "clevrtex_full" / "0"
    for i in range(10):
        _write_scene(str(folder), "full", i, rng, max_label=12 if i == 0 else 3)
    _assert_build_fails(
        tmp_path, tmp_path / "m", ValueError, "more objects than the 10"
    )
