r"""Prepares a dataset as a standard TFDS directory (no `tfds` CLI / apache_beam needed).

Usage:
    python -m experiments.prepare_data --dataset=shapes/default
    python -m experiments.prepare_data --dataset=clevrtex/full --manual_dir=~/downloads/clevrtex
    python -m experiments.prepare_data --dataset=objects_room --manual_dir=DIR --data_dir=~/tfds
    python -m experiments.prepare_data --dataset=shapes/default --export_images=shapes_test --num_images=8

NAME is one of shapes, clevrtex, clevr, objects_room, shapestacks; CONFIG is the builder config (shapes:
default / default_128 / textured / textured_128 / tiny; clevrtex: full / outd / camo). TFDS shows a progress
bar per split. The result can be read with `tfds.builder_from_directory(DATA_DIR/<builder>/<config>/1.0.0)`.
With --export_images=DIR it also writes the first --num_images images of --split as PNG files into DIR, for
trying `experiments.segment` on them. Bad input (an unknown dataset or config, raw files missing from
--manual_dir) is reported in one paragraph with exit status 2 (`--debug` shows the traceback).
"""

import os

from absl import flags

from ast_seg_jax import cli

# --help lists --debug and --verbosity too.
flags.adopt_module_key_flags(cli)
flags.declare_key_flag("verbosity")

_DATASET = flags.DEFINE_string(
    "dataset", "shapes/default", "NAME[/CONFIG] of the dataset to prepare."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "Folder holding the downloaded raw files."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "TFDS data dir ('' = TFDS default, ~/tensorflow_datasets)."
)
_EXPORT_IMAGES = flags.DEFINE_string(
    "export_images",
    "",
    "Also write the first --num_images images of --split as PNGs here.",
)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Number of images to export.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to export images from.")


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(
            f"unexpected arguments {argv[1:]}; flags are written --name=value (--help lists them)."
        )
    cli.quiet_third_party_logs()
    if _NUM_IMAGES.value <= 0:
        raise cli.UserError(f"--num_images={_NUM_IMAGES.value} must be positive.")
    import ml_collections
    import tensorflow_datasets as tfds

    from ast_seg_jax import input_pipeline

    name, _, config = _DATASET.value.partition("/")
    tfds.display_progress_bar(True)
    builder = input_pipeline.prepare(
        name,
        config,
        os.path.expanduser(_DATA_DIR.value),
        os.path.expanduser(_MANUAL_DIR.value),
    )
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} examples")
    print(
        f"Prepared {builder.name}/{builder.builder_config.name} in {builder.data_dir}"
    )
    if _EXPORT_IMAGES.value:
        data_config = ml_collections.ConfigDict(
            {
                "name": name,
                "config": config,
                "data_dir": os.path.expanduser(_DATA_DIR.value),
            }
        )
        paths = input_pipeline.export_images(
            data_config,
            os.path.expanduser(_EXPORT_IMAGES.value),
            split=_SPLIT.value,
            num=_NUM_IMAGES.value,
        )
        print(f"Wrote {len(paths)} {_SPLIT.value} images to {_EXPORT_IMAGES.value}")


if __name__ == "__main__":
    cli.run(main)
