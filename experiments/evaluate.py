"""Evaluates a trained model on a dataset split and prints the paper's table row.

    python -m experiments.evaluate --config=experiments/configs/clevrtex.py --workdir=workdirs/clevrtex \
        [--split=test] [--step=N] [--config.data.config=outd]

Writes WORKDIR/eval/<split>/metrics.json (keys miou, miou_all, ari_fg, msc_fg, mse, num_images) and
samples.png. With a non-default data config (e.g. clevrtex outd / camo) the results go to
WORKDIR/eval/<config>_<split>/.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
_SPLIT = flags.DEFINE_string(
    "split", "", "Split to evaluate (default: config.data.eval_split)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # Unused.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from ast_seg_jax import checkpointing, evaluator, trainer
    from ast_seg_jax.models.build import build_model

    config, workdir = _CONFIG.value, _WORKDIR.value
    split = _SPLIT.value or config.data.eval_split
    try:
        variables, step = checkpointing.load_model_variables(workdir, _STEP.value)
        trained = checkpointing.read_config(workdir)
        # Another variant of the training data (e.g. clevrtex outd / camo) gets its own results folder.
        tag = split
        if config.data.config and config.data.config != trained.data.config:
            tag = f"{config.data.config}_{split}"
        mesh = trainer.create_mesh()
        trainer.check_config(config, mesh.size)
        model = build_model(config.model, tuple(config.data.image_size))
        means = evaluator.evaluate_and_write(
            config, workdir, model, variables, mesh, split=split, tag=tag
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        if not trainer.raised_by_project(e):
            raise  # A bug, not bad input: keep the traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("Checkpoint step %d: %s", step, means)


if __name__ == "__main__":
    app.run(main)
