"""Soft-argmax and attention pooling on a feature map (paper eqs. 11-16, spec section 1.4).

Each object slot owns one attention-logit map over the ``h x w`` feature grid. A softmax over all
``h * w`` positions turns it into a probability map ``p``; its expectation under a fixed position
grid is the slot's position (soft-argmax), and the same ``p`` pools the feature map into the slot's
feature vector.

Coordinate convention ("align_corners=True" on the feature map, as in the official code):
column ``i`` has ``x_i = 2 i / (w - 1) - 1`` and row ``j`` has ``y_j = 2 j / (h - 1) - 1``, so the
first and last feature-pixel centres sit exactly at -1 and +1. Coordinates are returned as
``(x, y)``: x along the width, y along the height. A dimension of size 1 gets the coordinate 0.

Because the grid is affine in the pixel index, shifting a logit map by ``(u, v)`` pixels (with all
its mass staying inside the map) shifts the soft-argmax by exactly ``(2 u / (w - 1), 2 v / (h - 1))``
(translation equivariance, paper eq. 3 / Proposition 2.1).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _axis_coordinates(n: int) -> Float[Array, " n"]:
    """Returns ``2 i / (n - 1) - 1`` for ``i = 0 .. n - 1`` (a single 0 when ``n == 1``)."""
    if n < 1:
        raise ValueError(f"A grid axis needs at least one position, got size {n}.")
    if n == 1:
        return jnp.zeros((1,), jnp.float32)
    return 2.0 * jnp.arange(n, dtype=jnp.float32) / (n - 1) - 1.0


def position_grid(h: int, w: int) -> Float[Array, "h w 2"]:
    """The fixed position map of the feature grid.

    Args:
      h: grid height (rows).
      w: grid width (columns).

    Returns:
      [h, w, 2] float32 array; ``[j, i, 0] = x_i = 2 i / (w - 1) - 1`` (horizontal) and
      ``[j, i, 1] = y_j = 2 j / (h - 1) - 1`` (vertical). Size-1 axes get coordinate 0.
    """
    xs = _axis_coordinates(w)
    ys = _axis_coordinates(h)
    gx = jnp.broadcast_to(xs[None, :], (h, w))
    gy = jnp.broadcast_to(ys[:, None], (h, w))
    return jnp.stack([gx, gy], axis=-1)


def _spatial_softmax(logits: Float[Array, "... h w"]) -> Float[Array, "... h w"]:
    """Softmax over the last two axes together, computed in float32 with a max shift."""
    *lead, h, w = logits.shape
    flat = logits.astype(jnp.float32).reshape(*lead, h * w)
    return jax.nn.softmax(flat, axis=-1).reshape(*lead, h, w)


def soft_argmax(logits: Float[Array, "... h w"]) -> Float[Array, "... 2"]:
    """Expected grid position under the softmax of a logit map.

    ``p = softmax(logits)`` over all ``h * w`` positions, then
    ``x = sum_{j,i} p[j, i] x_i`` and ``y = sum_{j,i} p[j, i] y_j`` (paper eqs. 11-15).

    Args:
      logits: [..., h, w] attention logits (any leading batch axes).

    Returns:
      [..., 2] float32 coordinates ``(x, y)`` in [-1, 1].
    """
    if logits.ndim < 2:
        raise ValueError(
            f"soft_argmax needs logits of shape [..., h, w], got {logits.shape}."
        )
    h, w = logits.shape[-2:]
    p = _spatial_softmax(logits)
    xs = _axis_coordinates(w)
    ys = _axis_coordinates(h)
    # Marginalise first: x only depends on the column, y only on the row.
    x = jnp.sum(jnp.sum(p, axis=-2) * xs, axis=-1)
    y = jnp.sum(jnp.sum(p, axis=-1) * ys, axis=-1)
    return jnp.stack([x, y], axis=-1)


def attention_pool(
    logits: Float[Array, "b h w k"], features: Float[Array, "b h w c"]
) -> tuple[Float[Array, "b k 2"], Float[Array, "b k c"]]:
    """Soft-argmax positions and softmax-pooled features of ``k`` attention maps (eq. 16).

    For every image and slot ``k``: ``p_k = softmax(logits[..., k])`` over all ``h * w`` positions,
    ``xy_k = sum p_k(j, i) (x_i, y_j)`` and ``pooled_k = sum p_k(j, i) features[j, i, :]``.

    Args:
      logits: [b, h, w, k] attention logits, one map per slot (NHWC, slots on the channel axis).
      features: [b, h, w, c] feature map to pool.

    Returns:
      ``(xy, pooled)``: xy [b, k, 2] float32 coordinates ``(x, y)`` in [-1, 1] and
      pooled [b, k, c] float32 pooled features.
    """
    if logits.ndim != 4 or features.ndim != 4:
        raise ValueError(
            "attention_pool needs logits [b, h, w, k] and features [b, h, w, c], got "
            f"{logits.shape} and {features.shape}."
        )
    if logits.shape[:3] != features.shape[:3]:
        raise ValueError(
            "attention_pool: logits and features disagree on [b, h, w]: "
            f"{logits.shape[:3]} vs {features.shape[:3]}."
        )
    _, h, w, _ = logits.shape
    p = _spatial_softmax(jnp.moveaxis(logits, -1, 1))  # [b, k, h, w]
    xs = _axis_coordinates(w)
    ys = _axis_coordinates(h)
    # Full float32 precision (GPUs would otherwise use TF32 for these contractions).
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("bkhw,w->bk", p, xs, precision=hi)
    y = jnp.einsum("bkhw,h->bk", p, ys, precision=hi)
    pooled = jnp.einsum("bkhw,bhwc->bkc", p, features.astype(jnp.float32), precision=hi)
    return jnp.stack([x, y], axis=-1), pooled
