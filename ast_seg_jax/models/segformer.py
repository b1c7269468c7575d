"""Segformer in Flax: the Mix Transformer (MiT) encoder and the all-MLP decode head.

Weight-compatible with the Hugging Face PyTorch ``SegformerModel`` /
``SegformerForSemanticSegmentation`` (checkpoints ``nvidia/mit-b0`` ... ``nvidia/mit-b5``); see
``ast_seg_jax.pretrained`` for the converter. Everything is NHWC.

Module and parameter names mirror the Hugging Face (legacy, on-disk) hierarchy so that a checkpoint
converts by renaming and transposing only::

    encoder/patch_embeddings_{i}/{proj, layer_norm}
    encoder/block_{i}_{j}/layer_norm_1
    encoder/block_{i}_{j}/attention/{query, key, value, sr, sr_layer_norm, output_dense}
    encoder/block_{i}_{j}/layer_norm_2
    encoder/block_{i}_{j}/mlp/{dense1, dwconv, dense2}
    encoder/layer_norm_{i}
    decode_head/{linear_c_{i}, linear_fuse, batch_norm, classifier}

Numerical details that matter for parity with PyTorch (all measured, see the project spec):
exact (erf) GELU, LayerNorm epsilon 1e-5 everywhere, symmetric explicit padding for the strided
patch convolutions, ``'VALID'`` (flooring) sequence-reduction convolutions, concatenation of the
projected stage maps in the order 4, 3, 2, 1 in the head, BatchNorm momentum 0.9 (torch 0.1).
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ast_seg_jax.models import layers

# ImageNet statistics used by the Hugging Face SegformerImageProcessor (RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hugging Face initialisation: N(0, initializer_range=0.02) kernels, zero biases.
_KERNEL_INIT = nn.initializers.normal(stddev=0.02)
_BIAS_INIT = nn.initializers.zeros_init()

# depths, hidden_sizes, decoder_hidden_size of the published sizes (identical in the HF hub configs,
# the HF conversion script and the NVlabs code).
_PRESETS = {
    "b0": ((2, 2, 2, 2), (32, 64, 160, 256), 256),
    "b1": ((2, 2, 2, 2), (64, 128, 320, 512), 256),
    "b2": ((3, 4, 6, 3), (64, 128, 320, 512), 768),
    "b3": ((3, 4, 18, 3), (64, 128, 320, 512), 768),
    "b4": ((3, 8, 27, 3), (64, 128, 320, 512), 768),
    "b5": ((3, 6, 40, 3), (64, 128, 320, 512), 768),
}


def _as_tuple(name: str, value: Any, num_stages: int) -> tuple[int, ...]:
    """Returns `value` as a tuple of `num_stages` ints (an int is broadcast)."""
    if isinstance(value, int):
        return (value,) * num_stages
    result = tuple(int(v) for v in value)
    if len(result) != num_stages:
        raise ValueError(
            f"SegformerConfig.{name} has {len(result)} entries, expected {num_stages} "
            f"(one per stage): {result}"
        )
    return result


@dataclasses.dataclass(frozen=True)
class SegformerConfig:
    """Hyper-parameters of a Segformer (MiT encoder + all-MLP head).

    Field names follow the Hugging Face config where they can; lists are stored as tuples so the
    config is hashable and can be a field of a Linen module.

    Attributes:
      depths: transformer layers per stage.
      hidden_sizes: channels per stage.
      num_heads: attention heads per stage (HF ``num_attention_heads``).
      sr_ratios: sequence-reduction ratio per stage (kernel = stride of the ``sr`` conv).
      patch_sizes: kernel of the overlapping patch embedding per stage (padding = size // 2).
      strides: stride of the overlapping patch embedding per stage.
      mlp_ratio: Mix-FFN expansion; an int for all stages or one per stage (HF ``mlp_ratios``).
      decoder_hidden_size: width D of the decode head.
      drop_path_rate: largest stochastic-depth rate; block rates rise linearly from 0 to it.
      classifier_dropout: dropout before the head's 1x1 classifier.
      layer_norm_eps: epsilon of every LayerNorm. HF Segformer builds all its LayerNorms with the
        torch default 1e-5 and ignores the ``layer_norm_eps`` (1e-6) stored in its config.
      num_channels: input image channels.
      hidden_dropout: dropout after the attention output and inside the Mix-FFN (0 in all released
        configs).
      attention_dropout: dropout on the attention probabilities (0 in all released configs).
    """

    depths: tuple[int, ...] = (2, 2, 2, 2)
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int | tuple[int, ...] = 4
    decoder_hidden_size: int = 256
    drop_path_rate: float = 0.1
    classifier_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        num_stages = len(tuple(self.depths))
        if num_stages < 1:
            raise ValueError("SegformerConfig.depths must have at least one stage.")
        for name in (
            "depths",
            "hidden_sizes",
            "num_heads",
            "sr_ratios",
            "patch_sizes",
            "strides",
        ):
            object.__setattr__(
                self, name, _as_tuple(name, getattr(self, name), num_stages)
            )
        object.__setattr__(
            self, "mlp_ratio", _as_tuple("mlp_ratio", self.mlp_ratio, num_stages)
        )
        for size, heads in zip(self.hidden_sizes, self.num_heads):
            if size % heads:
                raise ValueError(
                    f"hidden size {size} is not divisible by its {heads} attention heads."
                )

    @property
    def num_stages(self) -> int:
        """Number of encoder stages (4 for every released model)."""
        return len(self.depths)

    def drop_path_rates(self) -> list[list[float]]:
        """Per-block stochastic-depth rates, ``linspace(0, drop_path_rate, sum(depths))``."""
        total = sum(self.depths)
        flat = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        rates, start = [], 0
        for depth in self.depths:
            rates.append(flat[start : start + depth])
            start += depth
        return rates

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SegformerConfig":
        """Returns the configuration of a published size.

        Args:
          name: "b0" ... "b5" (case-insensitive, "mit-b3" also accepted).
          **overrides: fields to change, e.g. ``drop_path_rate=0.0``.
        """
        key = name.lower().removeprefix("mit-").removeprefix("segformer-")
        if key not in _PRESETS:
            raise ValueError(
                f"Unknown Segformer size {name!r}; expected one of {sorted(_PRESETS)}."
            )
        depths, hidden_sizes, decoder = _PRESETS[key]
        fields = {
            "depths": depths,
            "hidden_sizes": hidden_sizes,
            "decoder_hidden_size": decoder,
        }
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_json(cls, config: Mapping[str, Any]) -> "SegformerConfig":
        """Builds a config from a Hugging Face Segformer ``config.json`` dictionary.

        Missing keys take the Hugging Face defaults. ``layer_norm_eps`` is deliberately not read
        (Hugging Face does not use it either).

        Raises:
          ValueError: for a config that is not a Segformer/MiT one or uses an unsupported option.
        """
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "segformer" and not any(
            str(a).startswith("Segformer") for a in architectures
        ):
            raise ValueError(
                "Unknown architecture: expected a Hugging Face Segformer/MiT config "
                f"(model_type 'segformer'), got model_type={model_type!r}, "
                f"architectures={architectures!r}."
            )
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(
                f"Unsupported hidden_act {act!r}: only the exact 'gelu' of every released "
                "Segformer is implemented."
            )
        depths = tuple(config.get("depths", (2, 2, 2, 2)))
        num_blocks = config.get("num_encoder_blocks", len(depths))
        if num_blocks != len(depths):
            raise ValueError(
                f"num_encoder_blocks={num_blocks} does not match depths={list(depths)}."
            )
        return cls(
            depths=depths,
            hidden_sizes=tuple(config.get("hidden_sizes", (32, 64, 160, 256))),
            num_heads=tuple(config.get("num_attention_heads", (1, 2, 5, 8))),
            sr_ratios=tuple(config.get("sr_ratios", (8, 4, 2, 1))),
            patch_sizes=tuple(config.get("patch_sizes", (7, 3, 3, 3))),
            strides=tuple(config.get("strides", (4, 2, 2, 2))),
            mlp_ratio=tuple(config.get("mlp_ratios", (4, 4, 4, 4))),
            decoder_hidden_size=int(config.get("decoder_hidden_size", 256)),
            drop_path_rate=float(config.get("drop_path_rate", 0.1)),
            classifier_dropout=float(config.get("classifier_dropout_prob", 0.1)),
            num_channels=int(config.get("num_channels", 3)),
            hidden_dropout=float(config.get("hidden_dropout_prob", 0.0)),
            attention_dropout=float(config.get("attention_probs_dropout_prob", 0.0)),
        )


def _drop_path(
    module: nn.Module, x: Float[Array, "b ..."], rate: float | Array, train: bool
) -> Float[Array, "b ..."]:
    """Stochastic depth: zeroes whole examples of a residual branch with probability `rate`.

    `rate` is a Python float, or a traced scalar inside a scanned stage (`SegformerEncoder`).
    """
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
        return x
    keep = 1.0 - rate
    rng = module.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _dense(features: int, name: str, dtype: Any = jnp.float32) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=_KERNEL_INIT,
        bias_init=_BIAS_INIT,
        dtype=dtype,
        name=name,
    )


class OverlapPatchEmbed(nn.Module):
    """Strided conv with symmetric padding ``patch_size // 2`` followed by a LayerNorm.

    Attributes:
      features: output channels.
      patch_size: conv kernel size.
      stride: conv stride.
      eps: LayerNorm epsilon.
      dtype: computation dtype.
    """

    features: int
    patch_size: int
    stride: int
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 d"]:
        """Maps [b, h, w, c] to [b, ceil-ish(h / stride), ..., features] (torch conv sizes)."""
        pad = self.patch_size // 2
        x = layers.Conv(
            self.features,
            (self.patch_size, self.patch_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            dtype=self.dtype,
            name="proj",
        )(x)
        return nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm")(x)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced map.

    Attributes:
      num_heads: attention heads; channel c belongs to head c // head_dim.
      sr_ratio: kernel and stride of the ``sr`` conv (1 = no reduction, no ``sr`` params).
      eps: epsilon of the reduction LayerNorm.
      attention_dropout: dropout on the attention probabilities.
      hidden_dropout: dropout after the output projection.
      dtype: computation dtype (the attention softmax runs in float32).
    """

    num_heads: int
    sr_ratio: int
    eps: float = 1e-5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], *, train: bool
    ) -> Float[Array, "b h w c"]:
        """Attends from every position of [b, h, w, c] to the reduced map; returns [b, h, w, c]."""
        b, h, w, c = x.shape
        head_dim = c // self.num_heads
        q = _dense(c, "query", self.dtype)(x).reshape(
            b, h * w, self.num_heads, head_dim
        )
        kv = x
        if self.sr_ratio > 1:
            kv = layers.Conv(
                c,
                (self.sr_ratio, self.sr_ratio),
                strides=(self.sr_ratio, self.sr_ratio),
                padding="VALID",
                kernel_init=_KERNEL_INIT,
                bias_init=_BIAS_INIT,
                dtype=self.dtype,
                name="sr",
            )(kv)
            kv = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="sr_layer_norm")(
                kv
            )
        num_kv = kv.shape[1] * kv.shape[2]
        k = _dense(c, "key", self.dtype)(kv).reshape(
            b, num_kv, self.num_heads, head_dim
        )
        v = _dense(c, "value", self.dtype)(kv).reshape(
            b, num_kv, self.num_heads, head_dim
        )
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * (head_dim**-0.5)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        probs = nn.Dropout(self.attention_dropout, deterministic=not train)(probs)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, h, w, c)
        out = _dense(c, "output_dense", self.dtype)(out)
        return nn.Dropout(self.hidden_dropout, deterministic=not train)(out)


class MixFFN(nn.Module):
    """Dense -> 3x3 depthwise conv -> exact GELU -> Dense, with optional dropout.

    Attributes:
      hidden_features: width of the expanded layer (mlp_ratio * c).
      hidden_dropout: dropout after the activation and after the second Dense.
      dtype: computation dtype.
    """

    hidden_features: int
    hidden_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], *, train: bool
    ) -> Float[Array, "b h w c"]:
        """Maps [b, h, w, c] to [b, h, w, c]."""
        c = x.shape[-1]
        y = _dense(self.hidden_features, "dense1", self.dtype)(x)
        # Same parameters as nn.Conv(..., feature_group_count=hidden_features), faster on a CPU.
        y = layers.DepthwiseConv(
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            dtype=self.dtype,
            name="dwconv",
        )(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dropout(self.hidden_dropout, deterministic=not train)(y)
        y = _dense(c, "dense2", self.dtype)(y)
        return nn.Dropout(self.hidden_dropout, deterministic=not train)(y)


class MiTBlock(nn.Module):
    """Pre-norm transformer layer: efficient attention and Mix-FFN, each with drop path.

    Attributes:
      num_heads: attention heads.
      sr_ratio: sequence-reduction ratio.
      mlp_ratio: Mix-FFN expansion.
      drop_path: stochastic-depth rate of both residual branches.
      eps: LayerNorm epsilon.
      attention_dropout: dropout on attention probabilities.
      hidden_dropout: dropout inside the branches.
      dtype: computation dtype.
    """

    num_heads: int
    sr_ratio: int
    mlp_ratio: int
    drop_path: float
    eps: float = 1e-5
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b h w c"],
        *,
        train: bool,
        drop_path: Float[Array, ""] | None = None,
    ) -> Float[Array, "b h w c"]:
        """Maps [b, h, w, c] to [b, h, w, c]; `drop_path` (traced) replaces the attribute's rate."""
        c = x.shape[-1]
        rate = self.drop_path if drop_path is None else drop_path
        y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm_1")(x)
        y = EfficientSelfAttention(
            self.num_heads,
            self.sr_ratio,
            eps=self.eps,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            dtype=self.dtype,
            name="attention",
        )(y, train=train)
        x = x + _drop_path(self, y, rate, train)
        y = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm_2")(x)
        y = MixFFN(self.mlp_ratio * c, self.hidden_dropout, self.dtype, name="mlp")(
            y, train=train
        )
        return x + _drop_path(self, y, rate, train)


class SegformerEncoder(nn.Module):
    """The hierarchical Mix Transformer (MiT) encoder.

    With `scan_blocks`, each stage runs its blocks as one `lax.scan` over their parameters, stacked
    at call time: the compiled program holds one block per stage instead of `depths[i]`, so tracing,
    compiling and loading a cached program take less time (MiT-B3's third stage has 18 blocks). The
    parameters keep the per-block layout, so checkpoints are the same either way. Outputs and
    gradients agree with the unrolled form to float rounding; in training, the drop-path and dropout
    masks are drawn from other keys (same distribution). On a CPU the scanned step is slower (see
    the README's performance section), so it is off by default.

    Attributes:
      config: the Segformer hyper-parameters.
      dtype: computation dtype.
      scan_blocks: run each stage's blocks as a scan (above).
    """

    config: SegformerConfig
    dtype: Any = jnp.float32
    scan_blocks: bool = False

    def _block(self, i: int, j: int, **kwargs) -> MiTBlock:
        cfg = self.config
        return MiTBlock(
            cfg.num_heads[i],
            cfg.sr_ratios[i],
            cfg.mlp_ratio[i],
            cfg.drop_path_rates()[i][j],
            eps=cfg.layer_norm_eps,
            attention_dropout=cfg.attention_dropout,
            hidden_dropout=cfg.hidden_dropout,
            dtype=self.dtype,
            **kwargs,
        )

    def _scanned_stage(
        self, i: int, x: Float[Array, "b h w c"], train: bool
    ) -> Float[Array, "b h w c"]:
        """Stage i's blocks as one scan over their stacked parameters (the params must exist)."""
        cfg = self.config
        depth, stage_rates = cfg.depths[i], cfg.drop_path_rates()[i]
        params = self.variables.get("params", {})
        names = [f"block_{i}_{j}" for j in range(depth)]
        missing = [name for name in names if name not in params]
        if missing:
            raise ValueError(
                f"Segformer parameters lack {', '.join(missing)}: they do not fit depths "
                f"{cfg.depths}."
            )
        stacked = jax.tree.map(
            lambda *leaves: jnp.stack(leaves), *(params[name] for name in names)
        )
        # Unbound: applied to each block's parameters in turn.
        block = self._block(i, 0, parent=None)
        random = train and (
            max(stage_rates) > 0 or cfg.hidden_dropout > 0 or cfg.attention_dropout > 0
        )
        # Per-block drop-path rates and keys, scanned with the parameters; None when nothing is random.
        rates = jnp.asarray(stage_rates, jnp.float32) if random else None
        keys = jax.random.split(self.make_rng("dropout"), depth) if random else None

        def body(x, inputs):
            block_params, rate, key = inputs
            x = block.apply(
                {"params": block_params},
                x,
                train=train,
                drop_path=rate,
                rngs={"dropout": key} if random else None,
            )
            return x, None

        x, _ = jax.lax.scan(body, x, (stacked, rates, keys))
        return x

    @nn.compact
    def __call__(
        self, images: Float[Array, "b h w c"], *, train: bool
    ) -> list[Float[Array, "b hi wi ci"]]:
        """Computes the four stage feature maps.

        Args:
          images: [b, h, w, num_channels] float images.
          train: enables drop path / dropout (needs the 'dropout' rng).

        Returns:
          One NHWC map per stage, [b, h_i, w_i, hidden_sizes[i]] with strides 4, 8, 16, 32 for the
          released configs (torch conv sizes: 64 -> 16, 8, 4, 2; 200x320 -> 50x80, 25x40, 13x20, 7x10).
        """
        cfg = self.config
        if images.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"Segformer expects {cfg.num_channels} input channels (NHWC), got images "
                f"of shape {images.shape}."
            )
        x = images
        features = []
        for i in range(cfg.num_stages):
            x = OverlapPatchEmbed(
                cfg.hidden_sizes[i],
                cfg.patch_sizes[i],
                cfg.strides[i],
                eps=cfg.layer_norm_eps,
                dtype=self.dtype,
                name=f"patch_embeddings_{i}",
            )(x)
            if cfg.sr_ratios[i] > 1 and min(x.shape[1:3]) < cfg.sr_ratios[i]:
                raise ValueError(
                    f"Input {images.shape[1:3]} is too small: stage {i + 1} map "
                    f"{x.shape[1:3]} is smaller than its reduction ratio {cfg.sr_ratios[i]}."
                )
            if self.scan_blocks and cfg.depths[i] > 1 and not self.is_initializing():
                x = self._scanned_stage(i, x, train)
            else:  # Also what creates the parameters, in the same layout for both forms.
                for j in range(cfg.depths[i]):
                    x = self._block(i, j, name=f"block_{i}_{j}")(x, train=train)
            x = nn.LayerNorm(
                epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=f"layer_norm_{i}"
            )(x)
            features.append(x)
        return features


class _LinearFuse(nn.Module):
    """The decode head's upsampling, concatenation and bias-free 1x1 ``linear_fuse`` convolution.

    The official head upsamples each projected stage map to the stage-1 size (bilinear, half-pixel
    centres: torch's ``align_corners=False``), concatenates them, deepest stage first, and applies a
    1x1 convolution. Upsampling is linear and acts on each channel alone, so it commutes with the
    per-pixel matrix product: here each stage map is multiplied by its block of the kernel at its own
    resolution, then upsampled, and the four results are added. The values are the same up to float
    rounding (tests/test_segformer.py compares the head with Hugging Face's PyTorch one); the product costs 1/4, 1/16 and 1/64 of
    its stage-1 cost for stages 2-4, and no 4x-wide concatenated map is built. This was most of the
    head's cost on a CPU (about a quarter of an objects_room phase-2 step, docs/benchmarks.md). The
    parameter is the convolution's ``kernel`` of shape (1, 1, stages * d, d), as in the official head.

    Attributes:
      features: output channels d.
      out_shape: (b, h1, w1, d) of the stage-1 map.
      dtype: computation dtype.
    """

    features: int
    out_shape: tuple[int, int, int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, projected: Sequence[Float[Array, "b hi wi d"]]) -> Array:
        """Maps the projected stage maps, stage 1 first, to [b, h1, w1, features]."""
        d = projected[0].shape[-1]
        stages = len(projected)
        kernel = self.param(
            "kernel", _KERNEL_INIT, (1, 1, stages * d, self.features), jnp.float32
        )
        kernel = kernel[0, 0].astype(self.dtype)
        out = None
        for i, y in enumerate(projected):
            block = stages - 1 - i  # Concatenated deepest stage first.
            y = y.astype(self.dtype) @ kernel[block * d : (block + 1) * d]
            if y.shape != self.out_shape:
                y = jax.image.resize(y, self.out_shape, method="bilinear")
            out = y if out is None else out + y
        return out


class SegformerDecodeHead(nn.Module):
    """All-MLP decode head: project, upsample to stage 1, fuse, classify.

    Attributes:
      config: the Segformer hyper-parameters (hidden sizes, decoder width, dropout).
      num_outputs: channels of the output map (HF ``num_labels``).
      dtype: computation dtype (the logits are returned in float32).
    """

    config: SegformerConfig
    num_outputs: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, features: Sequence[Float[Array, "b hi wi ci"]], *, train: bool
    ) -> Float[Array, "b h1 w1 o"]:
        """Maps the stage maps to logits at the stage-1 resolution.

        Args:
          features: the encoder's stage maps, stage 1 first.
          train: BatchNorm uses batch statistics (mutable 'batch_stats') and dropout is active
            (needs the 'dropout' rng).

        Returns:
          [b, h1, w1, num_outputs] where (h1, w1) is the stage-1 size (1/4 of the input).
        """
        cfg = self.config
        if len(features) != cfg.num_stages:
            raise ValueError(
                f"Decode head expects {cfg.num_stages} feature maps, got {len(features)}."
            )
        b, h1, w1, _ = features[0].shape
        d = cfg.decoder_hidden_size
        projected = [
            _dense(d, f"linear_c_{i}", self.dtype)(feature)
            for i, feature in enumerate(features)
        ]
        x = _LinearFuse(d, (b, h1, w1, d), self.dtype, name="linear_fuse")(projected)
        x = layers.BatchNorm(  # PyTorch semantics: unbiased running variance.
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            name="batch_norm",
        )(x)
        x = nn.relu(x)
        # Faster random bits than nn.Dropout's on a CPU; the same distribution (layers.Dropout).
        x = layers.Dropout(cfg.classifier_dropout, deterministic=not train)(x)
        logits = layers.Conv(
            self.num_outputs,
            (1, 1),
            padding="VALID",
            kernel_init=_KERNEL_INIT,
            bias_init=_BIAS_INIT,
            dtype=self.dtype,
            name="classifier",
        )(x)
        return logits.astype(jnp.float32)


class Segformer(nn.Module):
    """MiT encoder + all-MLP head (HF ``SegformerForSemanticSegmentation`` without the loss).

    Attributes:
      config: the Segformer hyper-parameters.
      num_outputs: output channels.
      normalize_input: subtract the ImageNet mean and divide by its std before the encoder (what
        the HF image processor does). Off by default: AST feeds raw [0, 1] RGB.
      dtype: computation dtype of every layer (parameters stay float32; LayerNorm statistics,
        the attention softmax and the returned logits are float32).
      scan_blocks: run each encoder stage's blocks as one scan (`SegformerEncoder`).
    """

    config: SegformerConfig
    num_outputs: int
    normalize_input: bool = False
    dtype: Any = jnp.float32
    scan_blocks: bool = False

    @nn.compact
    def __call__(
        self, images: Float[Array, "b h w 3"], *, train: bool
    ) -> Float[Array, "b h1 w1 o"]:
        """Maps [b, h, w, 3] RGB images in [0, 1] to [b, h1, w1, num_outputs] (1/4 resolution)."""
        if self.normalize_input:
            if images.shape[-1] != len(IMAGENET_MEAN):
                raise ValueError(
                    "normalize_input applies the ImageNet RGB statistics and needs 3 "
                    f"channels, got images of shape {images.shape}."
                )
            mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
            std = jnp.asarray(IMAGENET_STD, images.dtype)
            images = (images - mean) / std
        features = SegformerEncoder(
            self.config, self.dtype, self.scan_blocks, name="encoder"
        )(images, train=train)
        return SegformerDecodeHead(
            self.config, self.num_outputs, self.dtype, name="decode_head"
        )(features, train=train)
