"""Training losses of AST (spec section 4) and of the AE-NE background model (spec section 5.3).

Every loss returns one value per example ([b]); the batch mean of those is the scalar the official
code minimises (all of its reductions are means or sums over batch and pixels, so the per-example
terms carry the same ``1 / (H W)`` normalisation and the batch mean adds the ``1 / N``).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

PIXEL_ENTROPY_EPS = 1e-20


def _check_image_pair(name: str, a: Array, b: Array) -> None:
    if a.ndim != 4 or a.shape[:3] != b.shape[:3]:
        raise ValueError(
            f"{name}: expected two [b, h, w, c] arrays with the same [b, h, w], "
            f"got {a.shape} and {b.shape}."
        )


def reconstruction_loss(
    image: Float[Array, "b h w c"], reconstruction: Float[Array, "b h w c"]
) -> Float[Array, " b"]:
    """Squared channel-summed L1 error, averaged over pixels (spec section 4).

    ``L_rec = mean_{i,j} ( sum_c |X_hat_{ijc} - X_{ijc}| )^2`` per example (images in [0, 1]).

    Args:
      image: [b, h, w, c] target image.
      reconstruction: [b, h, w, c] reconstruction.

    Returns:
      [b] float32 per-example loss.
    """
    _check_image_pair("reconstruction_loss", image, reconstruction)
    if image.shape != reconstruction.shape:
        raise ValueError(
            f"reconstruction_loss: shapes differ, {image.shape} vs {reconstruction.shape}."
        )
    error = jnp.sum(
        jnp.abs(reconstruction.astype(jnp.float32) - image.astype(jnp.float32)), axis=-1
    )
    return jnp.mean(jnp.square(error), axis=(1, 2))


def _layer_weights(name: str, weights: Array) -> Float[Array, "b k1 h w"]:
    if weights.ndim != 4:
        raise ValueError(f"{name} needs weights [b, k+1, h, w], got {weights.shape}.")
    return weights.astype(jnp.float32)


def _squared_entropy(p: Array) -> Array:
    """``(sum_k p_k log(p_k + 1e-20))^2`` over axis 1 (the layers)."""
    return jnp.square(jnp.sum(p * jnp.log(p + PIXEL_ENTROPY_EPS), axis=1))


def pixel_entropy_loss(weights: Float[Array, "b k1 h w"]) -> Float[Array, " b"]:
    """Squared per-pixel entropy of the compositing weights, averaged over pixels (eqs. 19-21).

    ``L_pix = mean_{i,j} ( sum_{k=0..K} w_{k,ij} log(w_{k,ij} + 1e-20) )^2`` per example. It is 0 for
    one-hot weights and maximal, ``log(K+1)^2``, for uniform weights.

    Args:
      weights: [b, k+1, h, w] normalised weights (index 0 = background).

    Returns:
      [b] float32 per-example loss.
    """
    weights = _layer_weights("pixel_entropy_loss", weights)
    return jnp.mean(_squared_entropy(weights), axis=(1, 2))


def object_entropy_loss(weights: Float[Array, "b k1 h w"]) -> Float[Array, " b"]:
    """Squared entropy of each image's mean layer weights (the official code's first version).

    ``q_k = mean_{i,j} w_{k,ij}`` (k = 0..K, background included) and
    ``L_obj = ( sum_k q_k log(q_k + 1e-20) )^2`` per example. It is lower when fewer layers
    share the image, so it favours one slot per object and spare slots that draw nothing.

    Args:
      weights: [b, k+1, h, w] normalised weights (index 0 = background).

    Returns:
      [b] float32 per-example loss.
    """
    weights = _layer_weights("object_entropy_loss", weights)
    return _squared_entropy(jnp.mean(weights, axis=(2, 3)))


def slot_overlap_loss(
    masks: Float[Array, "b k h w"],
    activation_logit: Float[Array, "b k"],
    background_logit: Float[Array, ""] | float,
) -> Float[Array, " b"]:
    """How much the slots would each cover the same pixels if drawn alone (not in the official code).

    ``v_k = alpha_k M_k / (alpha_k M_k + alpha_0) = sigmoid(a_k + log M_k - b)`` is slot k's weight at a
    pixel if it were the only slot there, and ``L_ovl = mean_{i,j} sum_{k < l} v_{k,ij} v_{l,ij}`` per
    example. The normalised weights cannot show two slots that each draw the whole of one object: one of
    them wins every pixel, or they share it out, and the reconstruction is the same (with one-colour
    glimpses exactly the same). This term is about the object's area for each such pair, and about 0 for
    slots on different objects.

    Args:
      masks: [b, k, h, w] placed object masks in [0, 1].
      activation_logit: [b, k] log-activations ``a_k``.
      background_logit: the background's log-activation ``b`` (scalar).

    Returns:
      [b] float32 per-example loss.
    """
    if masks.ndim != 4 or activation_logit.shape != masks.shape[:2]:
        raise ValueError(
            "slot_overlap_loss needs masks [b, k, h, w] and activation logits [b, k], got "
            f"{masks.shape} and {activation_logit.shape}."
        )
    tiny = jnp.finfo(jnp.float32).tiny
    log_masks = jnp.log(jnp.maximum(masks.astype(jnp.float32), tiny))
    alone = jax.nn.sigmoid(
        activation_logit.astype(jnp.float32)[:, :, None, None]
        + log_masks
        - jnp.asarray(background_logit, jnp.float32)
    )
    total = jnp.sum(alone, axis=1)
    pairs = 0.5 * (jnp.square(total) - jnp.sum(jnp.square(alone), axis=1))
    return jnp.mean(pairs, axis=(1, 2))


def quadratic_warmup(step: Array | int, length: Array | int) -> Float[Array, ""]:
    """Quadratic ramp ``r(t) = min(1, t / N)^2`` of the pixel-entropy weight (eq. 22).

    ``t`` is the number of optimiser steps already taken (0 on the first step). Negative steps give
    0; ``length <= 0`` disables the ramp (returns 1). Works on Python numbers and traced integers.

    Args:
      step: current step ``t`` (scalar, int or float, may be traced).
      length: ramp length ``N`` (e.g. 10,000; scalar, may be traced).

    Returns:
      float32 scalar in [0, 1].
    """
    step = jnp.asarray(step, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    ratio = jnp.clip(step / jnp.where(length > 0, length, 1.0), 0.0, 1.0)
    return jnp.where(length > 0, jnp.square(ratio), 1.0)


def smooth_l1(x: Array, beta: float) -> Array:
    """PyTorch ``SmoothL1Loss`` of a difference ``x``: ``0.5 x^2 / beta`` if ``|x| < beta`` else
    ``|x| - 0.5 beta``."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * jnp.square(x) / beta, ax - 0.5 * beta)


def _box_mean(x: Float[Array, "b h w"], radius: int) -> Float[Array, "b h w"]:
    """Mean over a (2 radius + 1)^2 window, stride 1, zero padding excluded from the count
    (PyTorch ``avg_pool2d(..., count_include_pad=False)``)."""
    if radius == 0:
        return x
    window = (1, 2 * radius + 1, 2 * radius + 1)
    padding = ((0, 0), (radius, radius), (radius, radius))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1), padding)
    count = jax.lax.reduce_window(
        jnp.ones(x.shape[1:], x.dtype),
        0.0,
        jax.lax.add,
        window[1:],
        (1, 1),
        padding[1:],
    )
    return total / count


def background_loss(
    image: Float[Array, "b h w 3"],
    rgba: Float[Array, "b h w 4"],
    *,
    beta: float = 6.0,
    r: int = 75,
    tau1: float = 0.25,
) -> Float[Array, " b"]:
    """Robust AE-NE background loss (spec section 5.3), per example.

    In the 0-255 units of the official code, with ``X = 255 image``, ``B = 255 rgba[..., :3]`` and
    ``P = rgba[..., 3]`` (the error-prediction channel ``A / 255``):

    1. ``E = (1/255) sum_c SmoothL1_{beta=3}(X_c - B_c)`` per pixel;
    2. ``e_P = SmoothL1_{beta=3/255}(P - stop_grad(E) / 3)`` (the error channel regresses E/3);
    3. ``S = tanh(E / tau1)``; ``m = box mean of S`` over a ``(2 floor(W/r) + 1)`` square window,
       stride 1, padding ``floor(W/r)``, padded cells excluded from the mean (W = image width);
       pixel weight ``omega = stop_grad(exp(-beta m))``;
    4. per example ``sum_{i,j} (E + e_P) omega / (H W)``.

    The batch mean of the result equals the official scalar ``sum_{n,i,j} (E + e_P) omega / (N H W)``.

    Args:
      image: [b, h, w, 3] real image in [0, 1].
      rgba: [b, h, w, 4] background model output in [0, 1]: RGB background + predicted error.
      beta: weight sharpness (AE-NE beta = 6).
      r: box-size divisor (AE-NE r = 75: a 3 x 3 box at W = 128, none at W = 64).
      tau1: tanh temperature of the error (AE-NE tau_1 = 0.25).

    Returns:
      [b] float32 per-example loss.
    """
    if image.ndim != 4 or image.shape[-1] != 3 or rgba.shape != image.shape[:3] + (4,):
        raise ValueError(
            "background_loss needs image [b, h, w, 3] and rgba [b, h, w, 4], got "
            f"{image.shape} and {rgba.shape}."
        )
    _, h, w, _ = image.shape
    image = image.astype(jnp.float32)
    rgba = rgba.astype(jnp.float32)
    error = (
        jnp.sum(smooth_l1(255.0 * image - 255.0 * rgba[..., :3], 3.0), axis=-1) / 255.0
    )
    target = jax.lax.stop_gradient(error) / 3.0
    error_prediction = smooth_l1(rgba[..., 3] - target, 3.0 / 255.0)
    soft_error = jnp.tanh(jax.lax.stop_gradient(error) / tau1)
    weight = jax.lax.stop_gradient(jnp.exp(-beta * _box_mean(soft_error, w // r)))
    return jnp.sum((error + error_prediction) * weight, axis=(1, 2)) / (h * w)
