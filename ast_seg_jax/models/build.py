"""Builds the AST model from the flat ``config.model`` fields (no string imports).

Every key of ``config.model`` is read explicitly below and passed to :class:`AST` under the
same name, so go-to-definition works from a config. Keys (see ``experiments/configs/base.py``):
num_slots, z_what_dim, isotropic, clean_latent_layout, feature_generator ('segformer' |
'unet'), segformer_variant ('b0'..'b5'), pretrained_encoder (checkpoint directory or ''),
normalize_input, use_transformer, transformer_layers, transformer_dim, transformer_heads,
transformer_mlp_dim, transformer_dropout, min_scale, max_scale, background_logit_init,
background_complexity, background_width, glimpse_size (0 = from the image size). Three keys
are optional, so that configs saved before they existed still build: unet_width (1.0 when
absent), compute_dtype ('float32' when absent; 'bfloat16' runs the convolutional networks in
mixed precision) and transformer_residual (False when absent); so are the later
slot_suppression_sigma / slot_suppression_strength (0 / 1000), appearance_encoder ('pooled')
crop_encoder_width (32), glimpse_width (1.0), glimpse_mask ('decoded'), window_mask_width
(32) and flat_colour (False), residual_input (False), residual_attention_prior /
residual_attention_blur (0 / 1.5), background_median_shift (False) and segformer_scan (False).

``pretrained_encoder`` only fixes the architecture here: when it is set, the Segformer is
built from the checkpoint's ``config.json`` (which must describe the same size as
``segformer_variant``). Loading its weights into the parameters is the job of the code that
creates the train state (``ast_seg_jax.pretrained.load_hf_encoder_params``).
"""

from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections

from ast_seg_jax.models.ast_model import (
    APPEARANCE_ENCODERS,
    AST,
    FEATURE_GENERATORS,
    GLIMPSE_MASKS,
)
from ast_seg_jax.models.background import BackgroundAutoencoder
from ast_seg_jax.models.glimpse import GLIMPSE_SIZES
from ast_seg_jax.models.segformer import SegformerConfig

MODEL_KEYS = (
    "num_slots",
    "z_what_dim",
    "isotropic",
    "clean_latent_layout",
    "feature_generator",
    "segformer_variant",
    "pretrained_encoder",
    "normalize_input",
    "use_transformer",
    "transformer_layers",
    "transformer_dim",
    "transformer_heads",
    "transformer_mlp_dim",
    "transformer_dropout",
    "min_scale",
    "max_scale",
    "background_logit_init",
    "background_complexity",
    "background_width",
    "glimpse_size",
)

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def segformer_config_for(model_config: ml_collections.ConfigDict) -> SegformerConfig:
    """The Segformer architecture a model config asks for.

    Args:
      model_config: ``config.model``.

    Returns:
      ``SegformerConfig.preset(segformer_variant)``, or the configuration stored with
      ``pretrained_encoder`` when that is set.

    Raises:
      ValueError: unknown variant, or a checkpoint of a different size than the variant.
      FileNotFoundError: ``pretrained_encoder`` or its config.json does not exist.
    """
    variant = model_config.segformer_variant
    preset = SegformerConfig.preset(variant)
    if not model_config.pretrained_encoder:
        return preset
    # Imported here: only runs that load a checkpoint need the loader.
    from ast_seg_jax.pretrained import load_hf_config

    config = load_hf_config(model_config.pretrained_encoder)
    if (config.depths, config.hidden_sizes) != (preset.depths, preset.hidden_sizes):
        raise ValueError(
            f"config.model.pretrained_encoder={model_config.pretrained_encoder!r} holds a "
            f"Segformer with depths {config.depths} and hidden sizes {config.hidden_sizes}, "
            f"but config.model.segformer_variant={variant!r} has depths {preset.depths} "
            f"and hidden sizes {preset.hidden_sizes}; make them agree."
        )
    return config


def build_model(
    model_config: ml_collections.ConfigDict, image_hw: Sequence[int]
) -> AST:
    """Constructs the AST module for a config and an image size.

    Args:
      model_config: ``config.model`` with the keys listed in the module docstring.
      image_hw: (height, width) of the training images.

    Returns:
      An (unbound) AST module.

    Raises:
      ValueError: a missing key or an invalid value, naming the key.
    """
    missing = [key for key in MODEL_KEYS if key not in model_config]
    if missing:
        raise ValueError(f"config.model is missing the keys {missing}.")
    image_hw = tuple(int(s) for s in image_hw)
    if len(image_hw) != 2 or min(image_hw) < 2:
        raise ValueError(f"image_hw must be (height, width) >= 2, got {image_hw}.")
    m = model_config
    if m.num_slots < 1:
        raise ValueError(f"config.model.num_slots must be >= 1, got {m.num_slots}.")
    if m.z_what_dim < 1:
        raise ValueError(f"config.model.z_what_dim must be >= 1, got {m.z_what_dim}.")
    if m.feature_generator not in FEATURE_GENERATORS:
        raise ValueError(
            f"config.model.feature_generator must be one of {FEATURE_GENERATORS}, got "
            f"{m.feature_generator!r}."
        )
    if m.get("unet_width", 1.0) <= 0:
        raise ValueError(f"config.model.unet_width must be > 0, got {m.unet_width}.")
    if m.feature_generator == "unet" and m.pretrained_encoder:
        raise ValueError(
            "config.model.pretrained_encoder is a Segformer checkpoint; it cannot be used "
            "with config.model.feature_generator='unet'."
        )
    if m.get("residual_input", False) and m.feature_generator != "unet":
        raise ValueError(
            "config.model.residual_input=True feeds the feature generator 6 channels (the image "
            "and its difference from the background); only feature_generator='unet' takes them, "
            f"got {m.feature_generator!r}."
        )
    if m.glimpse_size != 0 and m.glimpse_size not in GLIMPSE_SIZES:
        raise ValueError(
            f"config.model.glimpse_size must be 0 (from the image size) or one of "
            f"{GLIMPSE_SIZES}, got {m.glimpse_size}."
        )
    dtype = compute_dtype(m)
    appearance_encoder = m.get("appearance_encoder", "pooled")
    if appearance_encoder not in APPEARANCE_ENCODERS:
        raise ValueError(
            f"config.model.appearance_encoder must be one of {APPEARANCE_ENCODERS}, got "
            f"{appearance_encoder!r}."
        )
    if m.get("crop_encoder_width", 32) < 1:
        raise ValueError(
            f"config.model.crop_encoder_width must be >= 1, got {m.crop_encoder_width}."
        )
    glimpse_mask = m.get("glimpse_mask", "decoded")
    if glimpse_mask not in GLIMPSE_MASKS:
        raise ValueError(
            f"config.model.glimpse_mask must be one of {GLIMPSE_MASKS}, got {glimpse_mask!r}."
        )
    if m.get("window_mask_width", 32) < 1:
        raise ValueError(
            f"config.model.window_mask_width must be >= 1, got {m.window_mask_width}."
        )
    if m.get("glimpse_width", 1.0) <= 0:
        raise ValueError(
            f"config.model.glimpse_width must be > 0, got {m.glimpse_width}."
        )
    for key in ("segment_min_peak_weight", "segment_colour_min_weight"):
        if not 0.0 <= m.get(key, 0.0) < 1.0:
            raise ValueError(f"config.model.{key} must be in [0, 1), got {m[key]}.")
    if not 0 < m.min_scale < m.max_scale:
        raise ValueError(
            "config.model needs 0 < min_scale < max_scale, got "
            f"min_scale={m.min_scale}, max_scale={m.max_scale}."
        )
    if m.use_transformer:
        if m.transformer_layers < 1:
            raise ValueError(
                f"config.model.transformer_layers must be >= 1, got {m.transformer_layers}."
            )
        if m.transformer_dim % m.transformer_heads:
            raise ValueError(
                f"config.model.transformer_dim={m.transformer_dim} is not divisible by "
                f"transformer_heads={m.transformer_heads}."
            )
        if not 0.0 <= m.transformer_dropout < 1.0:
            raise ValueError(
                "config.model.transformer_dropout must be in [0, 1), got "
                f"{m.transformer_dropout}."
            )
    segformer_config = (
        segformer_config_for(m) if m.feature_generator == "segformer" else None
    )
    # The channel budget C = K + Z + 1 + sd follows from these fields (AST.generator_channels);
    # AST checks at trace time that the feature generator really returns C channels.
    return AST(
        image_hw=image_hw,
        num_slots=int(m.num_slots),
        z_what_dim=int(m.z_what_dim),
        isotropic=bool(m.isotropic),
        clean_latent_layout=bool(m.clean_latent_layout),
        feature_generator=m.feature_generator,
        unet_width=float(m.get("unet_width", 1.0)),
        segformer_config=segformer_config,
        segformer_scan=bool(m.get("segformer_scan", False)),
        normalize_input=bool(m.normalize_input),
        residual_input=bool(m.get("residual_input", False)),
        residual_attention_prior=float(m.get("residual_attention_prior", 0.0)),
        residual_attention_blur=float(m.get("residual_attention_blur", 1.5)),
        use_transformer=bool(m.use_transformer),
        transformer_residual=bool(m.get("transformer_residual", False)),
        slot_suppression_sigma=float(m.get("slot_suppression_sigma", 0.0)),
        slot_suppression_strength=float(m.get("slot_suppression_strength", 1000.0)),
        appearance_encoder=appearance_encoder,
        crop_encoder_width=int(m.get("crop_encoder_width", 32)),
        glimpse_width=float(m.get("glimpse_width", 1.0)),
        glimpse_mask=glimpse_mask,
        window_mask_width=int(m.get("window_mask_width", 32)),
        flat_colour=bool(m.get("flat_colour", False)),
        transformer_layers=int(m.transformer_layers),
        transformer_dim=int(m.transformer_dim),
        transformer_heads=int(m.transformer_heads),
        transformer_mlp_dim=int(m.transformer_mlp_dim),
        transformer_dropout=float(m.transformer_dropout),
        min_scale=float(m.min_scale),
        max_scale=float(m.max_scale),
        background_logit_init=float(m.background_logit_init),
        background_complexity=bool(m.background_complexity),
        background_width=float(m.background_width),
        background_median_shift=bool(m.get("background_median_shift", False)),
        glimpse_size=int(m.glimpse_size),
        segment_min_peak_weight=float(m.get("segment_min_peak_weight", 0.0)),
        segment_colour_min_weight=float(m.get("segment_colour_min_weight", 0.0)),
        dtype=dtype,
    )


def build_background_model(
    model_config: ml_collections.ConfigDict, image_hw: tuple[int, int]
) -> BackgroundAutoencoder:
    """The background autoencoder of `build_model(model_config, image_hw)`, on its own (phase 1)."""
    return BackgroundAutoencoder(
        image_hw=tuple(image_hw),
        complexity=bool(model_config.background_complexity),
        width=float(model_config.background_width),
        dtype=compute_dtype(model_config),
        median_shift=bool(model_config.get("background_median_shift", False)),
    )


def compute_dtype(model_config: ml_collections.ConfigDict):
    """The jnp dtype named by ``config.model.compute_dtype`` (float32 when the key is absent).

    Raises:
      ValueError: a name other than those of COMPUTE_DTYPES.
    """
    name = model_config.get("compute_dtype", "float32")
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.model.compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {name!r}."
        )
    return COMPUTE_DTYPES[name]
