"""`experiments.import_official`: official .pth checkpoints -> a workdir that evaluate and segment use.

The checkpoint files are written here with torch.save in the official layout (``encoder_state_dict``,
``generator_state_dict``, ``background_*_state_dict``, ``trainer_state_dict``), with every key and shape
that `ast_seg_jax.official.official_shapes` lists for a small official architecture (Segformer-B0,
one transformer layer of width 32, simple AE-NE background) on the tiny built-in dataset. The official
key names themselves are checked against the official code by tests/test_official_parity.py.
"""

import json
import os
import sys

import flax
import numpy as np
import pytest
from conftest import checkpoint_steps, run_module, smoke_config
from PIL import Image

from ast_seg_jax import checkpointing
from ast_seg_jax import official_files as import_official
from ast_seg_jax.official import load_official, official_constants, official_shapes

IMPORTED_STEP = 7

# shapes.py:tiny with the official settings it changes put back (all remain small).
OFFICIAL_OVERRIDES = {
    "model.feature_generator": "segformer",
    "model.segformer_variant": "b0",
    "model.unet_width": 1.0,
    "model.background_width": 1.0,
    "model.background_complexity": False,
    "model.transformer_residual": False,
    "model.slot_suppression_sigma": 0.0,
    "model.glimpse_mask": "decoded",
    "model.flat_colour": False,
    "num_eval_images": 4,
}
# The same, as launcher flags.
OVERRIDE_FLAGS = [
    "--config.data.config=tiny",
    *(f"--config.{key}={value}" for key, value in OFFICIAL_OVERRIDES.items()),
]
# Official renderer (netG) entries; everything else of the foreground is the encoder (netE).
RENDERER_KEYS = ("background_activation_logit", "background_mask", "glimpse_generator.")


def _random_state_dicts(config, seed):
    """Official-layout foreground and background dicts with random values (float32)."""
    rng = np.random.default_rng(seed)
    dicts = []
    for shapes, constants in zip(official_shapes(config), official_constants(config)):
        state = {}
        for key, shape in shapes.items():
            if key in constants:
                state[key] = constants[key]
            elif key.endswith("running_var"):
                state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            else:
                state[key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            if key.endswith("running_var"):
                state[key.replace("running_var", "num_batches_tracked")] = np.array(3)
        dicts.append(state)
    return dicts


def _save_official_files(tmp_path, config):
    """Writes an official foreground checkpoint (with fine-tuned background) and an AE-NE file."""
    import torch

    def tensors(d):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in d.items()}

    fg, bg = _random_state_dicts(config, seed=1)
    _, pretrained_bg = _random_state_dicts(config, seed=2)
    encoder = {k: v for k, v in fg.items() if not k.startswith(RENDERER_KEYS)}
    renderer = {k: v for k, v in fg.items() if k.startswith(RENDERER_KEYS)}
    background_encoder = {
        k: v for k, v in bg.items() if k.startswith("background_encoder.")
    }
    background_generator = {
        k: v for k, v in bg.items() if k.startswith("background_generator.")
    }
    foreground_path = str(tmp_path / "checkpoint_final_3_epochs.pth")
    torch.save(
        {
            "encoder_state_dict": tensors(encoder),
            "generator_state_dict": tensors(renderer),
            "background_encoder_state_dict": tensors(background_encoder),
            "background_generator_state_dict": tensors(background_generator),
            "trainer_state_dict": {"step": IMPORTED_STEP, "epoch": 3, "rate": 4e-5},
            "optimizer_state_dict": {"state": {}, "param_groups": []},
        },
        foreground_path,
    )
    background_path = str(tmp_path / "model_final.pth")
    torch.save(
        {
            "encoder_state_dict": tensors(
                {
                    k: v
                    for k, v in pretrained_bg.items()
                    if k.startswith("background_encoder.")
                }
            ),
            "generator_state_dict": tensors(
                {
                    k: v
                    for k, v in pretrained_bg.items()
                    if k.startswith("background_generator.")
                }
            ),
            "complexity": False,
        },
        background_path,
    )
    return foreground_path, background_path, fg, bg


_run = run_module


@pytest.fixture(scope="module")
def imported(data_dir, tmp_path_factory):
    """An imported workdir, the config and the state dicts it was made from."""
    tmp_path = tmp_path_factory.mktemp("official")
    config = smoke_config(data_dir, **OFFICIAL_OVERRIDES)
    foreground, background, fg, bg = _save_official_files(tmp_path, config)
    workdir = str(tmp_path / "workdir")
    proc = _run(
        "experiments.import_official",
        "--config=experiments/configs/shapes.py:tiny",
        f"--config.data.data_dir={data_dir}",
        *OVERRIDE_FLAGS,
        f"--foreground={foreground}",
        f"--background={background}",
        f"--workdir={workdir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tuned background" in proc.stdout
    return workdir, config, fg, bg


def test_import_writes_the_official_weights(imported):
    workdir, config, fg, bg = imported
    variables, step = checkpointing.load_model_variables(workdir)
    assert step == IMPORTED_STEP
    # The fine-tuned background of the foreground file wins over model_final.pth.
    want = load_official(fg, bg, config)
    for collection in ("params", "batch_stats"):
        got_flat = flax.traverse_util.flatten_dict(variables[collection])
        want_flat = flax.traverse_util.flatten_dict(want[collection])
        assert set(got_flat) == set(want_flat)
        for path, value in want_flat.items():
            np.testing.assert_array_equal(np.asarray(got_flat[path]), np.asarray(value))
    # Phase 1 is recorded as finished, so a fine-tuning run does not pretrain again.
    background_dir = os.path.join(workdir, checkpointing.BACKGROUND_DIR)
    assert checkpoint_steps(background_dir) == [config.background.num_train_steps]
    with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
        assert json.load(f)["model"]["segformer_variant"] == "b0"


def test_evaluate_and_segment_run_on_the_imported_workdir(imported, tmp_path):
    workdir, config, _, _ = imported
    proc = _run(
        "experiments.evaluate",
        "--config=experiments/configs/shapes.py:tiny",
        f"--config.data.data_dir={config.data.data_dir}",
        *OVERRIDE_FLAGS,
        f"--workdir={workdir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", "test", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["num_images"] == 4 and metrics["mse"] > 0

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    proc = _run(
        "experiments.segment",
        f"--workdir={workdir}",
        f"--input={tmp_path / 'scene.png'}",
        f"--output={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = np.asarray(Image.open(out / "scene_labels.png"))
    assert labels.shape == (64, 64) and labels.max() <= config.model.num_slots


def test_a_foreground_file_without_background_needs_the_background_file(tmp_path):
    import torch

    path = str(tmp_path / "checkpoint_0.pth")
    torch.save({"encoder_state_dict": {}, "generator_state_dict": {}}, path)
    with pytest.raises(ValueError, match="--background"):
        import_official.official_state_dicts(path, None)
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="encoder_state_dict"):
        import_official.official_state_dicts(path, None)


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(
        sys.modules, "torch", None
    )  # `import torch` now raises ImportError.
    with pytest.raises(ValueError, match="needs PyTorch"):
        import_official.read_torch_file(str(tmp_path / "checkpoint.pth"))


def test_an_existing_workdir_is_not_overwritten(imported):
    workdir, config, _, _ = imported
    foreground = os.path.join(os.path.dirname(workdir), "checkpoint_final_3_epochs.pth")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_official.import_official(config, foreground, None, workdir)


@pytest.mark.slow
def test_a_training_run_fine_tunes_the_imported_model(imported):
    """`train` resumes from the imported step (phase 1 is not run again) and adds one step."""
    from ast_seg_jax import trainer

    workdir, config, _, _ = imported
    config = smoke_config(
        config.data.data_dir, **OFFICIAL_OVERRIDES, num_train_steps=IMPORTED_STEP + 1
    )
    trainer.train_and_evaluate(config, workdir)
    steps = checkpoint_steps(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    assert steps[-1] == IMPORTED_STEP + 1
    background_dir = os.path.join(workdir, checkpointing.BACKGROUND_DIR)
    assert checkpoint_steps(background_dir) == [config.background.num_train_steps]
