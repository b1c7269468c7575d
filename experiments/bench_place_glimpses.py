"""Times formulations of the glimpse-placing spatial transformer on CPU (or any JAX backend).

Compares the separable two-matmul implementation kept in
``ast_seg_jax.models.spatial_transformer.place_glimpses`` with two gather-based formulations of the
same PyTorch ``affine_grid`` + ``grid_sample`` (bilinear, zeros, align_corners=False) warp:

* ``separable_gather``: two-tap gathers of whole glimpse rows, then of columns;
* ``gather``: four-corner bilinear gather on channels-last glimpses (``take_along_axis``);
* ``map_coordinates``: ``jax.scipy.ndimage.map_coordinates(order=1, mode="constant")`` vmapped
  over batch, slot and channel.

For each it reports the median (and min) wall time in ms of the jitted forward pass and of the
jitted forward+backward pass (gradient of ``sum(out * cotangent)`` for a fixed random cotangent,
with respect to glimpses, xy and scale), after a compile + warm-up call, timing the formulations
round-robin, and checks that all formulations agree.

Usage (the issue's setting, [64, 10, 64, 64, 4] glimpses placed at 128 x 128):

    JAX_PLATFORMS=cpu python experiments/bench_place_glimpses.py --repeats 5
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ast_seg_jax.models.spatial_transformer import place_glimpses


def _pixel_positions(xy, scale, out_hw, glimpse_hw):
    """Full-grid glimpse pixel positions (row, col) [b, k, H, W] of every output pixel."""
    out_h, out_w = out_hw
    gh, gw = glimpse_hw
    u = (2.0 * jnp.arange(out_w, dtype=jnp.float32) + 1.0) / out_w - 1.0
    v = (2.0 * jnp.arange(out_h, dtype=jnp.float32) + 1.0) / out_h - 1.0
    gx = scale[..., 0, None] * (u - xy[..., 0, None])  # [b, k, W]
    gy = scale[..., 1, None] * (v - xy[..., 1, None])  # [b, k, H]
    col = ((gx + 1.0) * gw - 1.0) / 2.0
    row = ((gy + 1.0) * gh - 1.0) / 2.0
    shape = xy.shape[:2] + (out_h, out_w)
    return (
        jnp.broadcast_to(row[..., :, None], shape),
        jnp.broadcast_to(col[..., None, :], shape),
    )


def place_glimpses_gather(glimpses, xy, scale, out_hw):
    """Four-corner bilinear gather with zero padding, channels last."""
    b, k, gh, gw, c = glimpses.shape
    row, col = _pixel_positions(xy, scale, out_hw, (gh, gw))
    row0 = jnp.floor(row)
    col0 = jnp.floor(col)
    frow = row - row0
    fcol = col - col0
    flat = glimpses.reshape(b, k, gh * gw, c)
    out = 0.0
    for dr, wr in ((0, 1.0 - frow), (1, frow)):
        for dc, wc in ((0, 1.0 - fcol), (1, fcol)):
            r = (row0 + dr).astype(jnp.int32)
            q = (col0 + dc).astype(jnp.int32)
            valid = (r >= 0) & (r < gh) & (q >= 0) & (q < gw)
            index = jnp.where(valid, r * gw + q, 0).reshape(b, k, -1, 1)
            values = jnp.take_along_axis(flat, index, axis=2)
            values = values.reshape(b, k, out_hw[0], out_hw[1], c)
            out = out + jnp.where(valid, wr * wc, 0.0)[..., None] * values
    return out


def place_glimpses_map_coordinates(glimpses, xy, scale, out_hw):
    """``jax.scipy.ndimage.map_coordinates`` (order 1, constant 0) per batch, slot, channel."""
    gh, gw = glimpses.shape[2:4]
    row, col = _pixel_positions(xy, scale, out_hw, (gh, gw))

    def one(image, r, q):  # image [gh, gw], r / q [H, W]
        return jax.scipy.ndimage.map_coordinates(
            image, [r, q], order=1, mode="constant", cval=0.0
        )

    per_channel = jax.vmap(one, in_axes=(2, None, None), out_axes=-1)
    return jax.vmap(jax.vmap(per_channel))(glimpses, row, col)


def _axis_taps(position, size):
    """Lower neighbour index (clipped), and the two bilinear weights (0 if out of range)."""
    lower = jnp.floor(position)
    frac = position - lower
    lower = lower.astype(jnp.int32)
    w0 = jnp.where((lower >= 0) & (lower < size), 1.0 - frac, 0.0)
    w1 = jnp.where((lower + 1 >= 0) & (lower + 1 < size), frac, 0.0)
    i0 = jnp.clip(lower, 0, size - 1)
    i1 = jnp.clip(lower + 1, 0, size - 1)
    return i0, i1, w0, w1


def place_glimpses_separable_gather(glimpses, xy, scale, out_hw):
    """Separable two-tap gathers: first whole glimpse rows, then columns."""
    gh, gw = glimpses.shape[2:4]
    out_h, out_w = out_hw
    u = (2.0 * jnp.arange(out_w, dtype=jnp.float32) + 1.0) / out_w - 1.0
    v = (2.0 * jnp.arange(out_h, dtype=jnp.float32) + 1.0) / out_h - 1.0
    col = ((scale[..., 0, None] * (u - xy[..., 0, None]) + 1.0) * gw - 1.0) / 2.0
    row = ((scale[..., 1, None] * (v - xy[..., 1, None]) + 1.0) * gh - 1.0) / 2.0
    r0, r1, wr0, wr1 = _axis_taps(row, gh)  # [b, k, H]
    q0, q1, wq0, wq1 = _axis_taps(col, gw)  # [b, k, W]

    def rows(index):
        return jnp.take_along_axis(glimpses, index[:, :, :, None, None], axis=2)

    tmp = wr0[..., None, None] * rows(r0) + wr1[..., None, None] * rows(r1)

    def cols(index):
        return jnp.take_along_axis(tmp, index[:, :, None, :, None], axis=3)

    return wq0[:, :, None, :, None] * cols(q0) + wq1[:, :, None, :, None] * cols(q1)


FORMULATIONS = {
    "separable_matmul (kept)": place_glimpses,
    "separable_gather": place_glimpses_separable_gather,
    "gather": place_glimpses_gather,
    "map_coordinates": place_glimpses_map_coordinates,
}


def _time_ms(fn, args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return 1e3 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--glimpse", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--out", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only", default="", help="comma-separated subset of: gather,map,separable"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    b, k, g, c = args.batch, args.slots, args.glimpse, args.channels
    out_hw = (args.out, args.out)
    glimpses = jnp.asarray(rng.uniform(size=(b, k, g, g, c)), jnp.float32)
    xy = jnp.asarray(rng.uniform(-1.0, 1.0, size=(b, k, 2)), jnp.float32)
    scale = jnp.asarray(rng.uniform(1.3, 6.0, size=(b, k, 2)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(b, k, args.out, args.out, c)), jnp.float32)
    print(
        f"backend={jax.default_backend()} devices={jax.devices()} "
        f"glimpses={glimpses.shape} -> {out_hw}, median of {args.repeats} runs"
    )

    cases = {}
    reference = None
    for name, impl in FORMULATIONS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        forward = jax.jit(lambda gl, p, s, impl=impl: impl(gl, p, s, out_hw))

        def loss(gl, p, s, ct, impl=impl):
            return jnp.sum(impl(gl, p, s, out_hw) * ct)

        backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        out = np.asarray(forward(glimpses, xy, scale))  # compiles and warms up
        jax.block_until_ready(backward(glimpses, xy, scale, cotangent))
        if reference is None:
            reference = out
        err = float(np.max(np.abs(out - reference)))
        cases[name] = (forward, backward, err, [], [])

    # Round-robin over the formulations so that load from other processes hits all alike.
    for _ in range(args.repeats):
        for forward, backward, _, fwd_times, bwd_times in cases.values():
            fwd_times.append(_time_ms(forward, (glimpses, xy, scale)))
            bwd_times.append(_time_ms(backward, (glimpses, xy, scale, cotangent)))
    for name, (_, _, err, fwd_times, bwd_times) in cases.items():
        print(
            f"{name:>24s}: forward {statistics.median(fwd_times):9.1f} ms "
            f"(min {min(fwd_times):7.1f})   forward+backward "
            f"{statistics.median(bwd_times):9.1f} ms (min {min(bwd_times):7.1f})"
            f"   max |out - first| {err:.1e}"
        )


if __name__ == "__main__":
    main()
