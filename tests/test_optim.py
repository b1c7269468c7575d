"""The phase-2 optimiser update over the foreground groups only, against Adam over every group."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_seg_jax import optim
from experiments.configs import base

FROZEN = "background_model"


def _params(seed: int = 0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {
        "background_logit": normal(),
        FROZEN: {
            "conv_0": {"kernel": normal(3, 3, 5, 4)},
            "norm_0": {"scale": normal(4)},
        },
        "feature_generator": {"dense": {"kernel": normal(6, 3), "bias": normal(3)}},
        "transformer": {"kernel": normal(4, 4)},
    }


def _grads(params, seed: int, frozen_zero: bool):
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params
    )
    if frozen_zero:
        grads[FROZEN] = jax.tree.map(jnp.zeros_like, grads[FROZEN])
    return grads


def _assert_trees_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("reset_at_phase3", [False, True])
def test_foreground_only_update_equals_adam_over_every_group(reset_at_phase3):
    """Three phase-2 steps (the old way: Adam over every group with zero background gradients, the
    background put back), then two phase-3 steps over every group, with or without the Adam rebuild:
    parameters, updates and the whole optimiser state (moments, counts) agree at every step."""
    config = base.get_config()
    tx = optim.foreground_optimizer(config)
    params = _params()
    full_update = jax.jit(tx.update)
    foreground_update = jax.jit(
        lambda g, s, p: optim.update_except(tx, g, s, p, (FROZEN,))
    )
    old = (params, tx.init(params))
    new = (params, tx.init(params))
    for step in range(5):
        lr = 1e-3 * (step + 1)
        grads = _grads(params, seed=step, frozen_zero=step < 3)
        if step == 3 and reset_at_phase3:
            old = (old[0], tx.init(old[0]))
            new = (new[0], tx.init(new[0]))
        # Reference: one update over every group.
        p, s = old
        s = optim.with_learning_rate(s, lr)
        old_updates, s = full_update(grads, s, p)
        p_next = optax.apply_updates(p, old_updates)
        if step < 3:
            p_next = {**p_next, FROZEN: p[FROZEN]}
        old = (p_next, s)
        # Phase 2 over the foreground groups only, then every group.
        p, s = new
        s = optim.with_learning_rate(s, lr)
        if step < 3:
            trainable = {k: v for k, v in grads.items() if k != FROZEN}
            updates, s = foreground_update(trainable, s, p)
            fg = {k: v for k, v in p.items() if k != FROZEN}
            p_next = {**optax.apply_updates(fg, updates), FROZEN: p[FROZEN]}
            assert FROZEN not in updates
            # The skipped group's updates would have been exactly zero.
            _assert_trees_close(
                updates, {k: v for k, v in old_updates.items() if k != FROZEN}
            )
            assert not any(np.any(x) for x in jax.tree.leaves(old_updates[FROZEN]))
        else:
            updates, s = full_update(grads, s, p)
            p_next = optax.apply_updates(p, updates)
            _assert_trees_close(updates, old_updates)
        new = (p_next, s)
        _assert_trees_close(new, old)
    # Phase 3 moved every group, and the step count ran over both phases (or restarted at phase 3).
    assert not np.allclose(
        new[0][FROZEN]["norm_0"]["scale"], params[FROZEN]["norm_0"]["scale"]
    )
    assert int(new[1].inner_state[0].count) == (2 if reset_at_phase3 else 5)


def test_update_except_without_frozen_groups_is_the_plain_update():
    tx = optim.foreground_optimizer(base.get_config())
    params = _params()
    grads = _grads(params, seed=1, frozen_zero=False)
    state = tx.init(params)
    _assert_trees_close(
        optim.update_except(tx, grads, state, params), tx.update(grads, state, params)
    )


@pytest.mark.parametrize("which", ["foreground", "background"])
def test_adam_updates_recomputes_the_last_update_from_the_state(which):
    config = base.get_config()
    tx = (
        optim.foreground_optimizer(config)
        if which == "foreground"
        else optim.background_optimizer(config)
    )
    params = _params()
    state = tx.init(params)
    for step in range(3):
        grads = _grads(params, seed=10 + step, frozen_zero=False)
        state = optim.with_learning_rate(state, 1e-3 * (step + 1))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # Same operations in the same order: equal to the last bit, every group or a subset.
        chex.assert_trees_all_equal(optim.adam_updates(state), updates)
        trainable = tuple(k for k in params if k != FROZEN)
        chex.assert_trees_all_equal(
            optim.adam_updates(state, trainable),
            {k: updates[k] for k in trainable},
        )


def test_after_gradients_keeps_the_value_and_ends_the_parameter_copies():
    """On XLA:CPU a donated weight read again by the backward pass is copied before its update unless
    the update is ordered after every read; the learning rate of `after_gradients` orders it."""
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

    def loss(p, x):
        h = jnp.tanh(x @ p["w1"])
        h = jnp.tanh(h @ p["w2"])
        return jnp.sum(h @ p["w3"])

    def make_step(ordered):
        def step(p, s, x):
            g = jax.grad(loss)(p, x)
            lr = jnp.float32(1e-3)
            s = optim.with_learning_rate(
                s, optim.after_gradients(lr, g) if ordered else lr
            )
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(step, donate_argnums=(0, 1))

    rng = np.random.default_rng(0)
    shape = (64, 64)
    p = {
        f"w{i}": jnp.asarray(rng.standard_normal(shape), jnp.float32) for i in (1, 2, 3)
    }
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    copies = {}
    results = {}
    for ordered in (False, True):
        args = (jax.tree.map(jnp.copy, p), tx.init(p), x)
        step = make_step(ordered)
        hlo = step.lower(*args).compile().as_text()
        copies[ordered] = len(re.findall(r"= f32\[64,64\]\{1,0\} copy\(", hlo))
        results[ordered] = step(*args)
    if jax.default_backend() == "cpu":
        assert copies[False] >= 1  # w2 and w3 are read by the backward pass.
    assert copies[True] == 0
    chex.assert_trees_all_equal(results[True], results[False])
    assert float(optim.after_gradients(jnp.float32(0.25), {"g": jnp.ones(3)})) == 0.25
