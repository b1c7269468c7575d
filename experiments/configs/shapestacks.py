"""ShapeStacks with the paper's hyperparameters (Segformer-B3, 64x64, K=6, isotropic scales).

Command (after preparing the dataset, see datasets/shapestacks/README.md):

    python -m experiments.train --config=experiments/configs/shapestacks.py \
        --workdir=workdirs/shapestacks --config.model.pretrained_encoder=PATH/TO/mit-b3

Hardware: one GPU with >= 16 GB; the paper needs 14 h (phase 1) + 6.5 h (phases 2-3) on an RTX 3090.
Paper (curriculum training, mean of 3 runs): ARI-FG 79.34, MSC-FG 77.65, mIoU 78.84, MSE 4.5.
"""

from experiments.configs import base


def get_config(arg: str = ""):
    config = base.get_config()
    config.data.name = "shapestacks"
    config.data.config = ""
    config.data.eval_split = "test"
    config.data.image_size = (64, 64)
    config.model.num_slots = 6
    config.model.isotropic = True
    return base.apply_arg(config, arg)
