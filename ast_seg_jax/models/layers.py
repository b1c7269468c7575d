"""Layers shared by the convolutional networks: a transposed convolution that XLA's CPU backend
trains faster (background model and U-Net), a depthwise convolution that it trains faster too
(`DepthwiseConv`, Segformer's Mix-FFN), a convolution whose kernel gradient it computes faster and
whose strided form is one matrix product over patches (`Conv`: the U-Net, the window-mask CNN, the
background encoder, Segformer's patch embeddings and attention reductions, the crop encoder), and
BatchNorm with PyTorch's semantics (`BatchNorm`).

`ConvTranspose` computes exactly what ``flax.linen.ConvTranspose`` computes with explicit padding
(and ``transpose_kernel=False``), with the same parameters (``kernel`` of shape
``(kh, kw, in, out)`` and an optional ``bias``), but without the stride-dilated input: each
of the ``sh * sw`` output phases of a stride-``s`` transposed convolution is an ordinary
convolution of the undilated input with a subset of the kernel taps. Two ways to compute the
phases, with the same numbers: one convolution each, with exactly that phase's taps (a strided
slice of the kernel), or one convolution for all with ``sh * sw * out`` output channels, whose
kernel is gathered from the taps and holds zeros where a phase has fewer taps than the window
(1.44x the multiplications at kernel 5 and stride 2, 2.25x at kernel 4). Either way the phases are
interleaved by a depth-to-space reshape ("sub-pixel convolution"). `conv_transpose` picks per layer
(`PER_PHASE_MIN_FEATURES`).

Why: XLA's CPU backend runs the gradient of a stride-dilated convolution at a small fraction of
the speed of an ordinary convolution, and three quarters of a stride-2 dilated input is zeros.
`experiments/bench_conv_transpose.py` measures it against Flax's: the AE-NE background autoencoder
(stacks of stride-2, kernel-5 transposed convolutions on up to 128x128 maps) trains about 3-7x
faster with this one, the glimpse generator about 1.4x.
The numbers are the same (up to float rounding), so checkpoints and the PyTorch correspondence
of the calling modules do not change.

Derivation, per spatial axis, for stride ``s``, kernel ``k`` and padding ``(lo, hi)`` of the
dilated input: ``out[o] = sum_t [(u + t) mod s = 0] x[(u + t) / s] W[t]`` with ``u = o - lo``.
Writing ``u = s q + r`` (``0 <= r < s``), the taps that hit an input sample are
``t = t0(r) + s j`` with ``t0(r) = (s - r) mod s``, and they read ``x[q + c(r) + j]`` with
``c(r) = 0 if r == 0 else 1``. So phase ``r`` is a correlation of ``x``, from offset ``c(r)`` on,
with the taps ``W[t0(r)::s]``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _phases(kernel: int, stride: int) -> tuple[list[tuple[int, int]], int]:
    """Per output phase r: (first tap t0(r), window offset c(r)); and the common window length.

    Phase r uses the taps t0(r), t0(r) + s, ... < kernel, read at window offsets c(r), c(r) + 1, ...
    """
    phases = [((stride - r) % stride, 0 if r == 0 else 1) for r in range(stride)]
    window = max(c + len(range(t0, kernel, stride)) for t0, c in phases)
    return phases, max(window, 1)


# `conv_transpose` computes each phase on its own from this many output channels on (as matrix
# products per tap, `_tap_products`), and below it
# one convolution for all phases unless that would multiply by zero taps half the time or more
# (kernel 4, stride 2). Measured per layer, forward and backward at batch 8 on a 2-core CPU (the
# background, U-Net and glimpse layers of the configs): per phase was 1.2-2x faster from 128
# output channels on, and at kernel 4 at any width; one convolution was faster at kernel 5 below
# 64 output channels (up to 3x at 4), where the per-phase products are too small to run well.
# (Measured when each form had its own gradients; the form now sets the forward pass only.)
PER_PHASE_MIN_FEATURES = 128

# ... except that a strided layer from many input channels to few output channels is one matrix
# product and an overlap-add (`_overlap_add_conv_transpose`): the background decoders' two last
# layers (642 -> 144 and 146 -> 4 channels).
OVERLAP_ADD = "overlap_add"
OVERLAP_ADD_MIN_CHANNELS = 128
OVERLAP_ADD_MAX_FEATURES = 256


def _conv_valid(x: Array, kernel: Array) -> Array:
    """Stride-1 'VALID' correlation, NHWC x HWIO."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _tap_products(x: Array, kernel: Array) -> Array:
    """`_conv_valid` as a sum over the kernel taps of [positions, c] x [c, f] matrix products.

    For the wide layers of the background decoder (hundreds of channels in and out) XLA's CPU
    convolutions ran at 25-65 GFLOP/s on 2 cores and these products about 3x faster: a 3x3
    convolution from 1282 to 640 channels on an [8, 18, 18] map took 498 ms as a convolution and
    163 ms as products, forward. (`conv_transpose` supplies the gradients.)
    """
    kh, kw, c, f = kernel.shape
    b, h, w = x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = None
    for a in range(kh):
        for d in range(kw):
            y = x[:, a : a + h, d : d + w].reshape(-1, c) @ kernel[a, d]
            out = y if out is None else out + y
    return out.reshape(b, h, w, f)


def _per_phase_convolutions(x, kernel, phases, q_hw, strides):
    """[b, qh, sh, qw, sw, f]: one convolution per phase with exactly its taps (strided slices)."""
    (qh, qw), (sh, sw) = q_hw, strides
    b, f = x.shape[0], kernel.shape[-1]
    rows = []
    for t_h, c_h in phases[0]:
        row = []
        for t_w, c_w in phases[1]:
            sub = kernel[t_h::sh, t_w::sw]
            if (
                sub.shape[0] == 0 or sub.shape[1] == 0
            ):  # Kernel smaller than the stride.
                row.append(jnp.zeros((b, qh, qw, f), x.dtype))
                continue
            xs = x[
                :, c_h : c_h + qh + sub.shape[0] - 1, c_w : c_w + qw + sub.shape[1] - 1
            ]
            conv = _tap_products if f >= PER_PHASE_MIN_FEATURES else _conv_valid
            row.append(conv(xs, sub.astype(x.dtype)))
        rows.append(jnp.stack(row, axis=3))  # [b, qh, qw, sw, f]
    return jnp.stack(rows, axis=2)


def _one_convolution(x, kernel, phases, windows, strides):
    """[b, qh, sh, qw, sw, f]: one convolution with sh * sw * f outputs, whose kernel holds every
    phase's taps at their window offsets and zeros where a phase has none."""
    kh, kw, c, f = kernel.shape
    (sh, sw), (mh, mw) = strides, windows
    taps, valid = [], []
    for k, s, m, phase in zip((kh, kw), strides, windows, phases):
        t = np.zeros((m, s), np.int32)
        v = np.zeros((m, s), bool)
        for r, (t0, c0) in enumerate(phase):
            for a in range(c0, m):
                tap = t0 + s * (a - c0)
                if tap < k:
                    t[a, r], v[a, r] = tap, True
        taps.append(t)
        valid.append(v)
    (th, tw), (vh, vw) = taps, valid
    sub = kernel[th[:, None, :, None], tw[None, :, None, :]]  # [mh, mw, sh, sw, c, f]
    mask = (vh[:, None, :, None] & vw[None, :, None, :]).astype(kernel.dtype)
    sub = (sub * mask[..., None, None]).transpose(0, 1, 4, 2, 3, 5)
    y = jax.lax.conv_general_dilated(
        x,
        sub.reshape(mh, mw, c, sh * sw * f).astype(x.dtype),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    b, qh, qw = y.shape[:3]
    return y.reshape(b, qh, qw, sh, sw, f).transpose(0, 1, 3, 2, 4, 5)


def conv_transpose(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw c f"],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    per_phase: bool | None = None,
) -> Float[Array, "b h2 w2 f"]:
    """``lax.conv_transpose(x, kernel, strides, padding)`` (NHWC, HWIO, explicit padding).

    The forward pass is the sub-pixel form (module docstring). The gradients come from the output
    gradient's patches (`_patches`, as `patch_conv` takes them): the input gradient is the strided
    convolution of the output gradient with the flipped kernel, one matrix product [positions,
    kh kw f] x [kh kw f, c], and the kernel gradient is x^T times the same patches, [c, positions] x
    [positions, kh kw f]. Forward and backward of the CLEVRTEX background decoder's layers at batch 8
    on 2 CPU cores, ms, with the sub-pixel form's own gradients (per-phase products) / these:
    36 / 23, 351 / 330, 1044 / 971, 660 / 463 and 50 / 27 (PyTorch: 31, 292, 884, 414 and 33).

    Args:
      x: [b, h, w, c] input.
      kernel: [kh, kw, c, f], used as Flax's ConvTranspose uses it (not flipped).
      strides: (sh, sw), each >= 1.
      padding: ((lo_h, hi_h), (lo_w, hi_w)), padding of the stride-dilated input (may be
        negative, which crops).
      per_phase: the forward pass as one convolution per output phase (True), one for all
        (False), or one matrix product and an overlap-add (`OVERLAP_ADD`); None chooses by size
        (`PER_PHASE_MIN_FEATURES`, `OVERLAP_ADD_MIN_CHANNELS`). All give the same numbers.

    Returns:
      [b, (h - 1) sh + 1 + lo_h + hi_h - kh + 1, (likewise for w), f].
    """
    strides = tuple(int(v) for v in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_transpose(x, kernel, strides, padding, per_phase)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_transpose(x, kernel, strides, padding, per_phase):
    return _sub_pixel_conv_transpose(x, kernel, strides, padding, per_phase)


def _conv_transpose_forward(x, kernel, strides, padding, per_phase):
    y = _sub_pixel_conv_transpose(x, kernel, strides, padding, per_phase)
    return y, (x, kernel)


def _conv_transpose_backward(strides, padding, per_phase, residuals, g):
    del per_phase
    x, kernel = residuals
    kh, kw, c, f = kernel.shape
    b, h, w, _ = x.shape
    (lo_h, hi_h), (lo_w, hi_w) = padding
    # x[i] met kernel[t] at output o = lo + s i - t, so dx[i] = sum_t g[lo + s i - t] kernel[t]^T:
    # with t' = k - 1 - t, a stride-s correlation of g (padded by k - 1 - lo before and k - 1 - hi
    # after, which gives exactly h positions) with the flipped kernel.
    rows = _patches(
        g,
        (kh, kw),
        strides,
        ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w)),
    ).reshape(b * h * w, kh * kw * f)
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2).reshape(kh * kw * f, c)
    dx = (rows @ flipped).reshape(b, h, w, c)
    dflipped = x.reshape(b * h * w, c).T @ rows  # [c, kh kw f], taps flipped.
    dkernel = dflipped.reshape(c, kh, kw, f).transpose(1, 2, 0, 3)[::-1, ::-1]
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_conv_transpose.defvjp(_conv_transpose_forward, _conv_transpose_backward)


def _overlap_add_conv_transpose(x, kernel, strides, padding):
    """`conv_transpose`'s forward pass as one matrix product and an overlap-add.

    z = x [positions, c] times the kernel as [c, kh kw f] holds what every input position adds to
    each of its kh x kw outputs; output phase (r_h, r_w) sums the taps that land on it, each
    shifted by its offset. For few output channels the one wide product runs much better than
    per-phase products with f columns: the CLEVRTEX background decoder's layer from 642 to 144
    channels took 140 ms forward against 170 per phase, its last layer (to 4 channels) 5.5 against
    9.5 as one convolution (batch 8, 2 CPU cores).
    """
    b, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    sh, sw = strides
    z = x.reshape(b * h * w, c) @ kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * f)
    z = z.reshape(b, h, w, kh, kw, f)
    qh, qw = h - 1 + -(-kh // sh), w - 1 + -(-kw // sw)  # Positions per phase.
    rows = []
    for rh in range(sh):
        row = []
        for rw in range(sw):
            acc = jnp.zeros((b, qh, qw, f), x.dtype)
            for a in range(kh):
                if (kh - 1 - a) % sh != rh:
                    continue
                for d in range(kw):
                    if (kw - 1 - d) % sw != rw:
                        continue
                    mh, mw = (kh - 1 - a) // sh, (kw - 1 - d) // sw
                    acc = acc + _pad_hw(
                        z[:, :, :, a, d], ((mh, qh - h - mh), (mw, qw - w - mw))
                    )
            row.append(acc)
        rows.append(jnp.stack(row, axis=3))  # [b, qh, qw, sw, f]
    # Full position u = s i + (k - 1 - t) (before cropping) lies in phase u mod s, at u // s.
    full = jnp.stack(rows, axis=2).reshape(b, qh * sh, qw * sw, f)
    crops = []
    for n, k, s_, (lo, hi), q in zip((h, w), (kh, kw), strides, padding, (qh, qw)):
        out_len = (n - 1) * s_ + 1 + lo + hi - k + 1
        start = k - 1 - lo
        crops.append((-start, start + out_len - q * s_))
    return _pad_hw(full, crops)


def _sub_pixel_conv_transpose(x, kernel, strides, padding, per_phase):
    """`conv_transpose`'s forward pass: one convolution per output phase, or one for all."""
    b, h, w, c = x.shape
    kh, kw, kc, f = kernel.shape
    if kc != c:
        raise ValueError(
            f"conv_transpose: input has {c} channels, kernel expects {kc}."
        )
    crops, pads, windows, phases = [], [], [], []
    for n, k, s, (lo, hi) in zip((h, w), (kh, kw), strides, padding):
        out_len = (n - 1) * s + 1 + lo + hi - k + 1
        if out_len < 1:
            raise ValueError(
                f"conv_transpose: empty output for size {n}, kernel {k}, stride {s}, "
                f"padding {(lo, hi)}."
            )
        phase, window = _phases(k, s)
        q0 = (-lo) // s
        q1 = (out_len - 1 - lo) // s
        pads.append((-q0, q1 + window - 1 - (n - 1)))
        crops.append((-lo - s * q0, out_len))
        windows.append(window)
        phases.append(phase)
    sh, sw = strides
    if (
        per_phase is None
        and sh * sw > 1
        and c >= OVERLAP_ADD_MIN_CHANNELS
        and f < OVERLAP_ADD_MAX_FEATURES
    ):
        per_phase = OVERLAP_ADD
    if per_phase == OVERLAP_ADD:
        return _overlap_add_conv_transpose(x, kernel, strides, padding)
    x = jax.lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)],
    )
    qh, qw = x.shape[1] - windows[0] + 1, x.shape[2] - windows[1] + 1
    if per_phase is None:
        waste = windows[0] * windows[1] * sh * sw / (kh * kw)
        per_phase = sh * sw == 1 or f >= PER_PHASE_MIN_FEATURES or waste >= 2.0
    if per_phase:
        y = _per_phase_convolutions(x, kernel, phases, (qh, qw), strides)
    else:
        y = _one_convolution(x, kernel, phases, windows, strides)
    y = y.reshape(b, qh * sh, qw * sw, f)
    (start_h, len_h), (start_w, len_w) = crops
    return y[:, start_h : start_h + len_h, start_w : start_w + len_w]


class ConvTranspose(nn.Module):
    """Drop-in for ``nn.ConvTranspose`` with explicit padding, computed by `conv_transpose` on a CPU.

    On other backends it is XLA's own transposed convolution (``lax.conv_transpose``, as Flax's; a
    single library call on a GPU): the sub-pixel forms were chosen for XLA:CPU and have not been
    measured on a GPU.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: ((lo_h, hi_h), (lo_w, hi_w)) of the stride-dilated input, as in Flax.
      use_bias: add a bias.
      kernel_init: initialiser of the (kh, kw, in, out) kernel.
      bias_init: initialiser of the (out,) bias.
      dtype: computation dtype (None: that of the input); parameters stay float32.
      sub_pixel: None picks by backend (CPU: `conv_transpose`); True / False forces one form.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    dtype: Any = None
    sub_pixel: bool | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        """Maps [b, h, w, c] to the transposed convolution's [b, h2, w2, features]."""
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        strides = tuple(int(v) for v in self.strides)
        padding = tuple(tuple(int(v) for v in p) for p in self.padding)
        sub_pixel = self.sub_pixel
        if sub_pixel is None:
            sub_pixel = jax.default_backend() == "cpu"
        if sub_pixel:
            y = conv_transpose(x, kernel, strides, padding)
        else:
            y = jax.lax.conv_transpose(
                x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


def _shifted_products(
    xp: Float[Array, "b hp wp c"], kernel: Float[Array, "kh kw 1 c"], out_hw
) -> Float[Array, "b h w c"]:
    """sum over taps (a, d) of xp[:, a : a + h, d : d + w] * kernel[a, d, 0] (one fused loop in XLA)."""
    (h, w), (kh, kw) = out_hw, kernel.shape[:2]
    out = None
    for a in range(kh):
        for d in range(kw):
            term = xp[:, a : a + h, d : d + w, :] * kernel[a, d, 0]
            out = term if out is None else out + term
    return out


def _pad_hw(x: Array, padding) -> Array:
    """Zero padding of the two spatial axes (negative values crop, as in lax.pad)."""
    (lo_h, hi_h), (lo_w, hi_w) = padding
    config = [(0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw 1 c"],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "b h2 w2 c"]:
    """Stride-1 depthwise correlation (each channel with its own filter) as a sum of shifted products.

    The same sum as ``lax.conv_general_dilated(..., feature_group_count=c)``, tap by tap: out[i, j] =
    sum over (a, d) of pad(x)[i + a, j + d] * kernel[a, d, 0]. XLA's CPU backend compiles the
    grouped convolution's gradient into something far slower than these element-wise products and
    their reductions. The gradient is written out (a custom VJP): with respect to the input it is
    the same kind of sum on the padded output gradient with the kernel flipped, with respect to the
    kernel one reduction per tap; differentiating the slices instead pads each tap's gradient to the
    full input, about twice as slow. `experiments/bench_depthwise.py` measures the forms.

    Args:
      x: [b, h, w, c] input.
      kernel: [kh, kw, 1, c] filters (Flax's layout for ``feature_group_count=c``).
      padding: ((lo_h, hi_h), (lo_w, hi_w)) zero padding.

    Returns:
      [b, h + lo_h + hi_h - kh + 1, w + lo_w + hi_w - kw + 1, c].
    """
    return _depthwise_forward(x, kernel, padding)[0]


def _depthwise_forward(x, kernel, padding):
    kh, kw = kernel.shape[:2]
    xp = _pad_hw(x, padding)
    out_hw = (xp.shape[1] - kh + 1, xp.shape[2] - kw + 1)
    # The residual is the unpadded input: the kernel gradient below reads shifted windows of the
    # padded output gradient, not of the padded input, so the forward pass's windows are used by
    # the forward sum alone and XLA fuses them into it instead of storing nine copies.
    return _shifted_products(xp, kernel, out_hw), (x, kernel)


def _depthwise_backward(padding, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (lo_h, hi_h), (lo_w, hi_w) = padding
    # d out[i] / d x[m] = kernel[m + lo - i]: a correlation of g, padded by k - 1 - lo before and
    # k - 1 - hi after, with the flipped kernel.
    gp = _pad_hw(g, ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w)))
    h, w = x.shape[1], x.shape[2]
    dx = _shifted_products(gp, kernel[::-1, ::-1], (h, w))
    # kernel[a, d] multiplies pad(x)[i + a, j + d] = x[m, n] against g[i, j] = gp[m + kh - 1 - a,
    # n + kw - 1 - d]: the same windows of gp as dx's.
    dkernel = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.sum(
                        x
                        * gp[
                            :, kh - 1 - a : kh - 1 - a + h, kw - 1 - d : kw - 1 - d + w
                        ],
                        axis=(0, 1, 2),
                    )
                    for d in range(kw)
                ]
            )
            for a in range(kh)
        ]
    )
    return dx, dkernel[:, :, None, :].astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_forward, _depthwise_backward)


class DepthwiseConv(nn.Module):
    """Drop-in for a stride-1 ``nn.Conv`` with ``feature_group_count`` = channels (same parameters).

    On a CPU it computes `depthwise_conv`; on other backends XLA's grouped convolution (a single
    library call on a GPU, not measured against this form yet). Both give the same numbers.

    Attributes:
      kernel_size: (kh, kw).
      padding: ((lo_h, hi_h), (lo_w, hi_w)).
      kernel_init: initialiser of the (kh, kw, 1, c) kernel.
      bias_init: initialiser of the (c,) bias.
      dtype: computation dtype (None: that of the input); parameters stay float32.
      shifted: None picks by backend (CPU: shifted products); True / False forces one form.
    """

    kernel_size: Sequence[int]
    padding: Sequence[tuple[int, int]]
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    dtype: Any = None
    shifted: bool | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c"]:
        """Maps [b, h, w, c] to [b, h2, w2, c]."""
        c = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (*self.kernel_size, 1, c), jnp.float32
        )
        bias = self.param("bias", self.bias_init, (c,), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        padding = tuple(tuple(int(v) for v in p) for p in self.padding)
        shifted = self.shifted
        if shifted is None:
            shifted = jax.default_backend() == "cpu"
        if shifted:
            y = depthwise_conv(x, kernel, padding)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (1, 1),
                padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
        return y + bias.astype(y.dtype)


# Where `Conv` uses `conv` on a CPU (kernels larger than 1x1): from this many input positions
# (batch x height x width) and input channels on. Measured forward + backward at the shapes config's
# layers (`experiments/bench_conv.py`, batch 8): 1.3-1.7x faster on [8, 64, 64] maps of 20-23
# channels, about even on [32, 32, 32] windows of 16-17 channels, and up to 2x slower on small maps
# (under a millisecond either way) and on the 3-channel input layer (5.4 against 7.7 ms).
CONV_PRODUCTS_MIN_POSITIONS = 16384
CONV_PRODUCTS_MIN_CHANNELS = 8


def _conv_padded(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw c f"],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> Float[Array, "b h2 w2 f"]:
    """Stride-1 convolution (correlation, as ``lax.conv_general_dilated``) whose kernel gradient is
    a matrix product per kernel tap.

    The forward pass and the input gradient are XLA's convolutions. The kernel gradient is what
    XLA's CPU backend does worst when the channels are few and the maps large (the U-Net's and the
    window-mask CNN's layers): for a 3x3 convolution from 23 to 23 channels on [8, 64, 64] maps it
    took 25 ms as a convolution and 11 ms as nine [c, positions] x [positions, f] products, and
    the forward pass 9 ms. A 1x1 convolution is one matrix product in both passes instead (19 ms
    forward and backward as a convolution, 3 ms as a product). `experiments/bench_conv.py`
    measures the forms.

    Args:
      x: [b, h, w, c] input.
      kernel: [kh, kw, c, f] (HWIO).
      padding: ((lo_h, hi_h), (lo_w, hi_w)) zero padding.

    Returns:
      [b, h + lo_h + hi_h - kh + 1, w + lo_w + hi_w - kw + 1, f].
    """
    return _conv_padded(x, kernel, padding)


def _conv_forward(x, kernel, padding):
    return _conv_padded(x, kernel, padding), (x, kernel)


def _conv_backward(padding, residuals, g):
    x, kernel = residuals
    kh, kw, c, f = kernel.shape
    (lo_h, hi_h), (lo_w, hi_w) = padding
    # As in `depthwise_conv`: the input gradient correlates g, padded by k - 1 - lo before and
    # k - 1 - hi after, with the flipped kernel (in and out swapped), and kernel[a, d] meets x
    # against the window of that padded g at (kh - 1 - a, kw - 1 - d).
    gp = _pad_hw(g, ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w)))
    dx = _conv_padded(gp, kernel[::-1, ::-1].transpose(0, 1, 3, 2), ((0, 0), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    xt = x.reshape(-1, c).T
    dkernel = jnp.stack(
        [
            jnp.stack(
                [
                    xt
                    @ gp[
                        :, kh - 1 - a : kh - 1 - a + h, kw - 1 - d : kw - 1 - d + w
                    ].reshape(-1, f)
                    for d in range(kw)
                ]
            )
            for a in range(kh)
        ]
    )
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv.defvjp(_conv_forward, _conv_backward)


def _patches(
    x: Float[Array, "b h w c"],
    kernel_hw: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Float[Array, "b oh ow taps c"]:
    """The kh x kw windows of the padded input at the strided positions, taps in (h, w) order.

    Where the kernel tiles the input exactly (kernel = stride) the windows are a reshape.
    """
    (kh, kw), (sh, sw) = kernel_hw, strides
    xp = _pad_hw(x, padding)
    b, hp, wp, c = xp.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if (kh, kw) == (sh, sw):
        xp = xp[:, : oh * sh, : ow * sw].reshape(b, oh, sh, ow, sw, c)
        return xp.transpose(0, 1, 3, 2, 4, 5).reshape(b, oh, ow, kh * kw, c)
    return jnp.stack(
        [
            xp[:, a : a + sh * (oh - 1) + 1 : sh, d : d + sw * (ow - 1) + 1 : sw]
            for a in range(kh)
            for d in range(kw)
        ],
        axis=3,
    )


def patch_conv(
    x: Float[Array, "b h w c"],
    kernel: Float[Array, "kh kw c f"],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Float[Array, "b h2 w2 f"]:
    """A strided convolution (as ``lax.conv_general_dilated``) computed as one matrix product.

    The input's kh x kw patches at the strided positions become rows of [positions, kh kw c] (the
    taps in the kernel's (h, w, c) order), multiplied by the kernel reshaped to [kh kw c, f]; where
    the kernel tiles the padded input exactly (kernel = stride, Segformer's attention reduction) the
    patches are a reshape of it. The gradients are JAX's: both are matrix products too, plus the
    strided slices' scatter back into the input.

    Why: XLA:CPU differentiates strided convolutions slowly when the map is small and the channels
    many. Forward and backward at batch 8 on 2 CPU cores (ms, XLA's convolution / this): the CLEVRTEX
    background encoder's 5x5 stride-2 layers 20.7 / 14.8, 200 / 135, 323 / 248, 183 / 109 and
    158 / 14 (642 to 320 channels on an 8x8 map); Segformer-B3's last patch embedding on 64-pixel
    images (320 to 512 channels, 4x4 map) 23.0 / 1.6; its attention reductions 1.9-2.8 / 0.5-0.8.

    Args:
      x: [b, h, w, c] input.
      kernel: [kh, kw, c, f] (HWIO).
      strides: (sh, sw).
      padding: ((lo_h, hi_h), (lo_w, hi_w)) zero padding (negative values crop).

    Returns:
      [b, (h + lo_h + hi_h - kh) // sh + 1, (likewise for w), f].
    """
    kh, kw, c, f = kernel.shape
    rows = _patches(x, (kh, kw), strides, padding)
    b, oh, ow = rows.shape[:3]
    y = rows.reshape(b * oh * ow, kh * kw * c) @ kernel.reshape(kh * kw * c, f)
    return y.reshape(b, oh, ow, f)


class Conv(nn.Module):
    """Drop-in for ``nn.Conv`` (same parameters) that trains faster on a CPU.

    On a CPU a strided layer is `patch_conv` (one matrix product over the input's patches), and a
    stride-1 layer is a matrix product if its kernel is 1x1, and `conv` if its input is large
    enough (`CONV_PRODUCTS_MIN_POSITIONS`, `CONV_PRODUCTS_MIN_CHANNELS`); other layers, and every
    layer on other backends, are XLA's convolution as in Flax. All give the same numbers (up to
    float rounding).

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((lo_h, hi_h), (lo_w, hi_w)).
      use_bias: add a bias.
      kernel_init: initialiser of the (kh, kw, in, out) kernel.
      bias_init: initialiser of the (out,) bias.
      dtype: computation dtype (None: that of the input); parameters stay float32.
      products: None picks by backend, stride and size (above); True / False forces one form.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    dtype: Any = None
    products: bool | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        """Maps [b, h, w, c] to [b, h2, w2, features]."""
        kernel_size = tuple(int(v) for v in self.kernel_size)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        strides = tuple(int(v) for v in self.strides)
        if isinstance(self.padding, str):
            padding = tuple(
                jax.lax.padtype_to_pads(
                    x.shape[1:3], kernel_size, strides, self.padding.upper()
                )
            )
        else:
            padding = tuple(tuple(int(v) for v in p) for p in self.padding)
        products = self.products
        if products is None and strides != (1, 1):
            products = jax.default_backend() == "cpu"
        elif products is None:
            products = jax.default_backend() == "cpu" and (
                kernel_size == (1, 1)
                or (
                    x.shape[-1] >= CONV_PRODUCTS_MIN_CHANNELS
                    and math.prod(x.shape[:3]) >= CONV_PRODUCTS_MIN_POSITIONS
                )
            )
        if products and strides != (1, 1):
            y = patch_conv(x, kernel, strides, padding)
        elif products and strides == (1, 1) and kernel_size == (1, 1):
            xp = _pad_hw(x, padding)
            y = (xp.reshape(-1, xp.shape[-1]) @ kernel[0, 0]).reshape(*xp.shape[:3], -1)
        elif products and strides == (1, 1):
            y = conv(x, kernel, padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


class Dropout(nn.Module):
    """``nn.Dropout`` whose random bits come from XLA's own Threefry generator.

    Same semantics as Flax's (each value kept with probability 1 - rate and scaled by 1 / (1 -
    rate), a Bernoulli draw as ``jax.random.bernoulli`` makes it: a uniform [0, 1) float from 23
    random bits, compared with 1 - rate), but the bits come from ``lax.rng_bit_generator`` with
    the Threefry algorithm, keyed by 128 bits drawn from the module's 'dropout' rng, instead of
    ``jax.random``'s Threefry written in HLO operations. The masks are as random, not the same
    ones. On 2 CPU cores the bits for Segformer's decode-head map at 128-pixel images ([8, 32, 32,
    768]) took 15 ms against 51 ms.

    Attributes:
      rate: probability of zeroing a value.
      deterministic: no dropout (may be given at call time instead).
      rng_collection: the rng stream the key comes from.
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        """Returns `x` with dropout applied (unchanged when deterministic or rate is 0)."""
        deterministic = nn.merge_param(
            "deterministic", self.deterministic, deterministic
        )
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        key = jax.random.bits(self.make_rng(self.rng_collection), (4,), jnp.uint32)
        _, bits = jax.lax.rng_bit_generator(
            key, x.shape, jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY
        )
        mantissa = (bits >> 9) | jnp.uint32(0x3F800000)  # A float in [1, 2).
        uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
        return jnp.where(uniform < keep, x / keep, jnp.zeros_like(x))


class BatchNorm(nn.Module):
    """PyTorch ``BatchNorm2d`` (training and eval semantics) over the last axis of NHWC maps.

    Same parameters (``scale``, ``bias``) and running statistics (``batch_stats``: ``mean``,
    ``var``) as ``flax.linen.BatchNorm``, so checkpoints are interchangeable, with two differences
    that bring it to PyTorch's numbers:

    * the running variance is updated with the *unbiased* batch variance (times n / (n - 1), n =
      the number of values per channel), as PyTorch does; Flax uses the biased one. The
      normalisation itself uses the biased variance in both;
    * the batch variance is computed in two passes, mean((x - mean)^2), not as
      mean(x^2) - mean^2 (Flax's default), which loses precision when the mean is large
      compared with the spread.

    Attributes:
      use_running_average: normalise with the running statistics (eval) instead of the batch's.
      momentum: weight of the old running value (Flax convention: PyTorch momentum 0.1 is 0.9).
      epsilon: added to the variance.
      dtype: computation dtype of the output (statistics are computed in float32).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... c"]) -> Float[Array, "... c"]:
        """Normalises `x` per channel (last axis) and applies the affine transform."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)
        )
        ra_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((c,), jnp.float32)
        )
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)
