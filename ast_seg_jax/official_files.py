"""Reading the official AST code's checkpoint files and writing them as a workdir of this project.

The command-line front end is ``experiments/import_official.py`` (its docstring describes the files);
this module holds the work so that it can be used and tested without the launcher's flags. torch is
imported only to read the ``.pth`` files.
"""

import os

from ast_seg_jax.cli import UserError

FOREGROUND_KEYS = ("encoder_state_dict", "generator_state_dict")
FINE_TUNED_BACKGROUND_KEYS = (
    "background_encoder_state_dict",
    "background_generator_state_dict",
)
BACKGROUND_KEYS = ("encoder_state_dict", "generator_state_dict")


class CheckpointImportError(UserError):
    """A checkpoint file that cannot be imported (reported without a traceback)."""


def read_torch_file(path: str) -> dict:
    """The dict stored in an official .pth file, tensors as they are."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointImportError(
            "Reading the official .pth checkpoints needs PyTorch, which is not installed; "
            "install it (e.g. `pip install torch`, the CPU build is enough) and run the command "
            "again. Only this import command needs torch."
        ) from e
    if not os.path.isfile(path):
        raise CheckpointImportError(f"No checkpoint file at {path!r}.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # Not a torch file, or a pickle of something else.
        raise CheckpointImportError(
            f"{path!r} is not a PyTorch checkpoint file: {e}"
        ) from e
    if not isinstance(content, dict):
        raise CheckpointImportError(
            f"{path!r} holds a {type(content).__name__}, not the dict of an official checkpoint."
        )
    return content


def _numpy_state(state: dict) -> dict:
    import numpy as np

    return {k: np.asarray(v.detach().cpu().float().numpy()) for k, v in state.items()}


def _entries(content: dict, keys: tuple, path: str, what: str) -> list[dict]:
    missing = [k for k in keys if k not in content]
    if missing:
        raise CheckpointImportError(
            f"{path!r} is not an official {what} checkpoint: it has no {missing} "
            f"(its keys: {sorted(content)})."
        )
    return [_numpy_state(content[k]) for k in keys]


def official_state_dicts(foreground_path: str, background_path: str | None):
    """(foreground, background, trainer step or None, where the background came from)."""
    content = read_torch_file(foreground_path)
    encoder, renderer = _entries(
        content, FOREGROUND_KEYS, foreground_path, "foreground"
    )
    foreground = {**encoder, **renderer}
    step = None
    trainer_state = content.get("trainer_state_dict")
    if isinstance(trainer_state, dict) and isinstance(trainer_state.get("step"), int):
        step = trainer_state["step"]
    if all(k in content for k in FINE_TUNED_BACKGROUND_KEYS):
        be, bg = _entries(
            content, FINE_TUNED_BACKGROUND_KEYS, foreground_path, "foreground"
        )
        origin = f"the fine-tuned background weights in {foreground_path}"
        if background_path:
            origin += f" (not {background_path})"
    elif background_path:
        be, bg = _entries(
            read_torch_file(background_path),
            BACKGROUND_KEYS,
            background_path,
            "background",
        )
        origin = background_path
    else:
        raise CheckpointImportError(
            f"{foreground_path!r} holds no background weights (saved before phase 3, or a "
            "frozen-background run): pass the AE-NE checkpoint with --background=model_final.pth."
        )
    return foreground, {**be, **bg}, step, origin


def import_official(
    config, foreground_path: str, background_path: str | None, workdir: str, step=None
) -> int:
    """Converts the official files and writes the workdir; returns the recorded step."""
    import jax

    from ast_seg_jax import checkpointing, optim, train_state
    from ast_seg_jax.official import load_official

    foreground, background, official_step, origin = official_state_dicts(
        foreground_path, background_path
    )
    directory = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    if os.path.isdir(directory) and os.listdir(directory):
        raise CheckpointImportError(
            f"{directory!r} already holds checkpoints; import into a new workdir."
        )
    try:
        variables = load_official(foreground, background, config)
    except ValueError as e:
        hint = ""
        if "background state dict" in str(e):
            hint = (
                " (the background schedule follows config.model.background_complexity; the "
                "official code stored that flag inconsistently, try the other value)"
            )
        raise CheckpointImportError(f"{e}{hint}") from e
    if step is None:
        step = official_step if official_step is not None else config.num_train_steps
    rng = jax.random.PRNGKey(config.seed)
    # The same trees the trainer creates (create_foreground_state / train_background).
    state = train_state.create(
        variables["params"],
        variables["batch_stats"],
        optim.foreground_optimizer(config),
        jax.random.fold_in(rng, 1),
    ).replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    background_state = train_state.create(
        variables["params"]["background_model"],
        {},
        optim.background_optimizer(config),
        rng,
    ).replace(
        step=jax.numpy.asarray(config.background.num_train_steps, jax.numpy.int32)
    )
    checkpointing.write_config(workdir, config)
    for sub, item in (
        (checkpointing.CHECKPOINT_DIR, state),
        (checkpointing.BACKGROUND_DIR, background_state),
    ):
        mngr = checkpointing.manager(os.path.join(workdir, sub), 1)
        checkpointing.save(mngr, item)
        mngr.wait_until_finished()
        mngr.close()
    print(
        f"Imported {foreground_path} (step {step}) with the background from {origin} "
        f"into {workdir}."
    )
    return step
