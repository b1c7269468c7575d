"""Tests of the ShapeStacks builder on RGBA `.map` masks, rgb PNGs and split lists in the real layout."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets.shapestacks import AstShapestacks, ShapestacksConfig

SPLITS = {"train": ["env_a", "env_b"], "eval": ["env_c"], "test": ["env_d"]}


def _write_map(path, labels):
    # Gray colormap with vmin 0, vmax 8 as the ShapeStacks renderer writes it: channel 0 = 32 * label.
    value = (labels * 32).astype(np.uint8)
    rgba = np.stack([value, value, value, np.full_like(value, 255)], axis=-1)
    with open(path, "wb") as f:
        Image.fromarray(rgba, mode="RGBA").save(f, format="PNG")


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapestacks") / "shapestacks"
    rng = np.random.default_rng(0)
    os.makedirs(root / "splits" / "default")
    for split, scenarios in SPLITS.items():
        (root / "splits" / "default" / f"{split}.txt").write_text(
            "".join(s + "\n" for s in scenarios)
        )
        for scenario in scenarios:
            os.makedirs(root / "recordings" / scenario)
            os.makedirs(root / "iseg" / scenario)
            for cam in (1, 2):
                _write_map(
                    root
                    / "iseg"
                    / scenario
                    / f"iseg-w=0-f=0-l=0-c=original-cam_{cam}-mono-0.map",
                    rng.integers(0, 7, (224, 224)),
                )
                for light in (0, 1):
                    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                    name = f"rgb-w=0-f=0-l={light}-c=original-cam_{cam}-mono-0.png"
                    Image.fromarray(image).save(root / "recordings" / scenario / name)
            (root / "recordings" / scenario / "log.txt").write_text("not a sample")
    return root.parent


def _build(manual_dir, data_dir, name="tiny"):
    builder = AstShapestacks(
        config=ShapestacksConfig(name=name), data_dir=str(data_dir)
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def test_splits_preprocessing_and_labels(manual_dir, tmp_path):
    builder = _build(manual_dir, tmp_path)
    sizes = {s: v.num_examples for s, v in builder.info.splits.items()}
    assert sizes == {"train": 8, "validation": 4, "test": 4}
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert [int(e["index"]) for e in examples] == list(range(8))
    root = manual_dir / "shapestacks"
    # Sorted file names of env_a first: l=0 cam_1, l=0 cam_2, l=1 cam_1, l=1 cam_2.
    third = examples[1]
    image = Image.open(
        root / "recordings" / "env_a" / "rgb-w=0-f=0-l=0-c=original-cam_2-mono-0.png"
    )
    expected = np.asarray(
        image.crop((14, 14, 210, 210)).resize((64, 64), Image.BILINEAR)
    )
    np.testing.assert_array_equal(third["image"], expected)
    raw = np.asarray(
        Image.open(
            root / "iseg" / "env_a" / "iseg-w=0-f=0-l=0-c=original-cam_2-mono-0.map"
        )
    )
    labels = raw[14:210, 14:210, 0] // 32
    rows = np.floor(np.arange(64) * 196 / 64).astype(
        int
    )  # torch legacy nearest: 0, 3, 6, 9, ...
    assert list(rows[:4]) == [0, 3, 6, 9]
    np.testing.assert_array_equal(
        third["segmentation"], labels[rows[:, None], rows[None, :]]
    )
    assert third["segmentation"].max() == 6 and third["segmentation"].dtype == np.uint8


def test_missing_mask_and_too_many_objects(manual_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(manual_dir, root)
    mask = (
        root
        / "shapestacks"
        / "iseg"
        / "env_d"
        / "iseg-w=0-f=0-l=0-c=original-cam_1-mono-0.map"
    )
    _write_map(mask, np.full((224, 224), 7))
    with pytest.raises(ValueError, match="more objects than the 6"):
        _build(root, tmp_path / "d1", "tiny_bad")
    os.remove(mask)
    with pytest.raises(
        FileNotFoundError, match="cam_1-mono-0.map of .*rgb-w=0-f=0-l=0"
    ):
        _build(root, tmp_path / "d2", "tiny_bad")
    assert not list(tmp_path.rglob("1.0.0"))
