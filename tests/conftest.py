"""Test set-up: CPU only, four forced host devices (for the data-parallel tests), TF kept off any GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")


import pytest


def tiny_config(data_dir: str):
    """The smallest config that runs every phase on the `tiny` built-in dataset (seconds of compute)."""
    from experiments.configs import shapes

    config = shapes.get_config("tiny")
    config.data.config = "tiny"
    config.data.data_dir = data_dir
    config.model.background_width = 0.125
    config.log_images_every_steps = 0
    return config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir with a finished tiny run (all three phases), shared by the CLI tests."""
    from ast_seg_jax import trainer

    root = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(str(root / "tfds"))
    workdir = str(root / "workdir")
    trainer.train_and_evaluate(config, workdir)
    return workdir, config
