"""Shared type aliases, dimension vocabulary, batch keys and the model's output record.

Dimension names used in shape annotations throughout the package:

    b   batch (images)
    h w height and width of an image or a feature map (NHWC layout everywhere)
    c   channels
    k   object slots (K in the paper); k+1 when the background layer is included
    d   latent width per slot (D = z_what + 3 + scale dims)
    z   z_what width
    g   glimpse side
    n   tokens

Batch dictionaries flowing from the input pipeline to the train / eval steps use the keys below.
"""

from typing import Any, TypedDict

import flax.struct
import jax
import numpy as np
from jaxtyping import Array, Float, Int

PRNGKey = jax.Array
PyTree = Any
ArrayLike = jax.Array | np.ndarray

# Batch keys. Every batch has IMAGE; the others are present when the data provides them.
IMAGE = "image"  # float32 [b, h, w, 3] in [0, 1]
SEGMENTATION = "segmentation"  # int32 [b, h, w], 0 = background, 1..n objects
BACKGROUND = (
    "background"  # float32 [b, h, w, 3] in [0, 1], precomputed background (phase 2)
)
INDEX = "index"  # int32 [b], position of the example inside its split (0..N-1)
VALID = "valid"  # bool [b], False for padding examples in the last eval batch


class Batch(TypedDict, total=False):
    image: Float[Array, "b h w 3"]
    segmentation: Int[Array, "b h w"]
    background: Float[Array, "b h w 3"]
    index: Int[Array, " b"]
    valid: Any


@flax.struct.dataclass
class ModelOutput:
    """Everything the AST forward pass produces for a batch.

    Attributes:
      reconstruction: [b, h, w, 3] composited image in [0, 1].
      weights: [b, k+1, h, w] normalised compositing weights; index 0 is the background.
      background: [b, h, w, 3] background image used for compositing, in [0, 1].
      layers: [b, k, h, w, 3] placed object colours (before weighting).
      masks: [b, k, h, w] placed object masks in [0, 1].
      xy: [b, k, 2] object positions (x along the width, y along the height) in [-1, 1].
      scale: [b, k, 2] inverse scales (s_x, s_y); the object spans [x - 1/s_x, x + 1/s_x].
      activation_logit: [b, k] log of the per-slot activation alpha_k.
      z_what: [b, k, z] appearance vectors fed to the glimpse generator.
      mask_distillation: [b] loss of the decoded masks against the window masks
        (``glimpse_mask='window'``), None otherwise.
    """

    reconstruction: Float[Array, "b h w 3"]
    weights: Float[Array, "b k1 h w"]
    background: Float[Array, "b h w 3"]
    layers: Float[Array, "b k h w 3"]
    masks: Float[Array, "b k h w"]
    xy: Float[Array, "b k 2"]
    scale: Float[Array, "b k 2"]
    activation_logit: Float[Array, "b k"]
    z_what: Float[Array, "b k z"]
    mask_distillation: Float[Array, " b"] | None = None
