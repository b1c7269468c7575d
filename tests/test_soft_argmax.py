"""Properties of soft_argmax / attention_pool: exact known values and translation equivariance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from ast_seg_jax.models.soft_argmax import attention_pool, position_grid, soft_argmax

NEG = -1e9  # exp(NEG - max) is exactly 0 in float32: no mass leaks outside a patch


def _patch_logits(h, w, top, left, patch):
    """A [h, w] logit map equal to `patch` at (top, left) and NEG elsewhere."""
    logits = np.full((h, w), NEG, np.float32)
    ph, pw = patch.shape
    logits[top : top + ph, left : left + pw] = patch
    return logits


class PositionGridTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("square", 4, 4), ("wide", 3, 7), ("tall", 8, 2), ("single_row", 1, 5)
    )
    def test_grid_values(self, h, w):
        grid = np.asarray(position_grid(h, w))
        self.assertEqual(grid.shape, (h, w, 2))
        expected_x = 2 * np.arange(w) / (w - 1) - 1
        expected_y = 2 * np.arange(h) / (h - 1) - 1 if h > 1 else np.zeros(1)
        np.testing.assert_allclose(
            grid[..., 0], np.broadcast_to(expected_x, (h, w)), rtol=1e-6
        )
        np.testing.assert_allclose(
            grid[..., 1], np.broadcast_to(expected_y[:, None], (h, w)), rtol=1e-6
        )
        # align_corners=True: the ends of each axis of size > 1 are exactly -1 and 1.
        self.assertEqual(grid[0, 0, 0], -1.0)
        self.assertEqual(grid[0, -1, 0], 1.0)


class SoftArgmaxTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("corner", 0, 0), ("inside", 3, 2), ("last", 6, 9))
    def test_delta_gives_exact_coordinates(self, row, col):
        h, w = 7, 10
        logits = np.full((2, h, w), NEG, np.float32)
        logits[:, row, col] = 5.0
        xy = self.variant(soft_argmax)(jnp.asarray(logits))
        chex.assert_shape(xy, (2, 2))
        expected = [2 * col / (w - 1) - 1, 2 * row / (h - 1) - 1]
        np.testing.assert_allclose(xy, [expected, expected], atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_uniform_logits_give_centre(self):
        xy = self.variant(soft_argmax)(jnp.full((3, 5, 6, 8), 2.5))
        chex.assert_shape(xy, (3, 5, 2))
        np.testing.assert_allclose(xy, 0.0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("right_down", 3, 2), ("left_up", -2, -1), ("rows_only", 0, 3)
    )
    def test_translation_equivariance(self, du, dv):
        """Shifting a peaked map by (u, v) pixels shifts the output by (2u/(w-1), 2v/(h-1))."""
        h, w = 11, 13
        patch = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32) * 3
        base = _patch_logits(h, w, 3, 3, patch)
        shifted = _patch_logits(h, w, 3 + dv, 3 + du, patch)
        xy = self.variant(soft_argmax)(jnp.asarray(np.stack([base, shifted])))
        np.testing.assert_allclose(
            xy[1] - xy[0], [2 * du / (w - 1), 2 * dv / (h - 1)], atol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_random_logits_match_numpy(self):
        logits = np.random.default_rng(1).normal(size=(2, 3, 5, 6)).astype(np.float32)
        xy = self.variant(soft_argmax)(jnp.asarray(logits))
        flat = logits.reshape(2, 3, -1)
        p = np.exp(flat - flat.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).reshape(2, 3, 5, 6)
        gx, gy = np.meshgrid(2 * np.arange(6) / 5 - 1, 2 * np.arange(5) / 4 - 1)
        expected = np.stack([(p * gx).sum((-2, -1)), (p * gy).sum((-2, -1))], -1)
        np.testing.assert_allclose(xy, expected, atol=1e-6)

    def test_huge_logits_finite_values_and_gradients(self):
        logits = jnp.asarray(
            np.random.default_rng(2).normal(size=(2, 6, 7)) * 1e4, jnp.float32
        )
        xy = soft_argmax(logits)
        grad = jax.jit(jax.grad(lambda x: jnp.sum(soft_argmax(x) ** 2)))(logits)
        self.assertTrue(np.all(np.isfinite(xy)))
        self.assertTrue(np.all(np.isfinite(grad)))
        self.assertTrue(np.all(np.abs(xy) <= 1.0))

    def test_rejects_vector(self):
        with self.assertRaisesRegex(ValueError, r"\[\.\.\., h, w\]"):
            soft_argmax(jnp.zeros((5,)))


class AttentionPoolTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_soft_argmax_and_weighted_mean(self):
        rng = np.random.default_rng(3)
        logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
        features = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
        xy, pooled = self.variant(attention_pool)(
            jnp.asarray(logits), jnp.asarray(features)
        )
        chex.assert_shape([xy, pooled], [(2, 3, 2), (2, 3, 4)])
        np.testing.assert_allclose(
            xy, soft_argmax(jnp.moveaxis(jnp.asarray(logits), -1, 1)), atol=1e-6
        )
        flat = logits.reshape(2, 30, 3)
        p = np.exp(flat - flat.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        expected = np.einsum("bnk,bnc->bkc", p, features.reshape(2, 30, 4))
        np.testing.assert_allclose(pooled, expected, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_delta_pools_the_pixel(self):
        rng = np.random.default_rng(4)
        logits = np.full((1, 4, 5, 2), NEG, np.float32)
        logits[0, 1, 3, 0] = 0.0
        logits[0, 3, 0, 1] = 0.0
        features = rng.normal(size=(1, 4, 5, 3)).astype(np.float32)
        xy, pooled = self.variant(attention_pool)(
            jnp.asarray(logits), jnp.asarray(features)
        )
        np.testing.assert_allclose(xy[0], [[0.5, -1 / 3], [-1.0, 1.0]], atol=1e-6)
        np.testing.assert_allclose(
            pooled[0], features[0, [1, 3], [3, 0]], atol=1e-6, rtol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("right", 2, 0), ("down_left", -1, 3))
    def test_translation_equivariance(self, du, dv):
        h, w = 9, 12
        rng = np.random.default_rng(5)
        patches = rng.normal(size=(2, 3, 3)).astype(np.float32) * 2
        base = np.stack(
            [
                _patch_logits(h, w, 2, 2, patches[0]),
                _patch_logits(h, w, 3, 5, patches[1]),
            ],
            -1,
        )
        shifted = np.stack(
            [
                _patch_logits(h, w, 2 + dv, 2 + du, patches[0]),
                _patch_logits(h, w, 3 + dv, 5 + du, patches[1]),
            ],
            -1,
        )
        features = jnp.asarray(rng.normal(size=(2, h, w, 4)), jnp.float32)
        xy, _ = self.variant(attention_pool)(
            jnp.asarray(np.stack([base, shifted])), features
        )
        expected = np.broadcast_to([2 * du / (w - 1), 2 * dv / (h - 1)], (2, 2))
        np.testing.assert_allclose(xy[1] - xy[0], expected, atol=1e-5)

    def test_shape_mismatch_raises(self):
        with self.assertRaisesRegex(ValueError, "disagree"):
            attention_pool(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5, 3)))


if __name__ == "__main__":
    absltest.main()
