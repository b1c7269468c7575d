"""AE-NE background autoencoder (the background model of AST, ast_model.md section 5).

A fully convolutional encoder squeezes the image into a 16-number code and a mirrored
transposed-convolution decoder expands it into an RGB background plus a fourth
"error prediction" channel. Every block concatenates two fixed coordinate channels to its
input (row r/(h-1) - 0.5 and column c/(w-1) - 0.5 at the block's input resolution; a
dimension of size 1 gets the constant 1). All convolutions are bias-free; every encoder
block and every decoder block but the last ends with GroupNorm(max(1, ch // 16) groups,
eps 1e-5) and CELU(1) (= ELU); the last decoder block is followed by a sigmoid.

Kernel schedule (computed per side from the image size, repeated until the side is 1):

* small images (max side < 200): side > 5 -> kernel 5 stride 2 pad 2; side 4-5 -> kernel 4
  stride 2 pad 1; side <= 3 -> kernel = side, stride 1, pad 0;
* large images: side > 5 -> kernel 5 stride 3 pad 2; otherwise kernel = side, stride 1.

The decoder runs the mirrored list with transposed convolutions and PyTorch
``output_padding = (in + 2p - k) mod s``, so every decoder activation has exactly the size of
the matching encoder input. The transposed convolutions are computed as sub-pixel convolutions
(`layers.ConvTranspose`: same parameters and outputs as Flax's, several times faster to train on a CPU).

Channel schedules are the official ones for 5, 6 and 7 blocks (200x320, 64x64 and 128x128
images; both ``complexity`` settings). Other sizes (a rule of this port, the official code
exits): with fewer than 5 blocks the 5-block schedule is shortened by dropping entries from
its middle (keeping the widest early layers and the narrow layers next to the code); with
more than 7 blocks the 7-block schedule is lengthened by repeating its widest entry.

Deviation from the official code: the official decoder tests the *height* where the width
rule asks for "side is 4 or 5" (a typo). For square images and for all large images both
rules agree; for small non-square images the official decoder then differs from its encoder
(and for very elongated images produces a zero-sized layer). Here the decoder always mirrors
the encoder.

Extension (off by default, not in the official code): ``median_shift`` moves the RGB output of
each image, per channel, so that its median is the image's median (attribute docstring below).

GroupNorm statistics use the two-pass variance (``use_fast_variance=False``) like PyTorch;
Flax's default E[x^2] - E[x]^2 loses precision on the large, 0-255-scaled activations.

Parameter names: ``encoder/conv_{i}``, ``encoder/norm_{i}`` (i = 0 at the image side) and
``decoder/conv_{j}``, ``decoder/norm_{j}`` (j = 0 at the code side; the last ``conv`` has no
norm).

Initialisation follows PyTorch defaults: conv kernels U(+-1/sqrt(fan_in)) with fan_in =
in_channels * k^2 for convolutions and, PyTorch's quirk, out_channels * k^2 for transposed
convolutions; GroupNorm scale 1, bias 0.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ast_seg_jax.models import layers

CODE_DIM = 16
_SMALL_IMAGE_LIMIT = 200

# Official channel lists, image side first (encoder: 3 input channels ... 16-d code; decoder:
# 4 output channels ... 16-d code), keyed by number of blocks and `complexity`.
_ENCODER_CHANNELS = {
    5: {False: (3, 64, 160, 160, 32, 16), True: (3, 64, 160, 160, 16, 16)},
    6: {False: (3, 64, 160, 320, 160, 32, 16), True: (3, 64, 160, 320, 160, 16, 16)},
    7: {
        False: (3, 64, 160, 320, 160, 160, 32, 16),
        True: (3, 64, 320, 640, 640, 320, 16, 16),
    },
}
_DECODER_CHANNELS = {
    5: {False: (4, 144, 256, 256, 32, 16), True: (4, 144, 640, 640, 16, 16)},
    6: {False: (4, 144, 256, 512, 256, 32, 16), True: (4, 144, 640, 1280, 640, 16, 16)},
    7: {
        False: (4, 144, 256, 512, 256, 256, 32, 16),
        True: (4, 144, 640, 1280, 640, 320, 16, 16),
    },
}

# PyTorch's default conv init, U(+-1/sqrt(fan_in)); fan_in = k*k*in_channels for a
# (kh, kw, in, out) kernel.
_conv_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# PyTorch's ConvTranspose2d computes fan_in from the output channels (weight axis 1).
_conv_transpose_kernel_init = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


@dataclasses.dataclass(frozen=True)
class ConvStep:
    """One resolution step of the encoder (the decoder runs it backwards).

    Attributes:
      in_hw: (h, w) at the block input (where the coordinate channels are added).
      out_hw: (h, w) after the convolution.
      kernel: (kh, kw).
      stride: (sh, sw).
      padding: (ph, pw), symmetric, PyTorch convention.
      output_padding: (oph, opw) the transposed convolution needs to return to `in_hw`.
    """

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    output_padding: tuple[int, int]


def _side_rule(side: int, small_image: bool) -> tuple[int, int, int]:
    """Returns (kernel, stride, padding) for one side of one block."""
    if side > 5:
        return (5, 2, 2) if small_image else (5, 3, 2)
    if side > 3 and small_image:
        return 4, 2, 1
    return side, 1, 0


def conv_schedule(image_hw: Sequence[int]) -> list[ConvStep]:
    """The encoder's blocks for an image size, from the image down to 1x1.

    Args:
      image_hw: (height, width) of the images, both >= 1.

    Returns:
      One ConvStep per block; the last one ends at (1, 1).
    """
    h, w = (int(s) for s in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image_hw must be positive, got {tuple(image_hw)}.")
    small_image = max(h, w) < _SMALL_IMAGE_LIMIT
    steps = []
    while h > 1 or w > 1:
        kh, sh, ph = _side_rule(h, small_image)
        kw, sw, pw = _side_rule(w, small_image)
        new_h = 1 + (h + 2 * ph - kh) // sh
        new_w = 1 + (w + 2 * pw - kw) // sw
        steps.append(
            ConvStep(
                in_hw=(h, w),
                out_hw=(new_h, new_w),
                kernel=(kh, kw),
                stride=(sh, sw),
                padding=(ph, pw),
                output_padding=((h + 2 * ph - kh) % sh, (w + 2 * pw - kw) % sw),
            )
        )
        h, w = new_h, new_w
    return steps


def _resize_schedule(table: dict, num_blocks: int, complexity: bool) -> tuple[int, ...]:
    """Channel list with num_blocks + 1 entries (see the module docstring for the rule)."""
    if num_blocks in table:
        return table[num_blocks][complexity]
    if num_blocks < min(table):
        base = table[min(table)][complexity]
        keep_front = (num_blocks + 2) // 2
        keep_back = num_blocks + 1 - keep_front
        return base[:keep_front] + base[len(base) - keep_back :]
    base = table[max(table)][complexity]
    widest = int(np.argmax(base))
    extra = num_blocks - max(table)
    return base[: widest + 1] + (base[widest],) * extra + base[widest + 1 :]


def channel_schedule(
    image_hw: Sequence[int], complexity: bool, width: float = 1.0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Encoder and decoder channel lists, image side first, code (16) last.

    Args:
      image_hw: (height, width).
      complexity: True selects the wider official schedule.
      width: multiplier of every hidden width (not of the 3/4 image channels nor of the
        16-d code); 1.0 is the official network. Smaller values (a deviation) make a
        CPU-sized background model; hidden widths never drop below 8.

    Returns:
      (encoder_channels, decoder_channels), each with len(conv_schedule(image_hw)) + 1
      entries; encoder_channels[0] = 3, decoder_channels[0] = 4, both end with 16.
    """
    num_blocks = len(conv_schedule(image_hw))
    if num_blocks == 0:
        raise ValueError(
            f"The background model needs an image larger than 1x1, got {image_hw}."
        )
    if width <= 0:
        raise ValueError(f"The background width multiplier must be > 0, got {width}.")

    def scaled(channels: tuple[int, ...]) -> tuple[int, ...]:
        if width == 1.0:
            return channels
        hidden = tuple(max(8, round(c * width)) for c in channels[1:-1])
        return (channels[0], *hidden, channels[-1])

    return (
        scaled(_resize_schedule(_ENCODER_CHANNELS, num_blocks, complexity)),
        scaled(_resize_schedule(_DECODER_CHANNELS, num_blocks, complexity)),
    )


def _num_groups(channels: int) -> int:
    return max(1, channels // 16)


def coordinate_channels(h: int, w: int) -> Float[np.ndarray, "h w 2"]:
    """The AE-NE coordinate channels: (row / (h-1) - 0.5, col / (w-1) - 0.5); size 1 -> 1."""
    rows = np.arange(h) / (h - 1) - 0.5 if h > 1 else np.ones(1)
    cols = np.arange(w) / (w - 1) - 0.5 if w > 1 else np.ones(1)
    grid = np.stack(np.broadcast_arrays(rows[:, None], cols[None, :]), axis=-1)
    return grid.astype(np.float32)  # [h, w, 2]


def _with_coordinates(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c+2"]:
    b, h, w, _ = x.shape
    coords = jnp.broadcast_to(coordinate_channels(h, w), (b, h, w, 2)).astype(x.dtype)
    return jnp.concatenate([x, coords], axis=-1)


class BackgroundEncoder(nn.Module):
    """Image (0-255 range) -> 16-d code.

    Attributes:
      image_hw: (height, width) of the images.
      complexity: selects the channel schedule.
      width: hidden-width multiplier (1.0 = official; see `channel_schedule`).
      dtype: computation dtype of the convolutions and norms (parameters stay float32).
    """

    image_hw: tuple[int, int]
    complexity: bool = True
    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b 16"]:
        """Encodes images given in the 0-255 range.

        Args:
          images: [b, h, w, 3], values in [0, 255].

        Returns:
          [b, 16] code (GroupNorm(1 group) + CELU-ed, as the official last block).
        """
        steps = conv_schedule(self.image_hw)
        channels, _ = channel_schedule(self.image_hw, self.complexity, self.width)
        if images.shape[1:3] != tuple(self.image_hw):
            raise ValueError(
                f"BackgroundEncoder built for {tuple(self.image_hw)} got images of shape "
                f"{images.shape}."
            )
        x = images.astype(self.dtype)
        for i, step in enumerate(steps):
            x = _with_coordinates(x)
            x = layers.Conv(
                channels[i + 1],
                kernel_size=step.kernel,
                strides=step.stride,
                padding=[(step.padding[0],) * 2, (step.padding[1],) * 2],
                use_bias=False,
                kernel_init=_conv_kernel_init,
                dtype=self.dtype,
                name=f"conv_{i}",
            )(x)
            x = nn.GroupNorm(
                num_groups=_num_groups(channels[i + 1]),
                epsilon=1e-5,
                use_fast_variance=False,
                dtype=self.dtype,
                name=f"norm_{i}",
            )(x)
            x = nn.celu(x)
        return x.reshape(x.shape[0], CODE_DIM)  # [b, 1, 1, 16] -> [b, 16]


class BackgroundDecoder(nn.Module):
    """16-d code -> RGB background + error prediction, in [0, 1] (sigmoid output).

    Attributes:
      image_hw: (height, width) of the images.
      complexity: selects the channel schedule.
      width: hidden-width multiplier (1.0 = official; see `channel_schedule`).
      dtype: computation dtype of the convolutions and norms (parameters stay float32).
    """

    image_hw: tuple[int, int]
    complexity: bool = True
    width: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, code: Float[Array, "b 16"]) -> Float[Array, "b h w 4"]:
        """Decodes a code into an RGBA image.

        Args:
          code: [b, 16].

        Returns:
          [b, h, w, 4] sigmoid output: RGB background and the predicted error channel.
        """
        steps = conv_schedule(self.image_hw)
        _, channels = channel_schedule(self.image_hw, self.complexity, self.width)
        x = code.reshape(code.shape[0], 1, 1, CODE_DIM).astype(self.dtype)
        # Decoder block j undoes encoder step i = n-1-j; block 0 starts from the code.
        for j, i in enumerate(reversed(range(len(steps)))):
            step = steps[i]
            x = _with_coordinates(x)
            # PyTorch ConvTranspose2d(k, s, p, output_padding=op) equals a stride-dilated
            # input padded by (k-1-p, k-1-p+op) and convolved with a k x k kernel.
            padding = [
                (k - 1 - p, k - 1 - p + op)
                for k, p, op in zip(step.kernel, step.padding, step.output_padding)
            ]
            x = layers.ConvTranspose(
                channels[i],
                kernel_size=step.kernel,
                strides=step.stride,
                padding=padding,
                use_bias=False,
                kernel_init=_conv_transpose_kernel_init,
                dtype=self.dtype,
                name=f"conv_{j}",
            )(x)
            if i > 0:
                x = nn.GroupNorm(
                    num_groups=_num_groups(channels[i]),
                    epsilon=1e-5,
                    use_fast_variance=False,
                    dtype=self.dtype,
                    name=f"norm_{j}",
                )(x)
                x = nn.celu(x)
        return nn.sigmoid(x.astype(jnp.float32))


class BackgroundAutoencoder(nn.Module):
    """AE-NE background model: image in [0, 1] -> RGBA in [0, 1].

    The official networks work in 0-255 units (input x255, output sigmoid x255, then /255 in
    the foreground pipeline); this module scales the input by 255 and returns the sigmoid
    output directly, which is the same function.

    Attributes:
      image_hw: (height, width) of the images.
      complexity: True selects the wider official channel schedule (ast_model.md 5.2, 5.5).
      width: hidden-width multiplier (1.0 = official; see `channel_schedule`).
      dtype: computation dtype of the convolutions and norms (parameters stay float32).
      median_shift: shift each image's RGB background, per channel, by the image's median minus
        the decoded background's median (then clip to [0, 1]); not in the official code. The
        network then draws the backdrop's shape and shading, and the image's own median gives its
        colour: objects cover a small part of a scene, so the median is the backdrop's.
    """

    image_hw: tuple[int, int]
    complexity: bool = True
    width: float = 1.0
    dtype: Any = jnp.float32
    median_shift: bool = False

    def setup(self):
        self.encoder = BackgroundEncoder(
            self.image_hw, self.complexity, self.width, dtype=self.dtype
        )
        self.decoder = BackgroundDecoder(
            self.image_hw, self.complexity, self.width, dtype=self.dtype
        )

    def __call__(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 4"]:
        """Reconstructs the background of each image.

        Args:
          images: [b, h, w, 3] RGB in [0, 1].

        Returns:
          [b, h, w, 4]: channels 0-2 the background RGB, channel 3 the predicted per-pixel
          error (in the units of the AE-NE loss divided by 3), all in [0, 1].
        """
        out = self.decoder(self.encoder(images * 255.0))
        if not self.median_shift:
            return out
        rgb = out[..., :3]
        shift = jnp.median(images.astype(jnp.float32), axis=(1, 2), keepdims=True)
        shift = shift - jnp.median(rgb, axis=(1, 2), keepdims=True)
        return jnp.concatenate([jnp.clip(rgb + shift, 0.0, 1.0), out[..., 3:]], axis=-1)
