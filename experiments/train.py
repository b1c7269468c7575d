"""Runs the whole AST curriculum for a config, resuming where a previous run in WORKDIR stopped.

    python -m experiments.train --config=experiments/configs/shapes.py --workdir=workdirs/shapes \
        [--config.key=value ...] [--distributed]
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and results go."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host; the coordinator comes from the environment).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # Unused.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(
            logging.WARNING
        )  # Progress lines are printed; --verbosity=0 for INFO logs.
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    import tensorflow as tf

    tf.config.set_visible_devices(
        [], "GPU"
    )  # TF only feeds data; the accelerators are JAX's.
    from ast_seg_jax import trainer

    logging.info("Config:\n%s", _CONFIG.value)
    print(f"Training {_CONFIG.value.data.name} into {_WORKDIR.value}", flush=True)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, OSError) as e:
        if not trainer.raised_by_project(e):
            raise  # A bug, not bad input: keep the traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
