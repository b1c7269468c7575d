"""The one pytree that holds everything a training run checkpoints."""

import flax.struct
import jax
import optax

from ast_seg_jax.typing import PRNGKey, PyTree


@flax.struct.dataclass
class TrainState:
    """State of a training run (phase 1, or phases 2 and 3).

    Attributes:
      step: int32 scalar, number of optimiser steps already taken in this run.
      params: model parameters.
      batch_stats: BatchNorm running statistics ({} for models without BatchNorm).
      opt_state: optimiser state.
      rng: base PRNG key; the step's key is `fold_in(rng, step)`.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: PRNGKey


def create(params, batch_stats, tx: optax.GradientTransformation, rng) -> TrainState:
    """A fresh state at step 0 with `tx` initialised on `params`."""
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=rng,
    )
