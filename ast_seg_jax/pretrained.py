"""Loading Hugging Face Segformer / MiT checkpoints into the Flax Segformer.

A checkpoint is a local directory holding the Hugging Face ``config.json`` and the weights, either
``model.safetensors`` (read with ``safetensors.numpy``, no torch needed) or ``pytorch_model.bin``
(needs torch, imported only then). Get one with, for example::

    python -c "from transformers import SegformerModel; \\
        SegformerModel.from_pretrained('nvidia/mit-b3').save_pretrained('checkpoints/mit-b3')"

and train with ``--config.model.pretrained_encoder=checkpoints/mit-b3``.

Conversion is a rename plus transpose: Linear ``(out, in)`` -> Dense ``(in, out)``, Conv2d OIHW ->
HWIO (the depthwise conv included), LayerNorm ``weight`` -> ``scale``, BatchNorm running
statistics -> the ``batch_stats`` collection. Keys may carry a ``segformer.`` prefix (image
classification and semantic segmentation checkpoints) or not (bare ``SegformerModel``). The legacy
on-disk names are expected; the module names transformers v5 uses in memory are accepted too. The
ImageNet ``classifier.*`` and BatchNorm ``num_batches_tracked`` entries are ignored. Every tensor is
checked against the shape the config implies, and missing or unexpected keys are reported by name.
"""

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ast_seg_jax.models.segformer import (
    Segformer,
    SegformerConfig,
    SegformerEncoder,
)
from ast_seg_jax.typing import PyTree

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

_HOW_TO_GET = (
    "Download a Hugging Face Segformer/MiT checkpoint, e.g. the ImageNet-pretrained encoder "
    "'nvidia/mit-b3', and save it locally with its config.json and model.safetensors, for "
    'instance with: python -c "from transformers import SegformerModel; '
    "SegformerModel.from_pretrained('nvidia/mit-b3').save_pretrained('<dir>')\" "
    "(on a machine with network access). Then pass "
    "--config.model.pretrained_encoder=<dir>."
)

# transformers v5 in-memory module names -> legacy (on-disk) names, applied in order.
_V5_RENAMES = (
    (
        re.compile(r"^stages\.(\d+)\.patch_embeddings\."),
        r"encoder.patch_embeddings.\1.",
    ),
    (re.compile(r"^stages\.(\d+)\.blocks\."), r"encoder.block.\1."),
    (re.compile(r"^stages\.(\d+)\.layer_norm\."), r"encoder.layer_norm.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.self.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.self.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.self.value."),
    (
        re.compile(r"\.attention\.sequence_reduction\.sequence_reduction\."),
        ".attention.self.sr.",
    ),
    (
        re.compile(r"\.attention\.sequence_reduction\.layer_norm\."),
        ".attention.self.layer_norm.",
    ),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".mlp.dense1."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.dense2."),
    (re.compile(r"\.layernorm_before\."), ".layer_norm_1."),
    (re.compile(r"\.layernorm_after\."), ".layer_norm_2."),
    (re.compile(r"^decode_head\.linear_projections\."), "decode_head.linear_c."),
)

# Flax module path (joined with '/') -> Hugging Face module name, as (regex, template) pairs.
_FLAX_TO_HF_MODULE = (
    (r"patch_embeddings_(\d+)/proj", r"encoder.patch_embeddings.\1.proj"),
    (r"patch_embeddings_(\d+)/layer_norm", r"encoder.patch_embeddings.\1.layer_norm"),
    (r"block_(\d+)_(\d+)/layer_norm_([12])", r"encoder.block.\1.\2.layer_norm_\3"),
    (
        r"block_(\d+)_(\d+)/attention/(query|key|value|sr)",
        r"encoder.block.\1.\2.attention.self.\3",
    ),
    (
        r"block_(\d+)_(\d+)/attention/sr_layer_norm",
        r"encoder.block.\1.\2.attention.self.layer_norm",
    ),
    (
        r"block_(\d+)_(\d+)/attention/output_dense",
        r"encoder.block.\1.\2.attention.output.dense",
    ),
    (r"block_(\d+)_(\d+)/mlp/(dense1|dense2)", r"encoder.block.\1.\2.mlp.\3"),
    (r"block_(\d+)_(\d+)/mlp/dwconv", r"encoder.block.\1.\2.mlp.dwconv.dwconv"),
    (r"layer_norm_(\d+)", r"encoder.layer_norm.\1"),
    (r"linear_c_(\d+)", r"decode_head.linear_c.\1.proj"),
    (r"(linear_fuse|batch_norm|classifier)", r"decode_head.\1"),
)

FLAX_TO_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def hf_name(path: tuple[str, ...], *, head: bool = False) -> str:
    """Returns the Hugging Face (legacy, unprefixed) key of a Flax parameter.

    Args:
      path: the parameter path inside the encoder tree (``('block_0_1', 'mlp', 'dense1',
        'kernel')``) or, with ``head=True``, inside the decode-head tree; ``mean``/``var`` leaves
        are the BatchNorm ``batch_stats``.
      head: whether `path` is relative to the decode head.
    """
    module = "/".join(path[:-1])
    for pattern, template in _FLAX_TO_HF_MODULE:
        match = re.fullmatch(pattern, module)
        if match is None:
            continue
        name = match.expand(template)
        if name.startswith("decode_head.") != head:
            continue
        return f"{name}.{FLAX_TO_TORCH_LEAF[path[-1]]}"
    raise ValueError(f"No Hugging Face name for the Flax parameter {'/'.join(path)}.")


def _to_flax(array: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout: Linear (out, in) -> (in, out); Conv OIHW -> HWIO."""
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax layout shape -> the torch layout shape of the same tensor."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _to_torch(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def _legacy_name(key: str) -> str:
    """Strips an optional ``segformer.`` prefix and maps transformers v5 names to legacy ones."""
    key = key.removeprefix("segformer.")
    if key.startswith(("stages.", "decode_head.linear_projections.")):
        for pattern, replacement in _V5_RENAMES:
            key = pattern.sub(replacement, key)
    return key


def _check_dir(checkpoint_dir: str | os.PathLike) -> str:
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(
            f"Segformer checkpoint directory {checkpoint_dir!r} does not exist. "
            + _HOW_TO_GET
        )
    return checkpoint_dir


def load_hf_config(checkpoint_dir: str | os.PathLike) -> SegformerConfig:
    """Reads ``config.json`` of a local Hugging Face Segformer checkpoint.

    Raises:
      FileNotFoundError: the directory or its config.json is missing.
      ValueError: the config is not a Segformer one.
    """
    checkpoint_dir = _check_dir(checkpoint_dir)
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in the Segformer checkpoint directory {checkpoint_dir!r}. "
            + _HOW_TO_GET
        )
    with open(path) as f:
        raw = json.load(f)
    try:
        return SegformerConfig.from_hf_json(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_hf_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads the weights of a local checkpoint as numpy arrays, keyed by legacy HF names.

    ``model.safetensors`` is preferred; ``pytorch_model.bin`` is read with torch (imported only
    then). The ``segformer.`` prefix is stripped and transformers v5 names are mapped back.

    Raises:
      FileNotFoundError: no directory or no weights file.
      ImportError: only a ``pytorch_model.bin`` exists and torch is not installed.
    """
    checkpoint_dir = _check_dir(checkpoint_dir)
    safetensors_path = os.path.join(checkpoint_dir, SAFETENSORS_FILE)
    torch_path = os.path.join(checkpoint_dir, TORCH_FILE)
    if os.path.isfile(safetensors_path):
        from safetensors.numpy import load_file

        raw = load_file(safetensors_path)
    elif os.path.isfile(torch_path):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{torch_path} is a PyTorch pickle and needs torch to read; install torch "
                f"or convert the checkpoint to {SAFETENSORS_FILE} once (save_pretrained does "
                "that)."
            ) from e
        state = torch.load(torch_path, map_location="cpu", weights_only=True)
        raw = {k: v.detach().cpu().numpy() for k, v in state.items()}
    else:
        raise FileNotFoundError(
            f"No weights in the Segformer checkpoint directory {checkpoint_dir!r}: expected "
            f"{SAFETENSORS_FILE} (or {TORCH_FILE}). " + _HOW_TO_GET
        )
    state_dict = {}
    for key, value in raw.items():
        name = _legacy_name(key)
        if name in state_dict:
            raise ValueError(
                f"Checkpoint in {checkpoint_dir!r} holds {name!r} twice (key {key!r})."
            )
        state_dict[name] = np.asarray(value)
    return state_dict


def _expected_shapes(config: SegformerConfig, num_outputs: int | None) -> PyTree:
    """Shapes of the Flax variables a config implies (no arrays are materialised)."""
    # Smallest input whose every stage map covers its reduction ratio; sizes do not affect shapes.
    side = 1
    for stride in config.strides:
        side *= stride
    side *= max(config.sr_ratios)
    images = jnp.zeros((1, side, side, config.num_channels), jnp.float32)
    if num_outputs is None:
        module = SegformerEncoder(config)
    else:
        module = Segformer(config, num_outputs)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))


def _convert(
    expected: Mapping[tuple[str, ...], Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    head: bool,
    source: str,
) -> tuple[dict[tuple[str, ...], jax.Array], set[str], list[str]]:
    """Converts the tensors for `expected` Flax paths; returns (flat tree, used keys, missing)."""
    flat, used, missing = {}, set(), []
    for path, leaf in expected.items():
        name = hf_name(path, head=head)
        if name not in state_dict:
            missing.append(name)
            continue
        value = state_dict[name]
        want = _to_torch_shape(tuple(leaf.shape))
        if tuple(value.shape) != want:
            raise ValueError(
                f"Shape mismatch for {name!r} in {source}: the checkpoint has "
                f"{tuple(value.shape)}, the config implies {want}."
            )
        flat[path] = jnp.asarray(_to_flax(value.astype(np.float32)))
        used.add(name)
    return flat, used, missing


def _check_keys(
    state_dict: Mapping[str, np.ndarray],
    used: set[str],
    missing: list[str],
    *,
    ignore_head: bool,
    source: str,
) -> None:
    def ignorable(name: str) -> bool:
        return (
            name.startswith("classifier.")
            or name.endswith("num_batches_tracked")
            or (ignore_head and name.startswith("decode_head."))
        )

    unexpected = sorted(k for k in state_dict if k not in used and not ignorable(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected}")
        raise ValueError(
            f"Checkpoint {source} does not match its config: " + "; ".join(parts)
        )


def _check_same_architecture(
    given: SegformerConfig, found: SegformerConfig, source: str
) -> None:
    for field in (
        "depths",
        "hidden_sizes",
        "num_heads",
        "sr_ratios",
        "patch_sizes",
        "strides",
        "mlp_ratio",
        "num_channels",
    ):
        if getattr(given, field) != getattr(found, field):
            raise ValueError(
                f"The encoder in {source} has {field}={getattr(found, field)}, but the model "
                f"config asks for {getattr(given, field)} (wrong segformer_variant?)."
            )


def load_hf_encoder_params(
    checkpoint_dir: str | os.PathLike, config: SegformerConfig | None = None
) -> tuple[SegformerConfig, PyTree]:
    """Loads the MiT encoder of a local Hugging Face checkpoint as a Flax params tree.

    Args:
      checkpoint_dir: directory with config.json and model.safetensors (or pytorch_model.bin).
      config: the model's config; if given, the checkpoint's architecture must equal it, and it is
        returned unchanged (so its dropout / drop-path settings stay the caller's).

    A decode head in the checkpoint (``decode_head.*``) and the ImageNet ``classifier.*`` are
    ignored; any other key the encoder does not use is an error.

    Returns:
      (config, params) where ``params`` has the structure of
      ``Segformer(config, n).init(...)['params']['encoder']`` (equivalently of
      ``SegformerEncoder(config).init(...)['params']``).

    Raises:
      FileNotFoundError: missing directory, config.json or weights file (the message says what
        to download and where to point ``--config.model.pretrained_encoder``).
      ValueError: not a Segformer config, an architecture differing from `config`, a tensor whose
        shape does not match (naming its key), or missing / unexpected keys (listed).
    """
    found = load_hf_config(checkpoint_dir)
    if config is not None:
        _check_same_architecture(config, found, os.fspath(checkpoint_dir))
    else:
        config = found
    state_dict = load_hf_state_dict(checkpoint_dir)
    source = repr(os.fspath(checkpoint_dir))
    expected = flax.traverse_util.flatten_dict(_expected_shapes(config, None)["params"])
    flat, used, missing = _convert(expected, state_dict, head=False, source=source)
    _check_keys(state_dict, used, missing, ignore_head=True, source=source)
    return config, flax.traverse_util.unflatten_dict(flat)


def segformer_from_hf(
    checkpoint_dir: str | os.PathLike,
) -> tuple[SegformerEncoder, dict[str, PyTree]]:
    """Builds the MiT encoder of a local Hugging Face checkpoint.

    Returns:
      (encoder, variables) such that ``encoder.apply(variables, images, train=False)`` maps NHWC
      images [b, h, w, 3] to the four stage maps (strides 4, 8, 16, 32), matching the
      ``hidden_states`` of the PyTorch ``SegformerModel`` transposed to NHWC.
    """
    config, params = load_hf_encoder_params(checkpoint_dir)
    return SegformerEncoder(config), {"params": params}


def segformer_for_semantic_segmentation_from_hf(
    checkpoint_dir: str | os.PathLike, *, normalize_input: bool = False
) -> tuple[Segformer, dict[str, PyTree]]:
    """Builds a full Segformer (encoder + decode head) from a semantic-segmentation checkpoint.

    The number of outputs is read from ``decode_head.classifier.weight``.

    Returns:
      (model, variables) with ``params`` and ``batch_stats`` (the running statistics) such that
      ``model.apply(variables, images, train=False)`` equals the PyTorch model's ``logits``
      transposed to NHWC, [b, h/4, w/4, num_labels].
    """
    config = load_hf_config(checkpoint_dir)
    state_dict = load_hf_state_dict(checkpoint_dir)
    source = repr(os.fspath(checkpoint_dir))
    classifier = state_dict.get("decode_head.classifier.weight")
    if classifier is None:
        raise ValueError(
            f"Checkpoint {source} has no decode head (no 'decode_head.classifier.weight'); "
            "use segformer_from_hf / load_hf_encoder_params for an encoder-only checkpoint."
        )
    num_outputs = int(classifier.shape[0])
    expected = _expected_shapes(config, num_outputs)
    used, missing = set(), []
    params_flat: dict[tuple[str, ...], jax.Array] = {}
    stats_flat: dict[tuple[str, ...], jax.Array] = {}
    parts = (
        (("params", "encoder"), False, params_flat),
        (("params", "decode_head"), True, params_flat),
        (("batch_stats", "decode_head"), True, stats_flat),
    )
    for (collection, module), head, target in parts:
        tree = flax.traverse_util.flatten_dict(expected[collection][module])
        flat, part_used, part_missing = _convert(
            tree, state_dict, head=head, source=source
        )
        target.update({(module, *path): v for path, v in flat.items()})
        used |= part_used
        missing += part_missing
    _check_keys(state_dict, used, missing, ignore_head=False, source=source)
    variables = {
        "params": flax.traverse_util.unflatten_dict(params_flat),
        "batch_stats": flax.traverse_util.unflatten_dict(stats_flat),
    }
    return Segformer(config, num_outputs, normalize_input=normalize_input), variables


def encoder_params_to_hf(params: PyTree) -> dict[str, np.ndarray]:
    """Inverse of the conversion: Flax encoder params -> legacy HF state-dict entries.

    Args:
      params: an encoder params tree (``variables['params']`` of a `SegformerEncoder`).

    Returns:
      ``{'encoder.block.0.0.mlp.dense1.weight': array, ...}`` in torch layouts (no prefix).
    """
    return {
        hf_name(path): _to_torch(np.asarray(value))
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }


def replace_encoder_params(segformer_params: PyTree, encoder_params: PyTree) -> PyTree:
    """Returns a copy of a `Segformer` params tree whose ``encoder`` subtree is `encoder_params`.

    Args:
      segformer_params: ``Segformer(...).init(...)['params']`` (freshly initialised head).
      encoder_params: e.g. the second result of `load_hf_encoder_params`.

    Raises:
      ValueError: the two encoder trees differ in structure or in any shape.
    """
    current = flax.traverse_util.flatten_dict(segformer_params["encoder"])
    new = flax.traverse_util.flatten_dict(encoder_params)
    if set(current) != set(new):
        only_model = sorted("/".join(p) for p in set(current) - set(new))
        only_new = sorted("/".join(p) for p in set(new) - set(current))
        raise ValueError(
            "Pretrained encoder does not fit the model: "
            f"missing {only_model[:10]}, unexpected {only_new[:10]}."
        )
    for path, value in current.items():
        if tuple(new[path].shape) != tuple(value.shape):
            raise ValueError(
                f"Pretrained encoder parameter {'/'.join(path)} has shape "
                f"{tuple(new[path].shape)}, the model expects {tuple(value.shape)}."
            )
    result = dict(segformer_params)
    result["encoder"] = encoder_params
    return result
