"""Orbax round trips and the phase-1 -> phase-2 hand-off."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_seg_jax import checkpointing, optim, train_state
from experiments.configs import base


def _state(seed=0):
    rng = jax.random.PRNGKey(seed)
    params = {
        "background_model": {"conv": {"kernel": jax.random.normal(rng, (3, 3, 5, 4))}},
        "embed": {"kernel": jax.random.normal(jax.random.fold_in(rng, 1), (7, 8))},
    }
    stats = {"bn": {"mean": jnp.arange(4.0), "var": jnp.ones(4)}}
    return train_state.create(
        params, stats, optim.foreground_optimizer(base.get_config()), rng
    )


def test_save_restore_round_trip(tmp_path):
    state = _state()
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt_state = optim.foreground_optimizer(base.get_config()).update(
        grads, state.opt_state, state.params
    )
    state = state.replace(
        step=jnp.int32(7),
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    mngr = checkpointing.manager(str(tmp_path / "ckpt"))
    checkpointing.save(mngr, state)
    mngr.wait_until_finished()
    restored = checkpointing.restore_latest(mngr, _state(seed=1))
    assert int(restored.step) == 7
    jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
    jax.tree.map(np.testing.assert_array_equal, restored.batch_stats, state.batch_stats)


def test_restore_latest_without_checkpoint_is_none(tmp_path):
    assert (
        checkpointing.restore_latest(checkpointing.manager(str(tmp_path)), _state())
        is None
    )


def test_background_hand_off_restores_exactly_the_background_subtree(tmp_path):
    background = _state(seed=3)
    bg_state = train_state.create(
        background.params["background_model"],
        {},
        optim.background_optimizer(base.get_config()),
        jax.random.PRNGKey(3),
    ).replace(step=jnp.int32(5))
    mngr = checkpointing.manager(str(tmp_path / checkpointing.BACKGROUND_DIR))
    checkpointing.save(mngr, bg_state)
    mngr.wait_until_finished()

    params, step = checkpointing.load_background_params(str(tmp_path), expected_steps=5)
    assert step == 5
    jax.tree.map(np.testing.assert_array_equal, params, bg_state.params)
    with pytest.raises(ValueError, match="stopped at step 5"):
        checkpointing.load_background_params(str(tmp_path), expected_steps=6)


def test_missing_background_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="restore_from"):
        checkpointing.load_background_params(str(tmp_path / "nowhere"))


def test_config_round_trip(tmp_path):
    config = base.get_config()
    config.model.num_slots = 5
    checkpointing.write_config(str(tmp_path), config)
    restored = checkpointing.read_config(str(tmp_path))
    assert restored.model.num_slots == 5
    assert restored.data.image_size == (128, 128)
    with pytest.raises(FileNotFoundError, match="not the workdir"):
        checkpointing.read_config(str(tmp_path / "other"))


def test_model_checkpoint_restores_on_another_device_count(tmp_path):
    from ast_seg_jax import trainer

    mesh = trainer.create_mesh()  # The 4 forced CPU devices of the test session.
    state = trainer.replicate(_state(), mesh)
    mngr = checkpointing.manager(str(tmp_path / checkpointing.CHECKPOINT_DIR))
    checkpointing.save(mngr, state)
    mngr.wait_until_finished()
    code = (
        "import jax, numpy as np\n"
        "from ast_seg_jax import checkpointing\n"
        f"v, step = checkpointing.load_model_variables({str(tmp_path)!r})\n"
        "assert len(jax.devices()) == 1, jax.devices()\n"
        "print(step, float(np.sum(v['params']['embed']['kernel'])))\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=os.path.join(os.path.dirname(__file__), ".."),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    step, total = proc.stdout.split()
    assert int(step) == 0
    np.testing.assert_allclose(
        float(total), float(np.sum(state.params["embed"]["kernel"])), rtol=1e-6
    )
