"""Tests of the glimpse generator (ast_model.md section 2.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_seg_jax.models.glimpse import GlimpseGenerator, glimpse_size_for


def _num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _expected_params(glimpse_size: int, z: int) -> int:
    # Transposed convs: z -> 2g (k2), then halving channels (k4), last -> 4 with bias;
    # GroupNorm scale + bias on every hidden layer.
    channels = [z]
    c = 2 * glimpse_size
    while c >= 8:
        channels.append(c)
        c //= 2
    channels.append(4)
    total = 0
    for i in range(len(channels) - 1):
        kernel = 2 if i == 0 else 4
        total += channels[i] * channels[i + 1] * kernel * kernel
        if i < len(channels) - 2:
            total += 2 * channels[i + 1]
    return total + 4  # Output bias.


@pytest.mark.parametrize("glimpse_size, num_layers", [(32, 5), (64, 6), (128, 7)])
def test_shapes_and_parameter_count(glimpse_size, num_layers):
    model = GlimpseGenerator(glimpse_size)
    z = jax.ShapeDtypeStruct((3, 32), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), z)
    params = variables["params"]
    assert sorted(params) == sorted(
        [f"conv_{i}" for i in range(num_layers)]
        + [f"norm_{i}" for i in range(num_layers - 1)]
    )
    assert "bias" in params[f"conv_{num_layers - 1}"]
    assert all("bias" not in params[f"conv_{i}"] for i in range(num_layers - 1))
    assert _num_params(params) == _expected_params(glimpse_size, 32)
    out = jax.eval_shape(model.apply, variables, z)
    assert out.shape == (3, glimpse_size, glimpse_size, 4)


@pytest.fixture(scope="module")
def glimpse32():
    model = GlimpseGenerator(32)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), z), z


def test_forward_range_and_official_first_layers(glimpse32):
    model, variables, z = glimpse32
    params = variables["params"]
    # Spec table: 64 -> 32 -> 16 -> 8 -> 4 channels for the 32-px variant.
    assert [params[f"conv_{i}"]["kernel"].shape[-1] for i in range(5)] == [
        64,
        32,
        16,
        8,
        4,
    ]
    assert params["conv_0"]["kernel"].shape == (2, 2, 8, 64)
    glimpses = np.asarray(jax.jit(model.apply)(variables, z))
    assert glimpses.shape == (5, 32, 32, 4)
    assert np.all((glimpses > 0) & (glimpses < 1))
    # Different latents give different glimpses; identical latents identical ones.
    assert not np.allclose(glimpses[0], glimpses[1])
    same = np.asarray(jax.jit(model.apply)(variables, jnp.stack([z[0], z[0]])))
    np.testing.assert_allclose(same[0], same[1])


def test_pytorch_default_init_bounds(glimpse32):
    params = glimpse32[1]["params"]
    # PyTorch ConvTranspose2d: U(+-1/sqrt(out_channels * k^2)) for weight and bias.
    last = params["conv_4"]
    bound = 1 / np.sqrt(4 * 16)
    assert np.abs(last["kernel"]).max() <= bound
    assert np.abs(last["bias"]).max() <= bound
    assert np.abs(last["bias"]).max() > 0.0
    first_bound = 1 / np.sqrt(64 * 4)
    assert np.abs(params["conv_0"]["kernel"]).max() <= first_bound
    assert np.abs(params["conv_0"]["kernel"]).max() > 0.8 * first_bound


@pytest.mark.parametrize(
    "image_hw, size",
    [
        ((64, 64), 32),
        ((32, 48), 32),
        ((128, 128), 64),
        ((64, 128), 64),
        ((200, 320), 128),
    ],
)
def test_glimpse_size_for(image_hw, size):
    assert glimpse_size_for(image_hw) == size


def test_rejects_unsupported_size():
    with pytest.raises(ValueError, match="glimpse_size"):
        GlimpseGenerator(48).init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))


def test_width_multiplies_the_hidden_channels():
    shapes = jax.eval_shape(
        lambda z: GlimpseGenerator(32, width=2.0).init(jax.random.PRNGKey(0), z),
        jax.ShapeDtypeStruct((2, 16), jnp.float32),
    )["params"]
    # Official 32-px widths are 64, 32, 16, 8, then 4 output channels; x2 doubles the hidden ones.
    assert [shapes[f"conv_{i}"]["kernel"].shape[-1] for i in range(5)] == [
        128,
        64,
        32,
        16,
        4,
    ]
    assert shapes["norm_0"]["scale"].shape == (128,)
