"""Flax Segformer: numerical parity with the Hugging Face PyTorch model, shapes, counts, modes."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ast_seg_jax import pretrained
from ast_seg_jax.models import segformer as sf

# Non-square size whose stage maps (25x37, 13x19, 7x10, 4x5) do not divide by the reduction
# ratios, so the flooring 'VALID' sr conv and the symmetric patch padding are both exercised.
SIZES = [(64, 64), (100, 148)]
TOLERANCE = 1e-4


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including norm affine parameters and BatchNorm running stats."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim == 1:  # LayerNorm / BatchNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def _hf_config(**kwargs) -> transformers.SegformerConfig:
    return transformers.SegformerConfig(**kwargs)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Two randomised HF models saved with save_pretrained: B0 and a shallow B3-width model."""
    models = {}
    configs = {
        "b0": _hf_config(num_labels=44),  # HF defaults are the B0 sizes.
        "b3_shallow": _hf_config(
            depths=[1, 1, 2, 1],
            hidden_sizes=[64, 128, 320, 512],
            decoder_hidden_size=768,
            num_labels=45,
        ),
    }
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = transformers.SegformerForSemanticSegmentation(config).eval()
        _randomize(model, seed)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        models[name] = (model, path)
    return models


def _images(hw, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (2, *hw, 3)).astype(np.float32)


def _torch_forward(model, images):
    with torch.no_grad():
        out = model(
            torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True
        )
    stages = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]
    return stages, out.logits.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("hw", SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("name", ["b0", "b3_shallow"])
def test_encoder_and_head_match_pytorch(hf_models, name, hw):
    model, path = hf_models[name]
    images = _images(hw)
    want_stages, want_logits = _torch_forward(model, images)

    encoder, enc_vars = pretrained.segformer_from_hf(path)
    full, full_vars = pretrained.segformer_for_semantic_segmentation_from_hf(path)
    assert full.num_outputs == model.config.num_labels

    @jax.jit
    def forward(enc_vars, full_vars, images):
        stages = encoder.apply(enc_vars, images, train=False)
        return stages, full.apply(full_vars, images, train=False)

    stages, logits = forward(enc_vars, full_vars, images)
    assert len(stages) == 4
    for i, (got, want) in enumerate(zip(stages, want_stages)):
        assert got.shape == want.shape, i
        err = _rel_err(got, want)
        assert err < TOLERANCE, f"stage {i + 1}: relative error {err:.2e}"
    assert logits.shape == want_logits.shape
    err = _rel_err(logits, want_logits)
    assert err < TOLERANCE, f"logits: relative error {err:.2e}"


@pytest.mark.parametrize(
    "variant, encoder_params, head_params",
    [("b0", 3_319_392, 394_752 + 257 * 44), ("b3", 44_072_128, 3_150_336 + 769 * 44)],
)
def test_parameter_counts(variant, encoder_params, head_params):
    config = sf.SegformerConfig.preset(variant)
    model = sf.Segformer(config, num_outputs=44)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    assert count(shapes["params"]["encoder"]) == encoder_params
    assert count(shapes["params"]["decode_head"]) == head_params
    assert count(shapes["batch_stats"]) == 2 * config.decoder_hidden_size


def test_presets_and_hf_config():
    b3 = sf.SegformerConfig.preset("b3")
    assert b3.depths == (3, 4, 18, 3)
    assert b3.hidden_sizes == (64, 128, 320, 512)
    assert b3.decoder_hidden_size == 768
    assert b3.mlp_ratio == (4, 4, 4, 4)
    assert sf.SegformerConfig.preset("mit-B3") == b3
    # transformers' defaults are the B0 sizes.
    from_hf = sf.SegformerConfig.from_hf_json(transformers.SegformerConfig().to_dict())
    assert from_hf == sf.SegformerConfig.preset("b0")
    assert (
        from_hf.layer_norm_eps == 1e-5
    )  # HF's stored 1e-6 is unused by its LayerNorms.
    rates = b3.drop_path_rates()
    assert [len(r) for r in rates] == [3, 4, 18, 3]
    assert rates[0][0] == 0.0 and rates[3][2] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Unknown Segformer size"):
        sf.SegformerConfig.preset("b9")
    with pytest.raises(ValueError, match="Unknown architecture"):
        sf.SegformerConfig.from_hf_json({"model_type": "vit"})


def _tiny_config(**kwargs):
    fields = {
        "depths": (1, 1, 1, 1),
        "hidden_sizes": (8, 16, 24, 32),
        "num_heads": (1, 2, 3, 4),
        "decoder_hidden_size": 16,
    }
    fields.update(kwargs)
    return sf.SegformerConfig(**fields)


def _fake_variables(model, images, seed=0):
    """Random variables with the model's structure, without compiling the (slow) threefry init."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return jnp.ones(leaf.shape)
        if name in ("mean", "bias"):
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return jnp.asarray(rng.standard_normal(leaf.shape) / fan_in**0.5, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_shapes_non_square_and_too_small():
    config = _tiny_config()
    model = sf.Segformer(config, num_outputs=7)
    images = jax.ShapeDtypeStruct((2, 200, 320, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images
    )
    stages = jax.eval_shape(
        lambda v, x: sf.SegformerEncoder(config).apply(v, x, train=False),
        {"params": variables["params"]["encoder"]},
        images,
    )
    assert [s.shape[1:3] for s in stages] == [(50, 80), (25, 40), (13, 20), (7, 10)]
    assert [s.shape[-1] for s in stages] == [8, 16, 24, 32]
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), variables, images
    )
    assert logits.shape == (2, 50, 80, 7)
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(
            lambda: model.init(
                jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False
            )
        )


def test_head_init_matches_hugging_face():
    config = _tiny_config()
    features = [
        jnp.zeros((1, 8 // 2**i, 8 // 2**i, c)) for i, c in enumerate((8, 16, 24, 32))
    ]
    head = sf.SegformerDecodeHead(config, num_outputs=64)
    variables = head.init(jax.random.key(0), features, train=False)
    params = variables["params"]
    kernels = np.concatenate(
        [np.ravel(params[f"linear_c_{i}"]["kernel"]) for i in range(4)]
        + [
            np.ravel(params["linear_fuse"]["kernel"]),
            np.ravel(params["classifier"]["kernel"]),
        ]
    )
    assert np.std(kernels) == pytest.approx(0.02, rel=0.1)
    assert not np.any(params["classifier"]["bias"])
    assert "bias" not in params["linear_fuse"]
    np.testing.assert_array_equal(params["batch_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(variables["batch_stats"]["batch_norm"]["var"], 1.0)


def test_train_mode_uses_rng_and_updates_batch_stats():
    config = _tiny_config(drop_path_rate=0.5, classifier_dropout=0.5)
    model = sf.Segformer(config, num_outputs=5)
    images = jnp.asarray(_images((32, 32)))
    variables = _fake_variables(model, images)

    @jax.jit
    def train_forward(variables, images, key):
        return model.apply(
            variables,
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )

    eval_forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval_out = eval_forward(variables, images)
    np.testing.assert_array_equal(eval_out, eval_forward(variables, images))

    out_a, updates = train_forward(variables, images, jax.random.key(1))
    out_b, _ = train_forward(variables, images, jax.random.key(2))
    assert out_a.shape == eval_out.shape
    assert np.all(np.isfinite(out_a))
    assert not np.allclose(out_a, out_b)  # different dropout / drop-path draws
    assert not np.allclose(out_a, eval_out)
    old = variables["batch_stats"]["decode_head"]["batch_norm"]
    new = updates["batch_stats"]["decode_head"]["batch_norm"]
    assert not np.allclose(old["mean"], new["mean"])
    assert not np.allclose(old["var"], new["var"])
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(
            lambda: model.apply(variables, images, train=True, mutable=["batch_stats"])
        )


def test_normalize_input_flag():
    config = _tiny_config()
    images = jnp.asarray(_images((32, 32)))
    raw = sf.Segformer(config, num_outputs=3)
    normed = sf.Segformer(config, num_outputs=3, normalize_input=True)
    variables = _fake_variables(raw, images)
    mean = jnp.asarray(sf.IMAGENET_MEAN)
    std = jnp.asarray(sf.IMAGENET_STD)

    raw_forward = jax.jit(lambda v, x: raw.apply(v, x, train=False))
    got = jax.jit(lambda v, x: normed.apply(v, x, train=False))(variables, images)
    want = raw_forward(variables, (images - mean) / std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, raw_forward(variables, images))
    with pytest.raises(ValueError, match="3 channels"):
        jax.eval_shape(
            lambda: normed.apply(variables, jnp.zeros((1, 32, 32, 4)), train=False)
        )


def test_linear_fuse_equals_upsample_concatenate_then_convolve():
    """The head multiplies each stage map by its kernel block before upsampling: same values and
    gradients as the official order (upsample, concatenate deepest first, 1x1 convolution)."""
    rng = np.random.default_rng(0)
    d, out_shape = 6, (2, 10, 12, 6)
    projected = [
        jnp.asarray(rng.normal(size=(2, h, w, d)), jnp.float32)
        for h, w in ((10, 12), (5, 6), (3, 3), (1, 2))
    ]
    module = sf._LinearFuse(d, out_shape)
    params = module.init(jax.random.key(0), projected)
    assert params["params"]["kernel"].shape == (1, 1, 4 * d, d)

    def official(params, projected):
        upsampled = [
            jax.image.resize(y, out_shape, method="bilinear") for y in projected
        ]
        x = jnp.concatenate(upsampled[::-1], axis=-1)
        return jax.lax.conv_general_dilated(
            x, params["params"]["kernel"], (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip

    want, want_vjp = jax.vjp(official, params, projected)
    got, got_vjp = jax.vjp(module.apply, params, projected)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    for g, w in zip(
        jax.tree.leaves(got_vjp(cotangent)), jax.tree.leaves(want_vjp(cotangent))
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _scan_case(**kwargs):
    """(config, unrolled model, scanned model, images, variables); every stage but one has 2+ blocks."""
    config = _tiny_config(depths=(2, 3, 1, 2), **kwargs)
    unrolled = sf.Segformer(config, num_outputs=5)
    scanned = sf.Segformer(config, num_outputs=5, scan_blocks=True)
    images = jnp.asarray(_images((32, 32)))
    return config, unrolled, scanned, images, _fake_variables(unrolled, images)


def test_scanned_blocks_keep_the_parameters_and_match_the_unrolled_encoder():
    _, unrolled, scanned, images, variables = _scan_case()
    # The scanned model creates the per-block layout that checkpoints and HF conversions use.
    scanned_shapes = jax.eval_shape(
        lambda: scanned.init(jax.random.key(0), images, train=False)
    )
    assert jax.tree.map(lambda x: x.shape, scanned_shapes) == jax.tree.map(
        jnp.shape, variables
    )

    def loss(model):
        def fn(params):
            out = model.apply({**variables, "params": params}, images, train=False)
            return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))

        return jax.jit(jax.value_and_grad(fn))(variables["params"])

    (want, want_grads), (got, got_grads) = loss(unrolled), loss(scanned)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)
    ):
        np.testing.assert_allclose(
            g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )

    # One traced block per stage instead of one per block.
    def count(model):
        jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables)
        names = [str(e.primitive) for e in jaxpr.jaxpr.eqns]
        return len(jaxpr.jaxpr.eqns), names.count("scan")

    (unrolled_eqns, unrolled_scans), (scanned_eqns, scans) = (
        count(unrolled),
        count(scanned),
    )
    assert (unrolled_scans, scans) == (0, 3)
    assert scanned_eqns < unrolled_eqns


def test_scanned_blocks_in_training():
    # Without random layers, a training forward is deterministic: both forms agree.
    _, unrolled, scanned, images, variables = _scan_case(
        drop_path_rate=0.0, classifier_dropout=0.0
    )

    @functools.cache
    def compiled(model):
        return jax.jit(
            lambda v, x, k: model.apply(
                v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
            )
        )

    def train(model, key):
        return compiled(model)(variables, images, key)

    (want, want_stats), (got, got_stats) = (
        train(unrolled, jax.random.key(1)),
        train(scanned, jax.random.key(1)),
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        got_stats,
        want_stats,
    )
    # With drop path, each key draws other masks inside the scan.
    _, _, scanned, images, variables = _scan_case(
        drop_path_rate=0.5, classifier_dropout=0.0
    )
    out_a, _ = train(scanned, jax.random.key(1))
    out_b, _ = train(scanned, jax.random.key(2))
    eval_out = scanned.apply(variables, images, train=False)
    assert np.all(np.isfinite(out_a))
    assert not np.allclose(out_a, out_b)
    assert not np.allclose(out_a, eval_out)
    np.testing.assert_array_equal(out_a, train(scanned, jax.random.key(1))[0])


def test_scanned_blocks_reject_parameters_of_other_depths():
    _, _, _, images, variables = _scan_case()
    deeper = sf.Segformer(
        _tiny_config(depths=(2, 4, 1, 2)), num_outputs=5, scan_blocks=True
    )
    with pytest.raises(ValueError, match="lack block_1_3"):
        deeper.apply(variables, images, train=False)
