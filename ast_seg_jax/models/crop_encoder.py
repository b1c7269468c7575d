"""Appearance encoder that reads each object's window of the input image (not in the official code).

With ``appearance_encoder='crop'`` the AST model reads, for every slot, the image window that its glimpse
will cover (``spatial_transformer.extract_glimpses`` at the slot's position and scale) and encodes that crop
into the slot's appearance vector z_what, as SPAIR and SPACE encode their objects. The attention-pooled
features still give the position, scale and activation. The crop holds the object in a canonical frame
(centred, scaled to the glimpse), so its shape is in the encoder's input directly; the pooled features of
a randomly initialised feature generator carry colour and size but, in this project's measurements, not
shape (see the README's status of the built-in demo).

The encoder also reads where the object sits in its window: a second read-out ``offset`` (zero-initialised)
gives a shift of the glimpse within the window, in units of the window's half-extent and bounded by
``max_offset`` through a tanh. The soft-argmax point lands anywhere on an object, not at its centre; the
shift lets the glimpse centre on the object, so the glimpse generator does not have to learn to draw
each shape at every offset.

Architecture: four 3x3 or 4x4 convolutions with CELU (the first at full crop resolution, then three of
stride 2), a dense layer of ``hidden`` units with CELU and the two dense read-outs. Flax default
initialisation (LeCun normal kernels, zero biases) except the zero offset read-out.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from ast_seg_jax.models import layers


class CropEncoder(nn.Module):
    """Maps [n, s, s, c] crops to [n, z_what_dim] appearance vectors.

    Attributes:
      z_what_dim: width of the output.
      width: channels of the first two convolutions (the last two have twice as many).
      hidden: units of the hidden dense layer.
      max_offset: bound of the offset, as a fraction of the window's half-extent.
      dtype: computation dtype (parameters stay float32; the output is float32).
    """

    z_what_dim: int
    width: int = 32
    hidden: int = 128
    max_offset: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, crops: Float[Array, "n s s c"]
    ) -> tuple[Float[Array, "n z"], Float[Array, "n 2"]]:
        """Returns (z_what [n, z_what_dim], offset [n, 2] in (-max_offset, max_offset))."""
        if crops.ndim != 4 or min(crops.shape[1:3]) < 8:
            raise ValueError(
                f"CropEncoder needs crops [n, s, s, c] with s >= 8, got {crops.shape}."
            )
        x = crops.astype(self.dtype)
        blocks = (
            (self.width, 3, 1),
            (self.width, 4, 2),
            (2 * self.width, 4, 2),
            (2 * self.width, 4, 2),
        )
        for i, (channels, kernel, stride) in enumerate(blocks):
            x = layers.Conv(
                channels,
                (kernel, kernel),
                strides=(stride, stride),
                padding=[(1, 1), (1, 1)],
                dtype=self.dtype,
                name=f"conv_{i}",
            )(x)
            x = nn.celu(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.celu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        z = nn.Dense(self.z_what_dim, dtype=self.dtype, name="readout")(x)
        offset = nn.Dense(
            2, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="offset"
        )(x)
        offset = self.max_offset * jnp.tanh(offset.astype(jnp.float32))
        return z.astype(jnp.float32), offset
