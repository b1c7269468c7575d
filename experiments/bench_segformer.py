r"""Forward time of the Flax Segformer (MiT) encoders on the host CPU.

Usage:
  python -m experiments.bench_segformer --variants=b0,b3 --sizes=64,128 --batch=8

For each variant and square input size it jit-compiles ``SegformerEncoder.apply`` (eval mode,
float32), runs ``--warmup`` calls, then times ``--repeats`` calls and prints the median and the
minimum in milliseconds, and the throughput. Parameters are random (filled from numpy, which
avoids compiling the random initialisers; the timing does not depend on the values). Pass
``--head`` to time the full Segformer (encoder + decode head with 44 outputs) as well.
"""

import math
import os
import statistics
import time

from absl import app, flags

_VARIANTS = flags.DEFINE_list("variants", ["b0", "b3"], "Segformer sizes to time.")
_SIZES = flags.DEFINE_list("sizes", ["64", "128"], "Square input sizes.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls.")
_HEAD = flags.DEFINE_bool(
    "head", False, "Also time encoder + decode head (44 outputs)."
)
_PLATFORM = flags.DEFINE_string("platform", "cpu", "JAX platform to run on.")


def _random_variables(model, images, seed=0):
    import jax
    import numpy as np

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        scale = 1.0 / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
        return jax.numpy.asarray(
            scale * rng.standard_normal(leaf.shape), jax.numpy.float32
        )

    return jax.tree.map(fill, shapes)


def _time(fn, *args) -> tuple[float, list[float]]:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, times


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", _PLATFORM.value)
    import jax
    import jax.numpy as jnp

    from ast_seg_jax.models import segformer

    print(
        f"jax {jax.__version__}, devices {jax.devices()}, "
        f"host cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'model':<14}{'input':>10}{'batch':>7}{'compile s':>11}"
        f"{'median ms':>11}{'min ms':>9}{'img/s':>9}"
    )
    for variant in _VARIANTS.value:
        config = segformer.SegformerConfig.preset(variant)
        models = [(f"{variant} encoder", segformer.SegformerEncoder(config))]
        if _HEAD.value:
            models.append((f"{variant} full", segformer.Segformer(config, 44)))
        for size in (int(s) for s in _SIZES.value):
            images = jnp.asarray(
                jax.random.uniform(jax.random.key(1), (_BATCH.value, size, size, 3))
            )
            for name, model in models:
                variables = _random_variables(model, images)
                forward = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
                compile_s, times = _time(forward, variables, images)
                median = statistics.median(times)
                print(
                    f"{name:<14}{f'{size}x{size}':>10}{_BATCH.value:>7}"
                    f"{compile_s:>11.1f}{1e3 * median:>11.1f}{1e3 * min(times):>9.1f}"
                    f"{_BATCH.value / median:>9.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    app.run(main)
