"""Hugging Face checkpoint loading: key handling, file formats, validation and error messages."""

import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import hf_segformer_json

from ast_seg_jax import pretrained
from ast_seg_jax.models import segformer as sf

TINY = {
    "depths": (1, 2, 1, 1),
    "hidden_sizes": (8, 16, 24, 32),
    "num_heads": (1, 2, 3, 4),
    "decoder_hidden_size": 16,
}


def _tiny_config(**kwargs) -> sf.SegformerConfig:
    return sf.SegformerConfig(**{**TINY, **kwargs})


def _random_encoder_params(config: sf.SegformerConfig, seed: int = 0):
    shapes = jax.eval_shape(
        lambda: sf.SegformerEncoder(config).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False
        )
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes
    )


def _write_checkpoint(path, config, state, *, torch_format=False, json_dict=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(json_dict or hf_segformer_json(config))
    )
    if torch_format:
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()
        }
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        contiguous = {k: np.ascontiguousarray(v) for k, v in state.items()}
        safetensors.numpy.save_file(contiguous, str(path / "model.safetensors"))
    return path


def _assert_trees_equal(a, b):
    flat_a = flax.traverse_util.flatten_dict(a)
    flat_b = flax.traverse_util.flatten_dict(b)
    assert set(flat_a) == set(flat_b)
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An ImageNet-style checkpoint: 'segformer.' prefix plus the 1000-class classifier."""
    config = _tiny_config()
    params = _random_encoder_params(config)
    state = {
        f"segformer.{k}": v for k, v in pretrained.encoder_params_to_hf(params).items()
    }
    state["classifier.weight"] = np.zeros((1000, 32), np.float32)
    state["classifier.bias"] = np.zeros((1000,), np.float32)
    return (
        _write_checkpoint(tmp_path / "mit-tiny", config, state),
        config,
        params,
        state,
    )


def test_round_trip_with_prefix_and_imagenet_classifier(tiny_checkpoint):
    path, config, params, _ = tiny_checkpoint
    encoder, variables = pretrained.segformer_from_hf(path)
    assert isinstance(encoder, sf.SegformerEncoder)
    assert encoder.config == config
    _assert_trees_equal(variables["params"], params)
    found, loaded = pretrained.load_hf_encoder_params(str(path))
    assert found == config
    _assert_trees_equal(loaded, params)


def test_bin_file_and_unprefixed_keys(tmp_path, tiny_checkpoint):
    _, config, params, _ = tiny_checkpoint
    state = pretrained.encoder_params_to_hf(params)
    path = _write_checkpoint(tmp_path / "bin", config, state, torch_format=True)
    _, loaded = pretrained.load_hf_encoder_params(path)
    _assert_trees_equal(loaded, params)


def test_names_match_hugging_face_including_v5_in_memory_names(tmp_path):
    hf_config = transformers.SegformerConfig(
        depths=[1, 2, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 2, 3, 4],
    )
    model = transformers.SegformerModel(hf_config)
    legacy_dir = tmp_path / "legacy"
    model.save_pretrained(legacy_dir)
    legacy_keys = set(
        safetensors.numpy.load_file(str(legacy_dir / "model.safetensors"))
    )
    config, from_legacy = pretrained.load_hf_encoder_params(legacy_dir)
    assert set(pretrained.encoder_params_to_hf(from_legacy)) == legacy_keys

    in_memory = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("stages.") for k in in_memory)  # really the v5 names
    v5_dir = _write_checkpoint(
        tmp_path / "v5", config, in_memory, json_dict=hf_config.to_dict()
    )
    _, from_v5 = pretrained.load_hf_encoder_params(v5_dir)
    _assert_trees_equal(from_v5, from_legacy)


def test_given_config_is_checked_and_kept(tiny_checkpoint):
    path, _, params, _ = tiny_checkpoint
    wanted = _tiny_config(drop_path_rate=0.0)
    got_config, loaded = pretrained.load_hf_encoder_params(path, wanted)
    assert got_config is wanted
    _assert_trees_equal(loaded, params)
    with pytest.raises(ValueError, match="depths"):
        pretrained.load_hf_encoder_params(path, sf.SegformerConfig.preset("b0"))


def test_put_pretrained_encoder_into_segformer(tiny_checkpoint):
    path, config, params, _ = tiny_checkpoint
    _, encoder_params = pretrained.load_hf_encoder_params(path, config)
    model = sf.Segformer(config, num_outputs=9)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
    merged = pretrained.replace_encoder_params(fresh, encoder_params)
    _assert_trees_equal(merged["encoder"], params)
    _assert_trees_equal(merged["decode_head"], fresh["decode_head"])
    other = _random_encoder_params(_tiny_config(hidden_sizes=(8, 16, 24, 40)))
    with pytest.raises(ValueError, match=r"block_3_0/.* has shape \(40,\)"):
        pretrained.replace_encoder_params(fresh, other)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        pretrained.segformer_from_hf(tmp_path / "nowhere")
    message = str(e.value)
    assert "nowhere" in message
    assert "nvidia/mit-b3" in message
    assert "--config.model.pretrained_encoder" in message


def test_missing_weights_and_missing_config(tmp_path, tiny_checkpoint):
    path, *_ = tiny_checkpoint
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        pretrained.load_hf_encoder_params(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.segformer_from_hf(tmp_path / "empty")


def test_shape_mismatch_names_the_key(tmp_path, tiny_checkpoint):
    _, config, _, state = tiny_checkpoint
    key = "segformer.encoder.block.1.0.mlp.dense1.weight"
    state = {**state, key: np.zeros((64, 17), np.float32)}
    path = _write_checkpoint(tmp_path / "bad", config, state)
    with pytest.raises(
        ValueError, match=r"encoder\.block\.1\.0\.mlp\.dense1\.weight"
    ) as e:
        pretrained.segformer_from_hf(path)
    assert "(64, 17)" in str(e.value) and "(64, 16)" in str(e.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_checkpoint):
    _, config, _, state = tiny_checkpoint
    state = dict(state)
    del state["segformer.encoder.layer_norm.2.bias"]
    state["segformer.encoder.extra.weight"] = np.zeros((3,), np.float32)
    path = _write_checkpoint(tmp_path / "keys", config, state)
    with pytest.raises(ValueError) as e:
        pretrained.segformer_from_hf(path)
    assert "encoder.layer_norm.2.bias" in str(e.value)
    assert "encoder.extra.weight" in str(e.value)


def test_unknown_architecture(tmp_path, tiny_checkpoint):
    _, config, _, state = tiny_checkpoint
    path = _write_checkpoint(
        tmp_path / "vit", config, state, json_dict={"model_type": "vit"}
    )
    with pytest.raises(ValueError, match="Unknown architecture"):
        pretrained.segformer_from_hf(path)


def test_full_loader_needs_a_decode_head(tiny_checkpoint):
    path, *_ = tiny_checkpoint
    with pytest.raises(ValueError, match="no decode head"):
        pretrained.segformer_for_semantic_segmentation_from_hf(path)


def test_full_loader_reads_head_and_running_stats(tmp_path):
    config = _tiny_config()
    model = sf.Segformer(config, num_outputs=6)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes
    )
    state = pretrained.encoder_params_to_hf(variables["params"]["encoder"])
    head = variables["params"]["decode_head"]
    stats = variables["batch_stats"]["decode_head"]["batch_norm"]
    for i in range(4):
        state[f"decode_head.linear_c.{i}.proj.weight"] = head[f"linear_c_{i}"][
            "kernel"
        ].T
        state[f"decode_head.linear_c.{i}.proj.bias"] = head[f"linear_c_{i}"]["bias"]
    state["decode_head.linear_fuse.weight"] = head["linear_fuse"]["kernel"].transpose(
        3, 2, 0, 1
    )
    state["decode_head.batch_norm.weight"] = head["batch_norm"]["scale"]
    state["decode_head.batch_norm.bias"] = head["batch_norm"]["bias"]
    state["decode_head.batch_norm.running_mean"] = stats["mean"]
    state["decode_head.batch_norm.running_var"] = stats["var"]
    state["decode_head.batch_norm.num_batches_tracked"] = np.array(7, np.int64)
    state["decode_head.classifier.weight"] = head["classifier"]["kernel"].transpose(
        3, 2, 0, 1
    )
    state["decode_head.classifier.bias"] = head["classifier"]["bias"]
    state = {
        f"segformer.{k}" if k.startswith("encoder.") else k: v for k, v in state.items()
    }
    path = _write_checkpoint(tmp_path / "seg", config, state)
    loaded_model, loaded = pretrained.segformer_for_semantic_segmentation_from_hf(path)
    assert loaded_model.num_outputs == 6 and loaded_model.config == config
    _assert_trees_equal(loaded, variables)
    assert math.prod(
        loaded["params"]["decode_head"]["linear_fuse"]["kernel"].shape
    ) == (4 * 16 * 16)
