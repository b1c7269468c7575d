"""Bad input, as a new user would give it, fails before any work in one paragraph (or does the right thing):
image files, read by the folder dataset and by segment alike.
"""

import os

import numpy as np
import pytest
from PIL import Image

from ast_seg_jax import cli, image_io, inference
from datasets.folder import FolderDataset

# ----------------------------------------------------------------------------------------------------------
# Images: one decode function for training and segment.


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)
GREY16 = (RNG.integers(0, 256, (24, 24)).astype(np.uint16) * 257).astype(np.uint16)

# name -> (writer of the file's bytes, expected RGB uint8 array, or None for an unusable file)
IMAGE_CASES = {
    "rgb": (lambda: _png_bytes(Image.fromarray(RGB)), RGB),
    "grey16": (
        lambda: _png_bytes(Image.fromarray(GREY16)),
        np.repeat((GREY16 // 257).astype(np.uint8)[..., None], 3, -1),
    ),
    "grey8": (
        lambda: _png_bytes(Image.fromarray(RGB[..., 0])),
        np.repeat(RGB[..., :1], 3, -1),
    ),
    "rgba": (
        lambda: _png_bytes(Image.fromarray(np.dstack([RGB, RGB[..., :1]]))),
        RGB,
    ),
    "palette": (
        lambda: _png_bytes(Image.fromarray(RGB).quantize(16)),
        np.asarray(Image.fromarray(RGB).quantize(16).convert("RGB")),
    ),
    "truncated": (lambda: _png_bytes(Image.fromarray(RGB))[:300], None),
    "garbage": (lambda: b"\x89PNG\r\n\x1a\n not really", None),
    "too_large": (lambda: _png_bytes(Image.new("RGB", (40, 24))), None),
}
MAX_SIDE = 32  # "too_large" is 40 pixels wide.


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_training_and_segment_decode_every_file_alike(case, tmp_path):
    write, expected = IMAGE_CASES[case]
    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        Image.fromarray(RGB).save(root / split / "images" / "good.png")
        (root / split / "images" / f"{case}.png").write_bytes(write())
    path = str(root / "train" / "images" / f"{case}.png")
    dataset = FolderDataset(str(root), max_image_side=MAX_SIDE)
    if expected is None:
        with pytest.raises(image_io.ImageError, match=f"{case}.png"):
            inference.load_image(path, max_side=MAX_SIDE)
        assert dataset.num_examples("train") == 1  # Skipped, counted, reported.
        with pytest.raises(cli.UserError, match=f"1 of 2 images .*\n.*{case}.png"):
            FolderDataset(
                str(root), max_image_side=MAX_SIDE, bad_images="error"
            ).num_examples("train")
        return
    decoded = inference.load_image(path, max_side=MAX_SIDE)
    np.testing.assert_array_equal(decoded, expected)
    names = [os.path.basename(p) for p in dataset.files("train")[0]]
    np.testing.assert_array_equal(
        dataset.load("train", names.index(f"{case}.png"))["image"], expected
    )


def test_large_images_are_downscaled_on_request(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (80, 40), (10, 20, 30)).save(path)
    image = inference.load_image(str(path), max_side=MAX_SIDE, downscale=True)
    assert image.shape == (16, 32, 3) and tuple(image[0, 0]) == (10, 20, 30)
    root = tmp_path / "data"
    (root / "train" / "images").mkdir(parents=True)
    Image.new("RGB", (80, 40)).save(root / "train" / "images" / "a.png")
    dataset = FolderDataset(
        str(root), max_image_side=MAX_SIDE, large_images="downscale"
    )
    assert dataset.load("train", 0)["image"].shape == (16, 32, 3)


def test_verdicts_are_cached_until_a_file_changes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "train" / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(RGB).save(root / "train" / "images" / f"{i}.png")
    assert FolderDataset(str(root)).num_examples("train") == 3
    decoded = []
    original = image_io.decode_image

    def counting(path, **kwargs):
        decoded.append(os.path.basename(path))
        return original(path, **kwargs)

    monkeypatch.setattr(image_io, "decode_image", counting)
    assert FolderDataset(str(root)).num_examples("train") == 3
    assert decoded == []  # Every verdict came from the cache.
    (root / "train" / "images" / "1.png").write_bytes(b"broken now")
    assert FolderDataset(str(root)).num_examples("train") == 2
    assert decoded == ["1.png"]
