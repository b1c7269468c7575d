r"""Sub-pixel vs stride-dilated transposed convolutions in the background model and the glimpse generator.

    python -m experiments.bench_conv_transpose [--repeats=5] [--batch_size=32] [--widths=0.25,1.0]

Times one jitted forward + backward pass (gradient of the output's sum with respect to the parameters) of

  * the AE-NE background autoencoder at 64x64 (simple schedule, widths x0.25 and x1),
  * the 32- and 64-pixel glimpse generators on batch x 4 latents (the built-in dataset's K = 4),

once with `ast_seg_jax.models.layers.ConvTranspose` (sub-pixel) and once with `flax.linen.ConvTranspose`
(the same function, computed on a stride-dilated input), and prints the median milliseconds of each, the
speed-up and which of the two the model uses (sub-pixel in both, the faster one as measured on a CPU).
Both use the same parameters; the script checks that the outputs agree.
"""

import contextlib
import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ast_seg_jax.models import layers
from ast_seg_jax.models.background import BackgroundAutoencoder
from ast_seg_jax.models.glimpse import GlimpseGenerator
from experiments import timing

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch.")
_WIDTHS = flags.DEFINE_list(
    "widths", ["0.25", "1.0"], "Background width multipliers to measure (may be empty)."
)


def _forward_backward(module, params, x):
    def loss(p):
        return jnp.sum(module.apply(p, x))

    return jax.jit(jax.value_and_grad(loss))


def _measure(name, make_module, x, repeats, models_use_subpixel):
    """Times `make_module()` with sub-pixel and with dilated transposed convolutions."""
    if (
        models_use_subpixel
    ):  # The model calls layers.ConvTranspose: swap in Flax's for "dilated".
        subpixel_patch = contextlib.nullcontext
        dilated_patch = functools.partial(
            mock.patch.object, layers, "ConvTranspose", _FlaxConvTranspose
        )
    else:  # The model calls nn.ConvTranspose: swap in the sub-pixel layer for "subpixel".
        subpixel_patch = functools.partial(
            mock.patch.object, nn, "ConvTranspose", layers.ConvTranspose
        )
        dilated_patch = contextlib.nullcontext
    module = make_module()
    params = module.init(jax.random.PRNGKey(0), x)
    results = {}
    for label, patch in (("dilated", dilated_patch), ("subpixel", subpixel_patch)):
        with patch():  # Tracing (the first call) happens under the patch.
            fn = _forward_backward(module, params, x)
            value = float(fn(params)[0])
            results[label] = (value, timing.median_ms(fn, params, repeats=repeats))
    (v_dilated, t_dilated), (v_sub, t_sub) = results["dilated"], results["subpixel"]
    if not np.isclose(v_dilated, v_sub, rtol=1e-4):
        raise RuntimeError(f"{name}: outputs differ ({v_dilated} vs {v_sub}).")
    used = "subpixel" if models_use_subpixel else "dilated"
    print(
        f"{name:<44} {t_dilated:>10.1f} {t_sub:>10.1f} {t_dilated / t_sub:>8.2f}x"
        f" {used:>9}",
        flush=True,
    )


class _FlaxConvTranspose(nn.ConvTranspose):
    """flax.linen.ConvTranspose with the keyword set of layers.ConvTranspose."""


def main(argv):
    del argv
    b = _BATCH.value
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; "
        f"batch {b}; forward + backward, median of {_REPEATS.value}"
    )
    print(
        f"{'model':<44} {'dilated ms':>10} {'subpixel':>10} {'speed-up':>9} {'used':>9}"
    )
    images = jnp.asarray(np.random.default_rng(0).random((b, 64, 64, 3)), jnp.float32)
    for width in (float(w) for w in _WIDTHS.value):
        _measure(
            f"AE-NE background 64x64 simple, width x{width}",
            lambda width=width: BackgroundAutoencoder(
                (64, 64), complexity=False, width=width
            ),
            images,
            _REPEATS.value,
            models_use_subpixel=True,
        )
    latents = jnp.asarray(
        np.random.default_rng(1).normal(size=(4 * b, 32)), jnp.float32
    )
    for size in (32, 64):
        _measure(
            f"glimpse generator {size} px, {4 * b} latents",
            lambda size=size: GlimpseGenerator(glimpse_size=size),
            latents,
            _REPEATS.value,
            models_use_subpixel=True,
        )


if __name__ == "__main__":
    app.run(main)
