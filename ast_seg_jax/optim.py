"""Optimisers of the two training runs, with the learning rate set from the global step.

Both use `optax.inject_hyperparams(optax.adam)`, so that the learning rate lives in the optimiser state and the
train step sets it from the *global* step counter: the official phase-3 Adam rebuild (fresh moments and bias
correction) must not restart the learning-rate schedule, and here it does not.
"""

import ml_collections
import optax


def foreground_optimizer(
    config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
    """Adam(b1 0.9, b2 0.98, eps 1e-9 by default) for phases 2 and 3; no weight decay, no clipping."""
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=config.learning_rate,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
    )


def background_optimizer(
    config: ml_collections.ConfigDict,
) -> optax.GradientTransformation:
    """Adam(0.9, 0.999, 1e-8) for phase 1 (the official AdamW with weight decay 0)."""
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=config.background.learning_rate
    )


def with_learning_rate(opt_state, learning_rate):
    """Returns `opt_state` (of an `inject_hyperparams` optimiser) with its learning rate replaced."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = learning_rate
    return opt_state._replace(hyperparams=hyperparams)
