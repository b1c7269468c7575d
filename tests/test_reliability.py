"""Faults a long run meets, injected on the tiny shapes config: kill -9 and rerun, SIGTERM / SIGINT,
determinism, two processes on localhost, bad input and a NaN loss.

Training runs go through `python -m experiments.train` in subprocesses with timeouts where a process must
die or several must cooperate; the rest runs in-process. Executables are shared through a persistent
compilation cache under pytest's base temp directory (also used by test_trainer.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # When run as the multi-host worker script.
    sys.path.insert(0, REPO)

from conftest import SMOKE_OVERRIDES, smoke_config

from ast_seg_jax import (
    checkpointing,
    curriculum,
    input_pipeline,
    optim,
    trainer,
)
from ast_seg_jax.models.build import build_background_model, build_model
from ast_seg_jax.typing import IMAGE

TIMEOUT = 600
# The tiny curriculum run of test_trainer.py (same compiled steps), recording its example ids.
OVERRIDES = {**SMOKE_OVERRIDES, "record_example_ids": True}


def tiny_config(data_dir: str, **overrides):
    return smoke_config(data_dir, record_example_ids=True, **overrides)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(compilation_cache_dir):
    """The persistent compilation cache, used in-process and by the subprocesses of this module."""
    return compilation_cache_dir


def _env(cache_dir: str, devices: int = 4) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_DEFAULT_MATMUL_PRECISION="highest",  # As tests/conftest.py sets in-process.
        PYTHONPATH=REPO,
    )
    return env


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
    """Waits until the run recorded the batch of foreground step `step`."""
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
def reference_run(data_dir, cache_dir, tmp_path_factory):
    """An uninterrupted CLI run: its example ids and final parameters."""
    workdir = str(tmp_path_factory.mktemp("reference") / "wd")
    result = _train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, _ids(workdir), _final_params(workdir, 4)


@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_kill_9_and_rerun_continues_exactly(
    reference_run, data_dir, cache_dir, tmp_path
):
    _, ref_ids, ref_params = reference_run
    workdir = str(tmp_path / "wd")
    proc = _start(workdir, data_dir, cache_dir, tmp_path / "log")
    # Killed while step 3 runs: its checkpoint does not exist, the one of step 2 may be complete.
    _wait_for_step(proc, os.path.join(workdir, "example_ids.txt"), 3)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    result = _train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step" in result.stdout
    # Same batches at every step (none skipped or repeated) and bit-identical parameters.
    assert _ids(workdir) == ref_ids
    assert sorted(ref_ids["example_ids.txt"]) == [1, 2, 3, 4]
    _assert_identical(_final_params(workdir, 4), ref_params)
    assert _no_temporary_checkpoints(workdir)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_stop_signal_saves_and_exits_cleanly(
    signum, reference_run, data_dir, cache_dir, tmp_path
):
    _, ref_ids, ref_params = reference_run
    workdir = str(tmp_path / "wd")
    proc = _start(workdir, data_dir, cache_dir, tmp_path / "log")
    _wait_for_step(proc, os.path.join(workdir, "example_ids.txt"), 3)
    proc.send_signal(signum)
    _, stderr = _finish(proc)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"{name} received: foreground stopped after step" in stderr
    assert "Traceback" not in stderr
    stopped_at = int(stderr.split("stopped after step ")[1].split(",")[0])
    mngr = ocp.CheckpointManager(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    assert mngr.latest_step() == stopped_at
    mngr.close()
    result = _train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {stopped_at}" in result.stdout
    assert _ids(workdir) == ref_ids
    _assert_identical(_final_params(workdir, 4), ref_params)


@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_same_seed_is_bit_identical_and_other_seeds_differ(
    reference_run, data_dir, tmp_path
):
    _, _, ref_params = reference_run
    finals = {}
    for seed in (0, 1):
        workdir = str(tmp_path / f"seed{seed}")
        trainer.train_and_evaluate(tiny_config(data_dir, seed=seed), workdir)
        finals[seed] = _final_params(workdir, 4)
    _assert_identical(
        finals[0], ref_params
    )  # In-process run == CLI run of the same config.
    differ = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(finals[1]), jax.tree.leaves(ref_params))
    ]
    assert all(differ)


@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch
):
    create = input_pipeline.create_train_iterator

    def poisoned(*args, start_step=0, **kwargs):
        for step, batch in enumerate(create(*args, start_step=start_step, **kwargs)):
            if start_step + step == 2:  # The batch of the third step.
                batch = {**batch, IMAGE: np.full_like(batch[IMAGE], np.nan)}
            yield batch

    monkeypatch.setattr(input_pipeline, "create_train_iterator", poisoned)
    config = tiny_config(data_dir, scenario="baseline", checkpoint_every_steps=1)
    workdir = str(tmp_path / "wd")
    with pytest.raises(trainer.NonFiniteLossError, match="between steps 2 and 3"):
        trainer.train_and_evaluate(config, workdir)
    mngr = ocp.CheckpointManager(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    assert mngr.all_steps() == [1, 2]
    params = mngr.restore(2, args=ocp.args.StandardRestore())["params"]
    mngr.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_cli_reports_bad_input_in_one_line(data_dir, cache_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _train(str(blocker / "wd"), data_dir, cache_dir)
    assert result.returncode == 1
    assert "cannot be written" in result.stderr and "Traceback" not in result.stderr
    result = _train(str(tmp_path / "wd"), data_dir, cache_dir, batch_size=6)
    assert result.returncode == 1
    assert "config.batch_size=6 is not divisible by the 4 devices" in result.stderr
    assert not (tmp_path / "wd" / checkpointing.CHECKPOINT_DIR).exists()


# ----------------------------------------------------------------------------------------------------------
# Two processes on localhost.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel_steps(config, global_images: np.ndarray, checkpoint_dir: str):
    """Phase-2 and phase-3 steps on this process's rows of fixed global batches, then a checkpoint
    round trip through Orbax on every process.

    Returns:
      (losses, host copy of the final state); the restored checkpoint equals the final state.
    """
    mesh = trainer.create_mesh()
    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    background_model = build_background_model(config.model, image_hw)
    state = trainer.replicate(
        trainer.create_foreground_state(
            config, model, None, jax.random.PRNGKey(config.seed)
        ),
        mesh,
    )
    steps = {}
    for phase in (curriculum.PHASE_FOREGROUND, curriculum.PHASE_JOINT):
        steps[phase] = trainer.compile_step(
            lambda s, b, phase=phase: trainer.foreground_train_step(
                s,
                b,
                model=model,
                background_model=background_model,
                config=config,
                phase=phase,
            ),
            mesh,
        )
    tx = optim.foreground_optimizer(config)
    rows = len(global_images[0]) // jax.process_count()
    local = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for step, images in enumerate(global_images):
        if curriculum.should_reset_optimizer(step, config):
            state = state.replace(
                opt_state=trainer.replicate(tx.init(state.params), mesh)
            )
        batch = input_pipeline.to_global_arrays({IMAGE: images[local]}, mesh)
        state, metrics = steps[curriculum.phase_of(step, config)](state, batch)
        losses.append(float(metrics["loss"]))
    mngr = checkpointing.manager(checkpoint_dir)
    checkpointing.save(mngr, state)
    mngr.wait_until_finished()
    host = jax.device_get(state)
    fresh = trainer.replicate(jax.tree.map(np.zeros_like, host), mesh)
    restored = jax.device_get(checkpointing.restore_latest(mngr, fresh))
    mngr.close()
    _assert_identical(restored, host)
    return losses, host


def _global_images() -> np.ndarray:
    images = np.random.default_rng(0).uniform(size=(3, 4, 64, 64, 3))
    return images.astype(np.float32)


def _multihost_config(data_dir: str):
    return tiny_config(data_dir, num_train_steps=3, freeze_background_steps=2)


def _worker(port: int, process_id: int, data_dir: str, out_dir: str) -> None:
    """One of two processes of `test_two_processes_match_one`."""
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    losses, state = data_parallel_steps(
        _multihost_config(data_dir), _global_images(), os.path.join(out_dir, "ckpt")
    )
    np.savez(
        os.path.join(out_dir, f"params{process_id}.npz"),
        *jax.tree.leaves(state.params),
    )
    with open(os.path.join(out_dir, f"losses{process_id}.json"), "w") as f:
        json.dump(losses, f)
    jax.distributed.shutdown()


@pytest.mark.slow  # Whole training runs: minutes of compilation on 2 cores.
def test_two_processes_match_one(data_dir, cache_dir, tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(i), data_dir, str(tmp_path)],
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
    losses, state = data_parallel_steps(
        _multihost_config(data_dir), _global_images(), str(tmp_path / "one")
    )
    leaves = jax.tree.leaves(state.params)
    for i in range(2):
        with open(tmp_path / f"losses{i}.json") as f:
            np.testing.assert_allclose(json.load(f), losses, rtol=1e-5)
        stored = np.load(tmp_path / f"params{i}.npz")
        for j, leaf in enumerate(leaves):
            np.testing.assert_allclose(stored[f"arr_{j}"], leaf, rtol=1e-4, atol=3e-3)


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
    ids = trainer.read_example_ids(os.path.join(workdir, "example_ids.txt"))
    assert sorted(ids) == [1, 2, 3, 4]
    for batch in ids.values():  # Global batch: process 0's half, then process 1's.
        assert all(i < 128 for i in batch[:2]) and all(i >= 128 for i in batch[2:])
    outputs = launch(6)
    assert "Phases 2-3: resuming from step 4." in outputs[0]
    assert _final_params(workdir, 6) is not None


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
