"""Tests of the AE-NE background autoencoder (ast_model.md section 5.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_seg_jax.models import background as bg


def _num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_variables(image_hw, complexity):
    model = bg.BackgroundAutoencoder(image_hw, complexity)
    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


# Spec 5.2: "128 complex = 21.2 M (enc) + 48.6 M (dec); 128 simple = 3.6 M + 9.3 M;
# 64 complex = 2.9 M + 43.6 M; 64 simple = 2.9 M + 7.7 M".
@pytest.mark.parametrize(
    "image_hw, complexity, encoder_millions, decoder_millions",
    [
        ((128, 128), True, 21.2, 48.6),
        ((128, 128), False, 3.6, 9.3),
        ((64, 64), True, 2.9, 43.6),
        ((64, 64), False, 2.9, 7.7),
    ],
)
def test_parameter_counts_match_the_spec(
    image_hw, complexity, encoder_millions, decoder_millions
):
    model, variables = _abstract_variables(image_hw, complexity)
    params = variables["params"]
    assert set(params) == {"encoder", "decoder"}
    assert _num_params(params["encoder"]) / 1e6 == pytest.approx(
        encoder_millions, abs=0.05
    )
    assert _num_params(params["decoder"]) / 1e6 == pytest.approx(
        decoder_millions, abs=0.05
    )
    rgba = jax.eval_shape(
        model.apply, variables, jax.ShapeDtypeStruct((2, *image_hw, 3), jnp.float32)
    )
    assert rgba.shape == (2, *image_hw, 4)


def test_exact_parameter_count_64_simple():
    # Encoder 3,64,160,320,160,32,16 with kernels 5,5,5,5,4,2 (+2 coordinate channels
    # per block) and GroupNorm scale+bias; decoder mirrors with 4,144,256,512,256,32,16.
    enc_ch, dec_ch = (3, 64, 160, 320, 160, 32, 16), (4, 144, 256, 512, 256, 32, 16)
    kernels = (5, 5, 5, 5, 4, 2)
    enc = sum((enc_ch[i] + 2) * enc_ch[i + 1] * kernels[i] ** 2 for i in range(6))
    enc += sum(2 * c for c in enc_ch[1:])
    dec = sum((dec_ch[i + 1] + 2) * dec_ch[i] * kernels[i] ** 2 for i in range(6))
    dec += sum(2 * c for c in dec_ch[1:-1])
    _, variables = _abstract_variables((64, 64), False)
    assert _num_params(variables["params"]["encoder"]) == enc
    assert _num_params(variables["params"]["decoder"]) == dec


@pytest.mark.parametrize(
    "image_hw, kernels, sizes",
    [
        ((128, 128), [5] * 5 + [4, 2], [128, 64, 32, 16, 8, 4, 2, 1]),
        ((64, 64), [5] * 4 + [4, 2], [64, 32, 16, 8, 4, 2, 1]),
        ((32, 32), [5] * 3 + [4, 2], [32, 16, 8, 4, 2, 1]),
    ],
)
def test_small_image_kernel_schedule(image_hw, kernels, sizes):
    steps = bg.conv_schedule(image_hw)
    assert [s.kernel[0] for s in steps] == kernels
    assert [s.in_hw[0] for s in steps] + [steps[-1].out_hw[0]] == sizes
    # Stride-2 kernel-5 layers need output_padding 1 to get back to the even sizes.
    assert [s.output_padding[0] for s in steps] == [int(k == 5) for k in kernels]


def test_large_image_kernel_schedule_200x320():
    steps = bg.conv_schedule((200, 320))
    assert [s.in_hw for s in steps] == [
        (200, 320),
        (67, 107),
        (23, 36),
        (8, 12),
        (3, 4),
    ]
    assert steps[-1].kernel == (3, 4) and steps[-1].stride == (1, 1)
    assert all(s.stride == (3, 3) for s in steps[:-1])
    enc, dec = bg.channel_schedule((200, 320), complexity=True)
    assert enc == (3, 64, 160, 160, 16, 16)
    assert dec == (4, 144, 640, 640, 16, 16)


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 8, 9])
def test_channel_rule_for_other_depths(num_blocks):
    for complexity in (False, True):
        enc = bg._resize_schedule(bg._ENCODER_CHANNELS, num_blocks, complexity)
        dec = bg._resize_schedule(bg._DECODER_CHANNELS, num_blocks, complexity)
        assert len(enc) == len(dec) == num_blocks + 1
        assert enc[0] == 3 and dec[0] == 4 and enc[-1] == dec[-1] == bg.CODE_DIM


@pytest.mark.parametrize("image_hw", [(16, 16), (200, 320)])
def test_output_shape_for_other_sizes(image_hw):
    model, variables = _abstract_variables(image_hw, complexity=False)
    images = jax.ShapeDtypeStruct((2, *image_hw, 3), jnp.float32)
    assert jax.eval_shape(model.apply, variables, images).shape == (2, *image_hw, 4)


def test_forward_non_square_image():
    image_hw = (24, 40)  # Heights reach 1 a block before widths do.
    model = bg.BackgroundAutoencoder(image_hw, complexity=False)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, *image_hw, 3))
    # An 'unsafe_rbg' key compiles `init` several times faster than the default threefry.
    variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), images)
    rgba = np.asarray(jax.jit(model.apply)(variables, images))
    assert rgba.shape == (2, *image_hw, 4)
    assert np.all((rgba > 0) & (rgba < 1))
    # Input is scaled by 255 inside: the module equals decoder(encoder(255 x)).
    code = model.apply(variables, images * 255.0, method=lambda m, x: m.encoder(x))
    assert code.shape == (2, bg.CODE_DIM)
    again = model.apply(variables, code, method=lambda m, c: m.decoder(c))
    np.testing.assert_allclose(np.asarray(again), rgba, atol=1e-5)


def test_coordinate_channels():
    coords = bg.coordinate_channels(3, 5)
    np.testing.assert_allclose(coords[:, 0, 0], [-0.5, 0.0, 0.5])
    np.testing.assert_allclose(coords[0, :, 1], [-0.5, -0.25, 0.0, 0.25, 0.5])
    np.testing.assert_array_equal(bg.coordinate_channels(1, 1), np.ones((1, 1, 2)))
    np.testing.assert_array_equal(bg.coordinate_channels(1, 2)[..., 0], np.ones((1, 2)))


def test_transposed_conv_padding_matches_pytorch():
    import flax.linen as nn
    import torch

    # k5 s2 p2 op1 (small images) and k5 s3 p2 op1 (200 -> 67 -> 200), as the decoder uses.
    for size, stride, output_padding in [(4, 2, 1), (67, 3, 1), (2, 1, 0)]:
        kernel = 5 if size > 2 else 2
        padding = 2 if size > 2 else 0
        x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
        weight = np.random.default_rng(1).normal(size=(3, 2, kernel, kernel))
        expected = torch.nn.functional.conv_transpose2d(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(weight.astype(np.float32)),
            stride=stride,
            padding=padding,
            output_padding=output_padding,
        ).numpy()
        pad = kernel - 1 - padding
        layer = nn.ConvTranspose(
            2,
            (kernel, kernel),
            strides=(stride, stride),
            padding=[(pad, pad + output_padding)] * 2,
            use_bias=False,
        )
        # PyTorch (in, out, kh, kw) -> flipped (kh, kw, in, out) for a plain convolution.
        kernel_flax = weight.transpose(2, 3, 0, 1)[::-1, ::-1].astype(np.float32)
        got = layer.apply({"params": {"kernel": kernel_flax}}, x)
        np.testing.assert_allclose(
            np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-4
        )


def test_rejects_wrong_image_size():
    model = bg.BackgroundAutoencoder((32, 32), complexity=False)
    with pytest.raises(ValueError, match="built for"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_width_multiplier_scales_only_hidden_channels():
    enc, dec = bg.channel_schedule((64, 64), False)
    enc_q, dec_q = bg.channel_schedule((64, 64), False, width=0.25)
    assert (enc_q[0], enc_q[-1], dec_q[0], dec_q[-1]) == (3, 16, 4, 16)
    assert enc_q[1:-1] == tuple(max(8, round(c / 4)) for c in enc[1:-1])
    assert dec_q[1:-1] == tuple(max(8, round(c / 4)) for c in dec[1:-1])
    with pytest.raises(ValueError, match="width multiplier"):
        bg.channel_schedule((64, 64), False, width=0.0)


def test_median_shift_gives_the_background_the_images_median_colour():
    image_hw = (16, 16)
    plain = bg.BackgroundAutoencoder(image_hw, complexity=False, width=0.25)
    shifted = bg.BackgroundAutoencoder(
        image_hw, complexity=False, width=0.25, median_shift=True
    )
    rng = np.random.default_rng(0)
    # A muted backdrop per image, and a bright object on a sixth of it.
    images = np.broadcast_to(
        rng.uniform(0.3, 0.7, (2, 1, 1, 3)), (2, *image_hw, 3)
    ).copy()
    images += rng.normal(0, 0.02, images.shape)
    images[:, 2:8, 3:9] = (1.0, 0.1, 0.9)
    images = jnp.asarray(images, jnp.float32)
    variables = jax.jit(plain.init)(jax.random.key(0, impl="unsafe_rbg"), images)
    out = np.asarray(jax.jit(plain.apply)(variables, images))
    got = np.asarray(jax.jit(shifted.apply)(variables, images))
    # Same parameters; RGB moved by the median difference, the error channel untouched.
    shift = np.median(np.asarray(images), axis=(1, 2), keepdims=True) - np.median(
        out[..., :3], axis=(1, 2), keepdims=True
    )
    np.testing.assert_allclose(
        got[..., :3], np.clip(out[..., :3] + shift, 0, 1), atol=1e-5
    )
    np.testing.assert_array_equal(got[..., 3], out[..., 3])
    np.testing.assert_allclose(
        np.median(got[..., :3], axis=(1, 2)),
        np.median(np.asarray(images), axis=(1, 2)),
        atol=1e-5,
    )
    assert np.abs(shift).max() > 0.05  # The test would notice a missing shift.

    # The network still learns through the shifted output.
    def loss(params):
        rgb = shifted.apply({"params": params}, images)[..., :3]
        return jnp.mean(jnp.abs(rgb - images))

    grad = jax.jit(jax.grad(loss))(variables["params"])
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grad))
