"""Optimisers of the two training runs, with the learning rate set from the global step.

Both use `optax.inject_hyperparams(optax.adam)`, so that the learning rate lives in the optimiser state and the
train step sets it from the *global* step counter: the official phase-3 Adam rebuild (fresh moments and bias
correction) must not restart the learning-rate schedule, and here it does not.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
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


def after_gradients(learning_rate, grads):
    """`learning_rate` made to depend on every gradient array, with its value unchanged.

    The train steps donate the parameters, so each update writes into the buffer it reads. XLA:CPU runs
    operations that do not depend on one another concurrently, so unless the update of a weight provably
    runs after every read of it (the backward pass reads most weights again to compute the input
    gradient), XLA copies the weight first: a copy of every parameter array at every step (about 50 ms of
    a 0.55 s objects_room phase-2 step on 2 CPU cores). Every backward read of a weight feeds some
    gradient, so a learning rate that depends on one element of each gradient array orders every update
    after every read, and the copies go.

    The value is `learning_rate + 0 * (sum of those elements)`: exactly `learning_rate` while the gradients
    are finite (XLA does not fold `0 * x` for floats, since x may be infinite). A non-finite gradient then
    makes every parameter non-finite rather than one array, which ends training the same way.
    """
    leaves = [g for g in jax.tree.leaves(grads) if g.size]
    if not leaves:
        return learning_rate
    witness = sum(jnp.ravel(g)[0].astype(jnp.float32) for g in leaves)
    return learning_rate + 0.0 * witness


def adam_updates(opt_state, keys=None):
    """The updates of the Adam step that produced `opt_state`, recomputed from its new moments.

    For `inject_hyperparams(optax.adam)` (both optimisers here): -lr * mu_hat / (sqrt(nu_hat + eps_root) +
    eps), with optax's bias correction at the state's step count, the same operations in the same order
    as the update itself. The train steps log the update norm from this at logging steps only, so that
    no other step keeps the updates as arrays of their own (the update then fuses into the parameter
    write). `keys`: the top-level parameter groups to return (every group when None).
    """
    hp = opt_state.hyperparams
    adam = opt_state.inner_state[0]
    mu, nu = adam.mu, adam.nu
    if keys is not None:
        mu = {k: mu[k] for k in keys}
        nu = {k: nu[k] for k in keys}
    mu_hat = optax.tree.bias_correction(mu, hp["b1"], adam.count)
    nu_hat = optax.tree.bias_correction(nu, hp["b2"], adam.count)
    step_size = -1 * hp["learning_rate"]
    return jax.tree.map(
        lambda m, v: step_size * (m / (jnp.sqrt(v + hp["eps_root"]) + hp["eps"])),
        mu_hat,
        nu_hat,
    )


def _map_param_trees(tree, structure, fn: Callable):
    """`tree` (an optimiser state) with `fn` applied to each subtree whose structure is `structure`.

    The subtrees shaped like the parameters are the per-parameter slots (Adam's `mu` and `nu`); counts,
    hyperparameters and empty states are left alone. Tuples, named tuples and dicts are walked.
    """
    if jax.tree.structure(tree) == structure:
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(
        tree, "_fields"
    ):  # A named tuple (optax states).
        return type(tree)(*(_map_param_trees(x, structure, fn) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_param_trees(x, structure, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_param_trees(v, structure, fn) for k, v in tree.items()}
    return tree


def update_except(
    tx: optax.GradientTransformation,
    grads,
    opt_state,
    params,
    frozen: Sequence[str] = (),
):
    """`tx.update` over the top-level parameter groups not in `frozen`; the frozen groups are skipped.

    The optimiser state keeps its full structure (checkpoints and a later update over every group see the
    state they always saw): the per-parameter slots of the frozen groups are passed through unchanged,
    while the shared ones (the step count, hence Adam's bias correction) advance as in a full update.

    For Adam this is the full update with zero gradients for the frozen groups whenever their moments are
    zero, as they are during phase 2 (the moments only move once phase 3 trains the background): the
    moments stay zero (b * 0 + (1 - b) * 0) and the update is 0 / (sqrt(0) + eps) = 0.

    Args:
      tx: the optimiser.
      grads: gradients of the groups not in `frozen` (a dict keyed by group).
      opt_state: `tx`'s state over every group of `params`.
      params: every parameter group (a dict).
      frozen: names of the top-level groups that do not train.

    Returns:
      (updates of the trainable groups, the new optimiser state over every group).
    """
    if not frozen:
        return tx.update(grads, opt_state, params)

    def trainable(tree):
        return {k: v for k, v in tree.items() if k not in frozen}

    held = []

    def split(slot):
        held.append({k: slot[k] for k in frozen})
        return trainable(slot)

    inner_state = _map_param_trees(opt_state, jax.tree.structure(params), split)
    updates, inner_state = tx.update(grads, inner_state, trainable(params))
    rejoin = iter(held)
    new_state = _map_param_trees(
        inner_state,
        jax.tree.structure(trainable(params)),
        lambda slot: {**slot, **next(rejoin)},
    )
    return updates, new_state
