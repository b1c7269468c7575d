"""The AST model: attention, soft-argmax, transformer, glimpses and compositing.

Forward pass (ast_model.md section 0):

1. A feature generator (Segformer, or the U-Net ablation) maps the image in [0, 1] to
   ``C = K + Z + 1 + sd`` channels; the first K are attention logit maps, the rest the
   feature map Phi.
2. ``attention_pool``: per slot, a spatial softmax of its logit map gives the soft-argmax
   position (x0, y0) and pools Phi; the slot token is [x0, y0, pooled Phi], width
   ``D = Z + 3 + sd``. With ``residual_attention_prior > 0`` (not in the official code) every
   slot's logits first get that weight times ``residual_prior``, the blurred distance between
   image and background. With ``slot_suppression_sigma > 0`` (not in the official code) the
   maps are first passed through ``suppress_taken_positions``: in slot order, each slot's logits
   are lowered around the positions the earlier slots took, so that two slots do not pool the
   same object.
3. Dense(D -> dim), a post-norm transformer encoder across the K tokens of an image,
   Dense(dim -> D) (no skip connection around them, as in the official code). With
   ``use_transformer=False`` (paper ablation) the pooled tokens are decoded directly. With
   ``transformer_residual=True`` (not in the official code) the read-out, initialised to zero,
   is added to the pooled tokens except at the two position entries: the positions stay the
   soft-argmax points and the transformer corrects scale, activation and appearance.
4. Latent decoding of each D-vector v: xy = clip(v[0:2], -1, 1); inverse scale
   s = min_scale + (max_scale - min_scale) * sigmoid(v[2:2+sd]) (broadcast to (s, s) when
   isotropic); activation logit = v[4] (official layout) or v[2+sd] (clean layout);
   z_what = v[3+sd:].
   With ``appearance_encoder='crop'`` (not in the official code) z_what is instead encoded from
   the slot's window of the input image (``extract_glimpses`` at xy and scale, gradient stopped
   through the window's placement) by a small CNN (``crop_encoder.CropEncoder``), which also
   shifts the glimpse within the window (by at most half its half-extent) to centre it on the
   object.
5. The glimpse generator turns each z_what into an RGBA glimpse; ``place_glimpses`` puts it
   on the image canvas at (x, y) with half-extent 1/s. With ``glimpse_mask='window'`` (not in
   the official code) the mask is drawn by ``window_mask.WindowMask`` from the window of the
   image (and of the background) that the glimpse covers, and the output carries
   ``mask_distillation``, the loss that trains the decoded mask towards the window mask. With
   ``flat_colour`` (not in the official code) each glimpse is painted in the mean of its
   decoded colours, so that a slot cannot draw two objects of different colours.
6. ``composite`` over the background (given, e.g. precomputed, or computed live by
   ``background_model``) with background activation exp(background_logit).

Official latent layout quirk (reproduced by default): the activation logit is read at index
4 for both scaling modes, so with isotropic scaling (sd = 1) it is the same number as
z_what[0] and index 3 is never read. ``clean_latent_layout=True`` reads it at index 2 + sd
instead (then z_what no longer overlaps it).

Names (fixed by the project contract): submodules ``feature_generator``, ``embed``,
``transformer``, ``readout`` (the last three absent when ``use_transformer=False``),
``glimpse_generator``, ``background_model``; parameter ``background_logit`` (scalar). At eval
(``train=False``) the module sows into the 'intermediates' collection (each as a 1-tuple,
Flax's default): ``attention`` [b, h, w, k] (softmax maps on the feature grid),
``xy_pooled`` [b, k, 2] (soft-argmax positions before the transformer) and ``glimpses``
[b, k, g, g, 4].

Collections and rngs: the Segformer's decode head has BatchNorm ('batch_stats', mutable
when ``train=True``); dropout (Segformer drop path and head dropout, transformer) needs a
'dropout' rng when ``train=True``.

Initialisation: embed/readout use PyTorch nn.Linear's default U(+-1/sqrt(fan_in)) for
kernel and bias; the other parts follow their own modules' docstrings. When ``background``
is given at init time the background model is still initialised, so ``init`` always returns
the full parameter tree.

Deviations from the official code: the transformer layers are initialised independently
(PyTorch deep-copies one layer, so its layers start identical); ``use_transformer=False``
(paper ablation, not a code option there) decodes the pooled tokens directly;
``transformer_residual=True`` (off by default) is the residual read-out of step 3;
``slot_suppression_sigma > 0`` (off by default) is the suppression of step 2;
``residual_attention_prior > 0`` (off by default) is the residual prior of step 2;
``residual_input`` (off by default) feeds the U-Net the image and its difference from the
background; ``background_median_shift`` (off by default) gives the background the image's median
colour (`background.BackgroundAutoencoder`);
``appearance_encoder='crop'`` (off by default) is the crop encoder of step 4;
``glimpse_mask='window'`` and ``flat_colour`` (off by default) are the window mask and the
one-colour glimpses of step 5; the
natural-video option ``variable_background_activation`` (a learned per-pixel background
logit map) is not implemented. Everything else follows ast_model.md sections 0-3.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ast_seg_jax.models.background import BackgroundAutoencoder
from ast_seg_jax.models.compositing import composite, segment
from ast_seg_jax.models.crop_encoder import CropEncoder
from ast_seg_jax.models.glimpse import GlimpseGenerator, glimpse_size_for
from ast_seg_jax.models.segformer import Segformer, SegformerConfig
from ast_seg_jax.models.soft_argmax import attention_pool, position_grid, soft_argmax
from ast_seg_jax.models.spatial_transformer import extract_glimpses, place_glimpses
from ast_seg_jax.models.transformer import TransformerEncoder, torch_dense
from ast_seg_jax.models.unet import UNet
from ast_seg_jax.models.window_mask import WindowMask, mask_distillation_loss
from ast_seg_jax.typing import ModelOutput

FEATURE_GENERATORS = ("segformer", "unet")
APPEARANCE_ENCODERS = ("pooled", "crop")
GLIMPSE_MASKS = ("decoded", "window")


class AST(nn.Module):
    """AST foreground model with its background autoencoder.

    Attributes:
      image_hw: (height, width) of the images (static; sizes the background model).
      num_slots: K, number of object slots.
      z_what_dim: Z, width of the appearance latent.
      isotropic: one inverse scale per slot (sd = 1) instead of two (sd = 2).
      clean_latent_layout: read the activation logit at index 2 + sd instead of the
        official hard-coded index 4 (see the module docstring).
      feature_generator: "segformer" or "unet".
      unet_width: multiplier of the U-Net's channel widths (1.0 = official).
      segformer_config: architecture of the Segformer (default: MiT-B3 preset).
      segformer_scan: run each Segformer stage's blocks as one scan (less to compile, same
        parameters; `SegformerEncoder`).
      normalize_input: ImageNet mean/std normalisation before the Segformer (official: off).
      residual_input: the feature generator (U-Net only) reads the image and its difference
        from the background (gradient stopped), 6 channels; not in the official code.
      residual_attention_prior: weight of the residual prior added to every slot's attention
        logits (`residual_prior`; not in the official code); 0 turns it off.
      residual_attention_blur: standard deviation, in image pixels, of the Gaussian blur of that
        prior.
      use_transformer: embed + transformer + readout between pooling and decoding.
      transformer_residual: the read-out (kernel and bias initialised to zero) is added to the
        pooled tokens, positions excepted, instead of replacing them (not official; step 3).
      slot_suppression_sigma: width (grid units) of the bump that each slot's soft-argmax point
        subtracts from the later slots' attention logits; 0 turns the suppression off (official).
      slot_suppression_strength: height of that bump, in logit units.
      appearance_encoder: "pooled" (official: z_what is read from the pooled token) or "crop"
        (z_what is encoded from the slot's window of the image; step 4).
      crop_encoder_width: channels of the crop encoder's first convolutions.
      glimpse_width: multiplier of the glimpse generator's hidden channels (1.0: official).
      glimpse_mask: "decoded" (official: the mask is the glimpse generator's) or "window" (the
        mask is read from the slot's window of the image; step 5).
      window_mask_width: hidden channels of that network.
      flat_colour: paint each glimpse in one colour, the mean of its decoded colours (not
        official; step 5).
      transformer_layers, transformer_dim, transformer_heads, transformer_mlp_dim,
        transformer_dropout: transformer encoder hyper-parameters.
      min_scale, max_scale: range of the inverse scales s (object half-extent 1/s).
      background_logit_init: initial value of the learned background activation logit.
      background_complexity: channel schedule of the background autoencoder.
      background_width: hidden-width multiplier of the background autoencoder.
      background_median_shift: the background autoencoder's `median_shift` (not official).
      glimpse_size: glimpse side (32, 64 or 128); 0 picks it from the image size.
      segment_min_peak_weight, segment_colour_min_weight: used by the segmentation only
        (`predicted_labels`), not by the forward pass: a slot whose compositing weight stays below
        the first everywhere takes no pixel, and a pixel that several layers draw with at least the
        second goes to the one whose colour is closest to the image (`compositing.segment`; 0, 0 is
        the official argmax).
      dtype: computation dtype of the three convolutional networks (feature generator,
        glimpse generator, background autoencoder): float32, or bfloat16 for mixed
        precision. Parameters, the transformer, soft-argmax, placement, compositing and the
        losses stay float32 either way.
    """

    image_hw: tuple[int, int]
    num_slots: int = 10
    z_what_dim: int = 32
    isotropic: bool = False
    clean_latent_layout: bool = False
    feature_generator: str = "segformer"
    unet_width: float = 1.0
    segformer_config: SegformerConfig | None = None
    segformer_scan: bool = False
    normalize_input: bool = False
    residual_input: bool = False
    residual_attention_prior: float = 0.0
    residual_attention_blur: float = 1.5
    use_transformer: bool = True
    transformer_residual: bool = False
    slot_suppression_sigma: float = 0.0
    slot_suppression_strength: float = 1000.0
    appearance_encoder: str = "pooled"
    crop_encoder_width: int = 32
    glimpse_width: float = 1.0
    glimpse_mask: str = "decoded"
    window_mask_width: int = 32
    flat_colour: bool = False
    transformer_layers: int = 6
    transformer_dim: int = 256
    transformer_heads: int = 8
    transformer_mlp_dim: int = 512
    transformer_dropout: float = 0.1
    min_scale: float = 1.3
    max_scale: float = 24.0
    background_logit_init: float = 11.0
    background_complexity: bool = True
    background_width: float = 1.0
    background_median_shift: bool = False
    glimpse_size: int = 0
    segment_min_peak_weight: float = 0.0
    segment_colour_min_weight: float = 0.0
    dtype: Any = jnp.float32

    @property
    def scale_dim(self) -> int:
        """sd: number of inverse-scale parameters per slot."""
        return 1 if self.isotropic else 2

    @property
    def latent_dim(self) -> int:
        """D = Z + 3 + sd, the width of a slot token."""
        return self.z_what_dim + 3 + self.scale_dim

    @property
    def generator_channels(self) -> int:
        """C = K + Z + 1 + sd, the feature generator's output channels."""
        return self.num_slots + self.z_what_dim + 1 + self.scale_dim

    @property
    def resolved_glimpse_size(self) -> int:
        """The glimpse side actually used."""
        return self.glimpse_size or glimpse_size_for(tuple(self.image_hw))

    def _feature_generator(self) -> nn.Module:
        if self.feature_generator == "segformer":
            return Segformer(
                self.segformer_config or SegformerConfig.preset("b3"),
                num_outputs=self.generator_channels,
                normalize_input=self.normalize_input,
                dtype=self.dtype,
                scan_blocks=self.segformer_scan,
                name="feature_generator",
            )
        if self.feature_generator == "unet":
            return UNet(
                out_channels=self.generator_channels,
                width=self.unet_width,
                dtype=self.dtype,
                name="feature_generator",
            )
        raise ValueError(
            f"feature_generator must be one of {FEATURE_GENERATORS}, got "
            f"{self.feature_generator!r}."
        )

    @nn.compact
    def __call__(
        self,
        image: Float[Array, "b h w 3"],
        background: Float[Array, "b h w 3"] | None = None,
        *,
        train: bool,
    ) -> ModelOutput:
        """Reconstructs and segments a batch of images.

        Args:
          image: [b, H, W, 3] RGB in [0, 1].
          background: [b, H, W, 3] background in [0, 1] (e.g. precomputed in phase 2), or
            None to compute it live with ``background_model``.
          train: training mode (BatchNorm batch statistics, dropout); at eval the module
            sows its intermediates.

        Returns:
          ModelOutput with reconstruction [b, H, W, 3], weights [b, K+1, H, W],
          background [b, H, W, 3], layers [b, K, H, W, 3], masks [b, K, H, W],
          xy [b, K, 2], scale [b, K, 2], activation_logit [b, K], z_what [b, K, Z].
        """
        if image.ndim != 4 or image.shape[1:] != (*self.image_hw, 3):
            raise ValueError(
                f"AST built for images of size {tuple(self.image_hw)} got {image.shape}; "
                "expected [b, H, W, 3]."
            )
        if background is not None and background.shape != image.shape:
            raise ValueError(
                f"background {background.shape} must have the image's shape {image.shape}."
            )
        b = image.shape[0]
        k, g = self.num_slots, self.resolved_glimpse_size

        background_model = BackgroundAutoencoder(
            tuple(self.image_hw),
            self.background_complexity,
            self.background_width,
            self.dtype,
            self.background_median_shift,
            name="background_model",
        )
        if background is None:
            background = background_model(image)[..., :3]
        elif self.is_initializing():
            # Create the background parameters too, so that init returns the full tree.
            background_model(image)

        # 1-2. Attention logits + feature map, soft-argmax and attention pooling.
        # What the background does not explain (read by the two residual options, not in the
        # official code). The background learns from the rendering only, not through it.
        residual = image - jax.lax.stop_gradient(background).astype(image.dtype)
        generator_input = image
        if self.residual_input:
            generator_input = jnp.concatenate([image, residual], axis=-1)
        maps = self._feature_generator()(generator_input, train=train)  # [b, fh, fw, C]
        if maps.shape[-1] != self.generator_channels:
            raise ValueError(
                f"feature generator returned {maps.shape[-1]} channels, expected "
                f"K + Z + 1 + sd = {self.generator_channels}."
            )
        logits, features = maps[..., :k], maps[..., k:]
        if self.residual_attention_prior:
            prior = residual_prior(
                residual, self.residual_attention_blur, logits.shape[1:3]
            )
            logits = logits + self.residual_attention_prior * prior[..., None]
        if self.slot_suppression_sigma:
            logits = suppress_taken_positions(
                logits, self.slot_suppression_sigma, self.slot_suppression_strength
            )
        xy_pooled, pooled = attention_pool(logits, features)  # [b,k,2], [b,k,Z+1+sd]
        if not train:
            _, fh, fw, _ = logits.shape
            attention = jax.nn.softmax(logits.reshape(b, fh * fw, k), axis=1)
            self.sow("intermediates", "attention", attention.reshape(b, fh, fw, k))
            self.sow("intermediates", "xy_pooled", xy_pooled)
        v = jnp.concatenate([xy_pooled, pooled], axis=-1)  # [b, k, D]

        # 3. Transformer refinement (no skip around it as in the official code, unless residual).
        if self.use_transformer:
            tokens = v
            v = torch_dense(self.transformer_dim, self.latent_dim, name="embed")(v)
            v = TransformerEncoder(
                num_layers=self.transformer_layers,
                dim=self.transformer_dim,
                heads=self.transformer_heads,
                mlp_dim=self.transformer_mlp_dim,
                dropout=self.transformer_dropout,
                name="transformer",
            )(v, train=train)  # [b, k, dim]
            d, dim = self.latent_dim, self.transformer_dim
            if not self.transformer_residual:
                v = torch_dense(d, dim, name="readout")(v)
            else:
                zero = nn.initializers.zeros
                correction = nn.Dense(d, kernel_init=zero, name="readout")(v)
                # Positions stay the soft-argmax points: a correction there could carry every
                # slot off the canvas, where the clamp's gradient is zero.
                v = tokens + correction.at[..., :2].set(0.0)

        # 4-5. Latent decoding, glimpses, placement on the canvas.
        xy, scale, activation_logit, z_what = decode_latents(
            v,
            scale_dim=self.scale_dim,
            clean_latent_layout=self.clean_latent_layout,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
        )
        if self.appearance_encoder == "crop":
            # The window follows the slot, but the crop is not a path for moving it: xy and
            # scale learn from the rendering only.
            crops = extract_glimpses(
                image,
                jax.lax.stop_gradient(xy),
                jax.lax.stop_gradient(scale),
                g,
            )  # [b, k, g, g, 3]
            z_what, offset = CropEncoder(
                self.z_what_dim,
                self.crop_encoder_width,
                dtype=self.dtype,
                name="crop_encoder",
            )(crops.reshape(b * k, g, g, 3))
            z_what = z_what.reshape(b, k, self.z_what_dim)
            # The glimpse moves within its window (offset in half-extents, 1/s).
            xy = jnp.clip(xy + offset.reshape(b, k, 2) / scale, -1.0, 1.0)
        elif self.appearance_encoder != "pooled":
            raise ValueError(
                f"appearance_encoder must be one of {APPEARANCE_ENCODERS}, got "
                f"{self.appearance_encoder!r}."
            )
        glimpses = GlimpseGenerator(
            g, self.dtype, self.glimpse_width, name="glimpse_generator"
        )(z_what.reshape(b * k, self.z_what_dim), logits=True).reshape(b, k, g, g, 4)
        colour = jax.nn.sigmoid(glimpses[..., :3])
        if self.flat_colour:
            colour = jnp.broadcast_to(
                jnp.mean(colour, axis=(2, 3), keepdims=True), colour.shape
            )
        decoded_logit = glimpses[..., 3]
        mask_distillation = None
        if self.glimpse_mask == "window":
            # The windows the glimpses will cover, pixel for pixel; no gradient through them.
            # Image and background in one pass: they share the interpolation weights.
            both = jnp.concatenate([image, background], axis=-1)
            windows = extract_glimpses(
                *jax.lax.stop_gradient((both, xy, scale)), g
            ).reshape(b * k, g, g, 6)
            window_logit = WindowMask(
                self.window_mask_width, dtype=self.dtype, name="window_mask"
            )(
                windows[..., :3],
                windows[..., 3:],
                jax.lax.stop_gradient(colour).reshape(b * k, g, g, 3),
            ).reshape(b, k, g, g)
            # The decoded mask learns from the window mask but does not feed it: a sum of the two
            # logits, distilled into one of its own terms, drove every mask to zero in a trial.
            mask = jax.nn.sigmoid(window_logit)
            mask_distillation = mask_distillation_loss(decoded_logit, mask)
        elif self.glimpse_mask == "decoded":
            mask = jax.nn.sigmoid(decoded_logit)
        else:
            raise ValueError(
                f"glimpse_mask must be one of {GLIMPSE_MASKS}, got {self.glimpse_mask!r}."
            )
        glimpses = jnp.concatenate([colour, mask[..., None]], axis=-1)
        if not train:
            self.sow("intermediates", "glimpses", glimpses)
        placed = place_glimpses(glimpses, xy, scale, tuple(self.image_hw))
        layers, masks = placed[..., :3], placed[..., 3]  # [b,k,H,W,3], [b,k,H,W]

        # 6. Compositing over the background.
        background_logit = self.param(
            "background_logit",
            nn.initializers.constant(self.background_logit_init),
            (),
            jnp.float32,
        )
        reconstruction, weights = composite(
            layers, masks, activation_logit, background, background_logit
        )
        return ModelOutput(
            reconstruction=reconstruction,
            weights=weights,
            background=background,
            layers=layers,
            masks=masks,
            xy=xy,
            scale=scale,
            activation_logit=activation_logit,
            z_what=z_what,
            mask_distillation=mask_distillation,
        )


def predicted_labels(
    model: AST, out: ModelOutput, image: Float[Array, "b h w 3"]
) -> jax.Array:
    """The label map [b, h, w] (0 = background, k = slot k) of `model`'s output `out` for `image`.

    `compositing.segment` with the model's segmentation settings; what evaluation, the probe, the
    figures and `experiments.segment` use.
    """
    return segment(
        out.weights,
        model.segment_min_peak_weight,
        model.segment_colour_min_weight,
        image=image,
        background=out.background,
        layers=out.layers,
    )


def residual_prior(
    residual: Float[Array, "b h w 3"],
    blur: float,
    grid_hw: tuple[int, int],
) -> Float[Array, "b fh fw"]:
    """What the background leaves unexplained, as a map on the attention grid (not official).

    `residual` is image - background. Its per-pixel L1 norm (summed over the colour channels, so
    in [0, 3] for images and backgrounds in [0, 1]), blurred by a Gaussian of standard deviation
    `blur` pixels (edges padded by replication; 0 skips the blur) and resized to the attention
    grid `grid_hw` when that differs from the image's. Scaled by `residual_attention_prior`
    and added to every slot's attention logits, it pulls the soft-argmax points towards the
    places the background cannot draw, that is towards objects, from the first step: where the
    background is poor (a textured backdrop), a randomly initialised feature generator puts
    them anywhere.
    """
    residual = jnp.sum(jnp.abs(residual), axis=-1).astype(jnp.float32)  # [b, h, w]
    if blur > 0:
        radius = max(1, int(3 * blur + 0.5))
        taps = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / blur) ** 2)
        taps = taps / jnp.sum(taps)
        padded = jnp.pad(residual, ((0, 0), (radius, radius), (radius, radius)), "edge")
        h, w = residual.shape[1:]
        # Separable: rows, then columns, as weighted sums of shifted copies.
        rows = sum(taps[i] * padded[:, i : i + h, :] for i in range(2 * radius + 1))
        residual = sum(taps[i] * rows[:, :, i : i + w] for i in range(2 * radius + 1))
    if residual.shape[1:] != tuple(grid_hw):
        residual = jax.image.resize(
            residual, (residual.shape[0], *grid_hw), "linear", antialias=True
        )
    return residual


def suppress_taken_positions(
    logits: Float[Array, "b h w k"], sigma: float, strength: float
) -> Float[Array, "b h w k"]:
    """Slot k's attention logits minus a Gaussian bump at each earlier slot's soft-argmax point.

    In slot order, the soft-argmax point xy_j of slot j (from its already suppressed map, gradient
    stopped) lowers the logits of every later slot by ``strength * exp(-|p - xy_j|^2 / (2 sigma^2))``
    (p and sigma in the [-1, 1] grid units of ``soft_argmax``), so that two slots cannot settle on
    the same object (non-maximum suppression).
    """
    _, fh, fw, k = logits.shape
    grid = position_grid(fh, fw)  # [h, w, 2]
    penalty = jnp.zeros(logits.shape[:3], jnp.float32)
    out = []
    for j in range(k):
        lj = logits[..., j] - strength * penalty
        out.append(lj)
        xy = jax.lax.stop_gradient(soft_argmax(lj))  # [b, 2]
        d2 = jnp.sum(jnp.square(grid[None] - xy[:, None, None, :]), axis=-1)
        penalty = penalty + jnp.exp(-d2 / (2.0 * sigma**2))
    return jnp.stack(out, axis=-1)


def decode_latents(
    v: Float[Array, "b k d"],
    *,
    scale_dim: int,
    clean_latent_layout: bool = False,
    min_scale: float = 1.3,
    max_scale: float = 24.0,
) -> tuple[
    Float[Array, "b k 2"],
    Float[Array, "b k 2"],
    Float[Array, "b k"],
    Float[Array, "b k z"],
]:
    """Splits slot vectors into (xy, inverse scale, activation logit, z_what).

    Layout of v (sd = scale_dim): [x, y, scale logit(s) (sd), ..., z_what (from 3 + sd)];
    the activation logit is v[4] (official, aliasing z_what[0] when sd = 1) or v[2 + sd]
    (clean layout).

    Args:
      v: [b, k, D] slot vectors, D = Z + 3 + sd.
      scale_dim: sd, 1 (isotropic) or 2 (anisotropic).
      clean_latent_layout: read the activation logit at 2 + sd instead of 4.
      min_scale, max_scale: range of the inverse scales.

    Returns:
      xy [b, k, 2] = clip(v[0:2], -1, 1) (zero gradient outside), scale [b, k, 2] =
      min + (max - min) * sigmoid(v[2:2+sd]) (repeated when sd = 1), activation_logit [b, k],
      z_what [b, k, D - 3 - sd].
    """
    if scale_dim not in (1, 2):
        raise ValueError(f"scale_dim must be 1 or 2, got {scale_dim}.")
    xy = jnp.clip(v[..., 0:2], -1.0, 1.0)
    scale = min_scale + (max_scale - min_scale) * jax.nn.sigmoid(
        v[..., 2 : 2 + scale_dim]
    )
    scale = jnp.broadcast_to(scale, (*scale.shape[:-1], 2))  # isotropic: (s, s)
    activation_logit = v[..., 2 + scale_dim if clean_latent_layout else 4]
    z_what = v[..., 3 + scale_dim :]
    return xy, scale, activation_logit, z_what
