"""The sub-pixel transposed convolution equals Flax's / XLA's dilated one, values and gradients; the
shifted-product depthwise convolution equals XLA's grouped one; BatchNorm follows PyTorch's BatchNorm2d."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_seg_jax.models import layers

# (input hw, kernel hw, strides, padding of the dilated input): every shape the background model,
# the glimpse generator and the U-Net use, plus odd strides, asymmetric and negative padding.
CASES = [
    ((1, 1), (2, 2), (1, 1), ((1, 1), (1, 1))),  # glimpse layer 0
    ((4, 4), (4, 4), (2, 2), ((2, 2), (2, 2))),  # glimpse / U-Net doubling
    ((4, 4), (4, 4), (2, 2), ((2, 3), (2, 3))),  # U-Net with output_padding 1
    ((5, 3), (5, 5), (2, 2), ((2, 3), (2, 2))),  # AE-NE k5 s2 with output_padding
    ((2, 2), (2, 2), (1, 1), ((1, 1), (1, 1))),  # AE-NE kernel = side
    ((7, 9), (5, 5), (3, 3), ((2, 4), (2, 2))),  # large-image AE-NE stride 3
    ((3, 4), (5, 4), (2, 2), ((0, 0), (3, 1))),
    ((6, 6), (3, 3), (2, 1), ((1, 2), (0, 0))),
    ((8, 8), (1, 1), (2, 2), ((0, 0), (0, 1))),
    ((6, 5), (5, 3), (2, 3), ((-1, 2), (1, -1))),
]


def _reference(x, kernel, strides, padding):
    return jax.lax.conv_transpose(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# The three forms of the forward pass (one convolution per phase, one for all, one product and an
# overlap-add), and the automatic choice.
FORMS = [True, False, layers.OVERLAP_ADD, None]


@pytest.mark.parametrize("per_phase", FORMS)
@pytest.mark.parametrize("hw,khw,strides,padding", CASES)
def test_matches_dilated_convolution(hw, khw, strides, padding, per_phase):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*khw, 3, 5)), jnp.float32)
    want = _reference(x, kernel, strides, padding)
    got = layers.conv_transpose(x, kernel, strides, padding, per_phase)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("per_phase", FORMS[:3])
@pytest.mark.parametrize("hw,khw,strides,padding", CASES)
def test_gradients_match_dilated_convolution(hw, khw, strides, padding, per_phase):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*khw, 3, 5)), jnp.float32)
    want = _reference(x, kernel, strides, padding)
    # Gradients w.r.t. input and kernel, through a random cotangent.
    cot = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def loss(fn, x, k):
        return jnp.sum(fn(x, k, strides, padding) * cot)

    want_g = jax.grad(lambda x, k: loss(_reference, x, k), argnums=(0, 1))(x, kernel)
    ours = functools.partial(layers.conv_transpose, per_phase=per_phase)
    got_g = jax.grad(lambda x, k: loss(ours, x, k), argnums=(0, 1))(x, kernel)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=1e-4)


def test_wide_layers_as_tap_products_match_dilated_convolution():
    """From PER_PHASE_MIN_FEATURES outputs on, the per-phase convolutions are matrix products per
    kernel tap; values and gradients match."""
    rng = np.random.default_rng(2)
    f = layers.PER_PHASE_MIN_FEATURES
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, 5, 6, f)), jnp.float32)
    strides, padding = (2, 2), ((2, 3), (2, 2))
    want, want_vjp = jax.vjp(lambda x, k: _reference(x, k, strides, padding), x, kernel)
    got, got_vjp = jax.vjp(
        lambda x, k: layers.conv_transpose(x, k, strides, padding), x, kernel
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=1e-4)


def test_module_is_a_drop_in_for_flax_conv_transpose():
    kwargs = {
        "features": 6,
        "kernel_size": (4, 4),
        "strides": (2, 2),
        "padding": ((2, 2), (2, 2)),
        "use_bias": True,
        "bias_init": nn.initializers.normal(1.0),
    }
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 5, 4)), jnp.float32)
    theirs = nn.ConvTranspose(**kwargs)
    params = theirs.init(jax.random.PRNGKey(0), x)
    # The CPU's sub-pixel form and the other backends' lax.conv_transpose.
    for sub_pixel in (None, True, False):
        ours = layers.ConvTranspose(**kwargs, sub_pixel=sub_pixel)
        # Same parameter names and shapes, so checkpoints of either load into the other.
        chex.assert_trees_all_equal_shapes(ours.init(jax.random.PRNGKey(0), x), params)
        np.testing.assert_allclose(
            ours.apply(params, x), theirs.apply(params, x), atol=1e-4, rtol=1e-5
        )


def test_empty_output_and_channel_mismatch_are_reported():
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="empty output"):
        layers.conv_transpose(x, jnp.zeros((5, 5, 3, 1)), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="channels"):
        layers.conv_transpose(x, jnp.zeros((2, 2, 4, 1)), (1, 1), ((1, 1), (1, 1)))


def _assert_same_values_and_vjp(ours, theirs, x, kernel, rng):
    """`ours(x, kernel)` matches `theirs`, and so do both gradients for a random cotangent."""
    want, want_vjp = jax.vjp(theirs, x, kernel)
    got, got_vjp = jax.vjp(ours, x, kernel)
    chex.assert_equal_shape([got, want])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
        chex.assert_equal_shape([g, w])
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-5)


# (input hw, kernel hw, padding): Segformer's Mix-FFN (3x3, padding 1, maps down to 1x1), then
# asymmetric, zero and larger-than-kernel padding (a negative gradient padding).
DEPTHWISE_CASES = [
    ((16, 16), (3, 3), ((1, 1), (1, 1))),
    ((1, 1), (3, 3), ((1, 1), (1, 1))),
    ((7, 6), (3, 2), ((0, 2), (2, 1))),
    ((8, 5), (3, 3), ((3, 0), (0, 0))),
]


@pytest.mark.parametrize("hw,khw,padding", DEPTHWISE_CASES)
def test_depthwise_conv_matches_grouped_convolution(hw, khw, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*khw, 1, 5)), jnp.float32)

    def grouped(x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=5,
        )

    def shifted(x, kernel):
        return layers.depthwise_conv(x, kernel, padding)

    _assert_same_values_and_vjp(jax.jit(shifted), grouped, x, kernel, rng)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_depthwise_module_is_a_drop_in_for_a_grouped_flax_conv(dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6, 6, 8)), jnp.float32)
    kwargs = {"padding": ((1, 1), (1, 1)), "dtype": dtype}
    init = {"bias_init": nn.initializers.normal(1.0)}
    theirs = nn.Conv(8, (3, 3), feature_group_count=8, **kwargs, **init)
    params = theirs.init(jax.random.PRNGKey(0), x)
    want = theirs.apply(params, x)
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
    for shifted in (True, False):
        ours = layers.DepthwiseConv((3, 3), shifted=shifted, **kwargs, **init)
        # Same parameter names and shapes, so checkpoints of either load into the other.
        chex.assert_trees_all_equal_shapes(ours.init(jax.random.PRNGKey(0), x), params)
        got = ours.apply(params, x)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(
            got.astype(jnp.float32),
            want.astype(jnp.float32),
            atol=tolerance,
            rtol=tolerance,
        )


# (input hw, kernel hw, padding): the U-Net's 3x3 'same' layers, a 1x1 layer, then asymmetric,
# zero and larger-than-kernel padding (a negative gradient padding).
CONV_CASES = [
    ((9, 9), (3, 3), ((1, 1), (1, 1))),
    ((6, 5), (1, 1), ((0, 0), (0, 0))),
    ((7, 6), (3, 2), ((0, 2), (2, 1))),
    ((8, 5), (3, 3), ((3, 0), (0, 0))),
]


@pytest.mark.parametrize("hw,khw,padding", CONV_CASES)
def test_conv_matches_xla_convolution_and_its_gradients(hw, khw, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*khw, 5, 3)), jnp.float32)

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, kernel):
        return layers.conv(x, kernel, padding)

    _assert_same_values_and_vjp(jax.jit(ours), xla, x, kernel, rng)


# (input hw, kernel hw, strides, padding): the background encoder's 5x5 stride-2 layers, Segformer's
# patch embeddings (7x7 stride 4, 3x3 stride 2) and attention reduction (kernel = stride, no padding,
# also with a remainder that the convolution drops), unequal strides and asymmetric padding.
PATCH_CONV_CASES = [
    ((8, 8), (5, 5), (2, 2), ((2, 2), (2, 2))),
    ((16, 12), (7, 7), (4, 4), ((3, 3), (3, 3))),
    ((7, 7), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((8, 8), (4, 4), (4, 4), ((0, 0), (0, 0))),
    ((9, 10), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((9, 8), (3, 2), (2, 3), ((0, 2), (1, 0))),
]


@pytest.mark.parametrize("hw,khw,strides,padding", PATCH_CONV_CASES)
def test_patch_conv_matches_xla_strided_convolution_and_its_gradients(
    hw, khw, strides, padding
):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*khw, 5, 3)), jnp.float32)

    def xla(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, kernel):
        return layers.patch_conv(x, kernel, strides, padding)

    _assert_same_values_and_vjp(jax.jit(ours), xla, x, kernel, rng)


@pytest.mark.parametrize(
    "kernel_size,strides,padding",
    [
        ((3, 3), (1, 1), "SAME"),
        ((1, 1), (1, 1), "SAME"),
        ((4, 4), (2, 2), ((1, 1), (1, 1))),
        ((5, 5), (2, 2), ((2, 2), (2, 2))),
        ((2, 2), (2, 2), "VALID"),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_module_is_a_drop_in_for_flax_conv(kernel_size, strides, padding, dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 6)), jnp.float32)
    kwargs = {"strides": strides, "padding": padding, "dtype": dtype}
    init = {"bias_init": nn.initializers.normal(1.0)}
    theirs = nn.Conv(4, kernel_size, **kwargs, **init)
    params = theirs.init(jax.random.PRNGKey(0), x)
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

    want = theirs.apply(params, x)
    want_grads = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    for products in (True, False):
        ours = layers.Conv(4, kernel_size, products=products, **kwargs, **init)
        # Same parameter names and shapes, so checkpoints of either load into the other.
        chex.assert_trees_all_equal_shapes(ours.init(jax.random.PRNGKey(0), x), params)
        got = ours.apply(params, x)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(
            got.astype(jnp.float32),
            want.astype(jnp.float32),
            atol=tolerance,
            rtol=tolerance,
        )
        got_grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(
                np.asarray(g, np.float32),
                np.asarray(w, np.float32),
                atol=30 * tolerance,
                rtol=tolerance,
            )


def test_batch_norm_matches_pytorch_batch_norm_2d():
    """Train-mode output, running statistics (unbiased variance) after two steps, eval output."""
    import torch

    rng = np.random.default_rng(0)
    # Batch 2 at 2x2 pixels: n = 8 values per channel, where n / (n - 1) matters (14 %).
    xs = [
        (3.0 + rng.standard_normal((2, 2, 2, 5))).astype(np.float32) for _ in range(2)
    ]
    scale = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    reference = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(scale))
        reference.bias.copy_(torch.from_numpy(bias))
    variables = {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)},
    }
    train = layers.BatchNorm(use_running_average=False)
    for x in xs:
        want = reference.train()(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        got, updates = train.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(
            got, want.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5
        )
    np.testing.assert_allclose(
        variables["batch_stats"]["mean"], reference.running_mean.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        variables["batch_stats"]["var"], reference.running_var.numpy(), atol=1e-6
    )
    want = reference.eval()(torch.from_numpy(xs[0].transpose(0, 3, 1, 2)))
    got = layers.BatchNorm(use_running_average=True).apply(
        variables, jnp.asarray(xs[0])
    )
    np.testing.assert_allclose(
        got, want.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5
    )
    # Same variables as Flax's BatchNorm, so checkpoints written before stay loadable.
    flax_vars = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), xs[0])
    assert jax.tree.structure(flax_vars) == jax.tree.structure(
        layers.BatchNorm(use_running_average=True).init(jax.random.key(0), xs[0])
    )


def test_dropout_keeps_values_at_the_rate_flax_does_and_scales_them():
    x = jnp.ones((64, 64, 32), jnp.float32) * 3.0
    rate = 0.1
    ours = layers.Dropout(rate)
    rngs = {"dropout": jax.random.PRNGKey(0)}
    y = jax.jit(lambda x: ours.apply({}, x, deterministic=False, rngs=rngs))(x)
    kept = np.asarray(y) != 0
    # 131072 Bernoulli(0.9) draws: the kept share is within 5 standard deviations of 0.9.
    assert abs(kept.mean() - 0.9) < 5 * np.sqrt(0.9 * 0.1 / kept.size)
    np.testing.assert_allclose(np.asarray(y)[kept], 3.0 / 0.9, rtol=1e-6)
    # Deterministic given the key, different for another key, off when deterministic.
    again = ours.apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(again, y)
    other = ours.apply(
        {}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}
    )
    assert np.mean((np.asarray(other) != 0) != kept) > 0.1
    np.testing.assert_array_equal(ours.apply({}, x, deterministic=True), x)
    # The gradient is the mask over the keep probability, as for Flax's dropout.
    grad = jax.grad(
        lambda x: jnp.sum(ours.apply({}, x, deterministic=False, rngs=rngs))
    )(x)
    np.testing.assert_allclose(np.asarray(grad), kept / 0.9, rtol=1e-6)
    assert not np.any(layers.Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs))
