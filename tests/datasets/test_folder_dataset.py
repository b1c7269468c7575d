"""Tests of the image-folder dataset (datasets/folder)."""

import numpy as np
import pytest
from PIL import Image

from datasets.folder import FolderDataset


def _tree(root, n=3, size=(40, 30), mask_size=None, masks=True):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        if masks:
            (root / split / "masks").mkdir()
        for i in range(n):
            Image.fromarray(
                rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            ).save(
                root / split / "images" / f"img_{i}.jpg"
                if i % 2
                else root / split / "images" / f"img_{i}.png"
            )
            if masks:
                ms = mask_size or size
                Image.fromarray(
                    rng.integers(0, 4, (ms[1], ms[0]), dtype=np.uint8), mode="L"
                ).save(root / split / "masks" / f"img_{i}.png")
    return root


def test_load_resize_and_crop(tmp_path):
    root = _tree(tmp_path)
    folder = FolderDataset(str(root), image_size=(16, 16), crop="center")
    assert folder.num_examples("train") == 3 and folder.has_masks("test")
    example = folder.load("train", 0)
    image = Image.open(root / "train" / "images" / "img_0.png")
    expected = np.asarray(image.crop((5, 0, 35, 30)).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(example["image"], expected)
    mask = Image.open(root / "train" / "masks" / "img_0.png")
    np.testing.assert_array_equal(
        example["segmentation"],
        np.asarray(mask.crop((5, 0, 35, 30)).resize((16, 16), 0)),
    )
    assert int(example["index"]) == 0
    # No image_size: stored size kept; crop="none" squashes the whole image.
    assert FolderDataset(str(root)).load("test", 1)["image"].shape == (30, 40, 3)
    assert FolderDataset(str(root), (8, 8), crop="none").load("test", 2)[
        "image"
    ].shape == (8, 8, 3)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no .png/.jpg images"):
        FolderDataset(str(tmp_path / "empty")).num_examples("train")
    with pytest.raises(FileNotFoundError, match="test/images does not exist"):
        FolderDataset(str(tmp_path / "empty")).num_examples("test")
    bad = _tree(tmp_path / "bad", mask_size=(20, 20))
    with pytest.raises(ValueError, match="img_0.png is 20x20 .* but its image"):
        FolderDataset(str(bad)).num_examples("train")
    broken = _tree(tmp_path / "broken", masks=False)
    (broken / "train" / "images" / "img_9.png").write_bytes(b"garbage")
    # Skipped with a count by default; fatal with bad_images="error".
    assert FolderDataset(str(broken)).num_examples("train") == 3
    with pytest.raises(ValueError, match="img_9.png: not a readable image"):
        FolderDataset(str(broken), bad_images="error").num_examples("train")
