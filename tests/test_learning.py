"""The model learns: the loss falls over a short run on built-in scenes (CI-sized), and a longer run segments.

The slow test runs the README's main job and asserts its goal (ARI-FG, mIoU (fg) and the mask probe), far
above what trivial predictions get (all background, or one blob: ARI-FG 0 on scenes with two or more
objects, which since the dataset's version 1.2.0 is every scene) and above what the recipe with blob masks
reached.
"""

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_config

from ast_seg_jax import curriculum, trainer
from ast_seg_jax.models.build import build_background_model, build_model
from ast_seg_jax.typing import IMAGE
from datasets.shapes import generator


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    config = tiny_config(str(tmp_path))
    config.learning_rate = 2e-3
    config.warmup_steps = 1
    config.num_train_steps = 30
    config.scenario = "baseline"  # Phase 3 from step 0: every parameter learns.
    config.model.transformer_dropout = 0.0
    scenes = generator.generate(8, seed=0)
    images = np.asarray(scenes["image"], np.float32) / 255.0
    mesh = trainer.create_mesh(jax.devices()[:1])
    image_hw = images.shape[1:3]
    model = build_model(config.model, image_hw)
    state = trainer.replicate(
        trainer.create_foreground_state(config, model, None, jax.random.PRNGKey(0)),
        mesh,
    )
    step = trainer.compile_step(
        functools.partial(
            trainer.foreground_train_step,
            model=model,
            background_model=build_background_model(config.model, image_hw),
            config=config,
            phase=curriculum.PHASE_JOINT,
        ),
        mesh,
    )
    batch = {IMAGE: jax.numpy.asarray(images)}
    losses = []
    for _ in range(config.num_train_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["reconstruction_loss"]))
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.85 * first, f"reconstruction loss {first:.4f} -> {last:.4f}"


@pytest.mark.slow
def test_main_job_segments_the_built_in_scenes(tmp_path):
    # The README's command as written (15-20 min on 2 CPU cores), in a subprocess with XLA's default
    # optimisation and one device: under this session's fast-compile flags (conftest.py) each step runs
    # about 5x slower. Only the dataset's location differs. A shortened command (150 + 2000 steps) used
    # to stand in for it, but at that length the result depends on the float rounding of the code
    # (ARI-FG 0.813 and 0.720, mIoU (fg) 0.757 and 0.483 on two commits that compute the same
    # function), while the full command met the goal on every seed tried.
    env = subprocess_env(devices=1, fast_compile=False)
    workdir = tmp_path / "workdir"
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/shapes.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]
    proc = subprocess.run(
        command,
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "eval" / "test" / "metrics.json") as f:
        results = json.load(f)
    # The goal of the README's main job. Seeds 0-2 measured ARI-FG 0.938-0.956, mIoU (fg) 0.914-0.934
    # and a mask probe of 0.733-0.744 (2026-12-05); the recipe with blob masks (decoded glimpse masks,
    # argmax segmentation) scored ARI-FG 0.756-0.774 and mIoU (fg) 0.558-0.648 on this command, and its
    # masks a mask probe of 0.168 (the true masks: about 0.76; chance about 0.18).
    assert results["ari_fg"] >= 0.90, results
    assert results["miou"] >= 0.85, results
    assert results["mask_probe"] >= 0.70, results
