r"""Grouped vs shifted-product depthwise convolutions at Segformer's Mix-FFN shapes.

    python -m experiments.bench_depthwise [--variant=b3] [--image_size=64] [--batch_size=8] [--repeats=5]

For each stage of the MiT variant, times one jitted forward + backward pass (gradients with respect to
the input and the parameters) of `ast_seg_jax.models.layers.DepthwiseConv` (3x3, the Mix-FFN's
depthwise convolution on `mlp_ratio * hidden` channels at 1/4, 1/8, 1/16 and 1/32 of the image side),
once as XLA's grouped convolution and once as shifted products, checks that both give the same output,
and prints the median milliseconds of each, times the stage's number of blocks, and the speed-up.
`DepthwiseConv` uses the shifted form on a CPU and the grouped one elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ast_seg_jax.models import layers
from ast_seg_jax.models.segformer import SegformerConfig
from experiments import timing

_VARIANT = flags.DEFINE_string("variant", "b3", "MiT variant (b0 ... b5).")
_IMAGE = flags.DEFINE_integer("image_size", 64, "Square image side.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")


def _squared_sum(module):
    return lambda params, x: jnp.sum(module.apply(params, x) ** 2)


def main(argv):
    del argv
    config = SegformerConfig.preset(_VARIANT.value)
    b = _BATCH.value
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; MiT-{_VARIANT.value}, "
        f"{_IMAGE.value}x{_IMAGE.value}, batch {b}; forward + backward, median of {_REPEATS.value}"
    )
    print(
        f"{'stage':<6} {'map':>6} {'channels':>8} {'blocks':>6} {'grouped ms':>11} "
        f"{'shifted ms':>11} {'speed-up':>9}"
    )
    rng = np.random.default_rng(0)
    side = _IMAGE.value
    totals = [0.0, 0.0]
    for stage in range(config.num_stages):
        kernel, stride = config.patch_sizes[stage], config.strides[stage]
        side = (side + 2 * (kernel // 2) - kernel) // stride + 1  # The patch embedding.
        channels = config.mlp_ratio[stage] * config.hidden_sizes[stage]
        blocks = config.depths[stage]
        x = jnp.asarray(rng.normal(size=(b, side, side, channels)), jnp.float32)
        times, outputs = [], []
        for shifted in (False, True):
            module = layers.DepthwiseConv(
                (3, 3), padding=((1, 1), (1, 1)), shifted=shifted
            )
            params = module.init(jax.random.PRNGKey(0), x)
            outputs.append(np.asarray(jax.jit(module.apply)(params, x)))
            grad = jax.jit(jax.grad(_squared_sum(module), argnums=(0, 1)))
            times.append(timing.median_ms(grad, params, x, repeats=_REPEATS.value))
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        totals = [t + blocks * m for t, m in zip(totals, times)]
        print(
            f"{stage + 1:<6} {side:>3}x{side:<2} {channels:>8} {blocks:>6} "
            f"{times[0]:>11.2f} {times[1]:>11.2f} {times[0] / times[1]:>8.1f}x",
            flush=True,
        )
    print(
        f"all blocks: grouped {totals[0]:.0f} ms, shifted {totals[1]:.0f} ms "
        f"({totals[0] / totals[1]:.1f}x)"
    )


if __name__ == "__main__":
    app.run(main)
