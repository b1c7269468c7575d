"""Smoke tests of experiments/benchmark.py on a tiny config (no timing assertions)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from experiments import benchmark
from experiments.configs import objects_room

# Keys whose values must be positive finite numbers on any backend (memory stats may be n/a on CPU).
POSITIVE_KEYS = (
    "seconds_per_step",
    "steps_per_second",
    "images_per_second",
    "init_seconds",
    "lower_seconds",
    "compile_seconds",
    "flops_per_step",
    "achieved_tflops",
    "bytes_accessed_per_step",
    "xla_memory_bytes",
    "peak_host_rss_bytes",
)


def _tiny_config():
    config = objects_room.get_config("tiny")
    config.data.image_size = (32, 32)
    config.model.num_slots = 2
    return config


def _check(result: dict, phase: str, batch_size: int) -> None:
    for key in benchmark.RESULT_KEYS:
        assert key in result, key
    for key in POSITIVE_KEYS:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        assert value > 0, (key, value)
    assert result["phase"] == phase
    assert result["batch_size"] == batch_size
    assert result["image_size"] == [32, 32]
    assert result["state_signature_stable"] is True
    assert math.isclose(
        result["images_per_second"], batch_size * result["steps_per_second"]
    )
    assert len(result["loadavg_before"]) == 3
    assert result["synthetic_data"] is True
    json.dumps(result)  # Everything must be JSON-serialisable.


# Phase 3 compiles the gradient of the whole model (about a minute of CPU even at this size): slow.
# Inference is measured by test_sweep_over_batch_size.
@pytest.mark.parametrize("phase", ["1", pytest.param("3", marks=pytest.mark.slow)])
def test_measure_reports_every_key(phase, tmp_path):
    result = benchmark.measure(
        _tiny_config(),
        phase,
        batch_size=4,
        repeats=2,
        warmup=1,
        init="random",
        peak_override=1.0,
        profile_dir=str(tmp_path / "trace"),
        profile_steps=1,
    )
    _check(result, phase, 4)
    # FLOPs are counted before backend optimisation, for the global batch: about 4 times one device's
    # share of the partitioned program (less: the optimiser runs on every device but counts once).
    assert result["num_devices"] == 4
    ratio = result["flops_per_step"] / (4 * result["compiled_flops_per_step"])
    assert 0.75 < ratio < 1.05, ratio
    # The profile names the compiled program's operations, slowest first.
    ops = result["top_ops"]
    assert ops and all(op["ms_per_step"] > 0 and op["opcode"] for op in ops)
    assert [op["ms_per_step"] for op in ops] == sorted(
        (op["ms_per_step"] for op in ops), reverse=True
    )
    assert "ms/step" in benchmark.format_top_ops(ops, result["seconds_per_step"])
    # With a given peak the fraction is the achieved rate over it, for each of the 4 devices.
    assert result["peak_tflops"] == 1.0
    assert math.isclose(result["fraction_of_peak"], result["achieved_tflops"] / 4)
    path = tmp_path / "out" / "bench.json"
    benchmark.write_json(str(path), result)
    assert json.loads(path.read_text())["phase"] == phase
    table = benchmark.format_table([result])
    assert len(table.splitlines()) == 2 and "s/step" in table


def test_compile_only_reports_the_compile_and_the_flops():
    result = benchmark.measure(
        _tiny_config(),
        "1",
        batch_size=4,
        init="random",
        compile_only=True,
        num_devices=1,
    )
    assert result["compile_seconds"] > 0 and result["num_devices"] == 1
    # On one CPU device the count before optimisation and the compiled program's agree (the optimiser
    # removes a few per cent: constant folding, simplifications).
    ratio = result["flops_per_step"] / result["compiled_flops_per_step"]
    assert 0.95 < ratio < 1.1, ratio
    assert (
        result["seconds_per_step"] is None and result["state_signature_stable"] is None
    )
    assert "n/a" in benchmark.format_table([result])


def test_sweep_over_batch_size():
    results = benchmark.sweep(
        _tiny_config(), "infer", "batch", [8, 4], repeats=1, warmup=0, init="random"
    )
    assert [r["sweep_value"] for r in results] == [4, 8]  # Smallest first.
    assert [r["batch_size"] for r in results] == [4, 8]
    for r in results:
        _check(r, "infer", r["batch_size"])
    # XLA counts about twice the FLOPs for twice the batch.
    ratio = results[1]["flops_per_step"] / results[0]["flops_per_step"]
    assert 1.5 < ratio < 2.5
    lines = benchmark.scaling_table(results).splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "batch"


def test_peak_table():
    class FakeDevice:
        platform = "gpu"
        device_kind = "NVIDIA H200"

    assert benchmark.peak_tflops(FakeDevice(), "bf16") == (989.0, "bf16")
    assert benchmark.peak_tflops(FakeDevice(), "fp32") == (67.0, "fp32")
    assert benchmark.peak_tflops(FakeDevice(), "auto", compute_dtype="bfloat16") == (
        989.0,
        "bf16",
    )
    FakeDevice.platform, FakeDevice.device_kind = "cpu", "cpu"
    assert benchmark.peak_tflops(FakeDevice(), "auto") == (None, "fp32")
    assert benchmark.peak_tflops(FakeDevice(), "auto", override=2.5) == (2.5, "fp32")


def test_bad_arguments_are_named():
    config = _tiny_config()
    with pytest.raises(ValueError, match="phase"):
        benchmark.measure(config, "4")
    with pytest.raises(ValueError, match="batch_size=-4 must be positive"):
        benchmark.measure(config, "1", batch_size=-4)
    with pytest.raises(ValueError, match="sweep"):
        benchmark.sweep(config, "1", "depth")


# Run in a fresh interpreter where importing TensorFlow, TFDS or CLU fails, as on a GPU machine without them.
_WITHOUT_TENSORFLOW = """
import functools
import sys

for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None  # `import name` now raises ImportError.

import jax
import jax.numpy as jnp

from ast_seg_jax import curriculum, optim, train_state, trainer
from ast_seg_jax.models.build import build_background_model, build_model
from experiments import benchmark
from experiments.configs import objects_room

config = objects_room.get_config("tiny")
config.data.image_size = (32, 32)
config.model.num_slots = 2
hw = (32, 32)
model = build_model(config.model, hw)
variables = benchmark.random_variables(model, hw, train=False)
state = train_state.create(
    variables["params"], variables.get("batch_stats", {}), optim.foreground_optimizer(config),
    jax.random.PRNGKey(0),
)
step = functools.partial(
    trainer.foreground_train_step, model=model, config=config, phase=curriculum.PHASE_JOINT,
    background_model=build_background_model(config.model, hw),
)
new_state, metrics = jax.eval_shape(step, state, {"image": jnp.zeros((2, *hw, 3))})
assert new_state.params.keys() == state.params.keys() and "loss" in metrics
result = benchmark.measure(config, "1", batch_size=2, repeats=1, warmup=0, init="random")
assert result["seconds_per_step"] > 0
print("without tensorflow: ok")
"""


def test_steps_and_benchmark_need_no_tensorflow_or_clu():
    """The model, the phase-3 step (traced) and a measured phase-1 step, with TensorFlow, TFDS and CLU
    unimportable: TensorFlow is imported only where data is read, CLU where logs are written."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW],
        cwd=REPO,
        env=subprocess_env(devices=1),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without tensorflow: ok" in done.stdout
