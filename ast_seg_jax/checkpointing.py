"""Orbax checkpoints: one manager per training run, and the hand-off from phase 1 to phases 2-3.

A workdir holds:

    WORKDIR/config.json          the config of the run (used by evaluate and segment)
    WORKDIR/background/          phase-1 checkpoints (a TrainState of the background autoencoder)
    WORKDIR/background/precomputed/  uint8 backgrounds of the training split (phase 2, optional)
    WORKDIR/checkpoints/         phase 2-3 checkpoints (a TrainState of the whole AST model)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed at any
moment leaves only complete checkpoints behind, and restoring picks the latest complete one.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ast_seg_jax.train_state import TrainState

BACKGROUND_DIR = "background"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager saving single `TrainState` items under `directory`."""
    # cleanup_tmp_directories: a save interrupted by a kill leaves a temporary directory; the next
    # manager on the same directory deletes it (restoring never looks at it anyway).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves `state` at its own step (asynchronously; call `mngr.wait_until_finished()` before exit)."""
    mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def restore_latest(
    mngr: ocp.CheckpointManager, target: TrainState
) -> TrainState | None:
    """Restores the latest checkpoint into the structure and shardings of `target`, or None if none."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def _reader(directory: str) -> ocp.CheckpointManager:
    """A manager that can read a checkpoint's metadata (for restores without a target tree)."""
    return ocp.CheckpointManager(
        os.path.abspath(directory), item_handlers=ocp.StandardCheckpointHandler()
    )


def _restore_unsharded(mngr: ocp.CheckpointManager, step: int):
    """The raw tree of a checkpoint, placed on this process's first device.

    Built from the checkpoint's own metadata, so it works whatever the number and kind of devices that
    wrote it (a model trained on 8 GPUs can be evaluated on a laptop).
    """
    metadata = mngr.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def load_background_params(directory: str, expected_steps: int | None = None):
    """Parameters of the background autoencoder from the latest phase-1 checkpoint in `directory`.

    Args:
      directory: a run's `WORKDIR/background` directory (or the workdir itself).
      expected_steps: when given, the checkpoint must have reached this step.

    Returns:
      (params, step) of the latest checkpoint.

    Raises:
      FileNotFoundError: when no complete checkpoint exists there.
      ValueError: when the checkpoint stopped before `expected_steps`.
    """
    if os.path.isdir(os.path.join(directory, BACKGROUND_DIR)):
        directory = os.path.join(directory, BACKGROUND_DIR)
    mngr = _reader(directory)
    step = mngr.latest_step() if os.path.isdir(directory) else None
    if step is None:
        raise FileNotFoundError(
            f"No background checkpoint in {directory!r}. Point config.background.restore_from at the "
            "'background' directory of a run whose phase 1 finished, or leave it empty to pretrain here."
        )
    if expected_steps is not None and step < expected_steps:
        raise ValueError(
            f"The background checkpoint in {directory!r} stopped at step {step}, before the "
            f"{expected_steps} steps of phase 1."
        )
    restored = _restore_unsharded(mngr, step)
    mngr.close()
    params = restored["params"] if isinstance(restored, dict) else restored.params
    return params, step


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Stores the run's config as JSON, so that evaluation and inference need only the workdir."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config stored by `write_config`, as a locked ConfigDict."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} does not exist: {workdir!r} is not the workdir of a training run."
        )
    with open(path) as f:
        values = json.load(f)
    for key in ("image_size",):
        if key in values.get("data", {}):
            values["data"][key] = tuple(values["data"][key])
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config


def load_model_variables(workdir: str, step: int | None = None):
    """The model variables ({'params', 'batch_stats'}) of a phase 2-3 checkpoint, without its optimiser.

    Args:
      workdir: the run's workdir.
      step: the checkpoint step; None means the latest.

    Returns:
      (variables, step).
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    mngr = _reader(directory) if os.path.isdir(directory) else None
    steps = mngr.all_steps() if mngr is not None else []
    if not steps:
        raise FileNotFoundError(
            f"No model checkpoint in {directory!r}: train first with "
            f"`python -m experiments.train --config=... --workdir={workdir}`."
        )
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(
            f"No checkpoint at step {step} in {directory!r}; available steps: {sorted(steps)}."
        )
    restored = _restore_unsharded(mngr, step)
    mngr.close()
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, step
