"""place_glimpses against PyTorch affine_grid + grid_sample, plus exact geometric properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl.testing import absltest, parameterized

from ast_seg_jax.models.spatial_transformer import extract_glimpses, place_glimpses


def _torch_place(glimpses, xy, scale, out_hw):
    """Reference: the official code's affine_grid + grid_sample (PyTorch defaults)."""
    b, k, gh, gw, c = glimpses.shape
    g = torch.as_tensor(glimpses).reshape(b * k, gh, gw, c).permute(0, 3, 1, 2)
    x, y = (torch.as_tensor(xy[..., i]).reshape(-1) for i in range(2))
    sx, sy = (torch.as_tensor(scale[..., i]).reshape(-1) for i in range(2))
    zero = torch.zeros_like(x)
    theta = torch.stack(
        [torch.stack([sx, zero, -sx * x], -1), torch.stack([zero, sy, -sy * y], -1)], 1
    )
    grid = F.affine_grid(theta, [b * k, c, *out_hw], align_corners=False)
    out = F.grid_sample(
        g, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.permute(0, 2, 3, 1).reshape(b, k, *out_hw, c)


def _random_case(seed, b, k, g_hw, c, isotropic, xy_range, scale_range):
    rng = np.random.default_rng(seed)
    glimpses = rng.uniform(size=(b, k, *g_hw, c)).astype(np.float32)
    xy = rng.uniform(*xy_range, size=(b, k, 2)).astype(np.float32)
    scale = rng.uniform(*scale_range, size=(b, k, 2 if not isotropic else 1))
    scale = np.broadcast_to(scale, (b, k, 2)).astype(np.float32).copy()
    return glimpses, xy, scale


CASES = (
    {
        "testcase_name": "isotropic",
        "isotropic": True,
        "xy_range": (-0.8, 0.8),
        "scale_range": (1.3, 6.0),
        "g_hw": (8, 8),
        "out_hw": (16, 16),
    },
    {
        "testcase_name": "anisotropic_rect",
        "isotropic": False,
        "xy_range": (-0.8, 0.8),
        "scale_range": (1.3, 6.0),
        "g_hw": (6, 10),
        "out_hw": (12, 20),
    },
    {
        "testcase_name": "near_borders",
        "isotropic": False,
        "xy_range": (-1.0, 1.0),
        "scale_range": (1.3, 24.0),
        "g_hw": (8, 8),
        "out_hw": (17, 13),
    },
    {
        "testcase_name": "outside_image",
        "isotropic": True,
        "xy_range": (-1.6, 1.6),
        "scale_range": (1.3, 3.0),
        "g_hw": (5, 7),
        "out_hw": (9, 11),
    },
    {
        "testcase_name": "glimpse_larger_than_output",
        "isotropic": False,
        "xy_range": (-1.0, 1.0),
        "scale_range": (0.5, 2.0),
        "g_hw": (16, 12),
        "out_hw": (6, 8),
    },
)


class PlaceGlimpsesTest(chex.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_matches_torch(self, isotropic, xy_range, scale_range, g_hw, out_hw):
        glimpses, xy, scale = _random_case(
            0, 2, 3, g_hw, 4, isotropic, xy_range, scale_range
        )
        fn = self.variant(functools.partial(place_glimpses, out_hw=out_hw))
        out = fn(jnp.asarray(glimpses), jnp.asarray(xy), jnp.asarray(scale))
        chex.assert_shape(out, (2, 3, *out_hw, 4))
        expected = _torch_place(glimpses, xy, scale, out_hw).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
        self.assertGreater(np.abs(expected).sum(), 0.0)  # something was placed

    @parameterized.named_parameters(CASES[1], CASES[2])
    def test_gradients_match_torch(
        self, isotropic, xy_range, scale_range, g_hw, out_hw
    ):
        glimpses, xy, scale = _random_case(
            1, 2, 2, g_hw, 3, isotropic, xy_range, scale_range
        )
        cotangent = np.random.default_rng(2).normal(size=(2, 2, *out_hw, 3))

        def loss(g, p, s):
            return jnp.sum(place_glimpses(g, p, s, out_hw) * cotangent)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
            jnp.asarray(glimpses), jnp.asarray(xy), jnp.asarray(scale)
        )
        tensors = [
            torch.tensor(a, dtype=torch.float64, requires_grad=True)
            for a in (glimpses, xy, scale)
        ]
        torch_loss = (_torch_place(*tensors, out_hw) * torch.as_tensor(cotangent)).sum()
        torch_loss.backward()
        for ours, ref in zip(grads, tensors, strict=True):
            self.assertTrue(np.all(np.isfinite(ours)))
            np.testing.assert_allclose(ours, ref.grad.numpy(), atol=2e-4, rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_identity_transform_reproduces_glimpse(self):
        """x = y = 0, s = 1 and glimpse size = output size is the identity (align_corners=False)."""
        glimpses, _, _ = _random_case(3, 2, 2, (6, 9), 4, True, (0, 0), (1, 1))
        fn = self.variant(functools.partial(place_glimpses, out_hw=(6, 9)))
        out = fn(jnp.asarray(glimpses), jnp.zeros((2, 2, 2)), jnp.ones((2, 2, 2)))
        np.testing.assert_allclose(out, glimpses, atol=1e-6)

    @chex.variants(with_jit=True)
    @parameterized.named_parameters(("right", 3, 0), ("up", 0, -2), ("diagonal", -4, 5))
    def test_whole_pixel_translation_translates_layer(self, du, dv):
        """Moving the centre by (2u/W, 2v/H) moves the placed layer by exactly (u, v) pixels."""
        out_h, out_w = 24, 28
        rng = np.random.default_rng(4)
        glimpses = jnp.asarray(rng.uniform(size=(1, 2, 8, 8, 3)), jnp.float32)
        xy = jnp.asarray([[[-0.13, 0.07], [0.21, -0.11]]], jnp.float32)
        scale = jnp.asarray([[[3.5, 4.0], [5.0, 3.1]]], jnp.float32)
        shift = jnp.asarray([2 * du / out_w, 2 * dv / out_h], jnp.float32)
        fn = self.variant(functools.partial(place_glimpses, out_hw=(out_h, out_w)))
        base = np.asarray(fn(glimpses, xy, scale))
        moved = np.asarray(fn(glimpses, xy + shift, scale))
        np.testing.assert_allclose(
            np.roll(base, (dv, du), axis=(2, 3)), moved, atol=2e-5
        )
        # The objects stay away from the borders, so the roll wrapped nothing around.
        self.assertEqual(np.abs(base[:, :, :6]).max(), 0.0)
        self.assertEqual(np.abs(base[:, :, :, -6:]).max(), 0.0)

    def test_support_is_exactly_the_glimpse_footprint(self):
        """The layer is non-zero exactly where |s (u - x)| < 1 + 1/G.

        The glimpse spans [x - 1/s, x + 1/s]; zero padding lets it fade out over half a glimpse
        pixel (1/G in normalised glimpse units) beyond that edge, and no further.
        """
        out = place_glimpses(
            jnp.ones((1, 1, 8, 8, 1)),
            jnp.asarray([[[0.26, -0.49]]]),
            jnp.asarray([[[4.0, 2.0]]]),
            (32, 32),
        )
        u = (2 * np.arange(32) + 1) / 32 - 1
        inside_x = np.abs(4.0 * (u - 0.26)) < 1 + 1 / 8
        inside_y = np.abs(2.0 * (u + 0.49)) < 1 + 1 / 8
        inside = inside_y[:, None] & inside_x[None, :]
        np.testing.assert_array_equal(np.asarray(out[0, 0, ..., 0]) > 0, inside)

    @parameterized.named_parameters(
        ("clamped_positions", 3.0, 0.0), ("saturated_sigmoids", 0.3, 100.0)
    )
    def test_finite_gradients_at_range_edges(self, raw_position, raw_scale):
        """Gradients through the model's decoding (clamp, sigmoid scale/glimpse) stay finite."""

        def loss(raw_xy, raw_s, raw_glimpse):
            xy = jnp.clip(raw_xy, -1.0, 1.0)
            scale = 1.3 + (24.0 - 1.3) * jax.nn.sigmoid(raw_s)
            glimpses = jax.nn.sigmoid(raw_glimpse)
            return jnp.sum(place_glimpses(glimpses, xy, scale, (16, 16)) ** 2)

        raw_xy = jnp.asarray([[[raw_position, -raw_position], [0.99, -1.0]]])
        raw_s = jnp.asarray([[[raw_scale, -raw_scale], [-raw_scale, 0.0]]])
        raw_glimpse = jnp.full((1, 2, 8, 8, 4), 90.0).at[:, :, ::2].set(-90.0)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(raw_xy, raw_s, raw_glimpse)
        for grad in grads:
            self.assertTrue(np.all(np.isfinite(grad)))
        if raw_position > 1:  # clamped coordinates get exactly zero gradient
            np.testing.assert_array_equal(grads[0][0, 0], 0.0)

    def test_vmap_over_extra_leading_axis(self):
        glimpses, xy, scale = _random_case(6, 3, 2, (4, 4), 2, False, (-1, 1), (1.3, 4))
        fn = functools.partial(place_glimpses, out_hw=(6, 5))
        mapped = jax.vmap(fn)(glimpses[:, None], xy[:, None], scale[:, None])
        np.testing.assert_allclose(mapped[:, 0], fn(glimpses, xy, scale), atol=1e-6)

    def test_bad_shapes_raise(self):
        with self.assertRaisesRegex(ValueError, r"\[b, k, 2\]"):
            place_glimpses(
                jnp.zeros((1, 2, 4, 4, 4)),
                jnp.zeros((1, 3, 2)),
                jnp.ones((1, 2, 2)),
                (8, 8),
            )
        with self.assertRaisesRegex(ValueError, "gh, gw"):
            place_glimpses(
                jnp.zeros((2, 4, 4, 4)),
                jnp.zeros((1, 2, 2)),
                jnp.ones((1, 2, 2)),
                (8, 8),
            )


if __name__ == "__main__":
    absltest.main()


class ExtractGlimpsesTest(parameterized.TestCase):
    """extract_glimpses: the inverse window of place_glimpses, against grid_sample."""

    @parameterized.parameters((32, (64, 64)), (16, (48, 80)))
    def test_matches_grid_sample_of_the_inverse_affine_map(self, size, image_hw):
        rng = np.random.default_rng(size)
        b, k = 2, 3
        image = rng.uniform(size=(b, *image_hw, 3)).astype(np.float32)
        xy = rng.uniform(-1.1, 1.1, size=(b, k, 2)).astype(np.float32)
        scale = rng.uniform(1.3, 8.0, size=(b, k, 2)).astype(np.float32)
        got = extract_glimpses(jnp.asarray(image), xy, scale, size)
        chex.assert_shape(got, (b, k, size, size, 3))
        # Reference: sample the image at x + g / s (theta = [[1/s_x, 0, x], [0, 1/s_y, y]]).
        sx, sy = (torch.as_tensor(scale[..., i]).reshape(-1) for i in range(2))
        x, y = (torch.as_tensor(xy[..., i]).reshape(-1) for i in range(2))
        zero = torch.zeros_like(x)
        theta = torch.stack(
            [torch.stack([1 / sx, zero, x], -1), torch.stack([zero, 1 / sy, y], -1)], 1
        )
        grid = F.affine_grid(theta, [b * k, 3, size, size], align_corners=False)
        source = torch.as_tensor(image).permute(0, 3, 1, 2).repeat_interleave(k, 0)
        want = F.grid_sample(
            source, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        want = want.permute(0, 2, 3, 1).reshape(b, k, size, size, 3).numpy()
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

    def test_a_crop_placed_back_covers_the_pixels_it_was_read_from(self):
        image = np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype(np.float32)
        xy = np.array([[[0.0, 0.0], [-0.5, 0.25]]], np.float32)
        scale = np.full((1, 2, 2), 2.0, np.float32)  # a 32-pixel window, pixel-aligned
        crops = extract_glimpses(jnp.asarray(image), xy, scale, 32)
        np.testing.assert_allclose(
            np.asarray(crops[0, 0]), image[0, 16:48, 16:48], atol=1e-6
        )
        rgba = jnp.concatenate([crops, jnp.ones((1, 2, 32, 32, 1))], axis=-1)
        placed = np.asarray(place_glimpses(rgba, xy, scale, (64, 64)))
        np.testing.assert_allclose(
            placed[0, 1, 24:56, 0:32, :3], image[0, 24:56, 0:32], atol=1e-6
        )
        assert not placed[0, 1, :24].any() and not placed[0, 1, :, 32:].any()

    def test_rejects_mismatched_shapes(self):
        with self.assertRaisesRegex(ValueError, "extract_glimpses"):
            extract_glimpses(
                jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 1, 2)), jnp.ones((3, 1, 2)), 8
            )
