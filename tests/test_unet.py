"""The AST U-Net feature generator: shapes, levels, train/eval modes, PyTorch conv equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ast_seg_jax.models import unet


def _shapes(model, hw):
    images = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), images
    )
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return variables, out


@pytest.mark.parametrize(
    "hw, levels",
    [((64, 64), 5), ((128, 128), 5), ((75, 98), 5), ((200, 320), 6), ((201, 99), 6)],
)
def test_full_resolution_output_with_requested_channels(hw, levels):
    model = unet.UNet(out_channels=45)
    variables, out = _shapes(model, hw)
    assert out.shape == (2, *hw, 45)
    params = variables["params"]
    assert f"down_{levels - 1}_conv" in params and f"down_{levels}_conv" not in params
    widths = unet.unet_widths(hw)
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, widths[0])
    assert params["up_0_conv"]["conv"]["kernel"].shape == (
        4,
        4,
        2 * widths[1],
        widths[0],
    )
    assert params["final_conv"]["kernel"].shape == (1, 1, 45, 45)
    assert all("bias" not in p for name, p in params.items() if name.endswith("conv"))


def test_too_small_input():
    with pytest.raises(ValueError, match="at least 32"):
        _shapes(unet.UNet(out_channels=4), (20, 64))


def test_train_mode_updates_batch_stats_and_eval_is_deterministic():
    model = unet.UNet(out_channels=6, widths=(8, 12, 16))
    images = jnp.asarray(
        np.random.default_rng(0).uniform(size=(2, 13, 18, 3)), jnp.float32
    )
    shapes, _ = _shapes(model, (13, 18))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes
    )
    variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])

    @jax.jit
    def run(variables, images):
        eval_out = model.apply(variables, images, train=False)
        train_out, updates = model.apply(
            variables, images, train=True, mutable=["batch_stats"]
        )
        return eval_out, train_out, updates

    eval_out, train_out, updates = run(variables, images)
    assert eval_out.shape == train_out.shape == (2, 13, 18, 6)
    assert np.all(np.isfinite(train_out))
    assert not np.allclose(eval_out, train_out)
    old = variables["batch_stats"]["stem_bn"]
    new = updates["batch_stats"]["stem_bn"]
    assert not np.allclose(old["mean"], new["mean"])
    # PyTorch momentum 0.1 == Flax momentum 0.9 on the batch mean of the stem conv output.
    stem = unet._conv(8, 3, "stem").apply(
        {"params": variables["params"]["stem_conv"]}, images
    )
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-5
    )
    np.testing.assert_array_equal(eval_out, run(variables, images)[0])


@pytest.mark.parametrize("size", [6, 7])
def test_convs_match_pytorch(size):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, size + 1, size, 5)).astype(np.float32)
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))

    # Strided down conv: k4 s2 p1.
    down_w = rng.standard_normal((7, 5, 4, 4)).astype(np.float32)
    want = torch.nn.functional.conv2d(
        x_torch, torch.from_numpy(down_w), stride=2, padding=1
    )
    conv = unet._conv(7, 4, "down", stride=2)
    got = conv.apply({"params": {"kernel": down_w.transpose(2, 3, 1, 0)}}, x)
    np.testing.assert_allclose(
        got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
    )

    # Transposed conv k4 s2 p1 with the output padding that restores odd sizes.
    y = got
    op = ((size + 1) % 2, size % 2)
    up_w = rng.standard_normal((7, 3, 4, 4)).astype(
        np.float32
    )  # torch: (in, out, kh, kw)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(np.array(y).transpose(0, 3, 1, 2)),
        torch.from_numpy(up_w),
        stride=2,
        padding=1,
        output_padding=op,
    )
    assert tuple(want.shape[2:]) == (size + 1, size)
    kernel = up_w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    up = unet.TransposedConv(3, op)
    got_up = up.apply({"params": {"conv": {"kernel": kernel}}}, y)
    np.testing.assert_allclose(
        got_up, want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
    )


def test_torch_default_init_bounds():
    variables = unet.TransposedConv(8, (0, 0)).init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 32))
    )
    kernel = np.asarray(variables["params"]["conv"]["kernel"])
    # PyTorch quirk: ConvTranspose2d fan_in = out_channels * k * k = 8 * 16.
    assert np.max(np.abs(kernel)) <= 1 / np.sqrt(8 * 16)
    assert np.max(np.abs(kernel)) > 0.9 / np.sqrt(8 * 16)


def test_width_multiplier():
    assert unet.unet_widths((64, 64)) == unet.SMALL_WIDTHS
    assert unet.unet_widths((64, 64), 0.25) == (20, 32, 48, 64, 64, 64)
    assert unet.unet_widths((256, 256), 0.1) == (8, 8, 10, 13, 13, 26, 26)
    with pytest.raises(ValueError, match="width"):
        unet.unet_widths((64, 64), 0.0)
    model = unet.UNet(out_channels=5, width=0.25)
    shapes = jax.eval_shape(
        lambda key, x: model.init(key, x, train=False),
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    assert shapes["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 20)
