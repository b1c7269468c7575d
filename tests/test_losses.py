"""Losses: known values, entropy extremes, warm-up ramp, and the AE-NE loss against PyTorch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from absl.testing import absltest, parameterized

from ast_seg_jax import losses


class ReconstructionLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_known_values(self):
        image = np.zeros((2, 2, 2, 3), np.float32)
        recon = np.zeros((2, 2, 2, 3), np.float32)
        # Example 0: one pixel off by (0.5, -0.25, 0.25) -> e = 1 -> mean of e^2 = 1/4.
        recon[0, 0, 1] = image[0, 0, 1] + [0.5, -0.25, 0.25]
        # Example 1: every pixel off by 1 in all channels -> e = 3 -> 9.
        recon[1] = 1.0
        loss = self.variant(losses.reconstruction_loss)(image, recon)
        chex.assert_shape(loss, (2,))
        np.testing.assert_allclose(loss, [0.25, 9.0], rtol=1e-6)

    def test_matches_numpy_on_random_images(self):
        rng = np.random.default_rng(0)
        image, recon = rng.uniform(size=(2, 2, 5, 4, 3)).astype(np.float32)
        expected = np.mean(np.abs(image - recon).sum(-1) ** 2, axis=(1, 2))
        np.testing.assert_allclose(
            losses.reconstruction_loss(image, recon), expected, rtol=1e-5
        )

    def test_shape_mismatch_raises(self):
        with self.assertRaisesRegex(ValueError, "reconstruction_loss"):
            losses.reconstruction_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 5, 3)))


class PixelEntropyLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("k1", 1), ("k4", 4), ("k10", 10))
    def test_zero_for_one_hot_and_max_for_uniform(self, k):
        labels = np.random.default_rng(k).integers(0, k + 1, size=(2, 4, 5))
        one_hot = np.moveaxis(np.eye(k + 1, dtype=np.float32)[labels], -1, 1)
        uniform = np.full((2, k + 1, 4, 5), 1.0 / (k + 1), np.float32)
        rng = np.random.default_rng(k + 100)
        logits = rng.normal(size=(2, k + 1, 4, 5)) * 2
        random = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=1))
        fn = self.variant(losses.pixel_entropy_loss)
        np.testing.assert_array_equal(fn(one_hot), 0.0)  # exactly 0
        np.testing.assert_allclose(fn(uniform), np.log(k + 1) ** 2, rtol=1e-5)
        self.assertTrue(np.all(np.asarray(fn(random)) < np.log(k + 1) ** 2))
        self.assertTrue(np.all(np.asarray(fn(random)) > 0))

    def test_known_value(self):
        weights = np.zeros((1, 2, 1, 2), np.float32)
        weights[0, :, 0, 0] = [0.25, 0.75]
        weights[0, :, 0, 1] = [1.0, 0.0]
        entropy = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
        np.testing.assert_allclose(
            losses.pixel_entropy_loss(weights), [entropy**2 / 2], rtol=1e-6
        )

    def test_finite_gradient_at_exact_zeros(self):
        weights = jnp.asarray(np.eye(3, dtype=np.float32)[None, :, :, None])
        grad = jax.grad(lambda w: jnp.sum(losses.pixel_entropy_loss(w)))(weights)
        self.assertTrue(np.all(np.isfinite(grad)))


class ObjectEntropyLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_known_values(self):
        # Image 0: every pixel background -> q = (1, 0, 0) -> 0.
        # Image 1: half the pixels slot 1, half background -> q = (0.5, 0.5, 0) -> (log 2)^2.
        weights = np.zeros((2, 3, 2, 2), np.float32)
        weights[0, 0] = 1.0
        weights[1, 0, 0] = 1.0
        weights[1, 1, 1] = 1.0
        loss = self.variant(losses.object_entropy_loss)(weights)
        chex.assert_shape(loss, (2,))
        np.testing.assert_allclose(loss, [0.0, np.log(2.0) ** 2], rtol=1e-6)

    def test_one_slot_per_object_costs_less_than_a_split(self):
        # The same object pixels owned by one slot, or split between two.
        one = np.zeros((1, 3, 1, 4), np.float32)
        one[0, 0, 0, :2] = 1.0
        one[0, 1, 0, 2:] = 1.0
        split = one.copy()
        split[0, 1, 0, 3], split[0, 2, 0, 3] = 0.0, 1.0
        self.assertLess(
            float(losses.object_entropy_loss(one)[0]),
            float(losses.object_entropy_loss(split)[0]),
        )

    def test_finite_gradient_for_an_unused_slot(self):
        # Layers: background and slot 1 share the pixels; slot 2 has weight 0 everywhere (q_2 = 0).
        weights = np.zeros((1, 3, 2, 1), np.float32)
        weights[0, 0, 0] = weights[0, 1, 1] = 1.0
        grad = jax.grad(lambda w: jnp.sum(losses.object_entropy_loss(w)))(
            jnp.asarray(weights)
        )
        self.assertTrue(np.all(np.isfinite(grad)))
        self.assertGreater(np.abs(np.asarray(grad)[0, 2]).max(), 0.0)


class SlotOverlapLossTest(chex.TestCase):
    def test_matches_the_formula_by_hand(self):
        rng = np.random.default_rng(0)
        masks = rng.uniform(size=(2, 3, 4, 5)).astype(np.float32)
        masks[0, 1, 0, 0] = 0.0  # an empty pixel: that slot would draw nothing there
        act = rng.normal(2.0, 1.0, size=(2, 3)).astype(np.float32)
        b = 1.5
        u = np.exp(act.astype(np.float64))[:, :, None, None] * masks
        alone = u / (u + np.exp(b))
        expected = np.zeros(2)
        for k in range(3):
            for j in range(k + 1, 3):
                expected += (alone[:, k] * alone[:, j]).mean(axis=(1, 2))
        got = jax.jit(losses.slot_overlap_loss)(masks, act, b)
        chex.assert_shape(got, (2,))
        np.testing.assert_allclose(got, expected, rtol=1e-5)

    def test_two_slots_on_one_object_cost_its_area_and_separate_objects_nothing(self):
        square = np.zeros((8, 8), np.float32)
        square[2:6, 2:6] = 1.0
        other = np.zeros((8, 8), np.float32)
        other[6:, 6:] = 1.0
        act = jnp.full((1, 2), 20.0)  # visible wherever the mask is positive
        same = losses.slot_overlap_loss(jnp.asarray([[square, square]]), act, 0.0)
        apart = losses.slot_overlap_loss(jnp.asarray([[square, other]]), act, 0.0)
        np.testing.assert_allclose(same, [16 / 64], rtol=1e-5)
        np.testing.assert_allclose(apart, [0.0], atol=1e-7)
        # Its gradient lowers a duplicate's activation; it is finite where a mask is exactly 0.
        grad = jax.grad(
            lambda a: losses.slot_overlap_loss(
                jnp.asarray([[square, square]]), a, 18.0
            )[0]
        )(act)
        self.assertTrue(np.all(np.asarray(grad) > 0))
        grad_masks = jax.grad(lambda m: losses.slot_overlap_loss(m, act, 18.0)[0])(
            jnp.asarray([[square, other]])
        )
        self.assertTrue(np.all(np.isfinite(grad_masks)))
        with self.assertRaisesRegex(ValueError, "slot_overlap_loss"):
            losses.slot_overlap_loss(jnp.zeros((1, 2, 4, 4)), jnp.zeros((1, 3)), 0.0)


class QuadraticWarmupTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("start", 0, 0.0),
        ("quarter", 2500, 0.0625),
        ("half", 5000, 0.25),
        ("end", 10000, 1.0),
        ("after", 25000, 1.0),
        ("negative", -5, 0.0),
    )
    def test_values(self, step, expected):
        value = self.variant(losses.quadratic_warmup)(jnp.int32(step), 10000)
        np.testing.assert_allclose(value, expected, rtol=1e-6)

    def test_disabled_ramp_and_python_numbers(self):
        self.assertEqual(float(losses.quadratic_warmup(0, 0)), 1.0)
        self.assertEqual(float(losses.quadratic_warmup(3, 4)), 0.5625)


def _torch_background_loss(image, rgba, beta=6.0, r=75, tau1=0.25):
    """Independent PyTorch re-computation of spec 5.3 in 0-255 units (NCHW), scalar Σ/(N·H·W)."""
    x = 255.0 * image.permute(0, 3, 1, 2)
    out = 255.0 * rgba.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    error = F.smooth_l1_loss(out[:, :3], x, reduction="none", beta=3.0).sum(1) / 255.0
    prediction = out[:, 3] / 255.0
    error_loss = F.smooth_l1_loss(
        prediction, error.detach() / 3.0, reduction="none", beta=3.0 / 255.0
    )
    with torch.no_grad():
        soft = torch.tanh(error / tau1)
        radius = w // r
        local = F.avg_pool2d(
            soft[:, None],
            kernel_size=2 * radius + 1,
            stride=1,
            padding=radius,
            count_include_pad=False,
        )[:, 0]
        weight = torch.exp(-beta * local) / (n * h * w)
    return ((error + error_loss) * weight).sum()


class BackgroundLossTest(chex.TestCase):
    @parameterized.named_parameters(
        ("no_smoothing_w64", (2, 6, 64), {}),
        ("box3_w150", (2, 7, 150), {}),
        ("box9_custom_r", (3, 11, 20), {"r": 5, "beta": 4.0, "tau1": 0.5}),
    )
    def test_matches_torch_value_and_gradient(self, shape, kwargs):
        rng = np.random.default_rng(sum(shape))
        image = rng.uniform(size=(*shape, 3)).astype(np.float32)
        # Background close to the image in places (quadratic SmoothL1 branch), far elsewhere.
        rgba = rng.uniform(size=(*shape, 4)).astype(np.float32)
        close = rng.uniform(size=shape) < 0.5
        rgba[..., :3] = np.where(
            close[..., None],
            image + rng.normal(size=image.shape) * 0.005,
            rgba[..., :3],
        )
        rgba = np.clip(rgba, 0.0, 1.0).astype(np.float32)

        def loss(a):
            return jnp.mean(losses.background_loss(jnp.asarray(image), a, **kwargs))

        value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(rgba))
        rgba_t = torch.tensor(rgba, dtype=torch.float64, requires_grad=True)
        ref = _torch_background_loss(
            torch.tensor(image, dtype=torch.float64), rgba_t, **kwargs
        )
        ref.backward()
        np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
        ref_grad = rgba_t.grad.numpy()
        # float32 vs float64: allow a 1e-5 error relative to the largest gradient entry.
        np.testing.assert_allclose(
            grad, ref_grad, rtol=1e-4, atol=1e-5 * np.abs(ref_grad).max()
        )
        self.assertGreater(np.abs(ref_grad[..., 3]).max(), 0.0)  # error channel learns
        per_example = jax.jit(losses.background_loss)(image, rgba)
        chex.assert_shape(per_example, (shape[0],))

    def test_perfect_background_and_prediction_give_zero(self):
        image = np.random.default_rng(1).uniform(size=(2, 4, 5, 3)).astype(np.float32)
        rgba = np.concatenate([image, np.zeros((2, 4, 5, 1), np.float32)], -1)
        np.testing.assert_allclose(
            jax.jit(losses.background_loss)(image, rgba), 0.0, atol=1e-12
        )

    def test_bad_shapes_raise(self):
        with self.assertRaisesRegex(ValueError, "rgba"):
            losses.background_loss(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)))


if __name__ == "__main__":
    absltest.main()
