"""Compositing of the object layers over the background, and the argmax segmentation (spec section 3).

Paper eqs. 17-18: with activations ``alpha_k = exp(a_k)`` (one per slot, constant over the image),
background activation ``alpha_0 = exp(b)`` and background mask ``M_0 = 1``,

    u_k = alpha_k M_k,   w_k = u_k / sum_{j=0..K} u_j,   X_hat = w_0 B + sum_{k>=1} w_k L_k.

No epsilon is added (the denominator is at least ``alpha_0 > 0``). The weights are computed as a
softmax over ``k = 0..K`` of the log-weights ``l_0 = b`` and ``l_k = a_k + log M_k`` (``-inf`` where
``M_k = 0``), which is the same function but never forms ``exp(a_k)`` itself: activation logits of
+-1000 give finite weights and finite gradients, whereas the literal formula overflows above ~88.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def compositing_weights(
    masks: Float[Array, "b k H W"],
    activation_logit: Float[Array, "b k"],
    background_logit: Float[Array, "..."] | float,
) -> Float[Array, "b k1 H W"]:
    """Normalised compositing weights ``w_k = alpha_k M_k / (alpha_0 + sum_j alpha_j M_j)``.

    Computed as ``softmax_k(l)`` with ``l_0 = background_logit`` and
    ``l_k = activation_logit_k + log M_k``. Masks at or below the smallest normal float32
    (``~1.2e-38``, where ``log`` and its derivative ``1 / M`` stop being representable) are treated
    as exactly 0: their weight is 0 and the gradient with respect to such a mask is 0 (instead of
    ``alpha_k / sum_j u_j``, which overflows for huge activations). Everywhere else the values and
    gradients are those of the formula.

    Args:
      masks: [b, k, H, W] object masks in [0, 1].
      activation_logit: [b, k] log-activations ``a_k``.
      background_logit: background log-activation ``b``: a scalar, or any array broadcastable to
        [b, H, W] (e.g. a per-pixel logit map added to the scalar).

    Returns:
      [b, k+1, H, W] float32 weights summing to 1 over axis 1; index 0 is the background.
    """
    if masks.ndim != 4:
        raise ValueError(f"masks must be [b, k, H, W], got {masks.shape}.")
    b, k, h, w = masks.shape
    if activation_logit.shape != (b, k):
        raise ValueError(
            f"activation_logit must be [b, k] = {(b, k)}, got {activation_logit.shape}."
        )
    masks = masks.astype(jnp.float32)
    positive = masks > jnp.finfo(jnp.float32).tiny
    # Double `where` so that neither the value nor the gradient of the masked branch is NaN.
    log_masks = jnp.where(positive, jnp.log(jnp.where(positive, masks, 1.0)), -jnp.inf)
    object_logits = activation_logit.astype(jnp.float32)[:, :, None, None] + log_masks
    background = jnp.broadcast_to(
        jnp.asarray(background_logit, jnp.float32), (b, h, w)
    )[:, None]
    logits = jnp.concatenate([background, object_logits], axis=1)
    # The background entry is finite, so the softmax's max shift is finite at every pixel.
    return jax.nn.softmax(logits, axis=1)


def composite(
    layers: Float[Array, "b k H W 3"],
    masks: Float[Array, "b k H W"],
    activation_logit: Float[Array, "b k"],
    background: Float[Array, "b H W 3"],
    background_logit: Float[Array, "..."] | float,
) -> tuple[Float[Array, "b H W 3"], Float[Array, "b k1 H W"]]:
    """Composites K object layers over the background (eqs. 17-18).

    ``X_hat = w_0 B + sum_{k=1..K} w_k L_k`` with the weights of :func:`compositing_weights`.

    Args:
      layers: [b, k, H, W, 3] placed object colours ``L_k``.
      masks: [b, k, H, W] placed object masks ``M_k`` in [0, 1].
      activation_logit: [b, k] log-activations ``a_k`` (``alpha_k = exp(a_k)``).
      background: [b, H, W, 3] background image ``B``.
      background_logit: background log-activation ``b`` (scalar or broadcastable to [b, H, W]).

    Returns:
      ``(reconstruction, weights)``: reconstruction [b, H, W, 3] and weights [b, k+1, H, W]
      (index 0 = background), both float32.
    """
    if layers.shape[:4] != masks.shape or background.shape != (
        masks.shape[0],
        *masks.shape[2:],
        layers.shape[-1],
    ):
        raise ValueError(
            "composite: inconsistent shapes layers "
            f"{layers.shape}, masks {masks.shape}, background {background.shape}; expected "
            "layers [b, k, H, W, c], masks [b, k, H, W], background [b, H, W, c]."
        )
    weights = compositing_weights(masks, activation_logit, background_logit)
    background_part = weights[:, 0, ..., None] * background.astype(jnp.float32)
    object_part = jnp.einsum(
        "bkhw,bkhwc->bhwc",
        weights[:, 1:],
        layers.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,  # no TF32 on accelerators
    )
    reconstruction = background_part + object_part
    return reconstruction, weights


def segment(
    weights: Float[Array, "b k1 H W"],
    min_peak_weight: float = 0.0,
    colour_min_weight: float = 0.0,
    image: Float[Array, "b H W 3"] | None = None,
    background: Float[Array, "b H W 3"] | None = None,
    layers: Float[Array, "b k H W 3"] | None = None,
) -> Int[Array, "b H W"]:
    """Per-pixel label ``argmax_k w_k`` (0 = background; ties go to the lowest index).

    Two rules that are not in the official code, both off by default:

    * ``min_peak_weight`` > 0 (``config.model.segment_min_peak_weight``): a slot whose weight stays
      below it at every pixel of the image takes no pixel; the argmax runs over the background and
      the other slots. Such a slot never draws any pixel mostly by itself: its layer is everywhere
      mixed with the background's or another slot's.
    * ``colour_min_weight`` > 0 (``config.model.segment_colour_min_weight``): where several layers
      mix, the pixel goes to the layer whose own colour is closest to the image (L1 over RGB),
      among the background and the slots kept by the first rule whose weight there is at least
      ``colour_min_weight``; a pixel that no layer reaches it with keeps the argmax. The weights
      still decide where each layer can be: a pixel can only go to a layer that draws at least
      this share of it.

    Args:
      weights: [b, k+1, H, W] compositing weights.
      min_peak_weight: the weight in [0, 1) that a slot must reach somewhere to be segmented; 0 keeps
        every slot (the official argmax).
      colour_min_weight: the weight in [0, 1) from which a layer competes for a pixel by colour;
        0 turns the rule off (the official argmax).
      image, background, layers: the input [b, H, W, 3], the background [b, H, W, 3] and the placed
        object colours [b, k, H, W, 3] (`ModelOutput`); needed only by the colour rule.

    Returns:
      [b, H, W] int32 label map.
    """
    if weights.ndim != 4:
        raise ValueError(f"segment needs weights [b, k+1, H, W], got {weights.shape}.")
    keep = jnp.ones(weights.shape[:2] + (1, 1), bool)  # [b, k+1, 1, 1]
    if min_peak_weight > 0:
        peak = jnp.max(weights[:, 1:], axis=(2, 3), keepdims=True)  # [b, k, 1, 1]
        keep = jnp.concatenate([keep[:, :1], peak >= min_peak_weight], axis=1)
    kept = jnp.where(keep, weights, -1.0)
    labels = jnp.argmax(kept, axis=1)
    if colour_min_weight > 0:
        if image is None or background is None or layers is None:
            raise ValueError(
                "segment's colour rule (colour_min_weight > 0) needs the image, the background "
                "and the layers."
            )
        colours = jnp.concatenate(
            [background[:, None], layers], axis=1
        )  # [b, k+1, H, W, 3]
        error = jnp.sum(jnp.abs(colours - image[:, None]), axis=-1)  # [b, k+1, H, W]
        candidate = keep & (weights >= colour_min_weight)
        error = jnp.where(candidate, error, jnp.inf)
        labels = jnp.where(
            jnp.any(candidate, axis=1), jnp.argmin(error, axis=1), labels
        )
    return labels.astype(jnp.int32)
