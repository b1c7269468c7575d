"""Every experiment config builds, shrinks for smoke tests, and rejects misspelt overrides."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from ast_seg_jax import curriculum

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if not os.path.basename(p).startswith("_") and not p.endswith("base.py")
)


def test_every_dataset_has_a_config():
    assert {
        "shapes",
        "clevrtex",
        "clevr",
        "objects_room",
        "shapestacks",
        "folder",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", ["", "tiny"])
def test_config_builds(name, arg):
    module = importlib.import_module(f"experiments.configs.{name}")
    config = module.get_config(arg)
    curriculum.check_scenario(config)
    assert config.data.name
    assert len(config.data.image_size) == 2
    assert module.__doc__ and "python -m experiments.train" in module.__doc__
    if arg == "tiny":
        assert config.num_train_steps <= 10 and config.background.num_train_steps <= 10


def test_unknown_config_argument_is_rejected():
    module = importlib.import_module("experiments.configs.clevrtex")
    with pytest.raises(ValueError, match="Unknown config argument 'tinny'"):
        module.get_config("tinny")


def test_misspelt_override_is_rejected_by_the_launcher(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/clevrtex.py",
            f"--workdir={tmp_path}",
            "--config.model.num_slot=3",
        ],
        cwd=os.path.join(os.path.dirname(__file__), ".."),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "num_slot" in proc.stderr
    assert not os.listdir(tmp_path)  # Nothing was written.
