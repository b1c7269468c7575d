"""Turns checkpoints of the official PyTorch AST code into a workdir of this project.

    python -m experiments.import_official --config=experiments/configs/clevrtex.py \
        --foreground=PATH/checkpoint_final_N_epochs.pth [--background=PATH/model_final.pth] \
        --workdir=workdirs/clevrtex_official [--step=N] [--config.model.KEY=VALUE ...]

``--foreground`` is a file written by the official ``MF_train.py`` (``checkpoint_final_*_epochs.pth``
or ``checkpoint_{0,1}.pth``): it holds ``encoder_state_dict`` and ``generator_state_dict`` and, when
the background model was fine-tuned with the foreground (phase 3 of the curriculum, or the baseline
scenario), ``background_encoder_state_dict`` and ``background_generator_state_dict``. Those fine-tuned
background weights are the ones the official evaluation uses, so they are taken when present.
``--background`` is the AE-NE file of the official ``background/train.py`` (``model_final.pth``, with
``encoder_state_dict`` and ``generator_state_dict``); it is needed only when the foreground file has
no background weights (a checkpoint saved during phase 2, or the frozen-background scenario).

``--config`` must describe the official run's architecture (image size, number of slots, isotropic
scaling, feature generator and Segformer variant, background complexity); the dataset configs do for
the paper's runs (the official CLEVR background may need ``--config.model.background_complexity``
flipped: the official code stored that flag inconsistently). A mismatch is reported with the key and
both shapes.

The workdir gets ``config.json``, the model as a phase 2-3 checkpoint (``checkpoints/<step>``, the
step the official trainer had reached, or ``--step``) and the background weights as a finished phase-1
checkpoint (``background/<config.background.num_train_steps>``), so that ``experiments.evaluate``,
``experiments.segment`` and ``experiments.train`` (fine-tuning, with ``--config.num_train_steps``
above the imported step) use it as they use a workdir of their own. The optimiser state is not
imported: Adam starts with zero moments, as after the official phase-3 switch.

torch is needed only by this command (to read the .pth files).
"""

from absl import flags
from ml_collections import config_flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file describing the official run.", lock_config=True
)
_FOREGROUND = flags.DEFINE_string(
    "foreground", None, "Official foreground checkpoint (.pth) written by MF_train.py."
)
_BACKGROUND = flags.DEFINE_string(
    "background",
    None,
    "Official AE-NE background checkpoint (model_final.pth); needed when the foreground file "
    "has no background weights.",
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to create.")
_STEP = flags.DEFINE_integer(
    "step",
    None,
    "Step to record (default: the official trainer's step, else config.num_train_steps).",
)
flags.mark_flags_as_required(["config", "foreground", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    cli.quiet_third_party_logs()
    from ast_seg_jax import official_files

    official_files.import_official(
        _CONFIG.value,
        _FOREGROUND.value,
        _BACKGROUND.value,
        _WORKDIR.value,
        _STEP.value,
    )


if __name__ == "__main__":
    cli.run(main)
