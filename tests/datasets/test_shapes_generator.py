"""Tests of the synthetic scene generator (datasets/shapes/generator.py)."""

import numpy as np
import pytest

from datasets.shapes import generator


@pytest.fixture(scope="module")
def scenes():
    return generator.generate(64, seed=3, image_size=64, max_objects=4)


def test_shapes_and_dtypes(scenes):
    assert (
        scenes["image"].shape == (64, 64, 64, 3) and scenes["image"].dtype == np.uint8
    )
    assert (
        scenes["segmentation"].shape == (64, 64, 64)
        and scenes["segmentation"].dtype == np.uint8
    )
    assert scenes["centre"].shape == (64, 4, 2) and scenes["bbox"].shape == (64, 4, 4)
    assert scenes["colour"].shape == (64, 4, 3) and scenes["shape"].shape == (64, 4)


def test_deterministic_for_a_seed(scenes):
    again = generator.generate(64, seed=3, image_size=64, max_objects=4)
    for key in scenes:
        np.testing.assert_array_equal(scenes[key], again[key])
    other = generator.generate(64, seed=4, image_size=64, max_objects=4)
    assert not np.array_equal(scenes["image"], other["image"])


def test_object_counts_and_labels(scenes):
    counts = scenes["num_objects"]
    assert counts.min() >= 1 and counts.max() <= 4
    assert len(np.unique(counts)) > 1
    for i in range(len(counts)):
        labels = np.unique(scenes["segmentation"][i])
        # Every object is visible, so the labels are exactly 0..num_objects.
        np.testing.assert_array_equal(labels, np.arange(counts[i] + 1))
        areas = np.bincount(scenes["segmentation"][i].ravel(), minlength=5)[
            1 : counts[i] + 1
        ]
        assert areas.min() >= 16


def test_metadata_matches_label_map(scenes):
    for i in range(16):
        n = scenes["num_objects"][i]
        assert np.all(scenes["shape"][i, :n] >= 0) and np.all(
            scenes["shape"][i, n:] == -1
        )
        assert np.all(scenes["shape"][i, :n] < len(generator.SHAPE_NAMES))
        for k in range(n):
            ys, xs = np.nonzero(scenes["segmentation"][i] == k + 1)
            np.testing.assert_array_equal(
                scenes["bbox"][i, k], [ys.min(), xs.min(), ys.max(), xs.max()]
            )
            # Flat objects: every visible pixel has the object's colour.
            np.testing.assert_array_equal(
                scenes["image"][i, ys, xs],
                np.broadcast_to(scenes["colour"][i, k], (len(ys), 3)),
            )
            cx, cy = scenes["centre"][i, k]
            assert 0 <= cx <= 64 and 0 <= cy <= 64


def test_objects_stand_out_from_background(scenes):
    # Background pixels are far (in RGB) from every object colour of the scene.
    for i in range(16):
        bg = scenes["image"][i][scenes["segmentation"][i] == 0].astype(np.float32) / 255
        for k in range(scenes["num_objects"][i]):
            colour = scenes["colour"][i, k].astype(np.float32) / 255
            assert np.linalg.norm(bg - colour, axis=-1).min() > 0.3


def test_all_shape_kinds_occur(scenes):
    assert set(np.unique(scenes["shape"])) == {-1, *range(len(generator.SHAPE_NAMES))}


@pytest.mark.parametrize("size", [64, 128])
def test_textured_variant(size):
    out = generator.generate(4, seed=0, image_size=size, max_objects=3, textured=True)
    assert out["image"].shape == (4, size, size, 3)
    assert out["segmentation"].max() <= 3
    assert np.all(out["texture"][out["shape"] >= 0] >= 1)
    # Textured objects are not a single colour.
    i, k = 0, 0
    pixels = out["image"][i][out["segmentation"][i] == k + 1]
    assert len(np.unique(pixels, axis=0)) > 1


def test_min_objects_bounds_the_count():
    out = generator.generate(64, seed=5, image_size=64, max_objects=4, min_objects=2)
    counts = out["num_objects"]
    assert counts.min() == 2 and counts.max() == 4
    for i in range(8):
        np.testing.assert_array_equal(
            np.unique(out["segmentation"][i]), np.arange(counts[i] + 1)
        )
    exact = generator.generate(8, seed=5, image_size=64, max_objects=3, min_objects=3)
    np.testing.assert_array_equal(exact["num_objects"], 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_objects"):
        generator.generate(2, seed=0, max_objects=0)
    with pytest.raises(ValueError, match="min_objects"):
        generator.generate(2, seed=0, max_objects=3, min_objects=4)
    with pytest.raises(ValueError, match="min_objects"):
        generator.generate(2, seed=0, max_objects=3, min_objects=0)
    assert generator.generate(0, seed=0)["image"].shape == (0, 64, 64, 3)


def test_fixed_background_is_shared_and_changes_nothing_else():
    fixed = generator.generate(
        16, seed=3, image_size=64, max_objects=4, fixed_background=True
    )
    free = generator.generate(16, seed=3, image_size=64, max_objects=4)
    # Same layouts (the choice does not shift the random stream; colours are picked to stand out from
    # the backdrop, so they differ) ...
    for key in ("segmentation", "shape", "centre"):
        np.testing.assert_array_equal(fixed[key], free[key])
    # ... and every background pixel has the colour of that pixel in every other scene.
    backdrop = np.zeros((64, 64, 3), np.int64)
    seen = np.zeros((64, 64), bool)
    for image, labels in zip(fixed["image"], fixed["segmentation"]):
        bg = labels == 0
        both = bg & seen
        np.testing.assert_array_equal(image[both], backdrop[both])
        backdrop[bg], seen[bg] = image[bg], True
    assert seen.mean() > 0.95
    # Top-to-bottom gradient between the two FIXED_BACKGROUND colours.
    top, bottom = backdrop[0, 0] / 255, backdrop[-1, 0] / 255
    np.testing.assert_allclose(top, generator.FIXED_BACKGROUND[0], atol=0.02)
    np.testing.assert_allclose(bottom, generator.FIXED_BACKGROUND[1], atol=0.02)
    assert not np.array_equal(free["image"][0], free["image"][1])
