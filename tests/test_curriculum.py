"""The curriculum's phase table and step-indexed schedules equal their formulas."""

import numpy as np
import pytest

from ast_seg_jax import curriculum
from experiments.configs import base


def _config(**overrides):
    config = base.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 4e-5 * (1 / 5000) ** 2),  # First optimiser step: s = 1.
        (2499, 4e-5 * 0.5**2),  # s = 2500, halfway through the warm-up.
        (4999, 4e-5),  # s = 5000: warm-up done.
        (112_498, 4e-5),  # s = 112,499 < 0.9 * 125,000.
        (112_499, 4e-6),  # s = 112,500: decayed.
        (124_999, 4e-6),
    ],
)
def test_foreground_learning_rate(step, expected):
    lr = float(curriculum.foreground_learning_rate(step, _config()))
    np.testing.assert_allclose(lr, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.0), (1, 1e-2 * 1e-8), (5000, 1e-2 * 0.25), (10_000, 1e-2), (50_000, 1e-2)],
)
def test_pixel_entropy_weight(step, expected):
    weight = float(curriculum.pixel_entropy_weight(step, _config()))
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-20)


@pytest.mark.parametrize(
    "step, expected", [(0, 0.0), (250, 3e-3 * 0.25), (500, 3e-3), (900, 3e-3)]
)
def test_object_entropy_weight(step, expected):
    config = _config(object_entropy_weight=3e-3, object_entropy_warmup_steps=500)
    weight = float(curriculum.object_entropy_weight(step, config))
    np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-20)
    off_by_default = float(curriculum.object_entropy_weight(step, _config()))
    assert off_by_default == 0.0
    # The slot-overlap weight shares the object entropy's warm-up.
    config.slot_overlap_weight = 0.1
    overlap = float(curriculum.slot_overlap_weight(step, config))
    np.testing.assert_allclose(overlap, expected / 3e-3 * 0.1, rtol=1e-5, atol=1e-20)
    assert float(curriculum.slot_overlap_weight(step, _config())) == 0.0


def test_background_learning_rate_decays_at_80_percent():
    config = _config()
    assert float(curriculum.background_learning_rate(399_999, config)) == pytest.approx(
        2e-3
    )
    assert float(curriculum.background_learning_rate(400_000, config)) == pytest.approx(
        2e-4
    )


def test_background_warmup_ramps_linearly_then_decays():
    config = _config()
    config.background.num_train_steps = 1000
    config.background.warmup_steps = 100
    lr = [
        float(curriculum.background_learning_rate(s, config))
        for s in (0, 49, 99, 500, 800)
    ]
    np.testing.assert_allclose(lr, [2e-5, 1e-3, 2e-3, 2e-3, 2e-4], rtol=1e-6)
    # Off (0, the official constant rate) gives the full rate from the first step.
    config.background.warmup_steps = 0
    assert float(curriculum.background_learning_rate(0, config)) == pytest.approx(2e-3)


@pytest.mark.parametrize(
    "scenario, step, phase",
    [
        ("curriculum", 0, 2),
        ("curriculum", 29_999, 2),
        ("curriculum", 30_000, 3),
        ("baseline", 0, 3),
        ("frozen_background", 124_999, 2),
    ],
)
def test_phase_of(scenario, step, phase):
    assert curriculum.phase_of(step, _config(scenario=scenario)) == phase


def test_optimizer_reset_only_at_the_phase_switch():
    config = _config()
    resets = [
        s
        for s in (0, 1, 29_999, 30_000, 30_001)
        if curriculum.should_reset_optimizer(s, config)
    ]
    assert resets == [30_000]
    config.reset_optimizer_at_phase3 = False
    assert not curriculum.should_reset_optimizer(30_000, config)
    assert not curriculum.should_reset_optimizer(30_000, _config(scenario="baseline"))


def test_bad_scenario_is_rejected():
    with pytest.raises(ValueError, match="config.scenario"):
        curriculum.check_scenario(_config(scenario="curiculum"))
    with pytest.raises(ValueError, match="freeze_background_steps"):
        curriculum.check_scenario(_config(freeze_background_steps=200_000))


def test_background_loss_beta_ramp():
    config = base.get_config()
    assert (
        config.background.robust_warmup_steps == 0
    )  # Official: beta 6 from the start.
    for step in (0, 1, 10**6):
        assert float(curriculum.background_loss_beta(step, config)) == 6.0
    config.background.robust_warmup_steps = 100
    got = [float(curriculum.background_loss_beta(s, config)) for s in (0, 50, 100, 500)]
    np.testing.assert_allclose(got, [0.0, 3.0, 6.0, 6.0])


def test_phase3_starts_once_with_or_without_the_adam_rebuild():
    config = _config(freeze_background_steps=30)
    assert [s for s in range(100) if curriculum.starts_phase3(s, config)] == [30]
    config.reset_optimizer_at_phase3 = False
    assert curriculum.starts_phase3(30, config)
    assert not curriculum.should_reset_optimizer(30, config)
    assert not curriculum.starts_phase3(30, _config(scenario="baseline"))
