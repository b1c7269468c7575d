"""Runs the whole AST curriculum for a config, resuming where a previous run in WORKDIR stopped.

    python -m experiments.train --config=experiments/configs/shapes.py --workdir=workdirs/shapes \
        [--config.key=value ...]

Rerunning the same command after a crash, a kill or a preemption resumes from the latest complete
checkpoint. SIGTERM or Ctrl-C saves the current step and exits with status 128 + signal number
(143 or 130). Multi-host: start one process per host with `--distributed` (the coordinator comes from
the cluster environment), or give it explicitly:

    python -m experiments.train ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

WORKDIR/config.json records how the workdir's model is trained. A rerun may change the safe keys (step
counts, learning rates, logging, checkpoint and eval settings): the changes are printed and appended to
WORKDIR/run_history.jsonl. A change of the model or the data is refused before anything is written.
`--dry_run` runs every check that can be done before training (config, workdir, resume, dataset splits,
pretrained weights) and prints "all checks passed" or the problems (exit status 0 or 2). Bad input is
reported in one paragraph with exit status 2 (`--debug` shows the traceback).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, experiments/configs/<name>.py[:tiny]; override keys with --config.KEY=VALUE.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and results go (rerun with it to resume)."
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Only run the pre-flight checks (config, workdir, resume, data, pretrained weights) and exit.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host; coordinator from the environment).",
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
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    # Progress lines are printed; --verbosity=0 shows the INFO logs too.
    cli.quiet_third_party_logs()
    import jax

    cli.enable_compilation_cache()

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
    from ast_seg_jax import preflight, trainer

    logging.info("Config:\n%s", _CONFIG.value)
    if _DRY_RUN.value:
        problems = preflight.check(_CONFIG.value, _WORKDIR.value)
        if problems:
            raise preflight.PreflightError(problems)
        saved = preflight.saved_config(_WORKDIR.value)
        if saved is not None:
            new_config = preflight.flatten(_CONFIG.value)
            for key, old, new in preflight.changes(saved, new_config):
                print(f"a run would record the change config.{key}: {old!r} -> {new!r}")
        print("all checks passed", flush=True)
        return
    if jax.process_index() == 0:
        print(f"Training {_CONFIG.value.data.name} into {_WORKDIR.value}", flush=True)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    cli.run(main)
