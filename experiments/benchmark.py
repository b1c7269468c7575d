r"""Speed, memory and FLOP use of one training phase (or of inference) on synthetic data.

    python -m experiments.benchmark --config=experiments/configs/clevrtex.py --phase=3 \
        [--batch_size=64] [--repeats=10] [--json=bench.json] [--config.key=value ...]

    python -m experiments.benchmark --config=experiments/configs/objects_room.py --phase=2 \
        --sweep=batch --sweep_values=8,16,32

No dataset is needed: the batch holds uniform random images (and, for phase 2, a random precomputed
background) of the config's image size, so the numbers are the model's, not the input pipeline's. The
model starts from its random initialisation (a pretrained encoder would not change the cost);
`--init=random` fills the same parameter shapes from numpy instead, which skips compiling `model.init`
(minutes of CPU for Segformer-B3) and leaves the cost of the step unchanged.

What is measured, for `--phase`:

  1      `trainer.background_train_step` (AE-NE background pretraining), batch `config.background.batch_size`;
  2      `trainer.foreground_train_step(phase=2)` with a precomputed background in the batch (how the trainer
         runs phase 2 when `config.background.precompute` is True), batch `config.batch_size`;
  3      `trainer.foreground_train_step(phase=3)`: every parameter trains, the background network runs live;
  infer  `evaluator.eval_step`: the eval-mode forward pass with the live background, then the argmax
         segmentation.

The training steps run as the trainer runs them between logging and checkpoint steps, without the
gradient, parameter and update norms (`with_norms=False`).

`--batch_size` overrides the config's batch size. The step is jitted exactly as the trainer does it
(`trainer.compile_step`: replicated, donated state; batch sharded over all devices on the axis "data"), lowered
and compiled once (the compile time is reported), run `--warmup` times untimed, then timed over `--repeats`
repeats of `--steps_per_repeat` back-to-back steps, each repeat ended by `jax.block_until_ready`. Reported:

  * seconds per step, steps/s and images/s from the median repeat (also the fastest repeat);
  * lowering and compile times, and the time to initialise the parameters;
  * FLOPs per step from XLA's cost analysis of the step *before* backend optimisation (the lowered
    program, the whole global batch), which counts every convolution and matmul on every backend, the
    achieved FLOP/s of all devices together and, when the device's peak is known (`PEAK_TFLOPS`, or
    `--peak_tflops`), the fraction of the devices' summed peak. The compiled program's own count is
    reported too (`compiled_flops_per_step`, per device: the program after partitioning over the
    mesh): times the number of devices it agrees on a CPU, but on a GPU the convolutions and matmuls
    become library calls that it does not count. Bytes accessed per step (per device) come from the
    compiled program;
  * peak device memory from `device.memory_stats()` (absent on CPU: reported as n/a), XLA's own estimate
    of the step's device memory (`compiled.memory_analysis()`), and the peak host RSS of the process;
  * whether the state the step returns has the same shapes, dtypes, weak types and shardings as the state
    it was given (if not, the jitted step is compiled a second time on its second call);
  * the host load average before and after (a shared host makes every timing slower).

`--profile_dir=DIR` then runs `--profile_steps` more steps under `jax.profiler.trace` (a TensorBoard /
Perfetto trace in DIR) and prints the compiled program's operations that took the most time, from that
trace (on a CPU, one event per operation; on a GPU, per kernel of an operation).

`--compile_only` stops after compiling (no step runs): with a fresh compilation cache it measures a cold
compile, and it fills the cache for a later run (see experiments/gpu_check.sh).

Peak memory and RSS are peaks of the whole process so far: in a sweep, run the smallest setting first
(the sweep does) and read them as upper bounds.

`--sweep=batch|image|slots` repeats the measurement for each of `--sweep_values` (default 8,16,32 for
batch, 64,128,256 for the square image size, 3,10,20 for K = `config.model.num_slots`) and prints how the
step time grows.
"""

import copy
import functools
import gzip
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import time

from absl import flags
from ml_collections import config_flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")

PHASES = ("1", "2", "3", "infer")
SWEEPS = ("batch", "image", "slots")
DEFAULT_SWEEP_VALUES = {
    "batch": (8, 16, 32),
    "image": (64, 128, 256),
    "slots": (3, 10, 20),
}

# Dense peak TFLOP/s of known devices by matmul precision (vendor datasheets). Matched against
# `device.device_kind` by substring, first match wins. H100/H200 are the SXM parts.
PEAK_TFLOPS = (
    ("H200", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0}),
    ("H100", {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    # GA102 whitepaper: TF32 tensor 35.6 dense (71 with sparsity); FP16/BF16 with FP32 accumulate 71.
    ("RTX 3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0}),
)
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
INITS = ("model", "random")

# Keys every result has (numbers may be None where a quantity is not available, e.g. CPU memory).
RESULT_KEYS = (
    "phase",
    "batch_size",
    "image_size",
    "num_slots",
    "seconds_per_step",
    "steps_per_second",
    "images_per_second",
    "init_seconds",
    "lower_seconds",
    "compile_seconds",
    "flops_per_step",
    "compiled_flops_per_step",
    "achieved_tflops",
    "peak_tflops",
    "fraction_of_peak",
    "bytes_accessed_per_step",
    "peak_device_memory_bytes",
    "xla_memory_bytes",
    "peak_host_rss_bytes",
    "state_signature_stable",
    "loadavg_before",
    "loadavg_after",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (experiments/configs/*.py[:tiny]).", lock_config=True
)
_PHASE = flags.DEFINE_enum("phase", "3", PHASES, "What to measure.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch size; 0 = the config's batch size for the phase."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 10, "Timed repeats (the median is reported)."
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps after compilation (at least one is always run)."
)
_STEPS_PER_REPEAT = flags.DEFINE_integer(
    "steps_per_repeat", 1, "Back-to-back steps per timed repeat (raise it on a GPU)."
)
_PEAK = flags.DEFINE_float(
    "peak_tflops", 0.0, "Device peak TFLOP/s to compare with (0 = from the table)."
)
_PRECISION = flags.DEFINE_enum(
    "precision",
    "auto",
    PRECISIONS,
    "Which peak of the table to compare with; auto = bf16 on GPU when config.model.compute_dtype is "
    "bfloat16, else tf32 on GPU (JAX's default float32 matmul) unless jax_default_matmul_precision "
    "is 'highest'/'float32', then fp32.",
)
_INIT = flags.DEFINE_enum(
    "init",
    "model",
    INITS,
    "model: initialise as training does; random: numpy-filled parameters of the same shapes "
    "(skips compiling model.init; the step costs the same).",
)
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    "",
    "Also trace --profile_steps steps with jax.profiler into this directory and print the top ops.",
)
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 3, "Steps traced with --profile_dir."
)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Run on the first this many devices (0 = all)."
)
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only",
    False,
    "Only lower and compile the step (a cold compile with an empty cache; fills the cache).",
)
_SWEEP = flags.DEFINE_enum(
    "sweep", None, SWEEPS, "Measure a sweep instead of one setting."
)
_SWEEP_VALUES = flags.DEFINE_list(
    "sweep_values", [], "Values of the sweep (default: 8,16,32 | 64,128,256 | 3,10,20)."
)


# ----------------------------------------------------------------------------------------------------------
# Device facts.


def peak_tflops(
    device,
    precision: str = "auto",
    override: float = 0.0,
    compute_dtype: str = "float32",
):
    """(peak TFLOP/s or None, precision name) of `device` for `precision`.

    Args:
      device: a jax Device.
      precision: one of PRECISIONS.
      override: a positive value is returned as the peak whatever the device.
      compute_dtype: the config's `model.compute_dtype`; with 'bfloat16', auto picks the bf16 peak
        on a GPU.
    """
    import jax

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}.")
    if precision == "auto":
        if device.platform == "gpu" and compute_dtype == "bfloat16":
            precision = "bf16"
        elif device.platform == "gpu":
            setting = str(jax.config.jax_default_matmul_precision or "").lower()
            precision = "fp32" if setting in ("highest", "float32") else "tf32"
        else:
            precision = "fp32"
    if override > 0:
        return float(override), precision
    kind = getattr(device, "device_kind", "")
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return peaks.get(precision), precision
    return None, precision


def _peak_device_memory(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return None
    for key in ("peak_bytes_in_use", "bytes_in_use"):
        if key in stats:
            return int(stats[key])
    return None


def _peak_host_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB.


def _cost(stage) -> tuple[float | None, float | None]:
    """(flops, bytes accessed) from XLA's cost analysis of a lowered or a compiled step.

    Lowered: the program before any backend optimisation, whose convolutions and dots are still
    HLO operations on every backend. Compiled: the optimised program, where a GPU backend has turned
    them into library calls that the analysis does not count.
    """
    try:
        analysis = stage.cost_analysis()
    except (NotImplementedError, RuntimeError):  # Some backends do not implement it.
        return None, None
    if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None, None
    flops = analysis.get("flops")
    bytes_accessed = analysis.get("bytes accessed")
    return (
        float(flops) if flops is not None and flops >= 0 else None,
        float(bytes_accessed) if bytes_accessed is not None else None,
    )


def _xla_memory(compiled) -> int | None:
    """XLA's estimate of the step's device memory: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(total)


def _signature(tree):
    import jax

    return jax.tree.map(
        lambda x: (
            tuple(x.shape),
            str(x.dtype),
            bool(getattr(x, "weak_type", False)),
            str(getattr(x, "sharding", None)),
        ),
        tree,
    )


# ----------------------------------------------------------------------------------------------------------
# The measured functions.


def _batch_size_for(config, phase: str, batch_size: int) -> int:
    if batch_size != 0:
        return batch_size
    return int(config.background.batch_size if phase == "1" else config.batch_size)


def random_variables(model, image_hw, seed: int = 0, **kwargs):
    """Variables of `model` with the shapes of `model.init`, filled from numpy without compiling it.

    Kernels get N(0, 1/fan_in), biases and BatchNorm means zeros, norm scales and variances ones. The
    values mean nothing; compiling a big model's `init` costs more CPU time than a smoke test has.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.PRNGKey(seed)
    dummy = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    shapes = jax.eval_shape(
        functools.partial(model.init, **kwargs), {"params": key, "dropout": key}, dummy
    )
    host = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        if name in ("scale", "var"):
            value = np.ones(leaf.shape)
        elif name in ("bias", "mean"):
            value = np.zeros(leaf.shape)
        else:
            fan_in = max(1, math.prod(leaf.shape[:-1]))
            value = host.standard_normal(leaf.shape) / math.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _setup(config, phase: str, batch_size: int, mesh, seed: int, init: str):
    """(jitted step, first argument, batch-like second argument, init seconds) for `phase`."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ast_seg_jax import curriculum, optim, train_state, trainer
    from ast_seg_jax.models.build import build_background_model, build_model
    from ast_seg_jax.typing import BACKGROUND, IMAGE

    image_hw = tuple(config.data.image_size)
    rng = jax.random.PRNGKey(seed)
    data = NamedSharding(mesh, P("data"))
    host = np.random.default_rng(seed)

    def random_images():
        images = host.random((batch_size, *image_hw, 3), dtype=np.float32)
        return jax.device_put(images, data)

    background_model = build_background_model(config.model, image_hw)
    start = time.perf_counter()
    if phase == "1":
        if init == "model":
            params = trainer.init_variables(background_model, image_hw, rng)["params"]
        else:
            params = random_variables(background_model, image_hw, seed)["params"]
        state = train_state.create(params, {}, optim.background_optimizer(config), rng)
        state = trainer.replicate(state, mesh)
        jax.block_until_ready(state)
        fn = functools.partial(
            trainer.background_train_step, model=background_model, config=config
        )
        return (
            trainer.compile_step(fn, mesh),
            state,
            {IMAGE: random_images()},
            time.perf_counter() - start,
        )

    model = build_model(config.model, image_hw)
    if init == "model":
        state = trainer.create_foreground_state(config, model, None, rng)
    else:
        variables = random_variables(model, image_hw, seed, train=False)
        state = train_state.create(
            variables["params"],
            variables.get("batch_stats", {}),
            optim.foreground_optimizer(config),
            jax.random.fold_in(rng, 1),
        )
    state = trainer.replicate(state, mesh)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - start
    if phase == "infer":
        # Imported here: it uses CLU, which the training phases do not need.
        from ast_seg_jax import evaluator

        variables = evaluator.variables_of(state)
        step = jax.jit(functools.partial(evaluator.eval_step, model=model))
        return step, variables, random_images(), init_seconds

    phase_number = (
        curriculum.PHASE_FOREGROUND if phase == "2" else curriculum.PHASE_JOINT
    )
    fn = functools.partial(
        trainer.foreground_train_step,
        model=model,
        background_model=background_model,
        config=config,
        phase=phase_number,
    )
    batch = {IMAGE: random_images()}
    if phase == "2":
        batch[BACKGROUND] = (
            random_images()
        )  # The precomputed background, as the trainer feeds it.
    return trainer.compile_step(fn, mesh), state, batch, init_seconds


def measure(
    config,
    phase: str,
    *,
    batch_size: int = 0,
    repeats: int = 10,
    warmup: int = 2,
    steps_per_repeat: int = 1,
    peak_override: float = 0.0,
    precision: str = "auto",
    seed: int = 0,
    init: str = "model",
    compile_only: bool = False,
    profile_dir: str = "",
    profile_steps: int = 3,
    num_devices: int = 0,
) -> dict:
    """Measures one phase of `config`; returns a flat dict with (at least) RESULT_KEYS.

    Args:
      config: a full experiment config (ml_collections); `config.model.pretrained_encoder` is ignored.
      phase: "1", "2", "3" or "infer".
      batch_size: global batch size (0 = the config's for the phase).
      repeats: timed repeats; the median is reported.
      warmup: untimed steps after compilation (the first step is always run untimed).
      steps_per_repeat: steps run back to back inside one timed repeat.
      peak_override: device peak TFLOP/s to use instead of the table (0 = table).
      precision: which peak of the table applies (see `peak_tflops`).
      seed: seeds the parameters and the random images.
      init: "model" initialises as training does (`trainer.create_foreground_state`, or the background
        model's jitted init for phase 1); "random" fills the same shapes from numpy (`random_variables`),
        which skips compiling `init` (for smoke tests; the step costs the same).
      compile_only: stop after compiling; the timing keys are None.
      profile_dir: when set, trace `profile_steps` more steps into it with `jax.profiler` and add
        `top_ops` (see `top_ops`) to the result.
      profile_steps: steps traced for `profile_dir`.
      num_devices: run on the first this many devices (0 = all).

    Raises:
      ValueError: unknown phase, non-positive counts, or a batch not divisible by the device count.
    """
    import jax

    from ast_seg_jax import trainer

    phase = str(phase)
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {', '.join(INITS)}.")
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASES)}.")
    if repeats < 1 or warmup < 0 or steps_per_repeat < 1:
        raise ValueError(
            f"Need repeats >= 1, warmup >= 0 and steps_per_repeat >= 1; got {repeats}, {warmup}, "
            f"{steps_per_repeat}."
        )
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.pretrained_encoder = ""  # Random weights cost the same.
    batch_size = _batch_size_for(config, phase, batch_size)
    devices = jax.devices()
    if not 0 <= num_devices <= len(devices):
        raise ValueError(
            f"num_devices={num_devices} must lie in [0, {len(devices)}] (0 = all)."
        )
    mesh = trainer.create_mesh(devices[: num_devices or None])
    if batch_size < 1 or batch_size % mesh.size:
        raise ValueError(
            f"batch_size={batch_size} must be positive and divisible by the {mesh.size} devices."
        )
    device = mesh.devices.flat[0]
    loadavg_before = os.getloadavg()

    step, first, batch, init_seconds = _setup(
        config, phase, batch_size, mesh, seed, init
    )
    is_train = phase != "infer"
    # A training step as the trainer runs it between logging and checkpoint steps: without the norms.
    extra = (False,) if is_train else ()
    start = time.perf_counter()
    lowered = step.lower(first, batch, *extra)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    flops, _ = _cost(lowered)
    compiled_flops, bytes_accessed = _cost(compiled)

    compute_dtype = config.model.get("compute_dtype", "float32")
    peak, precision_used = peak_tflops(device, precision, peak_override, compute_dtype)
    result = {
        "phase": phase,
        "batch_size": batch_size,
        "compute_dtype": compute_dtype,
        "image_size": list(config.data.image_size),
        "num_slots": int(config.model.num_slots),
        "segformer_variant": config.model.segformer_variant,
        "background_complexity": bool(config.model.background_complexity),
        "seconds_per_step": None,
        "steps_per_second": None,
        "images_per_second": None,
        "init_seconds": init_seconds,
        "lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "flops_per_step": flops,
        "compiled_flops_per_step": compiled_flops,
        "achieved_tflops": None,
        "peak_tflops": peak,
        "peak_precision": precision_used,
        "fraction_of_peak": None,
        "bytes_accessed_per_step": bytes_accessed,
        "peak_device_memory_bytes": None,
        "xla_memory_bytes": _xla_memory(compiled),
        "peak_host_rss_bytes": _peak_host_rss(),
        "state_signature_stable": None,
        "init": init,
        "repeats": repeats,
        "warmup": warmup,
        "steps_per_repeat": steps_per_repeat,
        "loadavg_before": list(loadavg_before),
        "loadavg_after": list(os.getloadavg()),
    }
    result.update(environment(mesh))
    if compile_only:
        return result

    signature_in = _signature(first) if is_train else None

    def run(n):
        nonlocal first
        out = None
        for _ in range(n):
            out = compiled(first, batch, *extra)
            if is_train:
                first = out[
                    0
                ]  # The state was donated: carry the new one, as training does.
        return jax.block_until_ready(out)

    out = run(1)
    stable = _signature(out[0]) == signature_in if is_train else True
    if warmup > 1:
        run(warmup - 1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps_per_repeat)
        times.append((time.perf_counter() - start) / steps_per_repeat)

    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12 if flops else None
    result.update(
        seconds_per_step=seconds,
        seconds_per_step_min=min(times),
        seconds_per_step_all=times,
        steps_per_second=1.0 / seconds,
        images_per_second=batch_size / seconds,
        achieved_tflops=achieved,
        fraction_of_peak=achieved / (peak * mesh.size) if achieved and peak else None,
        peak_device_memory_bytes=_peak_device_memory(device),
        peak_host_rss_bytes=_peak_host_rss(),
        state_signature_stable=stable,
        loadavg_after=list(os.getloadavg()),
    )
    if profile_dir:
        started = time.time()
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            run(profile_steps)
        result["profile_dir"] = profile_dir
        result["top_ops"] = top_ops(
            _newest_trace(profile_dir, started), compiled.as_text(), profile_steps
        )
    return result


def _newest_trace(directory: str, since: float) -> str:
    """The Perfetto trace that `jax.profiler.trace` wrote into `directory` after `since`."""
    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(directory)
        for name in names
        if name.endswith("perfetto_trace.json.gz")
    ]
    paths = [p for p in paths if os.path.getmtime(p) >= since - 1]
    if not paths:
        raise FileNotFoundError(
            f"jax.profiler wrote no Perfetto trace into {directory!r}."
        )
    return max(paths, key=os.path.getmtime)


# `name = shape opcode(` in HLO text; a tuple shape is in parentheses.
_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([a-z][\w\-]*)\(", re.MULTILINE
)


def top_ops(trace_path: str, hlo_text: str, steps: int, num: int = 15) -> list[dict]:
    """The operations of a compiled program that took the most time in a profiler trace.

    Args:
      trace_path: a Perfetto / Chrome trace (`.json.gz`) of `steps` runs of the program.
      hlo_text: the compiled program's HLO text (`compiled.as_text()`): trace events named after one
        of its instructions are its operations; the runtime's own events are left out.
      steps: how many runs the trace holds (the times are per run).
      num: how many operations to return.

    Returns:
      Up to `num` dicts, slowest first: name, opcode (e.g. fusion, convolution, custom-call), calls
      per step and milliseconds per step (the summed durations of its events; an operation that
      contains others, such as a while loop, includes their time).
    """
    opcodes = dict(_HLO_INSTRUCTION.findall(hlo_text))
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, calls = {}, {}
    for event in events:
        name = event.get("name")
        if event.get("ph") != "X" or name not in opcodes:
            continue
        total[name] = total.get(name, 0.0) + float(event.get("dur", 0.0))
        calls[name] = calls.get(name, 0) + 1
    slowest = sorted(total, key=total.get, reverse=True)[:num]
    return [
        {
            "name": name,
            "opcode": opcodes[name],
            "calls_per_step": calls[name] / steps,
            "ms_per_step": total[name]
            / 1e3
            / steps,  # Trace durations are in microseconds.
        }
        for name in slowest
    ]


def format_top_ops(ops: list, seconds_per_step: float | None = None) -> str:
    """A plain-text table of `top_ops`, with each op's share of the step time when it is given."""
    lines = [f"{'ms/step':>9}  {'share':>6}  {'calls':>5}  {'opcode':<14}  name"]
    for op in ops:
        share = (
            f"{op['ms_per_step'] / 1e3 / seconds_per_step:6.1%}"
            if seconds_per_step
            else "   n/a"
        )
        lines.append(
            f"{op['ms_per_step']:9.2f}  {share}  {op['calls_per_step']:5.3g}  "
            f"{op['opcode']:<14}  {op['name']}"
        )
    return "\n".join(lines)


def environment(mesh=None) -> dict:
    """Facts about the machine that the numbers depend on."""
    import jax

    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": getattr(devices[0], "device_kind", ""),
        "num_devices": len(devices),
        "host_cpus": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "synthetic_data": True,
    }


def sweep(config, phase: str, kind: str, values=None, *, batch_size: int = 0, **kwargs):
    """`measure` for each value of a batch | image | slots sweep (smallest first); returns the results."""
    if kind not in SWEEPS:
        raise ValueError(f"sweep={kind!r} is not one of {', '.join(SWEEPS)}.")
    values = sorted(int(v) for v in (values or DEFAULT_SWEEP_VALUES[kind]))
    if not values or values[0] < 1:
        raise ValueError(f"Sweep values must be positive integers, got {values}.")
    results = []
    for value in values:
        cfg = copy.deepcopy(config)
        size = batch_size
        with cfg.unlocked():
            if kind == "batch":
                size = value
            elif kind == "image":
                cfg.data.image_size = (value, value)
            else:
                cfg.model.num_slots = value
        result = measure(cfg, phase, batch_size=size, **kwargs)
        result["sweep"] = kind
        result["sweep_value"] = value
        results.append(result)
        print(format_table([result], sweep_key=kind), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def _fmt(value, scale=1.0, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value / scale:.{digits}g}"


def format_table(results: list, sweep_key: str | None = None) -> str:
    """A plain-text table of `measure` results, one line each."""
    columns = [
        ("phase", lambda r: r["phase"]),
        ("batch", lambda r: str(r["batch_size"])),
        ("image", lambda r: "x".join(map(str, r["image_size"]))),
        ("K", lambda r: str(r["num_slots"])),
        ("dtype", lambda r: r.get("compute_dtype", "float32")),
        ("s/step", lambda r: _fmt(r["seconds_per_step"], digits=4)),
        ("steps/s", lambda r: _fmt(r["steps_per_second"])),
        ("img/s", lambda r: _fmt(r["images_per_second"])),
        ("compile s", lambda r: _fmt(r["compile_seconds"])),
        ("GFLOP/step", lambda r: _fmt(r["flops_per_step"], 1e9, 4)),
        ("TFLOP/s", lambda r: _fmt(r["achieved_tflops"])),
        ("% peak", lambda r: _fmt(r["fraction_of_peak"], 0.01)),
        ("dev mem GB", lambda r: _fmt(r["peak_device_memory_bytes"], 1e9)),
        ("XLA mem GB", lambda r: _fmt(r["xla_memory_bytes"], 1e9)),
        ("RSS GB", lambda r: _fmt(r["peak_host_rss_bytes"], 1e9)),
        ("load", lambda r: _fmt(r["loadavg_before"][0], digits=2)),
    ]
    del sweep_key  # Every sweep variable already has its own column.
    rows = [[name for name, _ in columns]]
    rows += [[get(r) for _, get in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def scaling_table(results: list) -> str:
    """Step time of a sweep relative to its first (smallest) setting."""
    if not results:
        return ""
    kind = results[0].get("sweep", "value")
    base = results[0]
    lines = [f"{kind:>8}  {'s/step':>9}  {'x time':>7}  {'x FLOPs':>7}"]
    for r in results:
        flops_ratio = (
            r["flops_per_step"] / base["flops_per_step"]
            if r["flops_per_step"] and base["flops_per_step"]
            else None
        )
        lines.append(
            f"{r.get('sweep_value', ''):>8}  {r['seconds_per_step']:>9.4g}  "
            f"{r['seconds_per_step'] / base['seconds_per_step']:>7.3g}  {_fmt(flops_ratio):>7}"
        )
    return "\n".join(lines)


def write_json(path: str, payload) -> None:
    """Writes `payload` as indented JSON, creating the parent directory."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    if _CONFIG.value is None:
        raise cli.UserError(
            "--config is required (e.g. --config=experiments/configs/shapes.py:tiny)."
        )
    cli.quiet_third_party_logs()
    import jax

    cli.enable_compilation_cache()

    kwargs = {
        "batch_size": _BATCH_SIZE.value,
        "repeats": _REPEATS.value,
        "warmup": _WARMUP.value,
        "steps_per_repeat": _STEPS_PER_REPEAT.value,
        "peak_override": _PEAK.value,
        "precision": _PRECISION.value,
        "seed": int(_CONFIG.value.seed),
        "init": _INIT.value,
        "compile_only": _COMPILE_ONLY.value,
        "profile_dir": _PROFILE_DIR.value,
        "profile_steps": _PROFILE_STEPS.value,
        "num_devices": _NUM_DEVICES.value,
    }
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} host CPUs, load average {os.getloadavg()[0]:.2f}; "
        "synthetic random images (no dataset).",
        flush=True,
    )
    if _SWEEP.value:
        results = sweep(
            _CONFIG.value,
            _PHASE.value,
            _SWEEP.value,
            _SWEEP_VALUES.value or None,
            **kwargs,
        )
        print(format_table(results))
        print(scaling_table(results))
        payload = {"sweep": _SWEEP.value, "results": results}
    else:
        result = measure(_CONFIG.value, _PHASE.value, **kwargs)
        print(format_table([result]))
        if result.get("top_ops"):
            print(f"Slowest operations (trace in {result['profile_dir']}):")
            print(format_top_ops(result["top_ops"], result["seconds_per_step"]))
        if result["state_signature_stable"] is False:
            print(
                "warning: the step returns a state whose shapes/dtypes/weak types/shardings differ from "
                "its input: jit recompiles on the second step."
            )
        payload = result
    if _JSON.value:
        write_json(_JSON.value, payload)
        print(f"Wrote {_JSON.value}")


if __name__ == "__main__":
    cli.run(main)
