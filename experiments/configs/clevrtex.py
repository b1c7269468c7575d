"""CLEVRTEX with the paper's hyperparameters (Segformer-B3, 128x128, K=10, anisotropic scales).

Command (after preparing the dataset, see datasets/clevrtex/README.md):

    python -m experiments.train --config=experiments/configs/clevrtex.py --workdir=workdirs/clevrtex \
        --config.model.pretrained_encoder=PATH/TO/mit-b3

Evaluate the same model on the OOD and CAMO variants:

    python -m experiments.evaluate --config=experiments/configs/clevrtex.py --workdir=workdirs/clevrtex \
        --config.data.config=outd

Hardware: sized for one GPU with >= 24 GB. The paper needs 58 h (phase 1) + 16 h (phases 2-3) on an RTX 3090.
Paper (curriculum training, mean of 3 runs): mIoU 79.58, ARI-FG 94.77, MSE 139; OOD 67.50 / 83.14 / 832;
CAMO 73.07 / 87.27 / 145.
"""

from experiments.configs import base


def get_config(arg: str = ""):
    config = base.get_config()
    config.data.name = "clevrtex"
    config.data.config = "full"
    config.data.image_size = (128, 128)
    config.model.num_slots = 10
    config.model.isotropic = False
    return base.apply_arg(config, arg)
