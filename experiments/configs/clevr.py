"""CLEVR (with masks) with the paper's hyperparameters (Segformer-B3, 128x128, K=10, isotropic scales).

Command (after preparing the dataset, see datasets/multi_object/README.md):

    python -m experiments.train --config=experiments/configs/clevr.py --workdir=workdirs/clevr \
        --config.model.pretrained_encoder=PATH/TO/mit-b3

Hardware: one GPU with >= 24 GB; the paper needs 20 min (phase 1) + 12 h (phases 2-3) on an RTX 3090.
Phase 1 is short (2,500 steps) and uses the simple background model: CLEVR's background is fixed.
Paper (curriculum training, mean of 3 runs): mIoU 90.27, ARI-FG 98.26, MSE 16.
"""

from experiments.configs import base


def get_config(arg: str = ""):
    config = base.get_config()
    config.data.name = "clevr"
    config.data.config = "clevr_with_masks"
    config.data.image_size = (128, 128)
    config.model.num_slots = 10
    config.model.isotropic = True
    config.model.background_complexity = False
    config.background.num_train_steps = 2_500
    return base.apply_arg(config, arg)
