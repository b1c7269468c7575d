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


# The smallest curriculum the trainer and reliability tests run (2 background steps, 2 + 2 foreground
# steps), as dotted config overrides of `shapes.py:tiny` (also passed as --config.KEY=VALUE flags).
SMOKE_OVERRIDES = {
    "data.config": "tiny",
    "model.background_width": 0.125,
    "model.use_transformer": False,
    "model.z_what_dim": 8,
    "background.precompute": False,
    "log_images_every_steps": 0,
    "num_eval_images": 4,
    "checkpoint_every_steps": 2,
    "max_checkpoints_to_keep": 3,
}


def smoke_config(data_dir: str, **overrides):
    """`shapes.py:tiny` with SMOKE_OVERRIDES, then `overrides` (dotted keys, e.g. `**{"model.x": 1}`)."""
    from experiments.configs import shapes

    config = shapes.get_config("tiny")
    for key, value in {
        **SMOKE_OVERRIDES,
        "data.data_dir": data_dir,
        **overrides,
    }.items():
        node = config
        *path, last = key.split(".")
        for name in path:
            node = node[name]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny built-in dataset, built once per module that asks for it."""
    from ast_seg_jax import input_pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.get_builder(smoke_config(path).data)
    return path


@pytest.fixture(scope="module")
def compilation_cache_dir(tmp_path_factory):
    """A persistent compilation cache for one module (the session's setting is restored after).

    Shared by every module of a test session (and by the subprocesses they start), so that the smoke
    runs compile each step once.
    """
    from jax._src import compilation_cache

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {key: getattr(jax.config, key) for key in keys}
    path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    yield path
    for key, value in old.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A workdir with a finished tiny run (all three phases), shared by the CLI tests."""
    from ast_seg_jax import trainer

    root = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(str(root / "tfds"))
    workdir = str(root / "workdir")
    trainer.train_and_evaluate(config, workdir)
    return workdir, config
