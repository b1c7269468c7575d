r"""XLA's convolutions against `layers.conv`'s kernel gradient, at the layers a config's model runs.

    python -m experiments.bench_conv --config=experiments/configs/shapes.py [--batch_size=0] [--repeats=7]

Traces the config's model once (shapes only, nothing is compiled) to list the input shape and
settings of every `ast_seg_jax.models.layers.Conv` it calls, then, for each distinct stride-1 layer,
times one jitted forward + backward pass (gradients with respect to the input and the parameters)
with `products=False` (XLA's convolution, as Flax's) and `products=True` (what a CPU runs: `layers.conv`,
or one matrix product for a 1x1 kernel), checks that both give the same output, and prints the median
milliseconds of each, how many times the model calls the layer, and the speed-up.
"""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from ast_seg_jax import cli
from ast_seg_jax.models import layers
from ast_seg_jax.models.build import build_model
from experiments import timing

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (experiments/configs/*.py[:tiny])."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Images per batch; 0 = the config's batch size."
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats (median reported).")


def conv_layers(config, batch_size: int) -> collections.Counter:
    """Counter of (name, input shape, features, kernel size, padding) over the model's stride-1 Convs."""
    image_hw = tuple(config.data.image_size)
    model = build_model(config.model, image_hw)
    found = collections.Counter()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if (
            isinstance(module, layers.Conv)
            and context.method_name == "__call__"
            and tuple(module.strides) == (1, 1)
        ):
            name = "/".join(p for p in module.path if not p.startswith("_"))
            key = (
                name,
                tuple(args[0].shape),
                module.features,
                tuple(module.kernel_size),
                module.padding,
            )
            found[key] += 1
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((batch_size, *image_hw, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda x: model.init({"params": key, "dropout": key}, x, train=True), images
        )
    return found


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise cli.UserError(
            "--config is required (e.g. --config=experiments/configs/shapes.py)."
        )
    config = _CONFIG.value
    batch_size = _BATCH.value or config.batch_size
    found = conv_layers(config, batch_size)
    if not found:
        print("This config's model has no stride-1 layers.Conv.")
        return
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {batch_size}; "
        f"forward + backward, median of {_REPEATS.value} (ms)"
    )
    print(
        f"{'layer':<40} {'input':>18} {'out':>4} {'k':>3} {'calls':>5} "
        f"{'XLA':>8} {'products':>9} {'speed-up':>9}"
    )
    rng = np.random.default_rng(0)
    totals = [0.0, 0.0]
    for (name, shape, features, kernel_size, padding), calls in found.items():
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        times, outputs = [], []
        for products in (False, True):
            module = layers.Conv(
                features, kernel_size, padding=padding, products=products
            )
            params = module.init(jax.random.PRNGKey(0), x)
            outputs.append(np.asarray(jax.jit(module.apply)(params, x)))

            def loss(p, x, module=module):
                return jnp.sum(module.apply(p, x) ** 2)

            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
            times.append(timing.median_ms(grad, params, x, repeats=_REPEATS.value))
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
        totals = [t + calls * m for t, m in zip(totals, times)]
        print(
            f"{name[-40:]:<40} {'x'.join(map(str, shape)):>18} {features:>4} "
            f"{kernel_size[0]:>3} {calls:>5} {times[0]:>8.2f} {times[1]:>9.2f} "
            f"{times[0] / times[1]:>8.1f}x",
            flush=True,
        )
    print(
        f"all calls: XLA {totals[0]:.0f} ms, products {totals[1]:.0f} ms "
        f"({totals[0] / totals[1]:.1f}x)"
    )


if __name__ == "__main__":
    cli.run(main)
