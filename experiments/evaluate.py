"""Evaluates a trained model on a dataset split and prints the paper's table row.

    python -m experiments.evaluate --config=experiments/configs/clevrtex.py --workdir=workdirs/clevrtex \
        [--split=test] [--step=N] [--config.data.config=outd]

Writes WORKDIR/eval/<split>/metrics.json (keys miou, miou_all, ari_fg, msc_fg, mse, num_images) and
samples.png. With a non-default data config (e.g. clevrtex outd / camo) the results go to
WORKDIR/eval/<config>_<split>/.
"""

import json
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
    import jax
    from ast_seg_jax.models.build import build_model

    from ast_seg_jax import checkpointing, evaluator, trainer, visualize

    config, workdir = _CONFIG.value, _WORKDIR.value
    split = _SPLIT.value or config.data.eval_split
    try:
        variables, step = checkpointing.load_model_variables(workdir, _STEP.value)
        mesh = trainer.create_mesh()
        trainer.check_config(config, mesh.size)
        model = build_model(config.model, tuple(config.data.image_size))
        means, _ = evaluator.evaluate(
            model,
            variables,
            config.data,
            split=split,
            batch_size=config.eval_batch_size,
            num_slots=config.model.num_slots,
            mesh=mesh,
            max_images=config.num_eval_images,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    means["step"] = step
    name = config.data.name + (f"/{config.data.config}" if config.data.config else "")
    print(evaluator.format_table(means, name))
    if jax.process_index() == 0:
        tag = split
        if (
            config.data.config
            and config.data.config != checkpointing.read_config(workdir).data.config
        ):
            tag = f"{config.data.config}_{split}"
        out_dir = os.path.join(workdir, "eval", tag)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(means, f, indent=2)
        from ast_seg_jax import input_pipeline

        batch = next(
            iter(
                input_pipeline.create_eval_iterator(
                    config.data, split=split, global_batch_size=config.eval_batch_size
                )
            )
        )
        figure = visualize.sample_figure(
            evaluator.visual_sample(
                model, variables, {k: v[:6] for k, v in batch.items()}
            )
        )
        visualize.save_png(os.path.join(out_dir, "samples.png"), figure)
        logging.info("Wrote %s", out_dir)


if __name__ == "__main__":
    app.run(main)
