"""The curriculum as data: which phase a step belongs to, and the step-indexed schedules.

Phase numbers follow the paper: 1 = background pretraining (its own run of steps, its own state),
2 = foreground against the frozen background, 3 = foreground and background fine-tuned together.
Phases 2 and 3 share one global step counter `t` = number of optimiser steps already taken.
"""

import jax.numpy as jnp
import ml_collections

from ast_seg_jax.losses import quadratic_warmup

# Sharpness of the AE-NE robust pixel weights (spec section 5.3).
AE_NE_BETA = 6.0

SCENARIOS = ("curriculum", "baseline", "frozen_background")

PHASE_BACKGROUND = 1
PHASE_FOREGROUND = 2
PHASE_JOINT = 3


def check_scenario(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming the problem when the curriculum keys do not fit together."""
    if config.scenario not in SCENARIOS:
        raise ValueError(
            f"config.scenario={config.scenario!r} is not one of {', '.join(SCENARIOS)}."
        )
    if config.scenario == "curriculum" and not (
        0 <= config.freeze_background_steps <= config.num_train_steps
    ):
        raise ValueError(
            "config.freeze_background_steps must lie in [0, config.num_train_steps], got "
            f"{config.freeze_background_steps} and {config.num_train_steps}."
        )


def needs_background_pretraining(config: ml_collections.ConfigDict) -> bool:
    """Whether the scenario starts from a pretrained background (phase 1 or a restored one)."""
    return config.scenario in ("curriculum", "frozen_background")


def phase_of(step: int, config: ml_collections.ConfigDict) -> int:
    """The phase (2 or 3) of the optimiser step that follows `step` steps already taken."""
    if config.scenario == "baseline":
        return PHASE_JOINT
    if config.scenario == "frozen_background":
        return PHASE_FOREGROUND
    return PHASE_FOREGROUND if step < config.freeze_background_steps else PHASE_JOINT


def starts_phase3(step: int, config: ml_collections.ConfigDict) -> bool:
    """True right before the first phase-3 step of a curriculum run."""
    return (
        config.scenario == "curriculum" and 0 < config.freeze_background_steps == step
    )


def should_reset_optimizer(step: int, config: ml_collections.ConfigDict) -> bool:
    """True where phase 3 starts and the config keeps the official Adam rebuild."""
    return starts_phase3(step, config) and bool(config.reset_optimizer_at_phase3)


def foreground_learning_rate(step, config: ml_collections.ConfigDict):
    """Learning rate for the optimiser step that follows `step` steps already taken.

    With s = step + 1 (the official 1-based counter), base rate L, warm-up W and T total steps:
    lr = L * min(1, s / W)^2 for s < W; L until s >= decay_fraction * T; 0.1 * L afterwards.

    Args:
      step: scalar int (Python or traced).
      config: the run's config.

    Returns:
      A float32 scalar.
    """
    s = jnp.asarray(step, jnp.float32) + 1.0
    base = config.learning_rate
    warmup = quadratic_warmup(s, max(config.warmup_steps, 1))
    decayed = jnp.where(s >= config.decay_fraction * config.num_train_steps, 0.1, 1.0)
    return base * warmup * decayed


def background_learning_rate(step, config: ml_collections.ConfigDict):
    """Phase-1 learning rate: constant, x0.1 once step >= floor(decay_fraction * steps).

    With `config.background.warmup_steps` W > 0 (not official; 0 in the paper configs) it first rises
    linearly, lr * min(1, (step + 1) / W). From a random initialisation, ten Adam steps at the full rate
    make the AE-NE output the same image for every input (the mean image of the batch), and it takes
    hundreds of steps to depend on the input again; the ramp shortens that (docs/design.md).
    """
    bg = config.background
    boundary = int(bg.decay_fraction * bg.num_train_steps)
    s = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (s + 1.0) / max(bg.get("warmup_steps", 0), 1))
    return bg.learning_rate * warmup * jnp.where(s >= boundary, 0.1, 1.0)


def background_loss_beta(step, config: ml_collections.ConfigDict):
    """Sharpness beta of the AE-NE pixel weights exp(-beta m) at a phase-1 step.

    The official value (6) from the first step when `config.background.robust_warmup_steps` is 0;
    otherwise a linear ramp from 0 (every pixel weighs 1: plain smooth-L1 reconstruction) to 6 over
    that many steps. A deviation for short runs: from a random initialisation the AE-NE output is
    one flat colour, every pixel far from it gets weight ~exp(-6), and the robust loss then keeps
    the network near that flat image for thousands of steps; the ramp first lets it learn the
    coarse image and then narrows the loss onto the pixels it explains (the background).
    """
    warmup = config.background.robust_warmup_steps
    if warmup <= 0:
        return jnp.float32(AE_NE_BETA)
    t = jnp.asarray(step, jnp.float32)
    return AE_NE_BETA * jnp.minimum(1.0, t / warmup)


def _ramped(weight: float, warmup_steps: int, step):
    """weight * min(1, t / N)^2 with t = optimiser steps already taken (0 on the first step)."""
    t = jnp.asarray(step, jnp.float32)
    return weight * quadratic_warmup(t, max(warmup_steps, 1))


def pixel_entropy_weight(step, config: ml_collections.ConfigDict):
    """lambda * min(1, t / N_pix)^2 with t = optimiser steps already taken (0 on the first step)."""
    return _ramped(config.pixel_entropy_weight, config.pixel_entropy_warmup_steps, step)


def object_entropy_weight(step, config: ml_collections.ConfigDict):
    """The object-entropy weight times min(1, t / N_obj)^2 (0 with the default weight 0)."""
    return _ramped(
        config.object_entropy_weight, config.object_entropy_warmup_steps, step
    )


def slot_overlap_weight(step, config: ml_collections.ConfigDict):
    """The slot-overlap weight times min(1, t / N_obj)^2: the object-entropy warm-up (0 by default)."""
    return _ramped(
        config.get("slot_overlap_weight", 0.0), config.object_entropy_warmup_steps, step
    )
