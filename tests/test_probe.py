"""The shape probe: object-to-slot matching, the logistic regression, and a run on the built-in data."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ast_seg_jax import probe
from ast_seg_jax.models.compositing import segment
from experiments.configs import shapes


def test_match_objects_takes_the_covering_slot_and_one_object_per_slot():
    true = np.zeros((6, 6), np.int64)
    true[0:2, 0:2] = 1  # object 0: slot 2 covers it
    true[0:2, 4:6] = 2  # object 1: mostly background -> missed
    true[4:6, 0:3] = (
        3  # objects 2 and 3 both mostly under slot 0; object 2 has more pixels
    )
    true[4:6, 4:5] = 4
    pred = np.zeros((6, 6), np.int64)
    pred[0:2, 0:2] = 3
    pred[0:1, 4:5] = 2
    pred[4:6, 0:6] = 1
    assert probe.match_objects(true, pred, 4) == {0: 2, 2: 0}


def _polygon_mask(kind: str, radius: float, angle: float, centre=(40.0, 36.0)):
    """A 96x96 mask of a disc, square or cross of `radius` turned by `angle`."""
    rows, cols = np.mgrid[0:96, 0:96] + 0.5
    x, y = cols - centre[0], rows - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * x + s * y) / radius, (-s * x + c * y) / radius
    if kind == "disc":
        return u**2 + v**2 <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    return ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.36)) | (
        (np.abs(u) <= 0.36) & (np.abs(v) <= 1.0)
    )


def test_shape_descriptors_ignore_position_angle_and_size_but_not_the_shape():
    square = _polygon_mask("square", 12.0, 0.0)
    d = probe.shape_descriptors(square)
    assert d.shape == (probe.NUM_DESCRIPTORS,)
    # Moving and turning by 90 degrees map the pixel grid onto itself: the same values.
    np.testing.assert_allclose(
        probe.shape_descriptors(np.roll(square, (9, -7), (0, 1))),
        d,
        rtol=1e-9,
        atol=1e-9,
    )
    np.testing.assert_allclose(
        probe.shape_descriptors(np.rot90(square)), d, rtol=1e-9, atol=1e-9
    )
    # Other angles and sizes change only the rasterisation; other shapes change much more.
    variants = [
        probe.shape_descriptors(_polygon_mask("square", r, a))
        for r, a in [(12.0, 0.4), (9.0, 1.0), (20.0, 0.25)]
    ]
    spread = max(np.abs(v - d).max() for v in variants)
    for kind in ("disc", "cross"):
        other = probe.shape_descriptors(_polygon_mask(kind, 12.0, 0.3))
        assert np.abs(other - d).max() > 3 * spread, kind
    np.testing.assert_array_equal(probe.shape_descriptors(np.zeros((8, 8))), 0.0)


def test_logistic_regression_separates_what_is_separable_and_nothing_else():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centres = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    x = centres[y] + rng.normal(size=(300, 2))
    x = np.concatenate([x, rng.normal(size=(300, 6))], axis=1)
    assert probe.cross_validated_accuracy(x, y, 3) > 0.95
    noise = rng.normal(size=(300, 8))
    assert probe.cross_validated_accuracy(noise, y, 3) < 0.5
    with pytest.raises(ValueError, match="at least 5"):
        probe.cross_validated_accuracy(x[:3], y[:3], 3)


def test_gradient_of_the_softmax_loss_is_exact():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 4, 20)
    flat = rng.normal(size=3 * 4 + 4)
    _, grad = probe._softmax_loss(flat, x, y, 4, 0.5)
    eps = 1e-6
    numeric = [
        (
            probe._softmax_loss(flat + eps * e, x, y, 4, 0.5)[0]
            - probe._softmax_loss(flat - eps * e, x, y, 4, 0.5)[0]
        )
        / (2 * eps)
        for e in np.eye(len(flat))
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_probe_on_the_built_in_scenes_reads_shapes_from_an_oracle(smoke_run):
    """Slots that are the true objects, with the one-hot kind as z_what, score 100 %."""
    config = shapes.get_config("tiny")
    config.data.data_dir = (
        smoke_run.data_dir
    )  # The session's tiny dataset, already built.
    assert probe.has_shape_labels(config.data)
    assert not probe.has_shape_labels(ml_collections.ConfigDict({"name": "folder"}))
    examples = list(probe.shape_examples(config.data, "test", 40))
    assert len(examples) == 40
    assert all(2 <= len(kinds) <= 4 for _, _, kinds in examples)
    truth = {image.tobytes(): (labels, kinds) for image, labels, kinds in examples}

    def oracle(images):
        rows = [truth[image.tobytes()] for image in images]
        # Weights [b, K+1, h, w] whose argmax is the true label map (slot j - 1 = object j).
        weights = jnp.stack(
            [jnp.eye(5)[jnp.asarray(labels)].transpose(2, 0, 1) for labels, _ in rows]
        )
        z_what = np.zeros((len(images), 4, 6), np.float32)
        for i, (_, kinds) in enumerate(rows):
            z_what[i, np.arange(len(kinds)), kinds] = 1.0
        return segment(weights), z_what

    out = probe.shape_probe(
        oracle, config.data, split="test", num_images=40, batch_size=16
    )
    assert out["shape_probe_found"] == 1.0
    assert out["shape_probe_objects"] == sum(len(k) for _, _, k in examples)
    assert out["shape_probe"] == 1.0
    assert 0.15 < out["shape_probe_chance"] < 0.5
    # The oracle's segments are the true masks: its mask probe is the reference, well above chance.
    assert out["mask_probe"] == out["mask_probe_reference"]
    assert out["mask_probe"] > out["shape_probe_chance"] + 0.25

    def blobs(images):
        # Every object drawn as a disc of its own area at its centroid, as a model of blobs would.
        pred, z_what = oracle(images)
        pred = np.asarray(pred)
        discs = np.zeros_like(pred)
        rows, cols = np.mgrid[0 : pred.shape[1], 0 : pred.shape[2]]
        for i in range(len(pred)):
            for label in range(1, pred[i].max() + 1):
                inside = pred[i] == label
                if inside.any():
                    r2 = inside.sum() / np.pi
                    near = (rows - rows[inside].mean()) ** 2 + (
                        cols - cols[inside].mean()
                    ) ** 2 <= r2
                    discs[i][near] = label
        return discs, z_what

    blob_out = probe.shape_probe(
        blobs, config.data, split="test", num_images=40, batch_size=16
    )
    assert blob_out["mask_probe"] < blob_out["mask_probe_reference"] - 0.2
    assert blob_out["mask_probe"] < out["mask_probe"] - 0.2
    # A model that leaves everything to the background matches nothing and gives no accuracy.
    blank = probe.shape_probe(
        lambda images: (
            np.zeros((len(images), 64, 64), np.int64),
            np.zeros((len(images), 4, 6)),
        ),
        config.data,
        split="test",
        num_images=16,
        batch_size=16,
    )
    assert blank["shape_probe_objects"] == 0 and np.isnan(blank["shape_probe"])
