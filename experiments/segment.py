"""Segments your own images with a trained model.

    python -m experiments.segment --workdir=workdirs/shapes --input=IMAGE_OR_FOLDER --output=OUT_DIR \
        [--save_latents] [--step=N]

For each image NAME it writes OUT_DIR/NAME_labels.png (label map, 0 = background, k = slot k),
OUT_DIR/NAME_overlay.png (colour overlay) and OUT_DIR/NAME_objects.json (one entry per slot: position,
glimpse size, activation, bounding box, pixel area, visible); with --save_latents also OUT_DIR/NAME_latents.npz
(z_what, xy, scale, activation_logit). A file that cannot be read is reported and skipped; the command then
exits with status 1 after processing the others.
"""

import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_INPUT = flags.DEFINE_string("input", None, "An image file or a folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.")
_SAVE_LATENTS = flags.DEFINE_bool(
    "save_latents", False, "Also write the object latents (.npz)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
    del argv  # Unused.
    import numpy as np
    from PIL import Image

    from ast_seg_jax import checkpointing, inference, visualize
    from ast_seg_jax.models.build import build_model

    try:
        config = checkpointing.read_config(_WORKDIR.value)
        variables, step = checkpointing.load_model_variables(
            _WORKDIR.value, _STEP.value
        )
        files = inference.list_images(_INPUT.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    image_hw = tuple(config.data.image_size)
    segmenter = inference.Segmenter(
        build_model(config.model, image_hw), variables, image_hw
    )
    os.makedirs(_OUTPUT.value, exist_ok=True)
    failed = []
    num_colors = config.model.num_slots + 1
    for i, path in enumerate(files):
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            image = inference.load_image(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(path)
            continue
        result = segmenter(image)
        base = os.path.join(_OUTPUT.value, stem)
        Image.fromarray(result["labels"]).save(base + "_labels.png")
        visualize.save_png(
            base + "_overlay.png",
            visualize.overlay(image, result["labels"], num_colors=num_colors),
        )
        with open(base + "_objects.json", "w") as f:
            json.dump(
                {"image": path, "checkpoint_step": step, "objects": result["objects"]},
                f,
                indent=2,
            )
        if _SAVE_LATENTS.value:
            np.savez(
                base + "_latents.npz",
                **{k: result[k] for k in ("z_what", "xy", "scale", "activation_logit")},
            )
        visible = sum(o["visible"] for o in result["objects"])
        print(f"[{i + 1}/{len(files)}] {path}: {visible} objects")
    print(
        f"Segmented {len(files) - len(failed)} of {len(files)} images into {_OUTPUT.value}."
    )
    if failed:
        print(f"{len(failed)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
