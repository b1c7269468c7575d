"""Object masks read from the image window they cover (not in the official code).

With ``glimpse_mask='window'`` each slot's mask is drawn by a small fully convolutional network that looks
at the window of the input image that the glimpse will cover (``spatial_transformer.extract_glimpses`` at
the slot's final position and scale, so that window pixel (i, j) lands on glimpse pixel (i, j)), at the
same window of the background, at the object colour that the glimpse generator decoded and at each
pixel's position in the window (so that it can prefer the object at the window's centre, where the
slot's attention put it). The official
mask comes from a 1x1 appearance code through transposed convolutions and, trained by the reconstruction
alone, stays a rounded blob for thousands of steps (docs/demo_experiments.md); the window shows where the
object's edges are, so this mask can follow them early.

The network's inputs carry no gradient: position, scale, colour and background learn from the rendering
only, as with the crop appearance encoder. Its last layer starts at zero, so an untrained model draws a
mask of 0.5 over the whole window, as an untrained glimpse generator does.

A bottleneck remains: the object's colour is still decoded from z_what, so the mask cannot copy the image
(a mask of 1 over the whole window would paint the window in one colour). The glimpse generator's own
mask is no longer drawn; ``mask_distillation_loss`` trains it towards the window mask (gradient stopped
on the target), weighted by ``config.mask_distillation_weight``, so that z_what still has to describe
the object's shape. It does not feed the window mask: in a trial where the drawn mask logit was the
decoded logit plus the network's correction, distilling the sum into its own decoded term made every
mask fall to zero within 200 steps.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ast_seg_jax.models import layers


class WindowMask(nn.Module):
    """Glimpse mask logits from the image and background windows and the decoded colour.

    Attributes:
      width: channels of the hidden 3x3 convolutions.
      depth: number of hidden 3x3 convolutions.
      dtype: computation dtype (parameters stay float32; the output is float32).
    """

    width: int = 32
    depth: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        window: Float[Array, "n g g 3"],
        background_window: Float[Array, "n g g 3"],
        colour: Float[Array, "n g g 3"],
    ) -> Float[Array, "n g g"]:
        """Returns the mask logits [n, g, g]."""
        if not window.shape == background_window.shape == colour.shape:
            raise ValueError(
                "WindowMask needs window, background window and colour of one shape "
                f"[n, g, g, 3], got {window.shape}, {background_window.shape}, {colour.shape}."
            )
        n, g = window.shape[0], window.shape[1]
        grid = (2.0 * jnp.arange(g, dtype=jnp.float32) + 1.0) / g - 1.0
        coords = jnp.stack(jnp.meshgrid(grid, grid, indexing="xy"), axis=-1)  # (x, y)
        x = jnp.concatenate(
            [
                window,
                background_window,
                colour,
                window - background_window,
                window - colour,
                jnp.broadcast_to(coords, (n, g, g, 2)),
            ],
            axis=-1,
        ).astype(self.dtype)
        for i in range(self.depth):
            x = layers.Conv(
                self.width, (3, 3), padding="SAME", dtype=self.dtype, name=f"conv_{i}"
            )(x)
            x = nn.celu(x)
        out = layers.Conv(
            1,
            (1, 1),
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="readout",
        )(x)
        return out[..., 0].astype(jnp.float32)


def mask_distillation_loss(
    decoded_logit: Float[Array, "b k g g"], mask: Float[Array, "b k g g"]
) -> Float[Array, " b"]:
    """Binary cross-entropy of the decoded mask against the window mask (no gradient to the target).

    Mean over slots and glimpse pixels, one value per image.
    """
    target = jax.lax.stop_gradient(mask)
    bce = (
        jax.nn.softplus(decoded_logit) - target * decoded_logit
    )  # = -t log sig(x) - (1 - t) log(1 - sig(x))
    return jnp.mean(bce, axis=(1, 2, 3))
