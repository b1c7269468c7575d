"""Evaluates a trained model on a dataset split and prints the paper's table row.

    python -m experiments.evaluate --workdir=workdirs/clevrtex [--split=test] [--step=N]
    python -m experiments.evaluate --workdir=workdirs/clevrtex \
        --config=experiments/configs/clevrtex.py --config.data.config=outd

The model and the data come from WORKDIR/config.json (how the model was trained). `--config` is only an
explicit override of the evaluation data: its data.eval_split, data.data_dir, data.manual_dir, data.dir,
data.config, eval_batch_size and num_eval_images replace the workdir's; a difference in a key that defines
the model or the data (model.*, data.name, data.image_size, ...) is refused, and keys that only matter to
training are ignored.

Writes WORKDIR/eval/<split>/metrics.json (keys miou, miou_all, ari_fg, msc_fg, mse, num_images) and
samples.png. Evaluated on other data (another data.config such as clevrtex outd / camo, or another
data.dir) the results go to WORKDIR/eval/<config or folder name>_<split>/, so the training run's own
results are never overwritten by another dataset's.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Optional: a config whose eval data settings override the workdir's (see the module docstring).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
_SPLIT = flags.DEFINE_string(
    "split", "", "Split to evaluate (default: the config's data.eval_split)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def results_tag(config, trained, split: str) -> str:
    """The results folder under WORKDIR/eval: the split, prefixed by the data variant when it is not the
    training data's."""
    if config.data.config and config.data.config != trained.data.config:
        return f"{config.data.config}_{split}"
    if config.data.get("dir", "") != trained.data.get("dir", ""):
        return f"{os.path.basename(os.path.normpath(config.data.dir))}_{split}"
    return split


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    cli.quiet_third_party_logs()
    cli.enable_compilation_cache()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from ast_seg_jax import checkpointing, evaluator, preflight, trainer
    from ast_seg_jax.models.build import build_model

    workdir = _WORKDIR.value
    trained = checkpointing.read_config(workdir)
    config, overridden = preflight.evaluation_config(workdir, _CONFIG.value)
    if overridden:
        print(f"Evaluating with --config's {', '.join(overridden)}.", flush=True)
    if _SPLIT.value:
        config.data.eval_split = _SPLIT.value
    split = config.data.eval_split
    tag = results_tag(config, trained, split)
    variables, step = checkpointing.load_model_variables(workdir, _STEP.value)
    mesh = trainer.create_mesh()
    problems = preflight.config_problems(config, mesh.size)
    problems += preflight.data_problems(config, keys=("eval_split",))
    if problems:
        raise preflight.PreflightError(problems)
    model = build_model(config.model, tuple(config.data.image_size))
    print(
        f"Evaluating checkpoint {step} on {split}: compiling the evaluation step first (can take a "
        "minute) ...",
        flush=True,
    )
    means = evaluator.evaluate_and_write(
        config, workdir, model, variables, mesh, split=split, tag=tag
    )
    logging.info("Checkpoint step %d: %s", step, means)
    print(f"Checkpoint step {step}; results in {os.path.join(workdir, 'eval', tag)}")


if __name__ == "__main__":
    cli.run(main)
