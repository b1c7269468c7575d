"""End-to-end training on the tiny shapes dataset: the smoke curriculum (every phase) and its resume, the
phase hand-off, frozen parameters, the optimiser reset, no recompilation; the other scenarios and one vs
four devices (slow); bad configs and workdirs.

The curriculum run is the session's `smoke_run` (conftest.py), shared with test_reliability.py. Compiled
executables go to the session's persistent compilation cache, so later runs of the same config load them.
"""

import functools
import os
import shutil
import signal
import types

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import checkpoint_steps, tiny_config

from ast_seg_jax import checkpointing, curriculum, input_pipeline, optim, trainer
from ast_seg_jax.models.build import build_background_model, build_model
from ast_seg_jax.typing import IMAGE

# The session's persistent compilation cache (see conftest.py).
pytestmark = pytest.mark.usefixtures("compilation_cache_dir")


def _restore(directory: str, step: int):
    mngr = ocp.CheckpointManager(os.path.abspath(directory))
    state = mngr.restore(step, args=ocp.args.StandardRestore())
    mngr.close()
    return state


def _equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.fixture(scope="module")
def curriculum_run(smoke_run):
    """A finished 2 + 4 step curriculum run, with the number of traces of each step function."""
    return smoke_run.workdir, smoke_run.config, smoke_run.results, smoke_run.traces


def test_curriculum_runs_all_phases_and_writes_checkpoints(curriculum_run):
    workdir, config, results, _ = curriculum_run
    assert checkpoint_steps(os.path.join(workdir, checkpointing.BACKGROUND_DIR)) == [2]
    assert checkpoint_steps(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)) == [
        2,
        4,
    ]
    assert os.path.exists(os.path.join(workdir, checkpointing.CONFIG_FILE))
    assert (
        np.isfinite(results["mse"]) and results["num_images"] == config.num_eval_images
    )
    final = _restore(os.path.join(workdir, checkpointing.CHECKPOINT_DIR), 4)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final["params"]))


def test_each_step_function_is_traced_once_per_phase(curriculum_run):
    *_, traces = curriculum_run
    # Phase 1 and phases 2 / 3 each compile their step once; later steps reuse it.
    assert traces == {"background_train_step": 1, "foreground_train_step": 2}


def test_hand_off_and_frozen_background(curriculum_run):
    workdir, *_ = curriculum_run
    background = _restore(os.path.join(workdir, checkpointing.BACKGROUND_DIR), 2)
    ckpt = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    end_of_phase2, end_of_phase3 = _restore(ckpt, 2), _restore(ckpt, 4)
    # Phase 2 starts from exactly the phase-1 parameters and never changes them ...
    assert _equal(end_of_phase2["params"]["background_model"], background["params"])
    # ... while the foreground trains; phase 3 fine-tunes the background too.
    assert not _equal(end_of_phase3["params"]["background_model"], background["params"])
    assert not _equal(
        end_of_phase2["params"]["feature_generator"],
        end_of_phase3["params"]["feature_generator"],
    )


def test_optimiser_restarts_once_and_learning_rate_follows_global_step(
    curriculum_run,
):
    workdir, config, *_ = curriculum_run
    ckpt = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    for step, adam_count in ((2, 2), (4, 2)):  # Reset before step 3, only there.
        opt_state = _restore(ckpt, step)["opt_state"]
        assert int(opt_state["inner_state"][0]["count"]) == adam_count
        # The learning rate of the last step taken (global step - 1), not of the restarted count.
        lr = float(opt_state["hyperparams"]["learning_rate"])
        np.testing.assert_allclose(
            lr, float(curriculum.foreground_learning_rate(step - 1, config)), rtol=1e-6
        )


@pytest.mark.slow  # The same resume as test_kill_9_and_rerun_continues_exactly (CLI, in CI).
def test_resume_continues_from_the_latest_checkpoint(curriculum_run, tmp_path, capsys):
    """A copy of the finished run without its last checkpoint (as a run killed during phase 3 leaves
    it) resumes at step 2: the optimiser restart and steps 3-4 are redone, bit for bit."""
    source, config, *_ = curriculum_run
    workdir = str(tmp_path / "wd")
    shutil.copytree(source, workdir)
    shutil.rmtree(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "4"))
    capsys.readouterr()
    trainer.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Phase 1: resuming from step 2." in out
    assert "Phase 1: background pretraining" not in out  # Phase 1 was finished.
    assert "Phases 2-3: resuming from step 2." in out
    assert "Step 2: phase 3 starts" in out
    assert checkpoint_steps(os.path.join(workdir, checkpointing.BACKGROUND_DIR)) == [2]
    ckpt = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    assert checkpoint_steps(ckpt) == [2, 4]
    original = _restore(os.path.join(source, checkpointing.CHECKPOINT_DIR), 4)
    assert _equal(_restore(ckpt, 4), original)


@pytest.mark.parametrize("scenario", ["baseline", "frozen_background"])
@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_scenario_smoke_and_resume(scenario, data_dir, tmp_path, capsys):
    precompute = scenario == "frozen_background"  # Covers the precomputed path too.
    config = tiny_config(
        data_dir, scenario=scenario, **{"background.precompute": precompute}
    )
    workdir = str(tmp_path / "wd")
    trainer.train_and_evaluate(config, workdir)
    ckpt = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    assert checkpoint_steps(ckpt) == [2, 4]
    has_background_run = os.path.isdir(
        os.path.join(workdir, checkpointing.BACKGROUND_DIR)
    )
    assert has_background_run == (scenario == "frozen_background")
    first, last = _restore(ckpt, 2), _restore(ckpt, 4)
    frozen = _equal(
        first["params"]["background_model"], last["params"]["background_model"]
    )
    assert frozen == (scenario == "frozen_background")
    # No optimiser reset outside the curriculum scenario.
    assert int(last["opt_state"]["inner_state"][0]["count"]) == 4
    capsys.readouterr()
    trainer.train_and_evaluate(config, workdir)  # Finished: resumes at the end.
    assert "resuming from step 4" in capsys.readouterr().out


def _run_steps(config, mesh, batches):
    """Phase-2 then phase-3 steps (with the optimiser reset) on `mesh`; host copies of every state."""
    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    background_model = build_background_model(config.model, image_hw)
    state = trainer.replicate(
        trainer.create_foreground_state(
            config, model, None, jax.random.PRNGKey(config.seed)
        ),
        mesh,
    )
    steps = {
        phase: trainer.compile_step(
            functools.partial(
                trainer.foreground_train_step,
                model=model,
                background_model=background_model,
                config=config,
                phase=phase,
            ),
            mesh,
        )
        for phase in (curriculum.PHASE_FOREGROUND, curriculum.PHASE_JOINT)
    }
    tx = optim.foreground_optimizer(config)
    states, losses = [jax.device_get(state)], []
    for step, images in enumerate(batches):
        if curriculum.should_reset_optimizer(step, config):
            state = state.replace(
                opt_state=trainer.replicate(tx.init(state.params), mesh)
            )
        phase = curriculum.phase_of(step, config)
        batch = input_pipeline.to_global_arrays({IMAGE: images}, mesh)
        state, metrics = steps[phase](state, batch)
        states.append(jax.device_get(state))
        losses.append(float(metrics["loss"]))
    return states, losses, steps


@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_one_and_four_devices_agree(data_dir):
    assert len(jax.devices()) == 4
    config = tiny_config(data_dir, num_train_steps=3, freeze_background_steps=2)
    batches = np.random.default_rng(0).uniform(size=(3, 4, 64, 64, 3))
    batches = batches.astype(np.float32)
    one, one_losses, _ = _run_steps(
        config, trainer.create_mesh(jax.devices()[:1]), batches
    )
    four, four_losses, steps = _run_steps(config, trainer.create_mesh(), batches)
    np.testing.assert_allclose(one_losses, four_losses, rtol=1e-5)
    # Adam normalises the first updates, so a gradient entry that is ~0 can flip sign with the
    # summation order; the tolerance allows that for a few entries (lr <= 4e-4 per step).
    for a, b in zip(jax.tree.leaves(one[-1].params), jax.tree.leaves(four[-1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-3)
    # Phase 2 leaves the background bit-identical on both meshes; phase 3 moves it.
    for states in (one, four):
        assert _equal(
            states[2].params["background_model"], states[0].params["background_model"]
        )
        assert not _equal(
            states[3].params["background_model"], states[0].params["background_model"]
        )
        assert int(states[3].opt_state.inner_state[0].count) == 1
    # One compilation per phase, whatever the number of steps.
    assert [fn._cache_size() for fn in steps.values()] == [1, 1]


def test_bad_config_and_workdir_fail_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot be written"):
        trainer.train_and_evaluate(tiny_config(data_dir), str(blocker / "wd"))
    cases = {
        "batch_size": (6, "batch_size=6 is not divisible by the 4 devices"),
        "model.num_slots": (300, "num_slots=300: label maps are uint8"),
        "model.glimpse_size": (48, "glimpse_size=48"),
        "data.image_size": ((8, 8), "too small"),
    }
    for key, (value, message) in cases.items():
        workdir = tmp_path / key
        with pytest.raises(ValueError, match=message):
            trainer.train_and_evaluate(
                tiny_config(data_dir, **{key: value}), str(workdir)
            )
        assert not (workdir / checkpointing.CHECKPOINT_DIR).exists()


def test_full_workdir_fails_before_training(data_dir, tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    # A filesystem with less free space than training needs (the threshold raised above what is free).
    monkeypatch.setattr(trainer, "MIN_FREE_BYTES", free + (1 << 30))
    workdir = tmp_path / "wd"
    with pytest.raises(OSError, match=r"MiB free; training needs at least") as error:
        trainer.train_and_evaluate(tiny_config(data_dir), str(workdir))
    assert trainer.raised_by_project(error.value)  # The launcher prints it as one line.
    assert os.listdir(workdir) == []  # Nothing written: no config, logs or checkpoints.
    # Enough space: the check passes (and the run then fails on a config check, before training).
    monkeypatch.setattr(trainer, "MIN_FREE_BYTES", 1)
    with pytest.raises(ValueError, match="batch_size=6"):
        trainer.train_and_evaluate(tiny_config(data_dir, batch_size=6), str(workdir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_turns_a_signal_into_a_stop_after_the_step(signum):
    """The handler the training loops use (end to end with SIGTERM in test_reliability.py; SIGINT takes
    the same path): a first signal only sets the flag, a second Ctrl-C aborts at once, and the previous
    handlers come back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with trainer.StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signum)
        assert stop.requested() and stop.signum == signum
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("generator", ["segformer", "unet"])
def test_scale_attention_init_scales_only_the_attention_channels(generator):
    k, c = 3, 7
    kernel = np.arange(2 * c, dtype=np.float32).reshape(1, 1, 2, c) + 1
    if generator == "segformer":
        last = {"kernel": kernel.copy(), "bias": np.ones(c, np.float32)}
        tree = {
            "decode_head": {"classifier": last, "batch_norm": {"scale": np.ones(4)}}
        }
    else:
        last = {"kernel": kernel.copy()}
        tree = {"final_conv": last, "stem_conv": {"kernel": np.ones((3, 3, 3, 4))}}
    params = {"feature_generator": tree, "background_logit": np.float32(11.0)}
    assert trainer.scale_attention_init(params, k, 1.0) is params

    scaled = trainer.scale_attention_init(params, k, 20.0)["feature_generator"]
    after = (
        scaled["decode_head"]["classifier"]
        if generator == "segformer"
        else scaled["final_conv"]
    )
    np.testing.assert_array_equal(after["kernel"][..., :k], 20 * kernel[..., :k])
    np.testing.assert_array_equal(after["kernel"][..., k:], kernel[..., k:])
    if generator == "segformer":
        np.testing.assert_array_equal(after["bias"], [20.0] * k + [1.0] * (c - k))
        np.testing.assert_array_equal(scaled["decode_head"]["batch_norm"]["scale"], 1)
    else:
        np.testing.assert_array_equal(scaled["stem_conv"]["kernel"], 1)
    np.testing.assert_array_equal(last["kernel"], kernel)  # The input is not modified.


def _background_step_setup():
    from ast_seg_jax import train_state
    from ast_seg_jax.models.background import BackgroundAutoencoder
    from experiments.configs import base

    config = base.get_config()
    model = BackgroundAutoencoder((16, 16), complexity=False, width=0.125)
    rng = jax.random.PRNGKey(0)
    params = trainer.init_variables(model, (16, 16), rng)["params"]
    state = train_state.create(params, {}, optim.background_optimizer(config), rng)
    images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    step = jax.jit(
        functools.partial(trainer.background_train_step, model=model, config=config)
    )
    return state, {IMAGE: images}, step


def test_norms_are_computed_only_when_asked_and_equal_the_unconditional_ones():
    """One compiled step with a traced `with_norms`: where true, every metric and the new state equal
    those of the step that always computes the norms (the step as it was); where false, the state is
    the same and the norms read 0 (the same up to float rounding: the two programs are compiled apart,
    and XLA may order a sum differently in each)."""
    state, batch, step = _background_step_setup()
    always, always_metrics = step(state, batch)  # Python True: no lax.cond.
    for flag in (True, False):
        new, metrics = step(state, batch, np.bool_(flag))
        chex.assert_trees_all_close(new, always, rtol=1e-6, atol=1e-12)
        for key, value in always_metrics.items():
            if flag or key not in ("l2_grads", "l2_params"):
                np.testing.assert_allclose(metrics[key], value, rtol=1e-6)
        if not flag:
            assert float(metrics["l2_grads"]) == float(metrics["l2_params"]) == 0.0
    assert float(always_metrics["l2_grads"]) > 0
    assert (
        step._cache_size() == 2
    )  # Python True, and one program for both values of the flag.


@pytest.mark.parametrize(
    "phase",
    [curriculum.PHASE_FOREGROUND, curriculum.PHASE_JOINT],
    ids=["phase2", "phase3"],
)
def test_foreground_step_logs_the_norm_of_the_update_it_applied(tmp_path, phase):
    """The update norm is recomputed from Adam's new moments (`optim.adam_updates`) inside the norms'
    branch; it equals the norm of what the parameters moved (over the trained groups: phase 2 leaves
    the background untouched), and the parameters are those of the plain Adam update."""
    config = tiny_config(str(tmp_path))
    config.model.transformer_dropout = 0.0
    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    state = trainer.create_foreground_state(config, model, None, jax.random.PRNGKey(0))
    images = np.random.default_rng(0).uniform(size=(2, *image_hw, 3)).astype(np.float32)
    batch = {IMAGE: images}
    if phase == curriculum.PHASE_FOREGROUND:
        batch["background"] = images[::-1]
    step = jax.jit(
        functools.partial(
            trainer.foreground_train_step,
            model=model,
            background_model=build_background_model(config.model, image_hw),
            config=config,
            phase=phase,
        )
    )
    new, metrics = step(state, batch, np.bool_(True))
    moved = jax.tree.map(
        lambda a, b: np.float64(a) - np.float64(b), new.params, state.params
    )
    frozen = ("background_model",) if phase == curriculum.PHASE_FOREGROUND else ()
    for name in frozen:
        assert not any(np.any(x) for x in jax.tree.leaves(moved[name]))
    moved_norm = np.sqrt(
        sum(
            np.sum(np.square(x))
            for name, tree in moved.items()
            if name not in frozen
            for x in jax.tree.leaves(tree)
        )
    )
    assert moved_norm > 0
    np.testing.assert_allclose(float(metrics["l2_updates"]), moved_norm, rtol=1e-3)
    _, quiet = step(state, batch, np.bool_(False))
    assert float(quiet["l2_updates"]) == 0.0


def test_norms_are_asked_for_at_logging_and_checkpoint_steps_only():
    config = tiny_config("unused")
    config.log_loss_every_steps, config.checkpoint_every_steps = 3, 5
    control = trainer.LoopControl("x", config, None, None, None, 0, 11)
    assert [d for d in range(1, 12) if control.needs_norms(d)] == [3, 5, 6, 9, 10, 11]


def test_a_stop_after_a_step_without_norms_checks_the_parameters():
    """A NaN that reached the parameters at a step without norms (its loss was finite) is caught before
    the stop's checkpoint is written."""

    class Stop:
        signum = signal.SIGTERM

        def requested(self):
            return True

    config = tiny_config("unused")
    config.log_loss_every_steps = config.checkpoint_every_steps = 10
    control = trainer.LoopControl("x", config, None, None, Stop(), 0, 20)
    assert not control.needs_norms(1)
    state = types.SimpleNamespace(params={"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(trainer.NonFiniteLossError, match="between steps 0 and 1"):
        control.after_step(1, state, {"is_finite": np.bool_(True)}, 2)
