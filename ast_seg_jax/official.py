"""Loading the weights of the official PyTorch AST code (BrunoSauvalle/AST) into this port.

The official training script saves one checkpoint file for the foreground model, holding the
``state_dict()`` of the encoder ``netE`` (``encoder_state_dict``) and of the renderer ``netG``
(``generator_state_dict``), and, from the moment the background model is fine-tuned (phase 3 of the
curriculum, or the baseline scenario), those of the background encoder ``BE`` and generator ``BG``
(``background_encoder_state_dict``, ``background_generator_state_dict``). The AE-NE pretraining
script saves ``BE`` and ``BG`` as ``encoder_state_dict`` and ``generator_state_dict`` of its own
``model_final.pth``. `load_official` takes these state dicts as flat dicts of numpy arrays (the
encoder's and renderer's entries together in one dict, the background encoder's and generator's in
another: their key names do not overlap) and returns the variables of this project's AST model.

Conversion per tensor (PyTorch layout -> Flax layout):

* ``nn.Linear`` weight ``(out, in)`` -> Dense kernel ``(in, out)``;
* ``nn.Conv2d`` weight ``(out, in, kh, kw)`` -> Conv kernel ``(kh, kw, in, out)``;
* ``nn.ConvTranspose2d`` weight ``(in, out, kh, kw)`` -> the kernel of the equivalent convolution
  of the stride-dilated input, spatially flipped: ``w[:, :, ::-1, ::-1]`` as ``(kh, kw, in, out)``;
* ``nn.MultiheadAttention``'s packed ``in_proj_weight`` ``(3d, d)`` -> the query, key and value
  kernels ``(d, heads, d / heads)`` (rows ``0:d``, ``d:2d``, ``2d:3d``), ``out_proj.weight`` ->
  the output kernel ``(heads, d / heads, d)``;
* norm ``weight`` -> ``scale``; BatchNorm ``running_mean`` / ``running_var`` -> the
  ``batch_stats`` collection (``num_batches_tracked`` is not needed);
* the renderer's ``background_activation_logit`` ``(1, 1)`` -> the scalar ``background_logit``.

The Segformer's tensors go through the converter of `ast_seg_jax.pretrained` (the official encoder
holds a Hugging Face ``SegformerForSemanticSegmentation`` under
``feature_and_attention_map_generator.complete_model``); names written by transformers v4 or v5
are both accepted.

The official modules also store constants as non-trainable parameters: the soft-argmax position
map (``position_map``), the AE-NE coordinate channels (``*.positional_encoding``), the background
mask (ones) and an unused background mask logit (zeros). This port computes them; they must be in
the state dicts and are checked against the computed values.

Every key of the given dicts must be used and every parameter of the model must be found: a
missing or unexpected key, or a tensor whose shape does not fit the config, raises a ValueError
naming the key (and both shapes).
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ast_seg_jax import pretrained
from ast_seg_jax.models.background import coordinate_channels
from ast_seg_jax.models.build import build_model
from ast_seg_jax.models.soft_argmax import position_grid
from ast_seg_jax.typing import PyTree

# Official module names.
GENERATOR_PREFIX = "feature_and_attention_map_generator."
SEGFORMER_PREFIX = GENERATOR_PREFIX + "complete_model."

# config.model settings whose official value is required: another value changes the function the
# loaded weights compute (or the parameter tree), so the result would not be the official model.
_OFFICIAL_SETTINGS = {
    "clean_latent_layout": False,
    "normalize_input": False,
    "use_transformer": True,
    "transformer_residual": False,
    "slot_suppression_sigma": 0.0,
    "appearance_encoder": "pooled",
    "glimpse_mask": "decoded",
    "flat_colour": False,
    "unet_width": 1.0,
    "background_width": 1.0,
}

# U-Net: Flax module path -> official module name, as (regex, template) pairs.
_UNET_MODULES = (
    (r"stem_conv", r"first_feature_map.0"),
    (r"stem_bn", r"first_feature_map.1"),
    (r"down_(\d+)_conv", r"downsample_blocks.\1.bloc1.0"),
    (r"down_(\d+)_bn", r"downsample_blocks.\1.bloc1.1"),
    (r"down_(\d+)_residual/conv", r"downsample_blocks.\1.bloc2.0"),
    (r"down_(\d+)_residual/bn", r"downsample_blocks.\1.bloc2.1"),
    (r"centre_conv", r"center_block.0"),
    (r"centre_bn", r"center_block.1"),
    (r"up_(\d+)_residual/conv", r"upsample_blocks.\1.bloc1.0"),
    (r"up_(\d+)_residual/bn", r"upsample_blocks.\1.bloc1.1"),
    (r"up_(\d+)_conv/conv", r"upsample_blocks.\1.bloc2.0"),
    (r"up_(\d+)_bn", r"upsample_blocks.\1.bloc2.1"),
    (r"out_conv", r"last_skip_layer.0"),
    (r"out_bn", r"last_skip_layer.1"),
    (r"refine_conv", r"last_residual_layer"),
    (r"final_conv", r"conv1x1"),
)

# The same leaf names as PyTorch's modules (kernel -> weight, BatchNorm mean -> running_mean, ...).
_LEAF_NAMES = pretrained.FLAX_TO_TORCH_LEAF


# ------------------------------------------------------------------------------------------------
# Layout conversions (torch array -> Flax array) and the torch shape a Flax shape comes from.


def _linear(w: np.ndarray) -> np.ndarray:
    return w.T


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _conv_transpose(w: np.ndarray) -> np.ndarray:
    return w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _torch_shape(kind: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind is _linear:
        return (shape[1], shape[0])
    if kind is _conv:
        return (shape[3], shape[2], shape[0], shape[1])
    if kind is _conv_transpose:
        return (shape[2], shape[3], shape[0], shape[1])
    return tuple(shape)


class _Source:
    """Where one Flax leaf comes from: an official key, the torch shape it must have, a converter."""

    def __init__(self, key: str, torch_shape: tuple[int, ...], convert: Callable):
        self.key = key
        self.torch_shape = tuple(torch_shape)
        self.convert = convert


def _plain(key: str, kind: Callable, flax_shape: tuple[int, ...]) -> _Source:
    return _Source(key, _torch_shape(kind, flax_shape), kind)


def _leaf_kind(leaf: str, ndim: int, transposed: bool) -> Callable:
    if leaf != "kernel":
        return _same
    if ndim == 2:
        return _linear
    return _conv_transpose if transposed else _conv


# ------------------------------------------------------------------------------------------------
# The source of every Flax leaf.


def _attention_source(
    layer: int, rest: tuple[str, ...], flax_shape: tuple[int, ...]
) -> _Source:
    """Sources of the transformer's attention leaves (the packed in-projection is split)."""
    prefix = f"transformer.layers.{layer}.self_attn."
    module, leaf = rest
    if module == "out":
        if leaf == "bias":
            return _plain(prefix + "out_proj.bias", _same, flax_shape)
        heads, head_dim, dim = flax_shape
        return _Source(
            prefix + "out_proj.weight",
            (dim, dim),
            lambda w: w.T.reshape(heads, head_dim, dim),
        )
    part = ("query", "key", "value").index(module)
    if leaf == "bias":
        heads, head_dim = flax_shape
        dim = heads * head_dim
        return _Source(
            prefix + "in_proj_bias",
            (3 * dim,),
            lambda b: b[part * dim : (part + 1) * dim].reshape(heads, head_dim),
        )
    dim, heads, head_dim = flax_shape
    return _Source(
        prefix + "in_proj_weight",
        (3 * dim, dim),
        lambda w: w[part * dim : (part + 1) * dim].T.reshape(dim, heads, head_dim),
    )


def _foreground_source(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> _Source:
    """The official netE / netG source of a Flax leaf outside the background model."""
    top, leaf = path[0], path[-1]
    if top == "background_logit":
        return _Source("background_activation_logit", (1, 1), lambda a: a.reshape(()))
    if top in ("embed", "readout"):
        name = "feature_vector_embedding" if top == "embed" else "latents_projection"
        kind = _leaf_kind(leaf, len(flax_shape), False)
        return _plain(f"{name}.{_LEAF_NAMES[leaf]}", kind, flax_shape)
    if top == "transformer":
        layer = int(re.fullmatch(r"layers_(\d+)", path[1]).group(1))
        if path[2] == "self_attn":
            return _attention_source(layer, path[3:], flax_shape)
        kind = _leaf_kind(leaf, len(flax_shape), False)
        key = f"transformer.layers.{layer}.{path[2]}.{_LEAF_NAMES[leaf]}"
        return _plain(key, kind, flax_shape)
    if top == "glimpse_generator":
        kind_name, index = re.fullmatch(r"(conv|norm)_(\d+)", path[1]).groups()
        position = 3 * int(index) + (0 if kind_name == "conv" else 1)
        kind = _leaf_kind(leaf, len(flax_shape), True)
        return _plain(
            f"glimpse_generator.{position}.{_LEAF_NAMES[leaf]}", kind, flax_shape
        )
    if top == "feature_generator":
        return _feature_generator_source(path[1:], flax_shape)
    raise ValueError(f"No official counterpart for the parameter {'/'.join(path)}.")


def _feature_generator_source(
    path: tuple[str, ...], flax_shape: tuple[int, ...]
) -> _Source:
    leaf = path[-1]
    if path[0] in ("encoder", "decode_head"):
        # Segformer: the pretrained converter's naming (legacy Hugging Face keys).
        head = path[0] == "decode_head"
        name = pretrained.hf_name(path[1:], head=head)
        name = SEGFORMER_PREFIX + ("" if head else "segformer.") + name
        kind = pretrained._to_flax  # Linear (out, in) -> (in, out); Conv OIHW -> HWIO.
        return _Source(name, pretrained._to_torch_shape(flax_shape), kind)
    module = "/".join(path[:-1])
    for pattern, template in _UNET_MODULES:
        match = re.fullmatch(pattern, module)
        if match is not None:
            transposed = module.startswith("up_") and module.endswith("_conv/conv")
            kind = _leaf_kind(leaf, len(flax_shape), transposed)
            key = f"{GENERATOR_PREFIX}{match.expand(template)}.{_LEAF_NAMES[leaf]}"
            return _plain(key, kind, flax_shape)
    raise ValueError(
        f"No official counterpart for the parameter feature_generator/{'/'.join(path)}."
    )


def _background_source(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> _Source:
    """The official BE / BG source of a leaf of ``background_model``."""
    part, module, leaf = path
    kind_name, index = re.fullmatch(r"(conv|norm)_(\d+)", module).groups()
    sub = 0 if kind_name == "conv" else 1
    if part == "encoder":
        key = f"background_encoder.{index}.downsample.{sub}.{_LEAF_NAMES[leaf]}"
        return _plain(key, _leaf_kind(leaf, len(flax_shape), False), flax_shape)
    key = f"background_generator.{index}.upsample.{sub}.{_LEAF_NAMES[leaf]}"
    return _plain(key, _leaf_kind(leaf, len(flax_shape), True), flax_shape)


# ------------------------------------------------------------------------------------------------
# Constants stored by the official modules.


def _official_position_map(fh: int, fw: int) -> np.ndarray:
    """The soft-argmax position map as the official encoder stores it, (1, 2, fh, fw)."""
    grid = np.asarray(position_grid(fh, fw))  # [h, w, 2]
    return grid.transpose(2, 0, 1)[None]


def _official_coordinates(h: int, w: int) -> np.ndarray:
    """The AE-NE coordinate channels as the official blocks store them, (1, 2, h, w)."""
    return coordinate_channels(h, w).transpose(2, 0, 1)[None]


def _feature_map_hw(model, image_hw: tuple[int, int]) -> tuple[int, int]:
    if model.feature_generator == "unet":
        return tuple(image_hw)
    cfg = model.segformer_config
    k, s = cfg.patch_sizes[0], cfg.strides[0]
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n in image_hw)


def _constants(model, image_hw: tuple[int, int]) -> tuple[dict, dict]:
    """Expected constants of the foreground and background state dicts."""
    from ast_seg_jax.models.background import conv_schedule

    fg = {
        "position_map": _official_position_map(*_feature_map_hw(model, image_hw)),
        "background_mask": np.ones((1, 1, 1, 1, 1), np.float32),
        "background_mask_logit": np.zeros((1, 1, 1, 1, 1), np.float32),
    }
    bg = {}
    steps = conv_schedule(image_hw)
    for i, step in enumerate(steps):
        bg[f"background_encoder.{i}.positional_encoding"] = _official_coordinates(
            *step.in_hw
        )
    # Decoder block j undoes encoder step n-1-j and adds coordinates at that step's output size.
    for j, step in enumerate(reversed(steps)):
        bg[f"background_generator.{j}.positional_encoding"] = _official_coordinates(
            *step.out_hw
        )
    return fg, bg


# ------------------------------------------------------------------------------------------------
# The loader.


def _normalise_keys(state_dict: Mapping[str, Any], source: str) -> dict[str, tuple]:
    """{official key with legacy Segformer names: (key as given, array)}."""
    out = {}
    for key, value in state_dict.items():
        name = key
        if key.startswith(SEGFORMER_PREFIX):
            rest = pretrained._legacy_name(key[len(SEGFORMER_PREFIX) :])
            if not rest.startswith("decode_head."):
                rest = "segformer." + rest
            name = SEGFORMER_PREFIX + rest
        if name in out:
            raise ValueError(f"The {source} state dict holds {name!r} twice ({key!r}).")
        out[name] = (key, np.asarray(value))
    return out


def _check_settings(config: ml_collections.ConfigDict) -> None:
    m = config.model
    for key, official in _OFFICIAL_SETTINGS.items():
        value = m.get(key, official)
        if value != official:
            raise ValueError(
                f"config.model.{key}={value!r}, but the official model has {official!r}: "
                "official weights only define the official model."
            )


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _plan(config: ml_collections.ConfigDict):
    """Where every variable of the model comes from, and the constants the official dicts hold.

    Returns:
      (plan, constants): plan is a list of (collection, Flax path, 'foreground' | 'background',
      _Source); constants maps 'foreground' / 'background' to {key: expected value}.
    """
    image_hw = tuple(int(s) for s in config.data.image_size)
    model = build_model(config.model, image_hw)
    expected = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0), "dropout": jax.random.key(0)},
            jnp.zeros((1, *image_hw, 3), jnp.float32),
            train=False,
        )
    )
    plan = []
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(expected.get(collection, {}))
        for path, leaf in flat.items():
            if path[0] == "background_model":
                plan.append(
                    (
                        collection,
                        path,
                        "background",
                        _background_source(path[1:], leaf.shape),
                    )
                )
            else:
                plan.append(
                    (
                        collection,
                        path,
                        "foreground",
                        _foreground_source(path, leaf.shape),
                    )
                )
    fg_constants, bg_constants = _constants(model, image_hw)
    return plan, {"foreground": fg_constants, "background": bg_constants}


def official_shapes(
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The keys and shapes `load_official` expects for a config (BatchNorm counters excepted).

    Returns:
      (foreground, background): {official key: torch shape}, the constants included (their
      values are those of `official_constants`).
    """
    _check_settings(config)
    plan, constants = _plan(config)
    shapes = {"foreground": {}, "background": {}}
    for _, _, part, source in plan:
        shapes[part][source.key] = source.torch_shape
    for part, part_shapes in shapes.items():
        part_shapes.update({k: v.shape for k, v in constants[part].items()})
    return shapes["foreground"], shapes["background"]


def official_constants(
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The constants the official state dicts hold for a config: (foreground, background)."""
    _, constants = _plan(config)
    return constants["foreground"], constants["background"]


def load_official(
    foreground: Mapping[str, Any],
    background: Mapping[str, Any],
    config: ml_collections.ConfigDict,
) -> dict[str, PyTree]:
    """Converts official AST state dicts into the variables of this project's AST model.

    Args:
      foreground: the official encoder's and renderer's ``state_dict()`` entries (``netE`` and
        ``netG``) in one flat dict of arrays (numpy, or anything ``np.asarray`` reads).
      background: the official AE-NE background encoder's and generator's entries (``BE`` and
        ``BG``) in one flat dict.
      config: this project's config (``config.data.image_size`` and ``config.model``) describing the
        same architecture: image size, feature generator and Segformer variant, number of slots,
        z_what width, isotropic or not, transformer sizes, glimpse size and background complexity.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of ``build_model(config.model, image_size)``, float32.

    Raises:
      ValueError: a config setting the official model does not have, a key the model does not use,
        a key it needs that is missing, a tensor of the wrong shape (naming the key, the shape found
        and the shape the config implies), or a stored constant that differs from the official one.
    """
    _check_settings(config)
    plan, constants = _plan(config)
    given = {
        "foreground": _normalise_keys(foreground, "foreground"),
        "background": _normalise_keys(background, "background"),
    }
    used = {"foreground": set(), "background": set()}
    missing = {"foreground": [], "background": []}
    flat_out: dict[str, dict[tuple[str, ...], jax.Array]] = {
        "params": {},
        "batch_stats": {},
    }
    for collection, path, part, source in plan:
        entry = given[part].get(source.key)
        if entry is None:
            if source.key not in missing[part]:
                missing[part].append(source.key)
            continue
        key, value = entry
        if tuple(value.shape) != source.torch_shape:
            raise ValueError(
                f"Shape mismatch for {key!r} in the {part} state dict: it has "
                f"{tuple(value.shape)}, the config implies {source.torch_shape}."
            )
        converted = np.asarray(source.convert(value.astype(np.float32)))
        flat_out[collection][path] = jnp.asarray(np.array(converted, np.float32))
        used[part].add(source.key)

    for part in ("foreground", "background"):
        for name, want in constants[part].items():
            entry = given[part].get(name)
            if entry is None:
                missing[part].append(name)
                continue
            key, value = entry
            if tuple(value.shape) != want.shape:
                raise ValueError(
                    f"Shape mismatch for {key!r} in the {part} state dict: it has "
                    f"{tuple(value.shape)}, the config implies {want.shape}."
                )
            if not np.allclose(value, want, atol=1e-5):
                raise ValueError(
                    f"{key!r} in the {part} state dict is a constant of the official model "
                    "but holds other values than the official ones."
                )
            used[part].add(name)

    problems = []
    for part in ("foreground", "background"):
        unexpected = sorted(
            original
            for name, (original, _) in given[part].items()
            if name not in used[part] and not _ignorable(name)
        )
        if missing[part]:
            problems.append(
                f"{len(missing[part])} keys missing from the {part} state dict: "
                f"{sorted(missing[part])}"
            )
        if unexpected:
            note = ""
            if "local_background_activation_logit" in unexpected:
                note = (
                    " (local_background_activation_logit belongs to the natural-video option "
                    "variable_background_activation, which this port does not implement)"
                )
            problems.append(
                f"{len(unexpected)} unexpected keys in the {part} state dict: {unexpected}{note}"
            )
    if problems:
        raise ValueError(
            "The official checkpoint does not match the config: " + "; ".join(problems)
        )
    return {
        collection: flax.traverse_util.unflatten_dict(flat)
        for collection, flat in flat_out.items()
    }
