"""Tests of the post-norm transformer encoder (PyTorch nn.TransformerEncoderLayer semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_seg_jax.models.transformer import TransformerEncoder

DIM, HEADS, MLP, LAYERS = 16, 4, 32, 2


@pytest.fixture(scope="module")
def model_and_variables():
    model = TransformerEncoder(
        num_layers=LAYERS, dim=DIM, heads=HEADS, mlp_dim=MLP, dropout=0.1
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, DIM))
    variables = jax.jit(lambda key: model.init(key, x, train=False))(
        jax.random.PRNGKey(0)
    )
    return model, variables, x


def test_names_and_parameter_count(model_and_variables):
    _, variables, _ = model_and_variables
    params = variables["params"]
    assert sorted(params) == [f"layers_{i}" for i in range(LAYERS)]
    layer = params["layers_0"]
    assert sorted(layer) == ["linear1", "linear2", "norm1", "norm2", "self_attn"]
    assert sorted(layer["self_attn"]) == ["key", "out", "query", "value"]
    per_layer = 4 * (DIM * DIM + DIM) + (DIM * MLP + MLP) + (MLP * DIM + DIM) + 4 * DIM
    total = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert total == LAYERS * per_layer
    # The official 6-layer, 256-wide stack: 6 * 527,104 parameters.
    big = jax.eval_shape(
        lambda key, tokens: TransformerEncoder().init(key, tokens, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 10, 256), jnp.float32),
    )
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(big)) == 6 * 527_104


def test_post_norm_output_is_layer_normalised(model_and_variables):
    model, variables, x = model_and_variables
    y = np.asarray(model.apply(variables, x * 5.0 + 3.0, train=False))
    assert y.shape == x.shape
    # The last operation is LayerNorm (scale 1, bias 0 at init).
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1.0, atol=1e-3)


def test_dropout_only_in_training(model_and_variables):
    model, variables, x = model_and_variables
    eval_a = model.apply(variables, x, train=False)
    eval_b = model.apply(
        variables, x, train=False, rngs={"dropout": jax.random.PRNGKey(3)}
    )
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}
    )
    train_b = model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    assert not np.allclose(np.asarray(train_a), np.asarray(eval_a))
    assert not np.allclose(np.asarray(train_a), np.asarray(train_b))
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True)


def test_tokens_are_permutation_equivariant(model_and_variables):
    # No positional encoding: permuting the slots permutes the outputs.
    model, variables, x = model_and_variables
    perm = np.array([2, 0, 1])
    y = model.apply(variables, x, train=False)
    y_perm = model.apply(variables, x[:, perm], train=False)
    np.testing.assert_allclose(np.asarray(y)[:, perm], np.asarray(y_perm), atol=1e-5)


def test_matches_pytorch_transformer_encoder(model_and_variables):
    import torch

    model, variables, x = model_and_variables
    layer = torch.nn.TransformerEncoderLayer(
        d_model=DIM, nhead=HEADS, dim_feedforward=MLP
    )
    encoder = torch.nn.TransformerEncoder(
        layer, num_layers=LAYERS, enable_nested_tensor=False
    ).eval()

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    with torch.no_grad():
        for i, torch_layer in enumerate(encoder.layers):
            p = variables["params"][f"layers_{i}"]
            att = p["self_attn"]
            in_w = [
                np.asarray(att[n]["kernel"]).reshape(DIM, DIM).T
                for n in ("query", "key", "value")
            ]
            in_b = [
                np.asarray(att[n]["bias"]).reshape(DIM)
                for n in ("query", "key", "value")
            ]
            torch_layer.self_attn.in_proj_weight.copy_(t(np.concatenate(in_w)))
            torch_layer.self_attn.in_proj_bias.copy_(t(np.concatenate(in_b)))
            torch_layer.self_attn.out_proj.weight.copy_(
                t(np.asarray(att["out"]["kernel"]).reshape(DIM, DIM).T)
            )
            torch_layer.self_attn.out_proj.bias.copy_(t(att["out"]["bias"]))
            for name in ("linear1", "linear2"):
                getattr(torch_layer, name).weight.copy_(
                    t(np.asarray(p[name]["kernel"]).T)
                )
                getattr(torch_layer, name).bias.copy_(t(p[name]["bias"]))
            for name in ("norm1", "norm2"):
                getattr(torch_layer, name).weight.copy_(t(p[name]["scale"]))
                getattr(torch_layer, name).bias.copy_(t(p[name]["bias"]))
        # PyTorch (batch_first=False) takes [seq, batch, d]: the slots are the sequence.
        expected = encoder(t(x).transpose(0, 1)).transpose(0, 1).numpy()
    got = np.asarray(model.apply(variables, x, train=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pytorch_like_init_bounds(model_and_variables):
    _, variables, _ = model_and_variables
    p = variables["params"]["layers_0"]
    # Xavier-uniform over the packed [3d, d] in-projection.
    packed_bound = np.sqrt(6.0 / (DIM + 3 * DIM))
    query = np.abs(np.asarray(p["self_attn"]["query"]["kernel"]))
    assert query.max() <= packed_bound and query.max() > 0.8 * packed_bound
    np.testing.assert_array_equal(np.asarray(p["self_attn"]["query"]["bias"]), 0.0)
    np.testing.assert_array_equal(np.asarray(p["self_attn"]["out"]["bias"]), 0.0)
    # nn.Linear default U(+-1/sqrt(fan_in)) for kernel and bias.
    lin2 = np.abs(np.asarray(p["linear2"]["bias"]))
    assert lin2.max() <= 1 / np.sqrt(MLP) and lin2.max() > 0
    assert np.abs(np.asarray(p["linear1"]["kernel"])).max() <= 1 / np.sqrt(DIM)


def test_rejects_wrong_width():
    with pytest.raises(ValueError, match="dim=16"):
        TransformerEncoder(num_layers=1, dim=16, heads=4).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 3, 8)), train=False
        )
