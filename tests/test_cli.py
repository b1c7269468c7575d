"""The evaluate and segment launchers, end to end on a checkpoint of a tiny run, and their bad-input errors."""

import json
import os

import numpy as np
import pytest
from conftest import run_module
from PIL import Image

from ast_seg_jax import checkpointing, inference

_run = run_module


def test_training_left_what_it_promises(trained_workdir):
    workdir, _ = trained_workdir
    with open(os.path.join(workdir, "eval", "test", "metrics.json")) as f:
        metrics = json.load(f)
    assert {"miou", "miou_all", "ari_fg", "msc_fg", "mse", "num_images"} <= set(metrics)
    assert metrics["num_images"] == 6
    # The built-in scenes store each object's kind, so the evaluation ran the shape probe too.
    assert {"shape_probe", "shape_probe_objects", "shape_probe_found"} <= set(metrics)
    assert 0 <= metrics["shape_probe_found"] <= 1
    assert os.path.getsize(os.path.join(workdir, "eval", "test", "samples.png")) > 1000
    assert os.listdir(os.path.join(workdir, "logs"))


def test_evaluate_cli(trained_workdir):
    workdir, config = trained_workdir
    proc = _run(
        "experiments.evaluate",
        "--config=experiments/configs/shapes.py:tiny",
        f"--workdir={workdir}",
        "--config.data.config=tiny",
        f"--config.data.data_dir={config.data.data_dir}",
        "--config.model.background_width=0.125",
        "--config.num_eval_images=-1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ari_fg" in proc.stdout
    with open(os.path.join(workdir, "eval", "test", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["num_images"] == 64  # Every test image, none dropped.
    assert 0.0 <= metrics["ari_fg"] <= 1.0 and metrics["mse"] > 0


def test_segment_cli(trained_workdir, tmp_path):
    workdir, _ = trained_workdir
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(
        inputs / "a.png"
    )
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8)).save(
        inputs / "b.jpg"
    )
    (inputs / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(inputs / "deep.png")
    Image.new("RGB", (120, 30)).save(inputs / "huge.png")
    whole = (inputs / "a.png").read_bytes()
    (inputs / "cut.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    proc = _run(
        "experiments.segment",
        f"--workdir={workdir}",
        f"--input={inputs}",
        f"--output={out}",
        "--save_latents",
        "--max_image_side=100",
    )
    # The bad files are reported by name, the others are processed, and the exit status says so.
    assert proc.returncode == 1
    failures = proc.stderr.split("file(s) failed:")[1]
    for name in ("broken.png", "cut.png", "huge.png"):
        assert name in failures
    assert "over the limit of 100" in failures and "Traceback" not in proc.stderr
    assert "Segmented 3 of 6 images" in proc.stdout
    assert (out / "deep_labels.png").exists()  # 16-bit greyscale is segmented.
    labels = np.asarray(Image.open(out / "a_labels.png"))
    assert labels.shape == (50, 90) and labels.max() <= 4
    assert np.asarray(Image.open(out / "a_overlay.png")).shape == (50, 90, 3)
    with open(out / "b_objects.json") as f:
        objects = json.load(f)["objects"]
    assert len(objects) == 4
    assert {
        "visible",
        "pixel_area",
        "bbox_xyxy",
        "center_xy",
        "activation_logit",
    } <= set(objects[0])
    latents = np.load(out / "a_latents.npz")
    z_what_dim = checkpointing.read_config(workdir).model.z_what_dim
    assert latents["z_what"].shape == (4, z_what_dim) and latents["xy"].shape == (4, 2)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model checkpoint"):
        checkpointing.load_model_variables(str(tmp_path))
    proc = _run(
        "experiments.segment",
        f"--workdir={tmp_path}",
        f"--input={tmp_path}",
        "--output=x",
    )
    assert proc.returncode == 2 and "not the workdir of a training run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_and_unsupported_images_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        inference.load_image(str(bad))
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8)).save(cmyk)
    with pytest.raises(ValueError, match="mode 'CMYK' is not supported"):
        inference.load_image(str(cmyk))
    with pytest.raises(FileNotFoundError, match="holds no image"):
        inference.list_images(str(_empty_dir(tmp_path)))


def _empty_dir(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_compilation_cache_directory_follows_the_environment(tmp_path):
    from ast_seg_jax import cli

    env = cli.COMPILATION_CACHE_ENV
    home = os.path.join(os.path.expanduser("~"), ".cache")
    assert cli.compilation_cache_dir({}) == os.path.join(
        home, "ast_seg_jax", "jax_compilation_cache"
    )
    assert cli.compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
        tmp_path / "ast_seg_jax" / "jax_compilation_cache"
    )
    assert cli.compilation_cache_dir({env: str(tmp_path / "c")}) == str(tmp_path / "c")
    for off in ("off", "0", "False", "none"):
        assert cli.compilation_cache_dir({env: off, "XDG_CACHE_HOME": "/x"}) is None
    # The test session keeps the launchers' cache out of the user's home (conftest.py).
    assert cli.compilation_cache_dir() is None


def test_enable_compilation_cache_keeps_a_directory_given_to_jax(tmp_path):
    import jax

    from ast_seg_jax import cli

    env = cli.COMPILATION_CACHE_ENV
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert cli.enable_compilation_cache({env: "off"}) is None
        assert jax.config.jax_compilation_cache_dir is None
        path = str(tmp_path / "cache")
        assert cli.enable_compilation_cache({env: path}) == path
        assert jax.config.jax_compilation_cache_dir == path
        # Already set (JAX_COMPILATION_CACHE_DIR or jax.config): kept, whatever the environment says.
        assert cli.enable_compilation_cache({env: "off"}) == path
        assert cli.enable_compilation_cache({env: str(tmp_path / "x")}) == path
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
