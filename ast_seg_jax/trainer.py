"""Training: the jit-compiled data-parallel steps and the curriculum loop around them.

`train_and_evaluate(config, workdir)` runs the whole curriculum of a config:

  1. background pretraining (phase 1) into WORKDIR/background, unless the scenario does not use it or
     `config.background.restore_from` names another run's background;
  2. (optionally) precomputing the frozen background of every training image;
  3. phases 2 and 3 into WORKDIR/checkpoints;
  4. evaluation on the eval split, written to WORKDIR/eval/<split>/.

Every piece resumes: rerunning the same command continues from the latest complete checkpoint of whichever
phase the run was in. One jitted step per phase; batches are sharded over the mesh axis "data" and the state
is replicated, so the same code runs on one CPU, several GPUs or several hosts.

Importing this module, building the model and running the steps need neither TensorFlow nor CLU: they
are imported where data is read, logs are written or the model is evaluated.
"""

import functools
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ast_seg_jax import (
    checkpointing,
    cli,
    curriculum,
    input_pipeline,
    losses,
    optim,
    preflight,
    train_state,
)
from ast_seg_jax.models.build import build_background_model, build_model
from ast_seg_jax.typing import BACKGROUND, IMAGE, INDEX, VALID

PRECOMPUTED_FILE = "train_backgrounds.npy"
# The background autoencoder's top-level parameter group in the AST model (frozen in phase 2).
BACKGROUND_PARAMS = "background_model"
# Written when config.record_example_ids is set: one line "step id id ..." per optimiser step.
EXAMPLE_IDS_FILES = {
    curriculum.PHASE_BACKGROUND: "example_ids_background.txt",
    curriculum.PHASE_FOREGROUND: "example_ids.txt",
}
# Predicted label maps are stored as uint8 (0 = background), which bounds the number of slots.
MAX_SLOTS = preflight.MAX_SLOTS


class NonFiniteLossError(ValueError):
    """Raised when the loss, the gradients or the parameters become NaN or infinite."""


class TrainingInterrupted(Exception):
    """Raised after a SIGTERM / SIGINT once the checkpoint of the current step is saved."""

    def __init__(self, signum: int, step: int, name: str):
        self.signum = signum
        self.step = step
        super().__init__(
            f"{signal.Signals(signum).name} received: {name} stopped after step {step}, whose "
            "checkpoint is saved. Rerun the same command to resume."
        )


def raised_by_project(error: BaseException) -> bool:
    """Whether `error` was raised by this project's own checks (bad input); see `cli.raised_by_project`."""
    return cli.raised_by_project(error)


# ----------------------------------------------------------------------------------------------------------
# Set-up helpers.


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, axis name "data"."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicate(tree, mesh: Mesh):
    """Places every array of `tree` on all devices of `mesh` (a copy: safe to donate later)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree
    )


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fails early, with the offending key, on values that cannot work together (the first problem of
    `preflight.config_problems`)."""
    problems = preflight.config_problems(config, num_devices)
    if problems:
        raise ValueError(problems[0])


# Free space the workdir's filesystem must have before training starts: a floor that catches a full disk
# up front (a Segformer-B3 checkpoint with its Adam state is about 0.6 GB), not a guarantee for long runs.
MIN_FREE_BYTES = 1 << 30


def create_writer(workdir: str):
    """The run's scalar and image writer (a `clu.metric_writers.MetricWriter`): TensorBoard files in
    WORKDIR/logs on process 0, the absl log only on the other processes (which write nothing to the
    workdir)."""
    # Imported here: CLU's writers import TensorFlow, which the steps do not need.
    from clu import metric_writers

    return metric_writers.create_default_writer(
        os.path.join(workdir, "logs"), just_logging=jax.process_index() != 0
    )


def check_workdir(workdir: str) -> None:
    """Makes sure `workdir` exists, can be written and has MIN_FREE_BYTES free before any work is done."""
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe file per process: processes of a multi-host run on one machine share the workdir.
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        free = shutil.disk_usage(workdir).free
    except OSError as e:
        raise OSError(f"The workdir {workdir!r} cannot be written: {e}") from e
    if free < MIN_FREE_BYTES:
        raise OSError(
            f"The workdir {workdir!r} is on a filesystem with {free / 2**20:.0f} MiB free; training "
            f"needs at least {MIN_FREE_BYTES / 2**20:.0f} MiB (checkpoints, logs). Free some space or "
            "choose another workdir."
        )


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag that the training loops check after every step.

    Use as a context manager around training; the previous handlers come back on exit. A second
    SIGINT while a stop is pending raises KeyboardInterrupt at once. With several processes, a stop
    seen by any process stops all of them after the same step (one tiny all-gather per step).
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        del frame  # Unused.
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None and jax.process_index() == 0:
            print(
                f"{signal.Signals(signum).name} received: stopping after the current step (or "
                "compilation) with a checkpoint; Ctrl-C again to abort at once.",
                flush=True,
            )
        self.signum = signum

    def requested(self) -> bool:
        """Whether any process received a stop signal (a collective call when multi-process)."""
        if jax.process_count() == 1:
            return self.signum is not None
        signals = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if self.signum is None and np.any(signals):
            self.signum = int(np.max(signals))
        return self.signum is not None


class ExampleIdLog:
    """Appends the global example ids of every step to a text file (debugging exact resumption).

    Each line is `step id id ...` (step = optimiser steps done after this batch). A resumed run
    appends the steps it redoes again; the last line of a step wins. Only process 0 writes.
    """

    def __init__(self, path: str | None):
        self.path = path

    def record(self, step: int, index: np.ndarray) -> None:
        if self.path is None:
            return
        index = np.asarray(index)
        if jax.process_count() > 1:
            index = multihost_utils.process_allgather(index, tiled=True)
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(f"{step} {' '.join(map(str, index.tolist()))}\n")


def read_example_ids(path: str) -> dict[int, list[int]]:
    """{step: example ids} from an `ExampleIdLog` file (the last line of a step wins)."""
    steps = {}
    with open(path) as f:
        for line in f:
            step, *ids = map(int, line.split())
            steps[step] = ids
    return steps


def _example_id_log(config, workdir: str, phase: int) -> ExampleIdLog:
    if not config.record_example_ids:
        return ExampleIdLog(None)
    return ExampleIdLog(os.path.join(workdir, EXAMPLE_IDS_FILES[phase]))


def init_variables(model, image_hw, rng, **kwargs):
    """Initial variables of `model` ({'params': ..., 'batch_stats': ...}) for images of `image_hw`.

    `kwargs` go to the model's __call__ (e.g. train=False for the AST model).
    """
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    rngs = {"params": rng, "dropout": rng}
    return jax.jit(functools.partial(model.init, **kwargs))(rngs, dummy)


def load_pretrained_encoder(params, checkpoint_dir: str):
    """`params` with the feature generator's encoder replaced by a Hugging Face MiT checkpoint."""
    from ast_seg_jax import pretrained  # Reads files; imported only when asked for.

    _, encoder_params = pretrained.load_hf_encoder_params(checkpoint_dir)
    current = params["feature_generator"]["encoder"]
    want = jax.tree.map(lambda x: x.shape, current)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), encoder_params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            f"The encoder in {checkpoint_dir!r} does not fit config.model.segformer_variant: "
            "its parameter tree or shapes differ from the model's."
        )
    params = dict(params)
    params["feature_generator"] = dict(params["feature_generator"])
    params["feature_generator"]["encoder"] = jax.tree.map(jnp.asarray, encoder_params)
    return params


def _tree_norms(with_norms, *trees, derive=None):
    """The global L2 norm of each of `trees`, or zeros when `with_norms` is false.

    `with_norms` is a Python bool or a traced boolean scalar. Traced, the norms are computed inside a
    `lax.cond` branch, so that a step whose metrics nobody reads (between logging and checkpoint steps)
    does not sum the squares of every gradient, parameter and update. `derive`: one function per tree
    (None: the tree itself) that makes the tree to measure from the one given, inside the branch.
    """
    derive = derive or (None,) * len(trees)

    def compute(trees):
        return tuple(
            optax.global_norm(fn(tree) if fn else tree)
            for fn, tree in zip(derive, trees)
        )

    def skip(trees):
        return tuple(jnp.zeros((), jnp.float32) for _ in trees)

    if isinstance(with_norms, bool):
        return compute(trees) if with_norms else skip(trees)
    return jax.lax.cond(with_norms, compute, skip, trees)


def _all_finite(*scalars):
    """True when every scalar is finite (the loss, the gradient and the new parameter norms)."""
    return jnp.all(jnp.isfinite(jnp.stack(scalars)))


@jax.jit
def _tree_finite(tree):
    """True when every array of `tree` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------------------------------------
# Steps (pure functions; static collaborators bound with functools.partial).


def background_train_step(
    state: train_state.TrainState, batch, with_norms=True, *, model, config
):
    """One phase-1 step: the AE-NE robust loss on the background autoencoder.

    `with_norms` (a bool, or a traced boolean scalar for one compiled step) says whether the step computes
    the gradient and parameter norms; without them they are reported as 0 and `is_finite` checks the loss
    only (a non-finite gradient makes the parameters non-finite, which the next step with norms sees).
    """
    image = batch[IMAGE]
    lr = curriculum.background_learning_rate(state.step, config)
    beta = curriculum.background_loss_beta(state.step, config)

    def loss_fn(params):
        rgba = model.apply({"params": params}, image)
        return losses.background_loss(image, rgba, beta=beta).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    tx = optim.background_optimizer(config)
    opt_state = optim.with_learning_rate(
        state.opt_state, optim.after_gradients(lr, grads)
    )
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = _tree_norms(with_norms, grads, params)
    metrics = {
        "loss": loss,
        "learning_rate": lr,
        "robust_beta": beta,
        "l2_grads": grad_norm,
        "l2_params": param_norm,
        "is_finite": _all_finite(loss, grad_norm, param_norm),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def foreground_train_step(
    state: train_state.TrainState,
    batch,
    with_norms=True,
    *,
    model,
    background_model,
    config,
    phase: int,
):
    """One phase-2 or phase-3 step.

    Phase 2: the background comes from `batch['background']` (precomputed) or from the frozen background
    network run under stop_gradient; background parameters do not change. Phase 3: the model runs its
    background network live and every parameter trains. `with_norms` as in `background_train_step` (the
    update norm too).
    """
    image = batch[IMAGE]
    step = state.step
    rng = jax.random.fold_in(state.rng, step)
    lr = curriculum.foreground_learning_rate(step, config)
    entropy_weight = curriculum.pixel_entropy_weight(step, config)
    object_weight = curriculum.object_entropy_weight(step, config)
    overlap_weight = curriculum.slot_overlap_weight(step, config)

    def loss_fn(params):
        background = None
        if phase == curriculum.PHASE_FOREGROUND:
            if BACKGROUND in batch:
                background = batch[BACKGROUND]
            else:
                rgba = background_model.apply(
                    {"params": params[BACKGROUND_PARAMS]}, image
                )
                background = jax.lax.stop_gradient(rgba[..., :3])
        out, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            image,
            background,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        rec = losses.reconstruction_loss(image, out.reconstruction).mean()
        pix = losses.pixel_entropy_loss(out.weights).mean()
        obj = losses.object_entropy_loss(out.weights).mean()
        total = rec + entropy_weight * pix + object_weight * obj
        # The optional terms (not official), each logged under its name when the model or config has it.
        extra = {}
        if out.mask_distillation is not None:
            extra["mask_distillation_loss"] = out.mask_distillation.mean()
            distillation_weight = config.get("mask_distillation_weight", 0.0)
            total = total + distillation_weight * extra["mask_distillation_loss"]
        if config.get("slot_overlap_weight", 0.0):
            extra["slot_overlap_loss"] = losses.slot_overlap_loss(
                out.masks, out.activation_logit, params["background_logit"]
            ).mean()
            total = total + overlap_weight * extra["slot_overlap_loss"]
        return total, (rec, pix, obj, new_vars.get("batch_stats", {}), out, extra)

    # Phase 2 differentiates and updates the foreground groups only: the frozen background's gradients
    # would be zeros, and Adam over its parameters would leave them and its zero moments unchanged.
    frozen = (BACKGROUND_PARAMS,) if phase == curriculum.PHASE_FOREGROUND else ()
    held = {k: state.params[k] for k in frozen}
    trainable = {k: v for k, v in state.params.items() if k not in frozen}
    (loss, (rec, pix, obj, batch_stats, out, extra)), grads = jax.value_and_grad(
        lambda p: loss_fn({**p, **held}), has_aux=True
    )(trainable)
    tx = optim.foreground_optimizer(config)
    opt_state = optim.with_learning_rate(
        state.opt_state, optim.after_gradients(lr, grads)
    )
    updates, opt_state = optim.update_except(tx, grads, opt_state, state.params, frozen)
    params = {**optax.apply_updates(trainable, updates), **held}

    # The update norm is recomputed from the new moments inside the norms' branch: passing `updates` to
    # it would keep them as arrays at every step instead of fusing them into the parameter write.
    grad_norm, param_norm, update_norm = _tree_norms(
        with_norms,
        grads,
        params,
        opt_state,
        derive=(None, None, lambda s: optim.adam_updates(s, tuple(trainable))),
    )
    # A slot counts as active if its weight reaches 1e-3 somewhere in the batch (official statistic).
    slot_max = jnp.max(out.weights[:, 1:], axis=(0, 2, 3))
    metrics = {
        "loss": loss,
        "reconstruction_loss": rec,
        "pixel_entropy_loss": pix,
        "pixel_entropy_weight": entropy_weight,
        "object_entropy_loss": obj,
        **extra,
        "learning_rate": lr,
        "l2_grads": grad_norm,
        "l2_params": param_norm,
        "l2_updates": update_norm,
        "active_slots": jnp.sum(slot_max >= 1e-3),
        "mse": jnp.mean(jnp.sum((out.reconstruction - image) ** 2, axis=(1, 2, 3))),
        "is_finite": _all_finite(loss, grad_norm, param_norm),
    }
    new_state = state.replace(
        step=step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def compile_step(step_fn, mesh: Mesh):
    """jit with a replicated, donated state and a batch sharded on "data"."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(step_fn, out_shardings=(replicated, replicated), donate_argnums=0)


class AnnouncedStep:
    """A compiled step that says, before its first call, that the call compiles (a silent minute
    otherwise, during which a Ctrl-C seems ignored)."""

    def __init__(self, step_fn, name: str):
        self.step_fn = step_fn
        self.name = name
        self.called = False

    def __call__(self, *args):
        if not self.called:
            say("compiling the %s step (first call; can take a minute) ...", self.name)
            self.called = True
        return self.step_fn(*args)


# ----------------------------------------------------------------------------------------------------------
# Periodic reporting.


class Progress:
    """Console progress lines (step, phase, loss terms, steps/s, ETA) and TensorBoard scalars."""

    def __init__(self, writer, name: str, total_steps: int, start_step: int):
        self.writer = writer
        self.name = name
        self.total = total_steps
        self.last_step = start_step
        self.last_time = time.time()

    def report(self, step: int, metrics: dict, phase: int) -> None:
        now = time.time()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        scalars = {
            f"train/{k}": float(v) for k, v in metrics.items() if k != "is_finite"
        }
        scalars["train/phase"] = phase
        scalars["train/steps_per_second"] = rate
        self.writer.write_scalars(step, scalars)
        terms = " ".join(
            f"{k.replace('_loss', '')} {float(metrics[k]):.4g}"
            for k in (
                "loss",
                "reconstruction_loss",
                "pixel_entropy_loss",
                "object_entropy_loss",
                "slot_overlap_loss",
                "mse",
            )
            if k in metrics
        )
        say(
            "%s step %d/%d phase %d | %s | %.2f steps/s | ETA %s",
            self.name,
            step,
            self.total,
            phase,
            terms,
            rate,
            _format_seconds(eta),
        )


def say(message: str, *args) -> None:
    """A progress line on stdout (lead process only), also kept in the absl log."""
    text = message % args if args else message
    logging.info(text)
    if jax.process_index() == 0:
        print(text, flush=True)


def _format_seconds(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def _is_time(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


class LoopControl:
    """What both training loops do after a step: NaN checks, progress, checkpoints, stop requests.

    The finiteness flag of every step is folded into one device scalar, so steps between two checks
    do not wait for the host; it is read whenever the loop logs, saves or stops. A checkpoint is only
    written after that read says every step since the last check was finite, so no NaN ever reaches
    a checkpoint. Only the steps that log or save compute the gradient and parameter norms
    (`needs_norms`); the others check their loss, and a non-finite gradient makes the parameters
    non-finite, which the next step with norms sees (a stop after a step without them checks the
    parameters before saving them).
    """

    def __init__(self, name, config, mngr, writer, stop, start: int, total: int):
        self.name = name
        self.config = config
        self.mngr = mngr
        self.stop = stop
        self.total = total
        self.progress = Progress(writer, name, total, start)
        self.last_good = start
        self.finite = jnp.asarray(True)

    def needs_norms(self, done: int) -> bool:
        """Whether the step that makes `done` steps must compute the gradient, parameter and update
        norms: it logs them, or it saves a checkpoint whose parameters must be checked finite."""
        return _is_time(done, self.config.log_loss_every_steps, self.total) or _is_time(
            done, self.config.checkpoint_every_steps, self.total
        )

    def after_step(self, done: int, state, metrics: dict, phase: int) -> None:
        """Bookkeeping once `done` steps are taken.

        Raises:
          NonFiniteLossError: a step since the last check had a NaN or infinite loss, gradient or
            parameter; nothing of it was saved.
          TrainingInterrupted: a stop signal arrived; the checkpoint of step `done` is saved.
        """
        self.finite = jnp.logical_and(self.finite, metrics["is_finite"])
        log_now = _is_time(done, self.config.log_loss_every_steps, self.total)
        save_now = _is_time(done, self.config.checkpoint_every_steps, self.total)
        stop_now = self.stop.requested()
        if not (log_now or save_now or stop_now):
            return
        if not (log_now or save_now):
            # A stop after a step without norms: check the parameters about to be saved here.
            self.finite = jnp.logical_and(self.finite, _tree_finite(state.params))
        if not bool(self.finite):
            raise NonFiniteLossError(
                f"{self.name}: the loss, the gradients or the parameters became NaN or infinite "
                f"between steps {self.last_good} and {done}. Training stopped; the last checkpoint "
                f"(step <= {self.last_good}) is kept."
            )
        self.last_good = done
        if log_now:
            self.progress.report(done, jax.device_get(metrics), phase)
        if save_now or stop_now:
            checkpointing.save(self.mngr, state)
        if stop_now:
            self.mngr.wait_until_finished()
            raise TrainingInterrupted(self.stop.signum, done, self.name)


# ----------------------------------------------------------------------------------------------------------
# Phase 1.


def train_background(
    config, workdir: str, mesh: Mesh, writer, background_model, stop: StopRequest
):
    """Runs (or resumes, or skips when finished) phase 1 and returns the background parameters."""
    bg = config.background
    directory = os.path.join(workdir, checkpointing.BACKGROUND_DIR)
    mngr = checkpointing.manager(directory, config.max_checkpoints_to_keep)
    tx = optim.background_optimizer(config)
    rng = jax.random.PRNGKey(config.seed)
    say("compiling the background model's initialisation (can take a minute) ...")
    params = init_variables(background_model, tuple(config.data.image_size), rng)[
        "params"
    ]
    state = replicate(train_state.create(params, {}, tx, rng), mesh)
    restored = checkpointing.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        say("Phase 1: resuming from step %d.", int(state.step))
    start, total = int(state.step), bg.num_train_steps
    try:
        if start < total:
            step_fn = AnnouncedStep(
                compile_step(
                    functools.partial(
                        background_train_step, model=background_model, config=config
                    ),
                    mesh,
                ),
                "phase-1",
            )
            batches = input_pipeline.create_train_iterator(
                config.data,
                global_batch_size=bg.batch_size,
                seed=config.seed,
                start_step=start,
            )
            ids = _example_id_log(config, workdir, curriculum.PHASE_BACKGROUND)
            control = LoopControl(
                "background", config, mngr, writer, stop, start, total
            )
            say("Phase 1: background pretraining, steps %d..%d.", start, total)
            for done in range(start + 1, total + 1):
                batch = next(batches)
                ids.record(done, batch[INDEX])
                state, metrics = step_fn(
                    state,
                    input_pipeline.to_global_arrays(_image_only(batch), mesh),
                    control.needs_norms(done),
                )
                control.after_step(done, state, metrics, curriculum.PHASE_BACKGROUND)
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return state.params


def _image_only(batch):
    return {IMAGE: batch[IMAGE]}


def precompute_backgrounds(config, workdir: str, mesh: Mesh, background_model, params):
    """Writes the uint8 background of every training image (by `index`) and returns it as a memmap.

    As in the official code, float backgrounds in [0, 1] are scaled to 0..255 and truncated to uint8.
    Every process computes the backgrounds of its share of the split; the outputs are gathered and
    process 0 writes the file under a temporary name and renames it when complete.
    """
    directory = os.path.join(workdir, checkpointing.BACKGROUND_DIR, "precomputed")
    path = os.path.join(directory, PRECOMPUTED_FILE)
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    is_lead = jax.process_index() == 0
    split = config.data.train_split
    n = input_pipeline.num_examples(config.data, split)
    h, w = config.data.image_size
    tmp = path + ".tmp.npy"
    if is_lead:
        os.makedirs(directory, exist_ok=True)
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(n, h, w, 3)
        )

    # Outputs replicated: every process (process 0 in particular) sees the whole global batch.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def apply(params, batch):
        rgb = background_model.apply({"params": params}, batch[IMAGE])[..., :3]
        return rgb, batch[INDEX], batch[VALID]

    params = replicate(params, mesh)
    say("Precomputing the backgrounds of %d training images.", n)
    done = 0
    start = time.time()
    for batch in input_pipeline.create_eval_iterator(
        config.data, split=split, global_batch_size=config.eval_batch_size
    ):
        host = {IMAGE: batch[IMAGE], INDEX: batch[INDEX], VALID: batch[VALID]}
        rgb, index, valid = jax.device_get(
            apply(params, input_pipeline.to_global_arrays(host, mesh))
        )
        valid = np.asarray(valid, bool)
        if is_lead:
            rgb = np.clip(np.asarray(rgb)[valid], 0.0, 1.0)
            out[np.asarray(index)[valid]] = (rgb * 255.0).astype(np.uint8)
        done += int(valid.sum())
        if done % (20 * config.eval_batch_size) < config.eval_batch_size:
            say("  %d/%d backgrounds (%.0f s)", done, n, time.time() - start)
    if is_lead:
        out.flush()
        del out
        os.replace(tmp, path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("precomputed backgrounds written")
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------------------------------------
# Phases 2 and 3.


def scale_attention_init(params, num_slots: int, factor: float):
    """Multiplies the initial weights of the K attention-logit output channels by `factor`.

    The feature generator's last layer (the Segformer head's classifier or the U-Net's final 1x1
    convolution) makes K attention logit maps and then the feature map; only its first K output
    channels are scaled. A randomly initialised encoder gives nearly flat attention (each softmax
    close to uniform, so every slot pools about the same features whatever the image); larger
    initial logits make the initial attention peaked and image-dependent. The factor is
    `config.model.attention_init_scale`, 1.0 (the official initialisation) by default.
    """
    if factor == 1.0:
        return params
    generator = dict(params["feature_generator"])
    if "decode_head" in generator:
        head = dict(generator["decode_head"])
        head["classifier"] = _scale_out_channels(head["classifier"], num_slots, factor)
        generator["decode_head"] = head
    else:
        generator["final_conv"] = _scale_out_channels(
            generator["final_conv"], num_slots, factor
        )
    return {**params, "feature_generator": generator}


def _scale_out_channels(layer, num_slots: int, factor: float):
    layer = dict(layer)
    channels = layer["kernel"].shape[-1]
    factors = jnp.ones(channels, jnp.float32).at[:num_slots].set(factor)
    for name in ("kernel", "bias"):
        if name in layer:
            layer[name] = jnp.asarray(layer[name]) * factors
    return layer


def create_foreground_state(config, model, background_params, rng):
    """Initial phase-2/3 state: fresh foreground, pretrained (or fresh) background, optional MiT encoder."""
    say("compiling the model's initialisation (can take a minute) ...")
    variables = init_variables(model, tuple(config.data.image_size), rng, train=False)
    params = dict(variables["params"])
    if background_params is not None:
        params[BACKGROUND_PARAMS] = background_params
    if config.model.pretrained_encoder:
        if config.model.feature_generator != "segformer":
            raise ValueError(
                "config.model.pretrained_encoder needs config.model.feature_generator='segformer'."
            )
        params = load_pretrained_encoder(params, config.model.pretrained_encoder)
    params = scale_attention_init(
        params, config.model.num_slots, config.model.get("attention_init_scale", 1.0)
    )
    tx = optim.foreground_optimizer(config)
    return train_state.create(
        params, variables.get("batch_stats", {}), tx, jax.random.fold_in(rng, 1)
    )


def train_foreground(
    config, workdir, mesh, writer, model, background_model, background_params, stop
):
    """Runs (or resumes) phases 2 and 3 and returns the final state."""
    mngr = checkpointing.manager(
        os.path.join(workdir, checkpointing.CHECKPOINT_DIR),
        config.max_checkpoints_to_keep,
    )
    rng = jax.random.PRNGKey(config.seed)
    state = replicate(
        create_foreground_state(config, model, background_params, rng), mesh
    )
    restored = checkpointing.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        say("Phases 2-3: resuming from step %d.", int(state.step))
    start, total = int(state.step), config.num_train_steps
    try:
        if start < total:
            state = _foreground_loop(
                config,
                workdir,
                mesh,
                writer,
                model,
                background_model,
                stop,
                mngr,
                state,
            )
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return state


def _foreground_loop(
    config, workdir, mesh, writer, model, background_model, stop, mngr, state
):
    """The phase 2-3 loop from `state.step` to config.num_train_steps."""
    start, total = int(state.step), config.num_train_steps
    precomputed = None
    uses_phase2 = curriculum.phase_of(start, config) == curriculum.PHASE_FOREGROUND
    if uses_phase2 and config.background.precompute:
        precomputed = precompute_backgrounds(
            config, workdir, mesh, background_model, state.params[BACKGROUND_PARAMS]
        )
    # One jitted step per phase (the phase is a static flag: where the background comes from).
    steps = {
        phase: AnnouncedStep(
            compile_step(
                functools.partial(
                    foreground_train_step,
                    model=model,
                    background_model=background_model,
                    config=config,
                    phase=phase,
                ),
                mesh,
            ),
            f"phase-{phase}",
        )
        for phase in (curriculum.PHASE_FOREGROUND, curriculum.PHASE_JOINT)
    }
    tx = optim.foreground_optimizer(config)
    batches = input_pipeline.create_train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start,
    )
    ids = _example_id_log(config, workdir, curriculum.PHASE_FOREGROUND)
    vis_batch = _visualisation_batch(config)
    control = LoopControl("foreground", config, mngr, writer, stop, start, total)
    say("Phases 2-3 (%s): steps %d..%d.", config.scenario, start, total)
    for step in range(start, total):
        phase = curriculum.phase_of(step, config)
        if curriculum.should_reset_optimizer(step, config):
            say("Step %d: phase 3 starts; Adam restarts over all parameters.", step)
            state = state.replace(opt_state=replicate(tx.init(state.params), mesh))
        elif curriculum.starts_phase3(step, config):
            say("Step %d: phase 3 starts; Adam keeps its moments.", step)
        batch = next(batches)
        done = step + 1
        ids.record(done, batch[INDEX])
        host = {IMAGE: batch[IMAGE]}
        if phase == curriculum.PHASE_FOREGROUND and precomputed is not None:
            host[BACKGROUND] = (
                precomputed[np.asarray(batch[INDEX])].astype(np.float32) / 255.0
            )
        state, metrics = steps[phase](
            state,
            input_pipeline.to_global_arrays(host, mesh),
            control.needs_norms(done),
        )
        control.after_step(done, state, metrics, phase)
        if vis_batch is not None and _is_time(
            done, config.log_images_every_steps, total
        ):
            from ast_seg_jax import evaluator  # Reads data (TensorFlow) and uses CLU.

            figure = evaluator.figure_for_batch(model, state, vis_batch, mesh)
            writer.write_images(done, {"samples": figure[None]})
    return state


def _visualisation_batch(config, num: int = 6):
    """A few fixed eval images (and labels) for the periodic image summaries."""
    if config.log_images_every_steps <= 0:
        return None
    batch = next(
        iter(
            input_pipeline.create_eval_iterator(
                config.data,
                split=config.data.eval_split,
                global_batch_size=config.eval_batch_size,
            )
        )
    )
    return {k: v[:num] for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# The whole curriculum.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every phase of `config` in `workdir` (resuming where it stopped) and evaluates the result.

    Before any work: the workdir must be writable and `preflight.check` must find no problem (config,
    resume compatibility with WORKDIR/config.json, data, pretrained weights). During training, SIGTERM /
    SIGINT save a checkpoint of the current step and raise TrainingInterrupted.

    Returns:
      The evaluation metrics (dataset means), also written to WORKDIR/eval/<split>/metrics.json.

    Raises:
      OSError: the workdir cannot be written.
      preflight.PreflightError: (a ValueError) the problems the pre-flight checks found.
      NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
      TrainingInterrupted: a stop signal arrived (the current step is checkpointed).
    """
    check_workdir(workdir)
    mesh = create_mesh()
    problems = preflight.check(config, workdir, num_devices=mesh.size)
    if problems:
        raise preflight.PreflightError(problems)
    is_lead = jax.process_index() == 0
    if is_lead:
        # Only now, with every check passed, does the workdir's config change (and its history grow).
        preflight.record_start(config, workdir, echo=say)
    writer = create_writer(workdir)
    if is_lead:
        writer.write_hparams(_flat_hparams(config))
    logging.info("Devices: %s", jax.devices())

    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    background_model = build_background_model(config.model, image_hw)

    with StopRequest() as stop:
        background_params = None
        if curriculum.needs_background_pretraining(config):
            if config.background.restore_from:
                background_params, step = checkpointing.load_background_params(
                    config.background.restore_from
                )
                say(
                    "Background restored from %s (step %d).",
                    config.background.restore_from,
                    step,
                )
            elif config.background.num_train_steps > 0:
                background_params = train_background(
                    config, workdir, mesh, writer, background_model, stop
                )

        state = train_foreground(
            config,
            workdir,
            mesh,
            writer,
            model,
            background_model,
            background_params,
            stop,
        )
    from ast_seg_jax import evaluator  # As in _foreground_loop.

    results = evaluator.evaluate_and_write(
        config, workdir, model, evaluator.variables_of(state), mesh
    )
    writer.flush()
    return results


def _flat_hparams(config) -> dict:
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                visit(name + ".", value)
            else:
                flat[name] = (
                    value if isinstance(value, (int, float, str, bool)) else str(value)
                )

    visit("", config)
    return flat
