"""Segments your own images with a trained model.

    python -m experiments.segment --workdir=workdirs/shapes --input=IMAGE_OR_FOLDER --output=OUT_DIR \
        [--save_latents] [--step=N]

For each image NAME it writes OUT_DIR/NAME_labels.png (label map, 0 = background, k = slot k),
OUT_DIR/NAME_overlay.png (colour overlay) and OUT_DIR/NAME_objects.json (one entry per slot: position,
glimpse size, activation, bounding box, pixel area, visible); with --save_latents also OUT_DIR/NAME_latents.npz
(z_what, xy, scale, activation_logit). The model comes from WORKDIR/config.json. Images are decoded as the
folder dataset decodes training images (16-bit greyscale scaled by 1/257; palette, greyscale and RGBA to
RGB). A file that cannot be read, has an unsupported mode or is over --max_image_side pixels on a side
(unless --downscale_large_images) is reported by name and skipped; the command goes on with the others,
lists the failures at the end and exits with status 1. Bad flags or workdirs: one paragraph, status 2.
"""

import json
import os
import sys

from absl import flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")
from ast_seg_jax.image_io import MAX_IMAGE_SIDE

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_INPUT = flags.DEFINE_string("input", None, "An image file or a folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (created if needed).")
_SAVE_LATENTS = flags.DEFINE_bool(
    "save_latents", False, "Also write the object latents (.npz)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MAX_SIDE = flags.DEFINE_integer(
    "max_image_side", MAX_IMAGE_SIDE, "Images larger than this on a side are refused."
)
_DOWNSCALE = flags.DEFINE_bool(
    "downscale_large_images",
    False,
    "Shrink images over --max_image_side to fit instead of refusing them.",
)
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    cli.quiet_third_party_logs()
    cli.enable_compilation_cache()
    import numpy as np
    from PIL import Image

    from ast_seg_jax import checkpointing, image_io, inference, visualize
    from ast_seg_jax.models.build import build_model

    config = checkpointing.read_config(_WORKDIR.value)
    files = inference.list_images(_INPUT.value)
    variables, step = checkpointing.load_model_variables(_WORKDIR.value, _STEP.value)
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
            image = inference.load_image(
                path, max_side=_MAX_SIDE.value, downscale=_DOWNSCALE.value
            )
        except image_io.ImageError as e:
            print(f"[{i + 1}/{len(files)}] skipped: {e}", file=sys.stderr, flush=True)
            failed.append((path, str(e)))
            continue
        if len(failed) == i:  # The first image that decoded: the model compiles now.
            print(
                "compiling the model (first image; can take a minute) ...", flush=True
            )
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
        print(f"[{i + 1}/{len(files)}] {path}: {visible} objects", flush=True)
    print(
        f"Segmented {len(files) - len(failed)} of {len(files)} images into {_OUTPUT.value}."
    )
    if failed:
        print(f"{len(failed)} file(s) failed:", file=sys.stderr)
        for path, reason in failed:
            print(f"  {reason}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
