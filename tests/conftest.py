"""Test set-up: CPU only, four forced host devices (for the data-parallel tests), TF kept off any GPU.

The tests' programs are tiny, so XLA's compile time dominates them: they compile with LLVM at O0 and
XLA's classic loop emitters (about twice as fast to compile on 2 cores; results agree with the default
to the tests' tolerances, and every run inside a test uses the same flags). A flag already set in
XLA_FLAGS wins. Subprocesses get the same flags from `subprocess_env`.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import types

FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The launchers' persistent compilation cache (ast_seg_jax.cli) stays out of the user's cache directory:
# off, except where a test turns on the session's own cache (`compilation_cache_dir`, `subprocess_env`).
os.environ["AST_SEG_COMPILATION_CACHE"] = "off"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _with_flag(flags: str, flag: str) -> str:
    name = flag.split("=")[0]
    return flags if name in flags else f"{flags} {flag}".strip()


_xla_flags = os.environ.get("XLA_FLAGS", "")
for _flag in (
    "--xla_force_host_platform_device_count=4",
    *FAST_COMPILE_XLA_FLAGS,
):
    _xla_flags = _with_flag(_xla_flags, _flag)
os.environ["XLA_FLAGS"] = _xla_flags

import jax

jax.config.update("jax_default_matmul_precision", "highest")


import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The smoke curriculum (2 background steps, 2 + 2 foreground steps, checkpoints at 2 and 4) that the
# trainer, reliability and CLI tests share: `tiny_config` as dotted overrides of `shapes.py:tiny` (also
# passed to the launcher as --config.KEY=VALUE flags), so that all of them run the same compiled steps.
SMOKE_OVERRIDES = {
    "data.config": "tiny",
    "model.background_width": 0.125,
    "log_images_every_steps": 0,
    # The official Adam rebuild at phase 3 (the shapes config turns it off; the smoke run checks it).
    "reset_optimizer_at_phase3": True,
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


# The smallest config that runs every phase on the `tiny` built-in dataset (seconds of compute).
tiny_config = smoke_config


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the complete Orbax checkpoints in `directory` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    mngr = ocp.CheckpointManager(os.path.abspath(directory))
    steps = sorted(mngr.all_steps())
    mngr.close()
    return steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny built-in dataset, built once per module that asks for it."""
    from ast_seg_jax import input_pipeline

    path = str(tmp_path_factory.mktemp("tfds"))
    input_pipeline.get_builder(smoke_config(path).data)
    return path


# Entries of the persistent compilation cache are written under a file lock when the cache has a size
# limit, so that concurrent processes (xdist workers, a test's subprocesses) can share one directory.
CACHE_MAX_BYTES = 8 << 30


def _shared_path(tmp_path_factory, name: str) -> str:
    """One path per test session, shared by the xdist workers (whose base temps are siblings)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return str(base / name)


@contextlib.contextmanager
def persistent_compilation_cache(tmp_path_factory):
    """Turns on the session's shared persistent compilation cache; the previous setting comes back after."""
    from jax._src import compilation_cache

    settings = {
        "jax_compilation_cache_dir": _shared_path(
            tmp_path_factory, "jax_compilation_cache"
        ),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
        "jax_compilation_cache_max_size": CACHE_MAX_BYTES,
    }
    old = {key: getattr(jax.config, key) for key in settings}
    for key, value in settings.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()
    try:
        yield settings["jax_compilation_cache_dir"]
    finally:
        for key, value in old.items():
            jax.config.update(key, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def compilation_cache_dir(tmp_path_factory):
    """The persistent compilation cache, on for one module (the session's setting is restored after).

    Shared by every module of a test session, by the xdist workers and by the subprocesses the tests
    start (see `subprocess_env`), so that the smoke runs compile each step once per session.
    """
    with persistent_compilation_cache(tmp_path_factory) as path:
        yield path


def subprocess_env(
    cache_dir: str | None = None, devices: int = 4, fast_compile: bool = True
) -> dict:
    """The environment of a JAX subprocess: this session's XLA flags with `devices` host devices,
    highest matmul precision (as set in-process above) and, given `cache_dir`, the shared persistent
    compilation cache. `fast_compile=False` drops FAST_COMPILE_XLA_FLAGS, for runs long enough that
    XLA's optimisation pays for itself."""
    dropped = {"--xla_force_host_platform_device_count"}
    if not fast_compile:
        dropped.update(f.split("=")[0] for f in FAST_COMPILE_XLA_FLAGS)
    flags = [
        f for f in os.environ["XLA_FLAGS"].split() if f.split("=")[0] not in dropped
    ]
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(
            [f"--xla_force_host_platform_device_count={devices}", *flags]
        ),
        JAX_DEFAULT_MATMUL_PRECISION="highest",
        PYTHONPATH=os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p
        ),
    )
    if cache_dir:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache_dir,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            JAX_COMPILATION_CACHE_MAX_SIZE=str(CACHE_MAX_BYTES),
        )
    return env


def run_module(*args, timeout=300):
    """Runs `python -m ARGS` from the repository root on the CPU, without AST_SEG_DEBUG; never raises."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("AST_SEG_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.fixture(scope="session")
def trained_workdir(smoke_run, tmp_path_factory):
    """A workdir with a finished tiny run (all three phases), shared by the CLI tests.

    A copy of the smoke run's workdir (the CLI tests write into it), with its config.
    """
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "workdir")
    shutil.copytree(smoke_run.workdir, workdir)
    return workdir, smoke_run.config


TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def _session_lock(path: str):
    """An exclusive lock on `path` across the processes of a test session (xdist workers)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_smoke_curriculum(root: str) -> dict:
    """Runs the smoke curriculum into ROOT/workdir; returns its results and step-function trace counts."""
    from ast_seg_jax import trainer

    config = smoke_config(os.path.join(root, "tfds"), record_example_ids=True)
    traces = {}

    def listener(event, duration, **kwargs):
        del duration  # Unused.
        name = str(kwargs.get("fun_name", ""))
        if event == TRACE_EVENT and "train_step" in name:
            traces[name] = traces.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        results = trainer.train_and_evaluate(config, os.path.join(root, "workdir"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {"results": results, "traces": traces}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke curriculum (`smoke_config`, example ids recorded), run once per test session.

    The reference run of the trainer, reliability and CLI tests, read-only for them: WORKDIR has
    background checkpoint 2 and checkpoints 2 and 4 of phases 2-3. `traces` counts the traces of each
    train step function during the run. The first xdist worker that needs it runs it (with the shared
    persistent compilation cache on, so that later runs of the same config load its executables); the
    others wait for it and read it from disk.
    """
    root = _shared_path(tmp_path_factory, "smoke_run")
    summary = os.path.join(root, "summary.json")
    with _session_lock(root + ".lock"):
        if not os.path.exists(summary):
            if os.path.exists(root):
                shutil.rmtree(root)  # What a failed attempt left.
            os.makedirs(root)
            with persistent_compilation_cache(tmp_path_factory):
                done = _run_smoke_curriculum(root)
            with open(summary, "w") as f:
                json.dump(done, f)
    with open(summary) as f:
        done = json.load(f)
    config = smoke_config(os.path.join(root, "tfds"), record_example_ids=True)
    return types.SimpleNamespace(
        workdir=os.path.join(root, "workdir"),
        config=config,
        data_dir=config.data.data_dir,
        results=done["results"],
        traces=done["traces"],
    )


def intercept_foreground_batches(monkeypatch, hook) -> None:
    """Passes each phase 2-3 training batch of later runs through `hook(step, batch)` (0-based step).

    `hook` returns the batch to use, or raises to end the run there. Phase-1 batches are left alone.
    """
    from ast_seg_jax import input_pipeline, trainer

    create = input_pipeline.create_train_iterator
    train_foreground = trainer.train_foreground
    inside = []

    def in_foreground(*args, **kwargs):
        inside.append(True)
        try:
            return train_foreground(*args, **kwargs)
        finally:
            inside.pop()

    def iterator(*args, start_step=0, **kwargs):
        batches = create(*args, start_step=start_step, **kwargs)
        if not inside:
            yield from batches
            return
        for step, batch in enumerate(batches, start=start_step):
            yield hook(step, batch)

    monkeypatch.setattr(trainer, "train_foreground", in_foreground)
    monkeypatch.setattr(input_pipeline, "create_train_iterator", iterator)


class SimulatedCrash(Exception):
    """Raised by `crash_before_foreground_step` where a process would die."""


def crash_before_foreground_step(monkeypatch, step: int) -> None:
    """Makes later runs die when they fetch the batch of phase 2-3 step `step + 1`.

    Steps 1..`step` are done and, with checkpoint_every_steps=1, checkpointed (the trainer finishes
    pending saves on the way out), as a run killed while reading the next batch would leave them.
    """

    def hook(i, batch):
        if i == step:
            raise SimulatedCrash(f"crashed before phase 2-3 step {step + 1}")
        return batch

    intercept_foreground_batches(monkeypatch, hook)


def hf_segformer_json(config) -> dict:
    """The Hugging Face `config.json` of a Segformer encoder with the architecture of `config`
    (an `ast_seg_jax.models.segformer.SegformerConfig`)."""
    return {
        "architectures": ["SegformerForImageClassification"],
        "model_type": "segformer",
        "depths": list(config.depths),
        "hidden_sizes": list(config.hidden_sizes),
        "num_attention_heads": list(config.num_heads),
        "sr_ratios": list(config.sr_ratios),
        "patch_sizes": list(config.patch_sizes),
        "strides": list(config.strides),
        "mlp_ratios": list(config.mlp_ratio),
        "decoder_hidden_size": config.decoder_hidden_size,
        "layer_norm_eps": 1e-6,
    }
