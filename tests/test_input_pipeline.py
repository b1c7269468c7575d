"""Tests of ast_seg_jax/input_pipeline.py on the tiny built-in shapes dataset and a folder dataset."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from ast_seg_jax import input_pipeline


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    config = ml_collections.ConfigDict(
        {
            "name": "shapes",
            "config": "tiny",
            "data_dir": str(tmp_path_factory.mktemp("tfds")),
            "shuffle_buffer": 64,
        }
    )
    input_pipeline.get_builder(config)  # Generated on first use.
    return config


def _indices(iterator, steps):
    return [next(iterator)["index"].tolist() for _ in range(steps)]


def test_train_batches(shapes_config):
    assert input_pipeline.num_examples(shapes_config, "train") == 256
    batch = next(
        input_pipeline.create_train_iterator(shapes_config, global_batch_size=4, seed=0)
    )
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert (
        batch["segmentation"].shape == (4, 64, 64)
        and batch["segmentation"].dtype == np.int32
    )
    assert batch["segmentation"].max() <= 4
    assert batch["index"].dtype == np.int32 and set(batch) == {
        "image",
        "segmentation",
        "index",
    }


def test_determinism_and_exact_resume(shapes_config):
    make = input_pipeline.create_train_iterator
    first = _indices(
        make(shapes_config, global_batch_size=4, seed=1), 70
    )  # crosses an epoch (64 batches)
    assert first == _indices(make(shapes_config, global_batch_size=4, seed=1), 70)
    assert first != _indices(make(shapes_config, global_batch_size=4, seed=2), 70)
    assert sorted(np.concatenate(first[:64]).tolist()) == list(
        range(256)
    )  # one epoch = every example once
    assert first[66:70] == _indices(
        make(shapes_config, global_batch_size=4, seed=1, start_step=66), 4
    )


def test_eval_covers_each_example_once(shapes_config):
    batches = list(
        input_pipeline.create_eval_iterator(
            shapes_config, split="test", global_batch_size=24
        )
    )
    assert len(batches) == 3  # 64 examples -> 24 + 24 + 16 valid + 8 padding
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert valid.sum() == 64 and not valid[64:].any()
    np.testing.assert_array_equal(index[valid], np.arange(64))
    assert np.all(index[~valid] == -1) and batches[-1]["image"][-1].max() == 0


def test_export_images_writes_the_split_as_pngs(shapes_config, tmp_path):
    paths = input_pipeline.export_images(
        shapes_config, str(tmp_path / "out"), split="test", num=5
    )
    assert [p.rsplit("/", 1)[-1] for p in paths] == [
        f"test_{i:05d}.png" for i in range(5)
    ]
    first = next(
        input_pipeline.create_eval_iterator(
            shapes_config, split="test", global_batch_size=8
        )
    )
    for i, path in enumerate(paths):
        written = np.asarray(Image.open(path))
        assert written.dtype == np.uint8 and written.shape == (64, 64, 3)
        np.testing.assert_allclose(written / 255.0, first["image"][i], atol=1e-6)
    # More than the split holds: all 64 test images, no padding.
    assert (
        len(
            input_pipeline.export_images(
                shapes_config, str(tmp_path / "all"), split="test", num=100
            )
        )
        == 64
    )
    with pytest.raises(ValueError, match="positive"):
        input_pipeline.export_images(shapes_config, str(tmp_path), split="test", num=0)


def test_to_global_arrays(shapes_config):
    batch = next(
        input_pipeline.create_train_iterator(shapes_config, global_batch_size=4, seed=0)
    )
    mesh = Mesh(np.array(jax.devices()), ("data",))
    arrays = input_pipeline.to_global_arrays(batch, mesh)
    assert arrays["image"].shape == (4, 64, 64, 3)
    assert arrays["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(
        np.asarray(arrays["segmentation"]), batch["segmentation"]
    )


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
                tmp_path / split / "images" / f"{i}.png"
            )
    config = ml_collections.ConfigDict(
        {
            "name": "folder",
            "dir": str(tmp_path),
            "image_size": (8, 8),
            "shuffle_buffer": 8,
        }
    )
    batch = next(
        input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
    )
    assert batch["image"].shape == (2, 8, 8, 3) and "segmentation" not in batch
    batches = list(input_pipeline.create_eval_iterator(config, global_batch_size=2))
    assert np.concatenate([b["index"] for b in batches]).tolist() == [0, 1, 2, 3, 4, -1]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset name 'mnist'"):
        input_pipeline.get_builder(ml_collections.ConfigDict({"name": "mnist"}))
    with pytest.raises(ValueError, match="Unknown clevrtex config 'fool'"):
        input_pipeline.get_builder(
            ml_collections.ConfigDict({"name": "clevrtex", "config": "fool"})
        )
    config = ml_collections.ConfigDict(
        {"name": "clevrtex", "config": "camo", "data_dir": str(tmp_path)}
    )
    with pytest.raises(
        FileNotFoundError, match="prepare_data --dataset=clevrtex/camo --manual_dir=DIR"
    ):
        input_pipeline.get_builder(config)
    with pytest.raises(ValueError, match="divisible"):
        input_pipeline.create_train_iterator(config, global_batch_size=0, seed=0)


def test_image_size_must_match_stored_size(shapes_config):
    config = ml_collections.ConfigDict(shapes_config.to_dict())
    config.image_size = (128, 128)
    with pytest.raises(ValueError, match=r"stored at \(64, 64\)"):
        input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
