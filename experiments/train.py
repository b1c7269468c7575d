"""Runs the whole AST curriculum for a config, resuming where a previous run in WORKDIR stopped.

    python -m experiments.train --config=experiments/configs/shapes.py --workdir=workdirs/shapes \
        [--config.key=value ...]

Rerunning the same command after a crash, a kill or a preemption resumes from the latest complete
checkpoint. SIGTERM or Ctrl-C saves the current step and exits with status 128 + signal number
(143 or 130). Multi-host: start one process per host with `--distributed` (the coordinator comes from
the cluster environment), or give it explicitly:

    python -m experiments.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
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
    "Call jax.distributed.initialize() first (multi-host; the coordinator comes from the environment "
    "unless --coordinator_address is given).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for jax.distributed.initialize (implies --distributed).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0..num_processes-1."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # Unused.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        # Progress lines are printed; --verbosity=0 for INFO logs.
        logging.set_verbosity(logging.WARNING)
    import jax

    if _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    import tensorflow as tf

    # TF only feeds data; the accelerators are JAX's.
    tf.config.set_visible_devices([], "GPU")
    from ast_seg_jax import trainer

    logging.info("Config:\n%s", _CONFIG.value)
    if jax.process_index() == 0:
        print(f"Training {_CONFIG.value.data.name} into {_WORKDIR.value}", flush=True)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (ValueError, FileNotFoundError, OSError) as e:
        if not trainer.raised_by_project(e):
            raise  # A bug, not bad input: keep the traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
