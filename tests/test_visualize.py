"""Tests of the numpy + PIL figures: shapes, colours, markers and PNG output."""

import numpy as np
import pytest
from PIL import Image

from ast_seg_jax import visualize


def _sample(b=2, h=16, w=16, k=3, attention=True, gt=True, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.random((b, k + 1, h, w)).astype(np.float32)
    sample = {
        "image": rng.random((b, h, w, 3)).astype(np.float32),
        "reconstruction": rng.random((b, h, w, 3)).astype(np.float32),
        "background": rng.random((b, h, w, 3)).astype(np.float32),
        "weights": weights / weights.sum(1, keepdims=True),
        "layers": rng.random((b, k, h, w, 3)).astype(np.float32),
        "masks": rng.random((b, k, h, w)).astype(np.float32),
        "xy": rng.uniform(-0.8, 0.8, (b, k, 2)).astype(np.float32),
    }
    if attention:
        att = rng.random((b, h // 4, w // 4, k)).astype(np.float32)
        sample["attention"] = att / att.sum((1, 2), keepdims=True)
        sample["xy_pooled"] = rng.uniform(-0.8, 0.8, (b, k, 2)).astype(np.float32)
    if gt:
        sample["segmentation"] = rng.integers(0, k + 1, (b, h, w)).astype(np.int32)
    return sample


@pytest.mark.parametrize(
    "attention, gt, columns",
    [(True, True, 4 + 1 + 3 + 3), (False, True, 4 + 1 + 3), (False, False, 4 + 3)],
    ids=["all_keys", "no_attention", "required_only"],
)
def test_sample_figure_shape_and_dtype(attention, gt, columns):
    sample = _sample(attention=attention, gt=gt)
    titles, rows = visualize.sample_tiles(sample)
    assert len(titles) == columns and len(rows) == 2
    # 16 px images are upscaled by the integer factor 8 to 128 px tiles.
    assert all(tile.shape == (128, 128, 3) for row in rows for tile in row)
    assert all(len(row) == columns for row in rows)
    fig = visualize.sample_figure(sample)
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[-1] == 3
    gap = visualize._GAP
    assert fig.shape[1] == columns * 128 + (columns + 1) * gap
    assert fig.shape[0] > 2 * 128


def test_max_samples_limits_rows_and_large_images_are_not_scaled():
    sample = _sample(b=3, h=160, w=144, k=2, attention=False)
    _, rows = visualize.sample_tiles(sample, max_samples=2)
    assert len(rows) == 2 and rows[0][0].shape == (160, 144, 3)
    np.testing.assert_array_equal(rows[1][0], visualize.to_uint8(sample["image"][1]))


def test_slot_colours_are_consistent_between_segmentation_and_layers():
    sample = _sample(k=3)
    colors = visualize.palette(4)
    titles, rows = visualize.sample_tiles(sample)
    seg_tile = rows[0][titles.index("segmentation")]
    labels = np.argmax(sample["weights"][0], axis=0).repeat(8, 0).repeat(8, 1)
    np.testing.assert_array_equal(seg_tile, colors[labels])
    for i in range(3):
        layer = rows[0][titles.index(f"slot {i + 1}")]
        attention = rows[0][titles.index(f"attention {i + 1}")]
        for tile in (layer, attention):
            # The frame (away from any marker near the corners) has the slot's colour.
            np.testing.assert_array_equal(
                tile[0, 40:90], np.tile(colors[i + 1], (50, 1))
            )
            np.testing.assert_array_equal(
                tile[40:90, -1], np.tile(colors[i + 1], (50, 1))
            )


def test_segmentation_tile_shows_the_given_labels():
    sample = _sample(k=3)
    sample["labels"] = np.zeros((2, 16, 16), np.int32)
    sample["labels"][0, :8] = 2
    titles, rows = visualize.sample_tiles(sample)
    seg_tile = rows[0][titles.index("segmentation")]
    expected = visualize.palette(4)[sample["labels"][0].repeat(8, 0).repeat(8, 1)]
    np.testing.assert_array_equal(seg_tile, expected)
    sample["labels"] = sample["labels"].astype(np.float32)
    with pytest.raises(ValueError, match="labels"):
        visualize.sample_tiles(sample)


def test_layer_tile_shows_layer_colour_under_a_full_mask():
    sample = _sample(k=2, attention=False, gt=False)
    sample["masks"][0, 1] = 1.0
    sample["layers"][0, 1] = np.array([0.0, 1.0, 0.0])
    sample["xy"][0, 1] = np.array([-1.0, -1.0])  # marker outside the checked area
    titles, rows = visualize.sample_tiles(sample)
    tile = rows[0][titles.index("slot 2")]
    np.testing.assert_array_equal(
        tile[60:100, 60:100], np.full((40, 40, 3), [0, 255, 0])
    )


def test_markers_are_drawn_at_the_positions():
    sample = _sample(k=1, gt=False)
    sample["attention"][:] = 0.0  # a black heatmap, so markers stand out
    sample["image"][:] = 0.0
    sample["xy"][0, 0] = [0.5, -0.5]  # final position: dot in slot colour
    sample["xy_pooled"][0, 0] = [-0.5, 0.5]  # soft-argmax: white cross
    titles, rows = visualize.sample_tiles(sample)
    tile = rows[0][titles.index("attention 1")]
    color = visualize.palette(2)[1]
    # Pixel (col, row) of x = 0.5, y = -0.5 on a 128 px tile: 95.5, 31.5.
    np.testing.assert_array_equal(tile[31, 95], color)
    np.testing.assert_array_equal(tile[95, 31], [255, 255, 255])
    assert tile[64, 64].max() < 5  # the dark end of the heat ramp, no marker


def test_colorize_overlay_and_palette():
    labels = np.array([[0, 1], [2, 25]])
    rgb = visualize.colorize(labels, 30)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
    # A label's colour does not depend on the palette size, and colours are distinct.
    np.testing.assert_array_equal(visualize.palette(40)[:30], visualize.palette(30))
    assert len({tuple(c) for c in visualize.palette(40)}) == 40
    with pytest.raises(ValueError, match="num_colors"):
        visualize.colorize(labels, 3)

    image = np.full((2, 2, 3), 0.5, np.float32)
    out = visualize.overlay(image, labels, alpha=0.5, num_colors=30)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])  # background untouched
    expected = np.round(0.5 * 127.5 + 0.5 * rgb[0, 1].astype(np.float32) + 0.25)
    np.testing.assert_allclose(out[0, 1], expected, atol=1)
    with pytest.raises(ValueError, match="overlay"):
        visualize.overlay(image, labels[:1])


def test_bad_samples_give_clear_errors():
    sample = _sample()
    del sample["masks"]
    with pytest.raises(ValueError, match="masks"):
        visualize.sample_figure(sample)
    sample = _sample()
    sample["xy"] = sample["xy"][:, :2]
    with pytest.raises(ValueError, match="xy"):
        visualize.sample_figure(sample)
    sample = _sample()
    sample["attention"] = sample["attention"][..., :1]
    with pytest.raises(ValueError, match="attention"):
        visualize.sample_figure(sample)


def test_save_png_writes_a_readable_png(tmp_path):
    fig = visualize.sample_figure(_sample())
    path = tmp_path / "new" / "dir" / "figure.png"
    visualize.save_png(path, fig)
    with Image.open(path) as img:
        assert img.format == "PNG"
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), fig)
    grey = tmp_path / "grey.png"
    visualize.save_png(grey, np.linspace(0, 1, 12).reshape(3, 4))
    with Image.open(grey) as img:
        assert img.size == (4, 3)
        assert np.asarray(img)[2, 3] == 255
    with pytest.raises(ValueError, match="save_png"):
        visualize.save_png(tmp_path / "bad.png", np.zeros((2, 2, 2)))
