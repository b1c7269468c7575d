"""The seeded weights of the whole-model parity fixture (shared by its generator and its test).

The fixture (``official_fixture.json``) lists, for each configuration, every entry of the
official state dicts in ``state_dict()`` order with its shape and how it is filled:

* ``["normal", mean, std]``: ``mean + std * standard_normal(shape)``;
* ``["uniform", low, high]``: ``uniform(low, high, shape)`` (BatchNorm running variances);
* ``["zeros"]``: zeros, drawing nothing (BatchNorm ``num_batches_tracked``);
* ``["constant"]``: a constant the official modules store (position map, coordinate channels,
  background mask and mask logit), computed by `official_constant`, drawing nothing.

All draws come, in list order (foreground list first, then background list), from one
``numpy.random.default_rng(seed)`` and are float32, so the generator (which copies them into the
official PyTorch modules) and the test (which hands them to ``load_official``) hold the same numbers.
"""

import numpy as np


def official_constant(key: str, shape) -> np.ndarray:
    """The value of a constant entry of an official state dict, from its key and shape."""
    shape = tuple(shape)
    if key == "position_map":
        # Soft-argmax grid: channel 0 = 2 (x / (w - 1) - 0.5), channel 1 = 2 (y / (h - 1) - 0.5).
        _, _, h, w = shape
        xs = 2.0 * (np.arange(w) / (w - 1) - 0.5)
        ys = 2.0 * (np.arange(h) / (h - 1) - 0.5)
        grid = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]))
        return grid[None].astype(np.float32)
    if key.endswith("positional_encoding"):
        # AE-NE coordinates: channel 0 = row / (h - 1) - 0.5, channel 1 = col / (w - 1) - 0.5,
        # a constant 1 along a side of length 1.
        _, _, h, w = shape
        rows = np.arange(h) / (h - 1) - 0.5 if h > 1 else np.ones(1)
        cols = np.arange(w) / (w - 1) - 0.5 if w > 1 else np.ones(1)
        grid = np.stack(np.broadcast_arrays(rows[:, None], cols[None, :]))
        return grid[None].astype(np.float32)
    if key == "background_mask":
        return np.ones(shape, np.float32)
    if key == "background_mask_logit":
        return np.zeros(shape, np.float32)
    raise KeyError(f"{key!r} is not a constant of the official model.")


def fill(rng: np.random.Generator, key: str, shape, how) -> np.ndarray:
    """One entry of a state dict, drawn from `rng` as `how` says (see the module docstring)."""
    shape = tuple(shape)
    kind = how[0]
    if kind == "normal":
        _, mean, std = how
        return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(
            np.float32
        )
    if kind == "uniform":
        _, low, high = how
        return rng.uniform(low, high, shape).astype(np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "constant":
        return official_constant(key, shape)
    raise ValueError(f"Unknown fill {how!r} for {key!r}.")


def state_dicts(spec: dict) -> tuple[dict, dict]:
    """The (foreground, background) state dicts of one fixture configuration.

    Args:
      spec: the configuration's entry of the fixture JSON, with ``seed``, ``foreground`` and
        ``background`` (lists of ``[key, shape, how]``).
    """
    rng = np.random.default_rng(spec["seed"])
    out = []
    for part in ("foreground", "background"):
        out.append({key: fill(rng, key, shape, how) for key, shape, how in spec[part]})
    return out[0], out[1]


# Outputs with image-sized axes, and where those axes are (the fixture may keep every n-th pixel).
SPATIAL_AXES = {
    "glimpses": (2, 3),  # [b, k, g, g, 4]
    "layers": (2, 3),  # [b, k, h, w, 3]
    "masks": (2, 3),  # [b, k, h, w]
    "weights": (2, 3),  # [b, k + 1, h, w]
    "reconstruction": (1, 2),  # [b, h, w, 3]
    "background": (1, 2),  # [b, h, w, 3]
}


def subsample(field: str, array, stride: int):
    """Every `stride`-th row and column of an image-sized output (other outputs unchanged)."""
    if stride == 1 or field not in SPATIAL_AXES:
        return array
    if np.ndim(array) <= max(SPATIAL_AXES[field]):
        return array  # A scalar of the same name (e.g. loss/reconstruction).
    index = [slice(None)] * np.ndim(array)
    for axis in SPATIAL_AXES[field]:
        index[axis] = slice(None, None, stride)
    return array[tuple(index)]
