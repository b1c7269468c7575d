"""Everything that can be checked before training, and the workdir's ownership of its config.

`check(config, workdir)` returns every problem it finds (an empty list when training can start): config
values, the workdir (writable, free space), a resume that would change what the checkpoints mean, the
dataset's splits and their sizes, and the pretrained weights and background checkpoint the config names.
`python -m experiments.train --dry_run` runs only it; `trainer.train_and_evaluate` runs it before phase 1.

WORKDIR/config.json is the truth about how the workdir's model was trained. When a run starts:

  * without a config.json, the config is written there;
  * otherwise the new config is compared with it key by key. Once the workdir has a checkpoint, a change of
    a key that defines the model or the data (`locked_on_resume`) is refused before anything is written;
    the other changes (step counts, learning rates, logging, checkpoint and eval settings) are accepted,
    printed and appended to WORKDIR/run_history.jsonl, and config.json is rewritten with them.

Each line of run_history.jsonl is a JSON object: time (UTC, ISO 8601), argv, event (created / resumed),
changes (a list of {key, old, new}). Lines are only ever appended.
"""

import datetime
import json
import os
import shutil
import sys

import ml_collections

from ast_seg_jax import checkpointing
from ast_seg_jax.cli import UserError

HISTORY_FILE = "run_history.jsonl"
# Predicted label maps are stored as uint8 (0 = background), which bounds the number of slots.
MAX_SLOTS = 255
MIN_IMAGE_SIDE = 16

# ---- The resume rule -------------------------------------------------------------------------------------
# A key defines the model or the data when a checkpoint means something else under another value: every
# parameter shape and architecture switch (model.*), what the images are and in which order they come
# (data.*, seed), which curriculum made the checkpoints (scenario) and which background was loaded
# (background.restore_from). All other keys (step counts, batch sizes, learning rates and their schedules,
# loss weights, logging, checkpoint and eval settings) are safe to change on resume.
LOCKED_PREFIXES = ("model.", "data.")
LOCKED_KEYS = frozenset({"seed", "scenario", "background.restore_from"})
# Under data.* but only where the same dataset is stored or which split is scored at the end.
SAFE_DATA_KEYS = frozenset({"data.data_dir", "data.manual_dir", "data.eval_split"})
# What `evaluate --config` may change: the split, where the data is, another variant of the same data.
EVAL_OVERRIDABLE = frozenset(
    {
        "data.eval_split",
        "data.data_dir",
        "data.manual_dir",
        "data.dir",
        "data.config",
        "eval_batch_size",
        "num_eval_images",
    }
)


def locked_on_resume(key: str) -> bool:
    """Whether the dotted config `key` defines the model or the data (refused as a change on resume)."""
    if key in SAFE_DATA_KEYS:
        return False
    return key in LOCKED_KEYS or key.startswith(LOCKED_PREFIXES)


def flatten(config) -> dict:
    """{dotted key: JSON value} of a ConfigDict or nested dict (tuples become lists, as in config.json)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json_best_effort())
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    visit("", config)
    return flat


_ABSENT = "(absent)"


def changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key whose value differs, in sorted key order.

    A key missing on one side (a config written by an older version) shows as "(absent)".
    """
    keys = sorted(set(saved) | set(new))
    return [
        (k, saved.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in keys
        if saved.get(k, _ABSENT) != new.get(k, _ABSENT)
    ]


def saved_config(workdir: str) -> dict | None:
    """The flat config of WORKDIR/config.json, or None when there is none."""
    path = os.path.join(workdir, checkpointing.CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return flatten(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} cannot be read ({e}); it records how the workdir's model was trained. Restore it, "
            "or use another workdir."
        ) from e


def has_checkpoints(workdir: str) -> bool:
    """Whether WORKDIR holds a checkpoint (of phase 1 or of phases 2-3) that a config change would betray."""
    for sub in (checkpointing.BACKGROUND_DIR, checkpointing.CHECKPOINT_DIR):
        directory = os.path.join(workdir, sub)
        if os.path.isdir(directory) and any(
            name.isdigit() for name in os.listdir(directory)
        ):
            return True
    return False


def _show(value) -> str:
    return json.dumps(value) if value is not _ABSENT else _ABSENT


def resume_problems(config, workdir: str) -> list[str]:
    """The refused changes of a resume: locked keys that differ from WORKDIR/config.json (with checkpoints)."""
    saved = saved_config(workdir)
    if saved is None or not has_checkpoints(workdir):
        return []
    refused = [
        (k, old, new)
        for k, old, new in changes(saved, flatten(config))
        if locked_on_resume(k) and old is not _ABSENT and new is not _ABSENT
    ]
    return [
        f"config.{k}={_show(new)} but the checkpoints in {workdir} were trained with {_show(old)}; "
        f"{k} defines the model or the data and cannot change on resume (drop the override, or train "
        "into a new workdir)."
        for k, old, new in refused
    ]


def record_start(config, workdir: str, argv=None, *, echo=print) -> list:
    """Writes WORKDIR/config.json and appends the start to run_history.jsonl; returns the accepted changes.

    Call after `check` found no problem (the refused changes are its business). The accepted changes are
    printed with `echo`.
    """
    saved = saved_config(workdir)
    new = flatten(config)
    accepted = [] if saved is None else changes(saved, new)
    for key, old, value in accepted:
        echo(
            f"config.{key} changed on resume: {_show(old)} -> {_show(value)} (recorded in "
            f"{HISTORY_FILE})."
        )
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
        "event": "created" if saved is None else "resumed",
        "changes": [
            {
                "key": k,
                "old": None if o is _ABSENT else o,
                "new": None if n is _ABSENT else n,
            }
            for k, o, n in accepted
        ],
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(entry) + "\n")
    if saved is None or accepted:
        checkpointing.write_config(workdir, config)
    return accepted


def read_history(workdir: str) -> list[dict]:
    """The entries of WORKDIR/run_history.jsonl, oldest first (none if the file does not exist)."""
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- Evaluation ------------------------------------------------------------------------------------------


def evaluation_config(
    workdir: str, override=None
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The config to evaluate WORKDIR's model with: WORKDIR/config.json, with the `EVAL_OVERRIDABLE` keys of
    `override` (a config given to `evaluate --config`) applied.

    Returns:
      (config, the overridden keys).

    Raises:
      UserError: `override` differs from the workdir's config in a key that defines the model or the data.
    """
    trained = checkpointing.read_config(workdir)
    if override is None:
        return trained, []
    saved, wanted = flatten(trained), flatten(override)
    applied, refused = [], []
    for key, old, new in changes(saved, wanted):
        if new is _ABSENT or old is _ABSENT:
            continue
        if key in EVAL_OVERRIDABLE:
            applied.append((key, new))
        elif locked_on_resume(key):
            refused.append(
                f"config.{key}={_show(new)} but the model in {workdir} was trained with {_show(old)}"
            )
    if refused:
        raise UserError(
            "evaluate builds the model from WORKDIR/config.json; --config may only change "
            f"{', '.join(sorted(EVAL_OVERRIDABLE))}. Refused: "
            + "; ".join(refused)
            + "."
        )
    values = trained.to_dict()
    for key, new in applied:
        node = values
        *path, last = key.split(".")
        for name in path:
            node = node[name]
        node[last] = new
    if "image_size" in values.get("data", {}):
        values["data"]["image_size"] = tuple(values["data"]["image_size"])
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config, [k for k, _ in applied]


# ---- The checks ------------------------------------------------------------------------------------------


def config_problems(config, num_devices: int = 1) -> list[str]:
    """Config values that cannot work (alone or together), each naming its key."""
    from ast_seg_jax import curriculum
    from ast_seg_jax.models.glimpse import GLIMPSE_SIZES

    problems = []
    try:
        curriculum.check_scenario(config)
    except ValueError as e:
        problems.append(str(e))
    pretraining = (
        curriculum.needs_background_pretraining(config)
        and config.background.num_train_steps > 0
        and not config.background.restore_from
    )
    batch_keys = ["batch_size", "eval_batch_size"]
    if pretraining:
        batch_keys.append("background.batch_size")
    for key in batch_keys:
        value = _value(config, key)
        if not isinstance(value, int) or value <= 0:
            problems.append(f"config.{key}={value!r} must be a positive integer.")
        elif value % num_devices:
            problems.append(
                f"config.{key}={value} is not divisible by the {num_devices} devices."
            )
    for key in ("num_train_steps",):
        if _value(config, key) < 1:
            problems.append(f"config.{key}={_value(config, key)} must be at least 1.")
    for key in (
        "background.num_train_steps",
        "freeze_background_steps",
        "warmup_steps",
        "pixel_entropy_warmup_steps",
    ):
        if _value(config, key) < 0:
            problems.append(f"config.{key}={_value(config, key)} must not be negative.")
    if config.max_checkpoints_to_keep < 1:
        problems.append(
            f"config.max_checkpoints_to_keep={config.max_checkpoints_to_keep} must be at least 1."
        )
    if config.num_eval_images == 0 or config.num_eval_images < -1:
        problems.append(
            f"config.num_eval_images={config.num_eval_images}: use -1 (all) or a positive number."
        )
    size = config.data.image_size
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) for s in size)
    ):
        problems.append(f"config.data.image_size={size!r} must be (height, width).")
    elif min(size) < MIN_IMAGE_SIDE:
        problems.append(
            f"config.data.image_size={tuple(size)} is too small: the Segformer, the background "
            f"autoencoder and the glimpse renderer need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}."
        )
    if config.model.glimpse_size not in (0, *GLIMPSE_SIZES):
        problems.append(
            f"config.model.glimpse_size={config.model.glimpse_size}: the glimpse generator makes "
            f"glimpses of {', '.join(map(str, GLIMPSE_SIZES))} pixels (0 picks one from the image size)."
        )
    if not 1 <= config.model.num_slots <= MAX_SLOTS:
        problems.append(
            f"config.model.num_slots={config.model.num_slots}: label maps are uint8 (0 = background), "
            f"so K must lie in [1, {MAX_SLOTS}]."
        )
    return problems


def _value(config, key: str):
    node = config
    for name in key.split("."):
        node = node[name]
    return node


def workdir_problems(workdir: str, min_free_bytes: int) -> list[str]:
    """The workdir (or, when it does not exist yet, its nearest existing parent) must be a writable
    folder with `min_free_bytes` free. Nothing is created."""
    if not workdir:
        return ["--workdir is empty."]
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [
            f"The workdir {workdir!r} cannot be written: {existing} is a file, not a folder."
        ]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"The workdir {workdir!r} cannot be written: no write permission on {existing}."
        ]
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        return [
            (
                f"The workdir {workdir!r} is on a filesystem with {free / 2**20:.0f} MiB free; "
                f"training needs at least {min_free_bytes / 2**20:.0f} MiB (checkpoints, logs). "
                "Free some space or choose another workdir."
            )
        ]
    return []


def data_problems(
    config, process_count: int = 1, keys=("train_split", "eval_split")
) -> list[str]:
    """The splits named by config.data[key] for `keys` must exist, be readable and hold enough examples."""
    from ast_seg_jax import input_pipeline

    data = config.data
    problems = []
    if data.name != "folder":
        try:
            builder = input_pipeline.builder_for(data.name, data.config, data.data_dir)
        except ValueError as e:
            return [str(e)]
        if not builder.is_prepared() and (data.name == "shapes" or data.manual_dir):
            return []  # Prepared on first use (from manual_dir for the downloaded ones).
        try:
            input_pipeline.get_builder(data)
        except (ValueError, OSError) as e:
            return [str(e)]
        stored = tuple(builder.info.features["image"].shape[:2])
        if tuple(data.image_size) != stored:
            problems.append(
                f"config.data.image_size={tuple(data.image_size)} but {builder.name}/"
                f"{builder.builder_config.name} is stored at {stored}; set image_size={stored}."
            )
    for key in keys:
        split = data[key]
        try:
            n = input_pipeline.num_examples(data, split)
        except (ValueError, OSError) as e:
            problems.append(f"config.data.{key}={split!r}: {e}")
            continue
        if n < process_count:
            problems.append(
                f"config.data.{key}={split!r} has {n} examples: too few for {process_count} processes."
            )
    return problems


def pretrained_problems(config) -> list[str]:
    """The pretrained encoder must load and fit the model; a background to restore must exist."""
    problems = []
    encoder = config.model.pretrained_encoder
    if encoder:
        if config.model.feature_generator != "segformer":
            problems.append(
                "config.model.pretrained_encoder needs config.model.feature_generator='segformer'."
            )
        else:
            from ast_seg_jax import pretrained
            from ast_seg_jax.models.build import segformer_config_for

            try:
                pretrained.load_hf_encoder_params(
                    encoder, segformer_config_for(config.model)
                )
            except Exception as e:  # noqa: BLE001  (safetensors and torch raise their own types)
                problems.append(
                    f"config.model.pretrained_encoder={encoder!r} cannot be used: {e}"
                )
    restore = config.background.restore_from
    if restore:
        directory = restore
        if os.path.isdir(os.path.join(restore, checkpointing.BACKGROUND_DIR)):
            directory = os.path.join(restore, checkpointing.BACKGROUND_DIR)
        if not os.path.isdir(directory) or not any(
            n.isdigit() for n in os.listdir(directory)
        ):
            problems.append(
                f"config.background.restore_from={restore!r} holds no background checkpoint; point it at "
                "the 'background' folder of a run whose phase 1 finished, or leave it empty."
            )
    return problems


def check(config, workdir: str, *, num_devices: int | None = None) -> list[str]:
    """Every problem that can be found before training (see the module docstring); [] when none."""
    import jax

    from ast_seg_jax import trainer  # Here: trainer imports this module.

    num_devices = jax.device_count() if num_devices is None else num_devices
    problems = workdir_problems(workdir, trainer.MIN_FREE_BYTES)
    problems += config_problems(config, num_devices)
    try:
        problems += resume_problems(config, workdir)
    except UserError as e:
        problems.append(str(e))
    problems += data_problems(config, jax.process_count())
    problems += pretrained_problems(config)
    return problems


class PreflightError(UserError):
    """The problems `check` found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(problems) == 1:
            text = problems[0]
        else:
            text = f"{len(problems)} problems found before training:\n" + "\n".join(
                f"- {p}" for p in problems
            )
        super().__init__(text)
