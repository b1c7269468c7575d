"""Your own images: DIR/train/images/*.png|jpg, DIR/test/images/*, optional DIR/{train,test}/masks/<stem>.png.

Command:

    python -m experiments.train --config=experiments/configs/folder.py --workdir=workdirs/mine \
        --config.data.dir=DIR [--config.data.image_size="(128, 128)"] [--config.model.num_slots=6]

Images are resized (and centre-cropped to the aspect ratio) to `data.image_size`. Masks, when present, are used
only for evaluation. Start from the paper's synthetic-data settings (below); for a fixed camera (a video's
frames) the background model needs far fewer steps (the official guidance: 2,500 for a fixed background,
10,000 with illumination changes, >= 24,000 for a moving camera).
Hardware: one GPU; the time depends on the number of steps.
"""

from experiments.configs import base


def get_config(arg: str = ""):
    config = base.get_config()
    config.data.name = "folder"
    config.data.config = ""
    config.data.image_size = (128, 128)
    config.model.num_slots = 6
    config.background.num_train_steps = 10_000
    return base.apply_arg(config, arg)
