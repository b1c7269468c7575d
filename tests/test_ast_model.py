"""Tests of the full AST forward pass, its latent decoding and build_model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ast_seg_jax.models import AST, BackgroundAutoencoder, build_model
from ast_seg_jax.models.ast_model import (
    decode_latents,
    residual_prior,
    suppress_taken_positions,
)
from ast_seg_jax.models.crop_encoder import CropEncoder
from ast_seg_jax.models.segformer import SegformerConfig
from ast_seg_jax.models.soft_argmax import soft_argmax
from ast_seg_jax.models.spatial_transformer import extract_glimpses, place_glimpses
from ast_seg_jax.models.unet import UNet
from ast_seg_jax.models.window_mask import WindowMask
from ast_seg_jax.typing import ModelOutput

B, HW, K, Z = 2, (32, 32), 3, 8
TINY_SEGFORMER = SegformerConfig(
    depths=(1, 1, 1, 1),
    hidden_sizes=(8, 16, 16, 16),
    num_heads=(1, 1, 1, 1),
    decoder_hidden_size=16,
)


def tiny_ast(**overrides) -> AST:
    fields = {
        "image_hw": HW,
        "num_slots": K,
        "z_what_dim": Z,
        "segformer_config": TINY_SEGFORMER,
        "transformer_layers": 1,
        "transformer_dim": 16,
        "transformer_heads": 2,
        "transformer_mlp_dim": 32,
        "background_complexity": False,
        "background_width": 1.0,
    }
    fields.update(overrides)
    return AST(**fields)


def _images(seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (B, *HW, 3))


def _assert_gradient_reaches(grad, group: str, *, not_to: str) -> None:
    """Some gradient reaches the parameter group `group` and none reaches `not_to`."""
    for leaf in jax.tree_util.tree_leaves(grad[not_to]):
        assert not np.asarray(leaf).any(), not_to
    assert any(
        np.asarray(leaf).any() for leaf in jax.tree_util.tree_leaves(grad[group])
    ), group


def _filled_variables(model: AST, seed: int = 0):
    """Variables of the right shapes, filled on the host (no XLA compile of `init`).

    Kernels ~ N(0, 1 / fan_in), biases 0, norm scales 1, BatchNorm statistics (0, 1), the
    background logit at its init value. Used where only the forward's semantics matter.
    """
    shapes = jax.eval_shape(
        lambda key, x: model.init(key, x, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((B, *HW, 3), jnp.float32),
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "background_logit" in name:
            return jnp.full(leaf.shape, model.background_logit_init)
        if "scale" in name or "var" in name:
            return jnp.ones(leaf.shape)
        if "bias" in name or "mean" in name:
            return jnp.zeros(leaf.shape)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _eval(**overrides):
    """(model, variables, eval output, intermediates) of a tiny AST with filled variables."""
    model = tiny_ast(**overrides)
    variables = _filled_variables(model)
    out, state = jax.jit(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])
    )(variables, _images())
    return model, variables, out, state["intermediates"]


@functools.cache
def _init_and_eval():
    """Default tiny AST: real init, then eval with the live and with a given background."""
    model = tiny_ast()
    image = _images()
    # The 'unsafe_rbg' key only makes the compile of `init` several times cheaper.
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(
        jax.random.key(0, impl="unsafe_rbg"), image
    )

    @jax.jit
    def forward(v, x, given):
        live, state = model.apply(v, x, train=False, mutable=["intermediates"])
        return live, state["intermediates"], model.apply(v, x, given, train=False)

    given = jnp.full((B, *HW, 3), 0.25)
    out, inter, out_given = forward(variables, image, given)
    return model, variables, out, inter, out_given


def test_output_shapes_and_weights():
    model, _, out, _, _ = _init_and_eval()
    assert isinstance(out, ModelOutput)
    g = model.resolved_glimpse_size
    assert g == 32
    expected = {
        "reconstruction": (B, *HW, 3),
        "weights": (B, K + 1, *HW),
        "background": (B, *HW, 3),
        "layers": (B, K, *HW, 3),
        "masks": (B, K, *HW),
        "xy": (B, K, 2),
        "scale": (B, K, 2),
        "activation_logit": (B, K),
        "z_what": (B, K, Z),
    }
    for name, shape in expected.items():
        value = np.asarray(getattr(out, name))
        assert value.shape == shape, name
        assert np.all(np.isfinite(value)), name
    np.testing.assert_allclose(np.asarray(out.weights).sum(1), 1.0, atol=1e-5)
    assert np.all(np.abs(np.asarray(out.xy)) <= 1.0)
    scale = np.asarray(out.scale)
    assert np.all((scale >= 1.3) & (scale <= 24.0))
    recon = np.asarray(out.reconstruction)
    assert recon.min() >= -1e-6 and recon.max() <= 1 + 1e-6
    # With the background activation exp(11) the background dominates at init.
    assert np.asarray(out.weights)[:, 0].mean() > 0.9


def test_parameter_and_module_names():
    _, variables, _, _, _ = _init_and_eval()
    params = variables["params"]
    assert set(params) == {
        "feature_generator",
        "embed",
        "transformer",
        "readout",
        "glimpse_generator",
        "background_model",
        "background_logit",
    }
    assert set(params["feature_generator"]) == {"encoder", "decode_head"}
    assert set(params["background_model"]) == {"encoder", "decoder"}
    assert params["background_logit"].shape == ()
    assert float(params["background_logit"]) == 11.0
    assert params["embed"]["kernel"].shape == (Z + 5, 16)
    assert params["readout"]["kernel"].shape == (16, Z + 5)
    assert "batch_stats" in variables


def test_intermediates_at_eval_only():
    model, variables, _, inter, _ = _init_and_eval()
    assert set(inter) == {"attention", "xy_pooled", "glimpses"}
    (attention,) = inter["attention"]
    (xy_pooled,) = inter["xy_pooled"]
    (glimpses,) = inter["glimpses"]
    fh, fw = HW[0] // 4, HW[1] // 4  # Segformer output stride 4.
    assert attention.shape == (B, fh, fw, K)
    np.testing.assert_allclose(np.asarray(attention).sum((1, 2)), 1.0, atol=1e-5)
    assert xy_pooled.shape == (B, K, 2)
    # The soft-argmax is the attention-weighted mean of the feature-grid coordinates.
    xs = np.linspace(-1, 1, fw)
    np.testing.assert_allclose(
        np.asarray(xy_pooled)[..., 0],
        np.einsum("bhwk,w->bk", np.asarray(attention), xs),
        atol=1e-5,
    )
    assert glimpses.shape == (B, K, 32, 32, 4)
    assert np.all((np.asarray(glimpses) > 0) & (np.asarray(glimpses) < 1))

    # Training mode sows nothing (checked on shapes only: no compile needed).
    _, state = jax.eval_shape(
        lambda v, x, key: model.apply(
            v,
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats", "intermediates"],
        ),
        variables,
        _images(),
        jax.random.PRNGKey(1),
    )
    assert "intermediates" not in state or not state["intermediates"]
    assert "batch_stats" in state


def test_forward_equals_hand_composition():
    _, variables, out, _, _ = _init_and_eval()
    layers = np.asarray(out.layers, np.float64)
    masks = np.asarray(out.masks, np.float64)
    alpha = np.exp(np.asarray(out.activation_logit, np.float64))  # [b, k]
    alpha0 = np.exp(float(variables["params"]["background_logit"]))
    background = np.asarray(out.background, np.float64)
    # Eq. 17: w_k = alpha_k M_k / (alpha_0 + sum_j alpha_j M_j), M_0 = 1.
    u = np.concatenate(
        [np.full((B, 1, *HW), alpha0), alpha[:, :, None, None] * masks], axis=1
    )
    weights = u / u.sum(1, keepdims=True)
    # Eq. 18: X_hat = w_0 B + sum_k w_k L_k.
    recon = weights[:, 0, ..., None] * background + np.einsum(
        "bkhw,bkhwc->bhwc", weights[:, 1:], layers
    )
    np.testing.assert_allclose(np.asarray(out.weights), weights, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.reconstruction), recon, atol=1e-5)


def test_given_and_live_background():
    model, variables, out, _, out_given = _init_and_eval()
    image = _images()
    live = jax.jit(BackgroundAutoencoder(HW, complexity=False).apply)(
        {"params": variables["params"]["background_model"]}, image
    )
    np.testing.assert_allclose(
        np.asarray(out.background), np.asarray(live)[..., :3], atol=1e-6
    )
    given = jnp.full((B, *HW, 3), 0.25)
    np.testing.assert_array_equal(np.asarray(out_given.background), 0.25)
    # The foreground does not depend on where the background comes from.
    np.testing.assert_allclose(np.asarray(out_given.weights), np.asarray(out.weights))
    assert not np.allclose(
        np.asarray(out_given.reconstruction), np.asarray(out.reconstruction)
    )
    # init with a given background still creates the background parameters.
    shapes = jax.eval_shape(
        lambda key: model.init(key, image, given, train=False), jax.random.PRNGKey(0)
    )
    assert "background_model" in shapes["params"]
    with pytest.raises(ValueError, match="background"):
        model.apply(variables, image, given[:, :16], train=False)


def test_without_transformer():
    _, variables, out, inter = _eval(use_transformer=False)
    assert not {"embed", "transformer", "readout"} & set(variables["params"])
    # The pooled tokens are decoded directly: positions are the soft-argmax positions.
    np.testing.assert_allclose(
        np.asarray(out.xy), np.asarray(inter["xy_pooled"][0]), atol=1e-6
    )
    assert out.weights.shape == (B, K + 1, *HW)


def test_residual_transformer_corrects_everything_but_the_positions():
    model, variables, out, inter = _eval(transformer_residual=True)
    params = variables["params"]
    assert params["readout"]["kernel"].shape == (16, Z + 5)
    plain = tiny_ast(use_transformer=False)
    plain_params = {
        k: v for k, v in params.items() if k not in ("embed", "transformer", "readout")
    }
    apply = jax.jit(lambda m, v: m.apply(v, _images(), train=False), static_argnums=0)
    want = apply(plain, {**variables, "params": plain_params})
    # A non-zero read-out moves scale, activation and appearance but never the positions (equal up
    # to float rounding: the two models are compiled separately, and XLA may fuse them differently).
    np.testing.assert_allclose(np.asarray(out.xy), np.asarray(want.xy), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out.xy), np.asarray(inter["xy_pooled"][0]), atol=1e-6
    )
    assert np.abs(np.asarray(out.activation_logit - want.activation_logit)).max() > 1e-3
    assert np.abs(np.asarray(out.z_what - want.z_what)).max() > 1e-3
    # With the read-out at its initial value (zero) the model is the no-transformer model.
    zero = jax.tree_util.tree_map(jnp.zeros_like, params["readout"])
    got = apply(model, {**variables, "params": {**params, "readout": zero}})
    for name in ("xy", "scale", "activation_logit", "z_what", "reconstruction"):
        np.testing.assert_allclose(
            np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), atol=1e-6
        )
    init = jax.jit(lambda key: model.init(key, _images(), train=False))(
        jax.random.key(0, impl="unsafe_rbg")
    )
    for leaf in jax.tree_util.tree_leaves(init["params"]["readout"]):
        assert not np.asarray(leaf).any()


def test_isotropic_official_layout_aliases_activation_and_z_what():
    _, variables, out, _ = _eval(isotropic=True)
    assert variables["params"]["readout"]["kernel"].shape == (16, Z + 4)
    scale = np.asarray(out.scale)
    np.testing.assert_array_equal(scale[..., 0], scale[..., 1])
    # Official layout: the activation logit is v[4] = z_what[0] when isotropic (the clean
    # layout is checked on decode_latents below).
    np.testing.assert_array_equal(
        np.asarray(out.activation_logit), np.asarray(out.z_what)[..., 0]
    )


def test_decode_latents_by_hand():
    v = jnp.asarray([[[1.7, -0.3, 0.0, 2.0, -1.5, 0.1, 0.2, 0.3]]])  # [1, 1, 8]
    sig = 1 / (1 + np.exp(-np.array([0.0, 2.0])))
    xy, scale, act, z = decode_latents(v, scale_dim=2, min_scale=1.3, max_scale=24.0)
    np.testing.assert_allclose(np.asarray(xy)[0, 0], [1.0, -0.3])
    np.testing.assert_allclose(np.asarray(scale)[0, 0], 1.3 + 22.7 * sig, rtol=1e-6)
    np.testing.assert_allclose(float(act[0, 0]), -1.5)
    np.testing.assert_allclose(np.asarray(z)[0, 0], [0.1, 0.2, 0.3])
    xy, scale, act, z = decode_latents(v, scale_dim=1)
    np.testing.assert_allclose(
        np.asarray(scale)[0, 0], [1.3 + 22.7 * 0.5] * 2, rtol=1e-6
    )
    np.testing.assert_allclose(float(act[0, 0]), -1.5)  # v[4], also z_what[0].
    np.testing.assert_allclose(np.asarray(z)[0, 0], [-1.5, 0.1, 0.2, 0.3])
    _, _, act, _ = decode_latents(v, scale_dim=1, clean_latent_layout=True)
    np.testing.assert_allclose(float(act[0, 0]), 2.0)  # v[2 + sd].
    # Clamped positions pass no gradient outside [-1, 1].
    grad = jax.grad(lambda u: decode_latents(u, scale_dim=2)[0].sum())(v)
    np.testing.assert_allclose(np.asarray(grad)[0, 0, :2], [0.0, 1.0])


def _model_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {
            "num_slots": 3,
            "z_what_dim": 32,
            "isotropic": False,
            "clean_latent_layout": False,
            "feature_generator": "segformer",
            "segformer_variant": "b3",
            "pretrained_encoder": "",
            "normalize_input": False,
            "use_transformer": True,
            "transformer_layers": 6,
            "transformer_dim": 256,
            "transformer_heads": 8,
            "transformer_mlp_dim": 512,
            "transformer_dropout": 0.1,
            "min_scale": 1.3,
            "max_scale": 24.0,
            "background_logit_init": 11.0,
            "background_complexity": True,
            "background_width": 1.0,
            "glimpse_size": 0,
        }
    )
    config.update(overrides)
    return config


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_build_model_objects_room_like_parameter_counts():
    model = build_model(_model_config(), (64, 64))
    assert model.image_hw == (64, 64) and model.num_slots == 3
    assert model.segformer_config == SegformerConfig.preset("b3")
    assert model.generator_channels == 38 and model.latent_dim == 37
    assert model.resolved_glimpse_size == 32
    shapes = jax.eval_shape(
        lambda key, x: model.init(key, x, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    params = shapes["params"]
    assert _count(params["transformer"]) == 6 * 527_104
    assert _count(params["embed"]) == 37 * 256 + 256
    assert _count(params["readout"]) == 256 * 37 + 37
    # Background: 64 px complex schedule, spec 5.2 (2.9 M + 43.6 M).
    assert _count(params["background_model"]) / 1e6 == pytest.approx(46.47, abs=0.01)
    # Glimpse generator, 32 px: kernels 32*64*4 + 64*32*16 + 32*16*16 + 16*8*16 + 8*4*16,
    # output bias 4, GroupNorm 2*(64+32+16+8).
    assert _count(params["glimpse_generator"]) == 51_956
    # MiT-B3 encoder has 44.07 M parameters (HF nvidia/mit-b3 without its classifier).
    assert _count(params["feature_generator"]["encoder"]) / 1e6 == pytest.approx(
        44.07, abs=0.01
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_slots": 0}, "num_slots"),
        ({"glimpse_size": 48}, "glimpse_size"),
        ({"feature_generator": "resnet"}, "feature_generator"),
        ({"min_scale": 30.0}, "min_scale"),
        ({"transformer_heads": 7}, "divisible"),
        ({"segformer_variant": "b9"}, "b9"),
        ({"feature_generator": "unet", "pretrained_encoder": "/x"}, "unet"),
        ({"unet_width": 0.0}, "unet_width"),
        ({"segment_min_peak_weight": 1.0}, "segment_min_peak_weight"),
        ({"segment_colour_min_weight": -0.1}, "segment_colour_min_weight"),
        ({"pretrained_encoder": "no/such/dir"}, "no/such/dir"),
    ],
)
def test_build_model_rejects_bad_configs(overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_model(_model_config(**overrides), (64, 64))


def test_build_model_rejects_missing_key():
    config = _model_config()
    del config["glimpse_size"]
    with pytest.raises(ValueError, match="glimpse_size"):
        build_model(config, (64, 64))


def test_build_model_unet_shapes():
    model = build_model(
        _model_config(feature_generator="unet", background_complexity=False), (32, 32)
    )
    shapes = jax.eval_shape(
        lambda key, x: model.init(key, x, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    assert "feature_generator" in shapes["params"]
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]),
        shapes,
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )[1]["intermediates"]
    # The U-Net works at full resolution: attention maps are 32 x 32.
    assert out["attention"][0].shape == (1, 32, 32, 3)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
    model32 = tiny_ast()
    model16 = tiny_ast(dtype=jnp.bfloat16)
    variables = _filled_variables(model32)
    shapes16 = jax.eval_shape(
        lambda key, x: model16.init(key, x, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((B, *HW, 3), jnp.float32),
    )
    # Same parameter tree, all float32: checkpoints move between the two precisions.
    assert jax.tree.structure(shapes16) == jax.tree.structure(variables)
    assert {x.dtype for x in jax.tree.leaves(shapes16)} == {jnp.dtype(jnp.float32)}

    image = _images()
    forward = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
    out32, out16 = (
        forward(model32, variables, image),
        forward(model16, variables, image),
    )
    for name in ("reconstruction", "weights", "background", "xy", "activation_logit"):
        value = getattr(out16, name)
        assert value.dtype == jnp.float32, name
        np.testing.assert_allclose(value, getattr(out32, name), atol=0.05, err_msg=name)
    # The convolutions really run in bfloat16 (and none in float32).
    jaxpr = str(
        jax.make_jaxpr(lambda v, x: model16.apply(v, x, train=False))(variables, image)
    )
    convs = [line for line in jaxpr.splitlines() if "conv_general_dilated[" in line]
    assert convs and all("bf16[" in line and "f32[" not in line for line in convs)


def test_bfloat16_gradients_are_float32_and_finite():
    model = tiny_ast(dtype=jnp.bfloat16)
    variables = _filled_variables(tiny_ast())
    image = _images()

    def loss(params):
        out = model.apply({**variables, "params": params}, image, train=False)
        return jnp.mean(jnp.square(out.reconstruction - image))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    leaves = jax.tree.leaves(grads)
    assert all(
        g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves
    )
    glimpse_grad = jax.tree.leaves(grads["glimpse_generator"])
    assert any(float(jnp.abs(g).max()) > 0 for g in glimpse_grad)


def test_build_model_compute_dtype():
    assert build_model(_model_config(), (64, 64)).dtype == jnp.float32
    model = build_model(_model_config(compute_dtype="bfloat16"), (64, 64))
    assert model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="compute_dtype"):
        build_model(_model_config(compute_dtype="float16"), (64, 64))


def test_build_model_transformer_residual_is_optional():
    # Configs saved before the key existed build the official read-out.
    assert not build_model(_model_config(), (64, 64)).transformer_residual
    model = build_model(_model_config(transformer_residual=True), (64, 64))
    assert model.transformer_residual


def test_slot_suppression_sends_later_slots_to_other_peaks():
    # Every slot's map peaks highest at pixel (row 4, col 4), then at (10, 12), then at (12, 2).
    logits = np.zeros((1, 16, 16, 3), np.float32)
    logits[0, 4, 4] = 50.0
    logits[0, 10, 12] = 40.0
    logits[0, 12, 2] = 30.0
    out = np.asarray(suppress_taken_positions(jnp.asarray(logits), 0.15, 1000.0))
    xy = np.asarray(soft_argmax(jnp.moveaxis(jnp.asarray(out), -1, 1)))[0]

    def pixel(col, row):
        return (2 * col / 15 - 1, 2 * row / 15 - 1)

    np.testing.assert_allclose(xy[0], pixel(4, 4), atol=1e-3)
    np.testing.assert_allclose(xy[1], pixel(12, 10), atol=1e-3)
    np.testing.assert_allclose(xy[2], pixel(2, 12), atol=1e-3)
    # The first slot is untouched; far from the taken points the later maps barely change.
    np.testing.assert_array_equal(out[..., 0], logits[..., 0])
    np.testing.assert_allclose(out[0, 15, 15, 1:], 0.0, atol=1e-2)
    # Without suppression all three slots take the same peak.
    xy_plain = np.asarray(soft_argmax(jnp.moveaxis(jnp.asarray(logits), -1, 1)))[0]
    np.testing.assert_allclose(xy_plain, [pixel(4, 4)] * 3, atol=1e-3)


def test_slot_suppression_leaves_earlier_slots_without_gradient_from_later_ones():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3)) * 5

    def last_slot(x):
        return jnp.sum(suppress_taken_positions(x, 0.3, 100.0)[..., 2] ** 2)

    grad = np.asarray(jax.grad(last_slot)(logits))
    assert not grad[..., :2].any()
    assert np.abs(grad[..., 2]).max() > 0


def test_slot_suppression_in_the_model_and_build():
    _, _, _, inter = _eval(slot_suppression_sigma=0.3)
    _, _, _, plain = _eval()
    xy, xy_plain = np.asarray(inter["xy_pooled"][0]), np.asarray(plain["xy_pooled"][0])
    # The first slot is free (equal up to float rounding: two programs).
    np.testing.assert_allclose(xy[:, 0], xy_plain[:, 0], atol=1e-6)
    assert np.abs(xy - xy_plain).max() > 1e-3  # Later slots moved.
    attention = np.asarray(inter["attention"][0])
    np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert build_model(_model_config(), (64, 64)).slot_suppression_sigma == 0.0
    model = build_model(_model_config(slot_suppression_sigma=0.15), (64, 64))
    assert (model.slot_suppression_sigma, model.slot_suppression_strength) == (
        0.15,
        1000.0,
    )


def test_crop_encoder_reads_each_slot_window_and_sets_z_what_and_the_offset():
    model, variables, out, _ = _eval(appearance_encoder="crop")
    params = variables["params"]
    assert set(params["crop_encoder"]) == {
        "conv_0",
        "conv_1",
        "conv_2",
        "conv_3",
        "hidden",
        "readout",
        "offset",
    }
    # The same weights without the crop encoder: the official pooled model.
    plain = {k: v for k, v in params.items() if k != "crop_encoder"}
    pooled = jax.jit(lambda v: tiny_ast().apply(v, _images(), train=False))(
        {**variables, "params": plain}
    )
    # Scale and activation still come from the pooled tokens (up to float rounding: two programs) ...
    for name in ("scale", "activation_logit"):
        np.testing.assert_allclose(
            np.asarray(getattr(out, name)),
            np.asarray(getattr(pooled, name)),
            atol=1e-6,
            rtol=1e-6,
        )
    # ... z_what is the crop encoder applied to the windows at the pooled positions, and the
    # glimpse moves within its window by the encoder's offset (at most half a half-extent).
    g = model.resolved_glimpse_size
    crops = extract_glimpses(_images(), pooled.xy, pooled.scale, g)
    z_what, offset = CropEncoder(Z, model.crop_encoder_width).apply(
        {"params": params["crop_encoder"]}, crops.reshape(B * K, g, g, 3)
    )
    np.testing.assert_allclose(
        np.asarray(out.z_what), np.asarray(z_what).reshape(B, K, Z), atol=1e-5
    )
    want_xy = np.clip(
        np.asarray(pooled.xy)
        + np.asarray(offset).reshape(B, K, 2) / np.asarray(pooled.scale),
        -1,
        1,
    )
    np.testing.assert_allclose(np.asarray(out.xy), want_xy, atol=1e-5)
    assert np.abs(np.asarray(offset)).max() < 0.5
    assert np.abs(np.asarray(out.z_what - pooled.z_what)).max() > 1e-3
    # At initialisation the offset read-out is zero: the glimpse sits at the soft-argmax point.
    init = jax.jit(lambda key: model.init(key, _images(), train=False))(
        jax.random.key(0, impl="unsafe_rbg")
    )
    assert not np.asarray(init["params"]["crop_encoder"]["offset"]["kernel"]).any()


def test_crop_encoder_gradient_does_not_move_the_window():
    model = tiny_ast(appearance_encoder="crop", use_transformer=False)
    variables = _filled_variables(model)

    def z_what_sum(params):
        return model.apply(
            {**variables, "params": params}, _images(), train=False
        ).z_what.sum()

    grad = jax.jit(jax.grad(z_what_sum))(variables["params"])
    # Without the transformer, z_what reaches the feature generator only through the window's
    # position and scale, whose gradient the crop stops.
    _assert_gradient_reaches(grad, "crop_encoder", not_to="feature_generator")


def test_build_model_appearance_encoder():
    assert build_model(_model_config(), (64, 64)).appearance_encoder == "pooled"
    model = build_model(_model_config(appearance_encoder="crop"), (64, 64))
    assert (model.appearance_encoder, model.crop_encoder_width) == ("crop", 32)
    assert build_model(_model_config(glimpse_width=2.0), (64, 64)).glimpse_width == 2.0
    with pytest.raises(ValueError, match="glimpse_width"):
        build_model(_model_config(glimpse_width=0.0), (64, 64))
    with pytest.raises(ValueError, match="appearance_encoder"):
        build_model(_model_config(appearance_encoder="box"), (64, 64))


def test_window_mask_draws_the_mask_from_the_windows():
    model, variables, out, inter = _eval(glimpse_mask="window")
    params = variables["params"]
    assert set(params["window_mask"]) == {"conv_0", "conv_1", "conv_2", "readout"}
    # The same weights without the window network: the official model, same colours, decoded masks.
    plain = {k: v for k, v in params.items() if k != "window_mask"}
    decoded, plain_inter = jax.jit(
        lambda v: tiny_ast().apply(v, _images(), train=False, mutable=["intermediates"])
    )({**variables, "params": plain})
    for name in ("xy", "scale", "activation_logit", "z_what", "background"):
        np.testing.assert_allclose(
            np.asarray(getattr(out, name)),
            np.asarray(getattr(decoded, name)),
            atol=1e-6,
        )
    assert decoded.mask_distillation is None
    glimpses = inter["glimpses"][0]
    plain_glimpses = plain_inter["intermediates"]["glimpses"][0]
    np.testing.assert_allclose(
        np.asarray(glimpses[..., :3]), np.asarray(plain_glimpses[..., :3]), atol=1e-6
    )
    # By hand: mask = sigmoid(WindowMask(image window, background window, decoded colour)).
    g = model.resolved_glimpse_size
    windows = extract_glimpses(_images(), out.xy, out.scale, g).reshape(B * K, g, g, 3)
    background_windows = extract_glimpses(out.background, out.xy, out.scale, g)
    colour = plain_glimpses[..., :3].reshape(B * K, g, g, 3)
    logits = (
        WindowMask(model.window_mask_width)
        .apply(
            {"params": params["window_mask"]},
            windows,
            background_windows.reshape(B * K, g, g, 3),
            colour,
        )
        .reshape(B, K, g, g)
    )
    want = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    np.testing.assert_allclose(np.asarray(glimpses[..., 3]), want, atol=2e-5)
    decoded_mask = np.asarray(plain_glimpses[..., 3], np.float64)
    assert np.abs(want - decoded_mask).max() > 1e-2
    # The placed masks are the window masks.
    placed = place_glimpses(glimpses, out.xy, out.scale, HW)
    np.testing.assert_allclose(
        np.asarray(out.masks), np.asarray(placed[..., 3]), atol=1e-6
    )
    # The distillation loss is the decoded masks' cross-entropy against the window masks.
    bce = -(want * np.log(decoded_mask) + (1 - want) * np.log1p(-decoded_mask))
    np.testing.assert_allclose(
        np.asarray(out.mask_distillation), bce.mean(axis=(1, 2, 3)), rtol=1e-4
    )


def test_window_mask_starts_at_one_half_and_distils_into_the_decoder():
    model = tiny_ast(glimpse_mask="window", use_transformer=False)
    variables = jax.jit(lambda key: model.init(key, _images(), train=False))(
        jax.random.key(0, impl="unsafe_rbg")
    )
    params = variables["params"]
    assert not np.asarray(params["window_mask"]["readout"]["kernel"]).any()
    _, inter = model.apply(variables, _images(), train=False, mutable=["intermediates"])
    np.testing.assert_allclose(
        np.asarray(inter["intermediates"]["glimpses"][0][..., 3]), 0.5, atol=1e-6
    )

    def distillation(params):
        return model.apply(
            {**variables, "params": params}, _images(), train=False
        ).mask_distillation.sum()

    grad = jax.jit(jax.grad(distillation))(variables["params"])
    # The target carries no gradient: the window network does not learn from this loss, the
    # glimpse generator does.
    _assert_gradient_reaches(grad, "glimpse_generator", not_to="window_mask")


def test_build_model_glimpse_mask():
    assert build_model(_model_config(flat_colour=True), (64, 64)).flat_colour
    assert build_model(_model_config(), (64, 64)).glimpse_mask == "decoded"
    model = build_model(
        _model_config(glimpse_mask="window", window_mask_width=8), (64, 64)
    )
    assert (model.glimpse_mask, model.window_mask_width) == ("window", 8)
    with pytest.raises(ValueError, match="glimpse_mask"):
        build_model(_model_config(glimpse_mask="box"), (64, 64))
    with pytest.raises(ValueError, match="window_mask_width"):
        build_model(_model_config(window_mask_width=0), (64, 64))


def test_flat_colour_paints_each_glimpse_in_its_mean_colour():
    _, _, _, inter = _eval(glimpse_mask="window", flat_colour=True)
    _, _, _, plain = _eval(glimpse_mask="window")
    flat, decoded = inter["glimpses"][0], plain["glimpses"][0]
    want = np.asarray(decoded[..., :3]).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(
        np.asarray(flat[..., :3]), np.broadcast_to(want, flat[..., :3].shape), atol=1e-6
    )
    assert np.asarray(decoded[..., :3]).std(axis=(2, 3)).min() > 1e-4


def test_evaluation_and_segmenter_use_the_models_segmentation_rules():
    from ast_seg_jax import evaluator, inference
    from ast_seg_jax.models.compositing import segment

    # A low background logit lets the slots win pixels at initialisation.
    model = tiny_ast(background_logit_init=-4.0)
    pixels = np.random.default_rng(1).integers(0, 256, (B, *HW, 3), np.uint8)
    image = (
        jnp.asarray(pixels, jnp.float32) / 255.0
    )  # What the Segmenter makes of `pixels`.
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), image, None
    )
    # visual_sample's forward pass gives the weights and colours that the rules read.
    sample = evaluator.visual_sample(model, variables, {"image": image})
    weights = jnp.asarray(sample["weights"])
    peaks = np.sort(sample["weights"][:, 1:].max(axis=(2, 3)).ravel())
    threshold = float(peaks[len(peaks) // 2])  # About half of the slots reach it.
    parts = {
        "image": image,
        "background": jnp.asarray(sample["background"]),
        "layers": jnp.asarray(sample["layers"]),
    }
    plain = np.asarray(segment(weights))
    dropped = np.asarray(segment(weights, threshold))
    by_colour = np.asarray(segment(weights, threshold, 0.2, **parts))
    np.testing.assert_array_equal(sample["labels"], plain)
    assert not np.array_equal(plain, dropped)
    assert not np.array_equal(dropped, by_colour)
    # Each entry point compiles the model once: one setting, in which both rules change the labels.
    ruled = model.clone(
        segment_min_peak_weight=threshold, segment_colour_min_weight=0.2
    )
    labels, _ = evaluator.eval_step(variables, image, model=ruled)
    np.testing.assert_array_equal(labels, by_colour)
    segmenter = inference.Segmenter(ruled, variables, HW)
    np.testing.assert_array_equal(segmenter(pixels[0])["labels"], by_colour[0])


def test_residual_input_feeds_the_unet_the_image_and_its_difference_from_the_background():
    model = tiny_ast(feature_generator="unet", unet_width=0.125, residual_input=True)
    variables = _filled_variables(model)
    stem = variables["params"]["feature_generator"]["stem_conv"]["kernel"]
    assert stem.shape[2] == 6
    image = _images()
    background = jax.random.uniform(jax.random.PRNGKey(5), image.shape)
    apply = jax.jit(
        lambda v, bg: model.apply(v, image, bg, train=False, mutable=["intermediates"])
    )
    _, inter = apply(variables, background)
    # The attention sees the background: another background moves it.
    _, moved = apply(variables, 1.0 - background)
    attention = np.asarray(inter["intermediates"]["attention"][0])
    assert (
        np.abs(attention - np.asarray(moved["intermediates"]["attention"][0])).max()
        > 1e-4
    )
    # By hand: the same U-Net on [image, image - background].
    maps = UNet(out_channels=model.generator_channels, width=0.125).apply(
        {
            "params": variables["params"]["feature_generator"],
            "batch_stats": variables["batch_stats"]["feature_generator"],
        },
        jnp.concatenate([image, image - background], axis=-1),
        train=False,
    )
    want = jax.nn.softmax(maps[..., :K].reshape(B, -1, K), axis=1).reshape(
        attention.shape
    )
    np.testing.assert_allclose(attention, np.asarray(want), atol=1e-5)

    # Live background: the feature generator's input carries no gradient into the background network.
    def attention_sum(params):
        _, state = model.apply(
            {**variables, "params": params},
            image,
            train=False,
            mutable=["intermediates"],
        )
        return (state["intermediates"]["attention"][0] ** 2).sum()

    grad = jax.jit(jax.grad(attention_sum))(variables["params"])
    _assert_gradient_reaches(grad, "feature_generator", not_to="background_model")


def test_residual_prior_by_hand():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.random((2, 20, 24, 3)).astype(np.float32)
    background = rng.random((2, 20, 24, 3)).astype(np.float32)
    distance = np.abs(image - background).sum(-1)
    np.testing.assert_allclose(
        residual_prior(image - background, 0.0, (20, 24)), distance, rtol=1e-6
    )
    # The blur is scipy's Gaussian filter with edge replication, cut at three sigma.
    want = np.stack(
        [
            ndimage.gaussian_filter(d, 1.5, mode="nearest", truncate=3.0)
            for d in distance
        ]
    )
    np.testing.assert_allclose(
        residual_prior(image - background, 1.5, (20, 24)), want, atol=1e-5
    )
    # On a coarser attention grid: resized, and a constant residual stays constant.
    coarse = residual_prior(image - background, 1.5, (5, 6))
    assert coarse.shape == (2, 5, 6)
    flat = residual_prior(np.full_like(image, 0.25), 1.5, (5, 6))
    np.testing.assert_allclose(flat, 0.75, rtol=1e-5)


@pytest.mark.parametrize("feature_generator", ["unet", "segformer"])
def test_residual_attention_prior_sends_the_slots_to_what_the_background_misses(
    feature_generator,
):
    # Two squares on a flat backdrop that the given background draws exactly; the top-left
    # square differs more from it. A large prior decides where the soft-argmax points go.
    image = np.full((B, *HW, 3), 0.5, np.float32)
    image[:, 4:12, 4:12] = 1.0  # Residual 1.5 per pixel.
    image[:, 20:28, 18:26] = (0.9, 0.5, 0.5)  # Residual 0.4 per pixel.
    background = np.full_like(image, 0.5)
    model = tiny_ast(
        feature_generator=feature_generator,
        unet_width=0.125,
        residual_attention_prior=100.0,
        slot_suppression_sigma=0.3,
    )
    variables = _filled_variables(model)

    def first_points(v, bg):
        _, state = model.apply(v, image, bg, train=False, mutable=["intermediates"])
        return state["intermediates"]["xy_pooled"][0][..., :2, :]

    xy = np.asarray(jax.jit(first_points)(variables, background))

    def inside(point, rows, cols):
        # Pixel index ranges in the grid's [-1, 1] units (x, y), with a margin.
        extent = np.array([HW[1] - 1, HW[0] - 1])
        lo = np.array([cols[0], rows[0]]) * 2 / extent - 1 - 0.15
        hi = np.array([cols[1], rows[1]]) * 2 / extent - 1 + 0.15
        return bool(np.all((point >= lo) & (point <= hi)))

    for i in range(B):
        assert inside(xy[i, 0], (4, 11), (4, 11)), xy[i, 0]
        assert inside(xy[i, 1], (20, 27), (18, 25)), xy[i, 1]
    # The background learns from the rendering only, not through the prior.
    grad = jax.jit(jax.grad(lambda bg: jnp.sum(first_points(variables, bg))))(
        jnp.asarray(background)
    )
    assert not np.asarray(grad).any()


def test_build_model_residual_attention_prior():
    model = build_model(_model_config(), (64, 64))
    assert model.residual_attention_prior == 0.0
    assert model.residual_attention_blur == 1.5
    model = build_model(
        _model_config(residual_attention_prior=100.0, residual_attention_blur=2.0),
        (64, 64),
    )
    assert model.residual_attention_prior == 100.0
    assert model.residual_attention_blur == 2.0


def test_build_model_background_median_shift():
    from ast_seg_jax.models.build import build_background_model

    assert not build_model(_model_config(), (64, 64)).background_median_shift
    assert not build_background_model(_model_config(), (64, 64)).median_shift
    config = _model_config(background_median_shift=True)
    assert build_model(config, (64, 64)).background_median_shift
    assert build_background_model(config, (64, 64)).median_shift
    # The live background of the model is the shifted one.
    _, _, out, _ = _eval(background_median_shift=True)
    np.testing.assert_allclose(
        np.median(np.asarray(out.background), axis=(1, 2)),
        np.median(np.asarray(_images()), axis=(1, 2)),
        atol=1e-5,
    )


def test_build_model_residual_input_needs_the_unet():
    assert not build_model(_model_config(), (64, 64)).residual_input
    model = build_model(
        _model_config(feature_generator="unet", residual_input=True), (64, 64)
    )
    assert model.residual_input
    with pytest.raises(ValueError, match="residual_input"):
        build_model(_model_config(residual_input=True), (64, 64))


def test_build_model_segformer_scan():
    assert not build_model(_model_config(), (64, 64)).segformer_scan
    assert build_model(_model_config(segformer_scan=True), (64, 64)).segformer_scan
    # Same parameters, same forward pass (the Segformer tests compare gradients too).
    deeper = dataclasses.replace(TINY_SEGFORMER, depths=(2, 2, 1, 1))
    _, variables, want, _ = _eval(segformer_config=deeper)
    model = tiny_ast(segformer_config=deeper, segformer_scan=True)
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _images())
    np.testing.assert_allclose(got.reconstruction, want.reconstruction, atol=1e-5)
    np.testing.assert_allclose(got.xy, want.xy, atol=1e-5)
    np.testing.assert_allclose(got.z_what, want.z_what, atol=1e-5)
