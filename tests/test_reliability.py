"""Faults a long run meets, injected on the tiny shapes config: kill -9 and rerun, SIGTERM / SIGINT,
determinism, two processes on localhost, bad input and a NaN loss (the full-disk check is in test_trainer.py).

Training runs go through `python -m experiments.train` in subprocesses with timeouts where a process must
die or several must cooperate; the rest runs in-process. The reference is the session's smoke run
(`smoke_run` in conftest.py, also the trainer tests' curriculum run), and every training run here uses its
config, so in-process runs and subprocesses load its executables from the shared persistent compilation
cache (the two-process training run uses a smaller model of its own and runs with `-m slow`; CI runs the
two-process plumbing without the model).

One chain of CLI runs serves the signal and kill tests: SIGTERM during phase 1, rerun and kill -9 during
phase 3, rerun to the end.
"""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # When run as the multi-host worker script.
    sys.path.insert(0, REPO)

from conftest import (
    SMOKE_OVERRIDES,
    SimulatedCrash,
    checkpoint_steps,
    crash_before_foreground_step,
    intercept_foreground_batches,
    smoke_config,
    subprocess_env,
)

from ast_seg_jax import (
    checkpointing,
    curriculum,
    evaluator,
    input_pipeline,
    train_state,
    trainer,
)
from ast_seg_jax.models.build import build_background_model, build_model
from ast_seg_jax.typing import IMAGE

TIMEOUT = 600
# The smoke curriculum of conftest.py (same compiled steps), recording its example ids.
OVERRIDES = {**SMOKE_OVERRIDES, "record_example_ids": True}
BACKGROUND_IDS = trainer.EXAMPLE_IDS_FILES[curriculum.PHASE_BACKGROUND]
FOREGROUND_IDS = trainer.EXAMPLE_IDS_FILES[curriculum.PHASE_FOREGROUND]


def tiny_config(data_dir: str, **overrides):
    return smoke_config(data_dir, record_example_ids=True, **overrides)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(compilation_cache_dir):
    """The persistent compilation cache, used in-process and by the subprocesses of this module."""
    return compilation_cache_dir


def _env(cache_dir: str, devices: int = 4) -> dict:
    return subprocess_env(cache_dir, devices)


def _train_command(workdir: str, data_dir: str, **overrides) -> list[str]:
    values = {**OVERRIDES, "data.data_dir": data_dir, **overrides}
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/shapes.py:tiny",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in values.items()),
    ]


def _train(workdir, data_dir, cache_dir, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        _train_command(workdir, data_dir, **overrides),
        check=False,
        cwd=REPO,
        env=_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _start(workdir, data_dir, cache_dir, log_dir) -> subprocess.Popen:
    """Starts a CLI run; its stdout and stderr go to files (a full pipe would block it)."""
    log_dir.mkdir(exist_ok=True)
    with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
        proc = subprocess.Popen(
            _train_command(workdir, data_dir),
            cwd=REPO,
            env=_env(cache_dir),
            stdout=out,
            stderr=err,
            text=True,
        )
    proc.log_dir = log_dir
    return proc


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Waits for a run started by `_start`; returns its (stdout, stderr)."""
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (proc.log_dir / "stdout").read_text(), (proc.log_dir / "stderr").read_text()


def _wait_for_step(proc: subprocess.Popen, path: str, step: int) -> None:
    """Waits until the run recorded the batch of step `step` in the example-id file `path`."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if os.path.exists(path) and step in trainer.read_example_ids(path):
            return
        if proc.poll() is not None:
            raise AssertionError(f"The run ended early:\n{_finish(proc)[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"The run never reached step {step}.")


def _final_params(workdir: str, step: int):
    mngr = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    )
    params = mngr.restore(step, args=ocp.args.StandardRestore())["params"]
    mngr.close()
    return params


def _assert_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def _ids(workdir: str) -> dict:
    return {
        name: trainer.read_example_ids(os.path.join(workdir, name))
        for name in trainer.EXAMPLE_IDS_FILES.values()
    }


def _no_temporary_checkpoints(workdir: str) -> bool:
    for root, dirs, _ in os.walk(workdir):
        if any("tmp" in d for d in dirs):
            return False
    return True


@pytest.fixture(scope="module")
def reference_run(smoke_run):
    """The uninterrupted run: its workdir, example ids and final parameters."""
    workdir = smoke_run.workdir
    return workdir, _ids(workdir), _final_params(workdir, 4)


def _outcome(proc: subprocess.Popen, workdir: str) -> types.SimpleNamespace:
    stdout, stderr = _finish(proc)
    return types.SimpleNamespace(
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
        steps={
            name: checkpoint_steps(os.path.join(workdir, name))
            for name in (checkpointing.BACKGROUND_DIR, checkpointing.CHECKPOINT_DIR)
        },
    )


@pytest.fixture(scope="module")
def interrupted_runs(smoke_run, cache_dir, tmp_path_factory):
    """One workdir, three CLI runs of the smoke config: SIGTERM during phase 1, rerun and kill -9 while
    phase-3 step 3 runs, rerun to the end. The outcome of each (the last one a CompletedProcess)."""
    root = tmp_path_factory.mktemp("interrupted")
    workdir, data_dir = str(root / "wd"), smoke_run.data_dir
    proc = _start(workdir, data_dir, cache_dir, root / "term")
    _wait_for_step(proc, os.path.join(workdir, BACKGROUND_IDS), 1)
    proc.send_signal(signal.SIGTERM)
    terminated = _outcome(proc, workdir)
    proc = _start(workdir, data_dir, cache_dir, root / "kill")
    # Killed while step 3 runs: its checkpoint does not exist, the one of step 2 may be complete.
    _wait_for_step(proc, os.path.join(workdir, FOREGROUND_IDS), 3)
    proc.send_signal(signal.SIGKILL)
    killed = _outcome(proc, workdir)
    final = _train(workdir, data_dir, cache_dir)
    return types.SimpleNamespace(
        workdir=workdir, terminated=terminated, killed=killed, final=final
    )


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(interrupted_runs):
    run = interrupted_runs.terminated
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    # Stopped after the step that was running (normally step 1 of phase 1), with its checkpoint.
    found = re.search(
        r"SIGTERM received: (background|foreground) stopped after step (\d+), whose checkpoint "
        r"is saved\. Rerun the same command to resume\.",
        run.stderr,
    )
    assert found, run.stderr[-3000:]
    name, step = found.group(1), int(found.group(2))
    directory = {
        "background": checkpointing.BACKGROUND_DIR,
        "foreground": checkpointing.CHECKPOINT_DIR,
    }[name]
    assert run.steps[directory][-1] == step
    # The next run picks it up.
    phase = "Phase 1" if name == "background" else "Phases 2-3"
    assert f"{phase}: resuming from step {step}." in interrupted_runs.killed.stdout


def test_kill_9_and_rerun_continues_exactly(interrupted_runs, reference_run):
    _, ref_ids, ref_params = reference_run
    killed, final = interrupted_runs.killed, interrupted_runs.final
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert 3 not in killed.steps[checkpointing.CHECKPOINT_DIR]
    assert final.returncode == 0, final.stderr[-3000:]
    if killed.steps[checkpointing.CHECKPOINT_DIR]:
        last = killed.steps[checkpointing.CHECKPOINT_DIR][-1]
        assert f"Phases 2-3: resuming from step {last}." in final.stdout
    # Same batches at every step (none skipped or repeated) and bit-identical parameters, also across
    # the SIGTERM in phase 1; the CLI runs match the in-process reference run.
    workdir = interrupted_runs.workdir
    assert _ids(workdir) == ref_ids
    assert sorted(ref_ids[FOREGROUND_IDS]) == [1, 2, 3, 4]
    _assert_identical(_final_params(workdir, 4), ref_params)
    assert _no_temporary_checkpoints(workdir)


@pytest.mark.slow  # Two more whole CLI runs; SIGTERM, which shares the code path, runs in CI.
def test_sigint_saves_and_exits_cleanly(reference_run, smoke_run, cache_dir, tmp_path):
    _, ref_ids, ref_params = reference_run
    workdir, data_dir = str(tmp_path / "wd"), smoke_run.data_dir
    proc = _start(workdir, data_dir, cache_dir, tmp_path / "log")
    _wait_for_step(proc, os.path.join(workdir, FOREGROUND_IDS), 3)
    proc.send_signal(signal.SIGINT)
    _, stderr = _finish(proc)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "SIGINT received: foreground stopped after step" in stderr
    assert "Traceback" not in stderr
    stopped_at = int(stderr.split("stopped after step ")[1].split(",")[0])
    assert (
        checkpoint_steps(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))[-1]
        == stopped_at
    )
    result = _train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {stopped_at}" in result.stdout
    assert _ids(workdir) == ref_ids
    _assert_identical(_final_params(workdir, 4), ref_params)


def _run_to_phase2_step2(data_dir: str, workdir: str, monkeypatch, **overrides):
    """Phase 1 and phase 2 (2 + 2 steps) of the smoke config in-process, stopped after the checkpoint
    of phase-2 step 2. Returns the parameters there and the example ids."""
    crash_before_foreground_step(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        trainer.train_and_evaluate(tiny_config(data_dir, **overrides), workdir)
    return _final_params(workdir, 2), _ids(workdir)


# A third in-process run, kept out of CI: there, test_kill_9_and_rerun_continues_exactly checks the same
# seed in other processes (bit-identical parameters and the same example ids as the reference run).
@pytest.mark.slow
def test_same_seed_is_bit_identical(reference_run, smoke_run, tmp_path, monkeypatch):
    ref_workdir, ref_ids, _ = reference_run
    params, ids = _run_to_phase2_step2(
        smoke_run.data_dir, str(tmp_path / "wd"), monkeypatch
    )
    _assert_identical(params, _final_params(ref_workdir, 2))
    assert ids[BACKGROUND_IDS] == ref_ids[BACKGROUND_IDS]
    assert ids[FOREGROUND_IDS] == {s: ref_ids[FOREGROUND_IDS][s] for s in (1, 2)}


def test_other_seeds_differ(reference_run, smoke_run, tmp_path, monkeypatch):
    """Seed 1 against the reference run (seed 0): other initial parameters, dropout and batches."""
    ref_workdir, ref_ids, _ = reference_run
    params, ids = _run_to_phase2_step2(
        smoke_run.data_dir, str(tmp_path / "wd"), monkeypatch, seed=1
    )
    differ = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(_final_params(ref_workdir, 2))
        )
    ]
    assert all(differ)
    assert ids[FOREGROUND_IDS] != {s: ref_ids[FOREGROUND_IDS][s] for s in (1, 2)}


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    smoke_run, tmp_path, monkeypatch
):
    def poison(step, batch):
        if step == 1:  # The batch of phase-2 step 2.
            batch = {**batch, IMAGE: np.full_like(batch[IMAGE], np.nan)}
        return batch

    intercept_foreground_batches(monkeypatch, poison)
    config = tiny_config(smoke_run.data_dir, checkpoint_every_steps=1)
    workdir = str(tmp_path / "wd")
    with pytest.raises(
        trainer.NonFiniteLossError, match="between steps 1 and 2"
    ) as error:
        trainer.train_and_evaluate(config, workdir)
    assert trainer.raised_by_project(error.value)  # The launcher prints it as one line.
    mngr = ocp.CheckpointManager(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    assert mngr.all_steps() == [1]
    params = mngr.restore(1, args=ocp.args.StandardRestore())["params"]
    mngr.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_cli_reports_bad_input_in_one_line(data_dir, cache_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _train(str(blocker / "wd"), data_dir, cache_dir)
    assert result.returncode == 2
    assert "cannot be written" in result.stderr and "Traceback" not in result.stderr
    result = _train(str(tmp_path / "wd"), data_dir, cache_dir, batch_size=6)
    assert result.returncode == 2
    assert "config.batch_size=6 is not divisible by the 4 devices" in result.stderr
    assert not (tmp_path / "wd" / checkpointing.CHECKPOINT_DIR).exists()


# ----------------------------------------------------------------------------------------------------------
# Two processes on localhost.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initial_state(config, model):
    return trainer.create_foreground_state(
        config, model, None, jax.random.PRNGKey(config.seed)
    )


def save_initial_state(config, path: str) -> None:
    """Writes the fresh phase 2-3 state of `config` (computed here) for `load_initial_state`."""
    model = build_model(config.model, tuple(config.data.image_size))
    np.savez(path, *jax.tree.leaves(jax.device_get(_initial_state(config, model))))


def load_initial_state(config, path: str):
    """The state `save_initial_state` wrote (no initialisation is compiled: only its shape is traced)."""
    model = build_model(config.model, tuple(config.data.image_size))
    structure = jax.tree.structure(
        jax.eval_shape(lambda: _initial_state(config, model))
    )
    stored = np.load(path)
    return jax.tree.unflatten(
        structure, [stored[f"arr_{i}"] for i in range(len(stored.files))]
    )


def data_parallel_steps(
    config, global_images: np.ndarray, checkpoint_dir: str, initial_state=None
):
    """Phase-3 steps (every parameter trains) on this process's rows of fixed global batches from a
    fresh state (`initial_state`, or initialised here), then a checkpoint round trip through Orbax on
    every process.

    Returns:
      (losses, host copy of the final state); the restored checkpoint equals the final state.
    """
    mesh = trainer.create_mesh()
    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    background_model = build_background_model(config.model, image_hw)
    if initial_state is None:
        initial_state = _initial_state(config, model)
    state = trainer.replicate(initial_state, mesh)
    # The trainer's own step (a partial keeps the function's name, so executables are shared).
    step_fn = trainer.compile_step(
        functools.partial(
            trainer.foreground_train_step,
            model=model,
            background_model=background_model,
            config=config,
            phase=curriculum.PHASE_JOINT,
        ),
        mesh,
    )
    rows = len(global_images[0]) // jax.process_count()
    local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for images in global_images:
        batch = input_pipeline.to_global_arrays({IMAGE: images[local]}, mesh)
        # With the norms flag traced, as the training loop calls it.
        state, metrics = step_fn(state, batch, True)
        losses.append(float(metrics["loss"]))
    return losses, _save_and_restore(state, checkpoint_dir, mesh)


def _save_and_restore(state, checkpoint_dir: str, mesh):
    """Saves `state` (on every process), restores it into zeros of the same shardings, checks that the
    two are identical and returns it on the host."""
    mngr = checkpointing.manager(checkpoint_dir)
    checkpointing.save(mngr, state)
    mngr.wait_until_finished()
    host = jax.device_get(state)
    fresh = trainer.replicate(jax.tree.map(np.zeros_like, host), mesh)
    restored = jax.device_get(checkpointing.restore_latest(mngr, fresh))
    mngr.close()
    _assert_identical(restored, host)
    return host


# A smaller model than the smoke config's (no transformer, 2 slots): data parallelism does not depend on
# the model, and its multi-process step compiles and runs in seconds.
MULTIHOST_OVERRIDES = {
    "model.use_transformer": False,
    "model.num_slots": 2,
    "model.z_what_dim": 8,
}


def _global_images() -> np.ndarray:
    """Three global batches of 4 images, each process feeding its half."""
    images = np.random.default_rng(0).uniform(size=(3, 4, 64, 64, 3))
    return images.astype(np.float32)


def _multihost_config(data_dir: str):
    """The smoke config with MULTIHOST_OVERRIDES (its phase-3 step trains every parameter)."""
    return tiny_config(data_dir, **MULTIHOST_OVERRIDES)


def _worker(port: int, process_id: int, data_dir: str, out_dir: str) -> None:
    """One of two processes of `test_two_processes_match_one`."""
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    config = _multihost_config(data_dir)
    losses, state = data_parallel_steps(
        config,
        _global_images(),
        os.path.join(out_dir, "ckpt"),
        initial_state=load_initial_state(config, os.path.join(out_dir, "initial.npz")),
    )
    np.savez(
        os.path.join(out_dir, f"params{process_id}.npz"),
        *jax.tree.leaves(state.params),
    )
    # The logs and the evaluation of a multi-host run: every process scores the whole test split, only
    # process 0 prints and writes (each process gets a workdir of its own here, to tell who wrote what).
    workdir = os.path.join(out_dir, f"wd{process_id}")
    writer = trainer.create_writer(workdir)
    writer.write_scalars(len(losses), {"loss": losses[-1]})
    writer.close()
    means = evaluator.evaluate_and_write(
        config,
        workdir,
        build_model(config.model, tuple(config.data.image_size)),
        {"params": state.params, "batch_stats": state.batch_stats},
        trainer.create_mesh(),
    )
    with open(os.path.join(out_dir, f"losses{process_id}.json"), "w") as f:
        json.dump({"losses": losses, "eval": means}, f)
    jax.distributed.shutdown()


def _glue_worker(port: int, process_id: int, out_dir: str) -> None:
    """One of two processes of `test_two_processes_share_batches_steps_and_checkpoints`."""
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    mesh = trainer.create_mesh()
    images = _global_images()[0]
    rows = len(images) // jax.process_count()
    local = images[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    batch = input_pipeline.to_global_arrays({IMAGE: local}, mesh)
    tx = optax.sgd(0.5)
    weights = {"w": np.linspace(-1.0, 1.0, 3, dtype=np.float32)}
    state = trainer.replicate(
        train_state.create(weights, {}, tx, jax.random.PRNGKey(0)), mesh
    )

    @jax.jit
    def step(state, batch):
        def loss(params):  # Per image: the squared distance of its mean colour to w.
            colours = batch[IMAGE].mean(axis=(1, 2))
            return ((colours - params["w"]) ** 2).sum(axis=-1).mean()

        value, grads = jax.value_and_grad(loss)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state
        ), value

    state, value = step(state, batch)
    host = _save_and_restore(state, os.path.join(out_dir, "ckpt"), mesh)
    with open(os.path.join(out_dir, f"glue{process_id}.json"), "w") as f:
        json.dump({"loss": float(value), "w": host.params["w"].tolist()}, f)
    jax.distributed.shutdown()


def _run_two_workers(*args: str, env: dict) -> list[str]:
    """Runs this file as two cooperating processes (`args` after the port and process id)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(i), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_share_batches_steps_and_checkpoints(cache_dir, tmp_path):
    """The multi-host plumbing without the model (CI's share of the slow test below): each process feeds
    its half of the batch, one jitted step over both processes' devices sees the whole batch, and a
    checkpoint that both write restores on both."""
    _run_two_workers("glue", str(tmp_path), env=_env(cache_dir, devices=2))
    images = _global_images()[0].astype(np.float64)
    colours = images.mean(axis=(1, 2))
    w = np.linspace(-1.0, 1.0, 3)
    loss = ((colours - w) ** 2).sum(axis=-1).mean()
    w_after = w - 0.5 * 2.0 * (w - colours).mean(axis=0)
    for i in range(2):
        with open(tmp_path / f"glue{i}.json") as f:
            result = json.load(f)
        np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(result["w"], w_after, rtol=1e-5, atol=1e-6)


# Every compiled step and the evaluation of a real run on two processes: about 170 s of one CI worker on
# 2 cores (three processes compile the phase-3 step), so it runs with `-m slow`; CI runs the test above.
@pytest.mark.slow
def test_two_processes_match_one(data_dir, cache_dir, tmp_path):
    # The same initial state everywhere, computed once (the workers skip compiling the initialisation).
    save_initial_state(_multihost_config(data_dir), str(tmp_path / "initial.npz"))
    outputs = _run_two_workers(data_dir, str(tmp_path), env=_env(cache_dir, devices=2))
    config = _multihost_config(data_dir)
    losses, state = data_parallel_steps(config, _global_images(), str(tmp_path / "one"))
    leaves = jax.tree.leaves(state.params)
    results = []
    for i in range(2):
        with open(tmp_path / f"losses{i}.json") as f:
            results.append(json.load(f))
        np.testing.assert_allclose(results[i]["losses"], losses, rtol=1e-5)
        stored = np.load(tmp_path / f"params{i}.npz")
        for j, leaf in enumerate(leaves):
            np.testing.assert_allclose(stored[f"arr_{j}"], leaf, rtol=1e-4, atol=3e-3)
    # Both processes scored the same images of the test split (their two shards), with the same result;
    # only process 0 printed the table and wrote metrics.json and the figure.
    assert results[0]["eval"] == results[1]["eval"]
    assert results[0]["eval"]["num_images"] == config.num_eval_images
    assert "Evaluation on" in outputs[0] and "Evaluation on" not in outputs[1]
    written = tmp_path / "wd0" / "eval" / "test"
    assert (written / "metrics.json").exists() and (written / "samples.png").exists()
    assert os.listdir(tmp_path / "wd0" / "logs")  # The TensorBoard event file.
    assert not (tmp_path / "wd1").exists()


@pytest.mark.slow
def test_two_process_cli_run_and_resume(data_dir, cache_dir, tmp_path):
    """The launcher on two processes: only process 0 writes, checkpoints resume on both."""
    workdir = str(tmp_path / "wd")

    def launch(steps: int):
        port = _free_port()
        procs = [
            subprocess.Popen(
                [
                    *_train_command(workdir, data_dir, num_train_steps=steps),
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
                cwd=REPO,
                env=_env(cache_dir, devices=2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]
        try:
            outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        return outputs

    outputs = launch(4)
    assert "Phases 2-3" in outputs[0] and "Phases 2-3" not in outputs[1]
    # The evaluation at the end scored the images of both processes' shards once each.
    with open(os.path.join(workdir, "eval", "test", "metrics.json")) as f:
        assert json.load(f)["num_images"] == smoke_config(data_dir).num_eval_images
    ids = trainer.read_example_ids(os.path.join(workdir, "example_ids.txt"))
    assert sorted(ids) == [1, 2, 3, 4]
    for batch in ids.values():  # Global batch: process 0's half, then process 1's.
        assert all(i < 128 for i in batch[:2]) and all(i >= 128 for i in batch[2:])
    outputs = launch(6)
    assert "Phases 2-3: resuming from step 4." in outputs[0]
    # Checkpoints written by two processes (2 devices each) restore here, on one process with 4.
    before = checkpointing.load_model_variables(workdir, 4)[0]["params"]
    after = checkpointing.load_model_variables(workdir, 6)[0]["params"]
    leaves = jax.tree.leaves(after)
    assert all(np.isfinite(leaf).all() for leaf in leaves)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), leaves)
    )


if __name__ == "__main__":
    if sys.argv[3] == "glue":
        _glue_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[4])
    else:
        _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
