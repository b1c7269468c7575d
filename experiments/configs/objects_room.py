"""ObjectsRoom with the paper's hyperparameters (Segformer-B3, 64x64, K=3, anisotropic scales).

Command (after preparing the dataset, see datasets/multi_object/README.md):

    python -m experiments.train --config=experiments/configs/objects_room.py \
        --workdir=workdirs/objects_room --config.model.pretrained_encoder=PATH/TO/mit-b3

Hardware: one GPU with >= 16 GB; the paper needs 15 h (phase 1) + 6.5 h (phases 2-3) on an RTX 3090.
Paper (curriculum training, mean of 3 runs): ARI-FG 87.23, MSC-FG 82.22, mIoU 85.02, MSE 6.7.
"""

from experiments.configs import base


def get_config(arg: str = ""):
    config = base.get_config()
    config.data.name = "objects_room"
    config.data.config = "objects_room"
    config.data.image_size = (64, 64)
    config.model.num_slots = 3
    config.model.isotropic = False
    return base.apply_arg(config, arg)
