"""Bad input, as a new user would give it, fails before any work in one paragraph (or does the right thing):
the workdir's config and its resume rule, the pre-flight checks, image files, and the CLIs' error output.

Most cases call the checks directly on small files the tests write; the CLI cases that start a subprocess
stop at flag parsing or at the pre-flight checks, before any compilation.
"""

import json
import os
import re

import ml_collections
import numpy as np
import pytest
from conftest import hf_segformer_json, run_module, smoke_config
from PIL import Image

from ast_seg_jax import checkpointing, cli, image_io, inference, preflight, trainer
from datasets.folder import FolderDataset
from experiments.configs import base, folder

# ----------------------------------------------------------------------------------------------------------
# The workdir owns its config.


@pytest.mark.parametrize(
    "key, locked",
    [
        ("model.num_slots", True),
        ("model.segformer_variant", True),
        ("model.background_width", True),
        ("data.name", True),
        ("data.config", True),
        ("data.image_size", True),
        ("data.dir", True),
        ("seed", True),
        ("scenario", True),
        ("background.restore_from", True),
        ("data.data_dir", False),
        ("data.eval_split", False),
        ("learning_rate", False),
        ("background.learning_rate", False),
        ("num_train_steps", False),
        ("background.num_train_steps", False),
        ("batch_size", False),
        ("log_loss_every_steps", False),
        ("checkpoint_every_steps", False),
        ("eval_batch_size", False),
        ("num_eval_images", False),
    ],
)
def test_resume_rule(key, locked):
    assert preflight.locked_on_resume(key) == locked


def test_every_model_key_is_locked_on_resume():
    keys = preflight.flatten(base.get_config())
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) > 20
    assert all(preflight.locked_on_resume(k) for k in model_keys)


def _workdir_with_checkpoint(tmp_path, config) -> str:
    """A workdir as a run leaves it: config.json and a (stand-in) phase 2-3 checkpoint at step 4."""
    workdir = str(tmp_path / "wd")
    checkpointing.write_config(workdir, config)
    os.makedirs(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "4"))
    return workdir


def test_resume_with_another_model_is_refused_before_anything_is_written(
    data_dir, tmp_path
):
    workdir = _workdir_with_checkpoint(tmp_path, smoke_config(data_dir))
    path = os.path.join(workdir, checkpointing.CONFIG_FILE)
    with open(path) as f:
        before = f.read()
    changed = smoke_config(data_dir, **{"model.num_slots": 3, "learning_rate": 1e-3})
    with pytest.raises(preflight.PreflightError) as error:
        trainer.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "config.model.num_slots=3" in message and "trained with 4" in message
    assert "learning_rate" not in message  # Safe: not a problem.
    with open(path) as f:
        assert f.read() == before
    assert not os.path.exists(os.path.join(workdir, preflight.HISTORY_FILE))
    assert sorted(os.listdir(workdir)) == [checkpointing.CHECKPOINT_DIR, "config.json"]


def test_safe_changes_are_recorded_and_the_config_follows(data_dir, tmp_path):
    config = smoke_config(data_dir)
    workdir = str(tmp_path / "wd")
    said = []
    assert preflight.record_start(config, workdir, ["train"], echo=said.append) == []
    os.makedirs(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "2"))
    resumed = smoke_config(data_dir, learning_rate=1e-3, num_train_steps=8)
    assert preflight.check(resumed, workdir, num_devices=4) == []
    accepted = preflight.record_start(
        resumed, workdir, ["train", "again"], echo=said.append
    )
    assert [k for k, *_ in accepted] == ["learning_rate", "num_train_steps"]
    assert any("learning_rate changed on resume: 0.0004 -> 0.001" in s for s in said)
    saved = checkpointing.read_config(workdir)
    assert saved.learning_rate == 1e-3 and saved.num_train_steps == 8
    history = preflight.read_history(workdir)
    assert [h["event"] for h in history] == ["created", "resumed"]
    assert history[1]["argv"] == ["train", "again"]
    assert {"key": "num_train_steps", "old": 4, "new": 8} in history[1]["changes"]
    # The same command again: nothing changes, and the history still grows by one line.
    assert preflight.record_start(resumed, workdir, ["train"], echo=said.append) == []
    assert len(preflight.read_history(workdir)) == 3


def test_evaluation_takes_the_model_from_the_workdir(data_dir, tmp_path):
    workdir = _workdir_with_checkpoint(tmp_path, smoke_config(data_dir))
    config, applied = preflight.evaluation_config(workdir)
    assert applied == [] and config.model.num_slots == 4
    override = smoke_config(
        data_dir,
        num_eval_images=-1,
        log_loss_every_steps=7,
        **{"data.eval_split": "train"},
    )
    config, applied = preflight.evaluation_config(workdir, override)
    assert sorted(applied) == ["data.eval_split", "num_eval_images"]
    assert config.num_eval_images == -1 and config.log_loss_every_steps == 1
    assert config.data.image_size == (64, 64)
    with pytest.raises(
        preflight.UserError, match="config.model.num_slots=6 but the model"
    ):
        preflight.evaluation_config(
            workdir, smoke_config(data_dir, **{"model.num_slots": 6})
        )


# ----------------------------------------------------------------------------------------------------------
# Everything that can be checked before training.


def _hf_dir(path, weights: bytes | None):
    from ast_seg_jax.models.segformer import SegformerConfig

    config = SegformerConfig.preset("b0")
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_segformer_json(config)))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return str(path)


def _folder_without_test(tmp_path):
    root = tmp_path / "mine"
    (root / "train" / "images").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(
            root / "train" / "images" / f"{i}.png"
        )
    return {"data.name": "folder", "data.dir": str(root), "data.image_size": (32, 32)}


SEGFORMER = {"model.feature_generator": "segformer", "model.segformer_variant": "b0"}
# (overrides or a function of tmp_path returning them, a fragment of the expected problem)
PREFLIGHT_CASES = {
    "batch_size_zero": (
        {"batch_size": 0},
        "config.batch_size=0 must be a positive integer",
    ),
    "eval_batch_size_negative": (
        {"eval_batch_size": -4},
        "config.eval_batch_size=-4 must be a positive integer",
    ),
    "background_batch_size_zero": (
        {"background.batch_size": 0},
        "config.background.batch_size=0 must be a positive",
    ),
    "batch_not_divisible": (
        {"batch_size": 6},
        "batch_size=6 is not divisible by the 4",
    ),
    "no_steps": ({"num_train_steps": 0}, "config.num_train_steps=0 must be at least 1"),
    "negative_phase2": (
        {"freeze_background_steps": -1},
        "freeze_background_steps=-1 must not be negative",
    ),
    "zero_slots": ({"model.num_slots": 0}, "K must lie in [1, 255]"),
    "tiny_images": ({"data.image_size": (8, 8)}, "is too small"),
    "image_size_not_stored": ({"data.image_size": (32, 32)}, "is stored at (64, 64)"),
    "missing_eval_split": (
        {"data.eval_split": "validation"},
        "config.data.eval_split='validation'",
    ),
    "no_eval_images": ({"num_eval_images": 0}, "num_eval_images=0"),
    "folder_without_test": (_folder_without_test, "test/images does not exist"),
    "pretrained_missing": (
        lambda p: {"model.pretrained_encoder": str(p / "nowhere"), **SEGFORMER},
        "does not exist",
    ),
    "pretrained_without_weights": (
        lambda p: {"model.pretrained_encoder": _hf_dir(p / "mit", None), **SEGFORMER},
        "No weights in the Segformer checkpoint",
    ),
    "pretrained_corrupt_weights": (
        lambda p: {
            "model.pretrained_encoder": _hf_dir(p / "mit", b"\x10garbage"),
            **SEGFORMER,
        },
        "cannot be used",
    ),
    "background_to_restore_missing": (
        lambda p: {"background.restore_from": str(p)},
        "holds no background checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT_CASES))
def test_preflight_finds_the_problem(case, data_dir, tmp_path):
    overrides, expected = PREFLIGHT_CASES[case]
    if callable(overrides):
        overrides = overrides(tmp_path)
    config = smoke_config(data_dir, **overrides)
    problems = preflight.check(config, str(tmp_path / "wd"), num_devices=4)
    assert any(expected in p for p in problems), problems
    assert not os.path.exists(tmp_path / "wd")  # The checks write nothing.


def test_preflight_passes_a_good_config_and_checks_the_workdir(data_dir, tmp_path):
    assert preflight.check(smoke_config(data_dir), str(tmp_path / "a" / "b")) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    problems = preflight.check(smoke_config(data_dir), str(blocker / "wd"))
    assert problems and "cannot be written" in problems[0]


def test_folder_config_passes_preflight(tmp_path, data_dir):
    root = tmp_path / "mine"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / split / "images" / "a.png")
    config = folder.get_config("tiny")
    config.data.dir = str(root)
    assert preflight.check(config, str(tmp_path / "wd"), num_devices=4) == []


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


# ----------------------------------------------------------------------------------------------------------
# The command lines.


def _cli(*args, timeout=600):
    return run_module(*args, timeout=timeout)


@pytest.mark.parametrize(
    "module, flags",
    [
        ("experiments.train", ["--config", "--workdir", "--dry_run", "--debug"]),
        ("experiments.evaluate", ["--config", "--workdir", "--split", "--step"]),
        (
            "experiments.segment",
            [
                "--workdir",
                "--input",
                "--output",
                "--max_image_side",
                "--downscale_large_images",
            ],
        ),
        ("experiments.prepare_data", ["--dataset", "--manual_dir", "--export_images"]),
        ("experiments.benchmark", ["--config", "--phase", "--batch_size", "--sweep"]),
    ],
)
def test_help_exits_0_and_names_the_flags(module, flags):
    proc = _cli(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in [*flags, "--verbosity", "--debug"]:
        name = flag.lstrip("-")
        assert re.search(rf"--(\[no\])?{name}: \S", proc.stdout), flag


def test_misspelt_config_key_is_one_paragraph(tmp_path):
    proc = _cli(
        "experiments.train",
        "--config=experiments/configs/shapes.py:tiny",
        f"--workdir={tmp_path / 'wd'}",
        "--config.model.num_slot=3",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        "--config.model.num_slot: the config has no key 'num_slot'; did you mean 'num_slots'"
        in (" ".join(proc.stderr.split()))
    )
    assert not (tmp_path / "wd").exists()


def test_dry_run_lists_every_problem_and_debug_shows_the_traceback(data_dir, tmp_path):
    args = [
        "experiments.train",
        "--config=experiments/configs/shapes.py:tiny",
        f"--workdir={tmp_path / 'wd'}",
        "--config.data.config=tiny",
        f"--config.data.data_dir={data_dir}",
        "--config.batch_size=0",
        "--config.eval_batch_size=-1",
        "--dry_run",
    ]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = " ".join(proc.stderr.split())
    assert "2 problems found before training" in text
    assert "config.batch_size=0 must be a positive integer" in text
    assert "config.eval_batch_size=-1 must be a positive integer" in text
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "wd").exists()
    proc = _cli(*args, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_prepare_data_reports_bad_input_in_one_paragraph():
    proc = _cli("experiments.prepare_data", "--dataset=mnist")
    assert proc.returncode == 2
    assert "Unknown dataset name 'mnist'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluation_config_is_json_of_the_trained_model(data_dir, tmp_path):
    """config.json round-trips into the config evaluate and segment build the model from."""
    config = smoke_config(data_dir)
    checkpointing.write_config(str(tmp_path), config)
    restored = checkpointing.read_config(str(tmp_path))
    assert (
        preflight.changes(preflight.flatten(config), preflight.flatten(restored)) == []
    )
    assert isinstance(restored, ml_collections.ConfigDict)


def test_error_paragraph_keeps_long_names_whole():
    path = "/data/" + "x" * 150 + ".png"
    assert cli.paragraph(f"{path} is missing\nsecond line") == (
        f"error: {path} is missing\n  second line"
    )
