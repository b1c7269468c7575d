"""composite / segment: eqs. 17-18 exactly, normalisation, one-hot behaviour and stability."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from ast_seg_jax.models.compositing import composite, segment


def _random_inputs(seed, b=2, k=3, h=5, w=6, logit_scale=2.0):
    rng = np.random.default_rng(seed)
    layers = rng.uniform(size=(b, k, h, w, 3)).astype(np.float32)
    masks = rng.uniform(size=(b, k, h, w)).astype(np.float32)
    masks[:, :, 0, 0] = 0.0  # exact zeros as produced by zero padding
    logits = (rng.normal(size=(b, k)) * logit_scale).astype(np.float32)
    background = rng.uniform(size=(b, h, w, 3)).astype(np.float32)
    return layers, masks, logits, background


def _literal_formula(layers, masks, logits, background, background_logit):
    """Eqs. 17-18 written literally in float64."""
    u = np.exp(logits.astype(np.float64))[:, :, None, None] * masks
    u0 = np.full(masks[:, :1].shape, np.exp(np.float64(background_logit)))
    u = np.concatenate([u0, u], axis=1)
    weights = u / u.sum(1, keepdims=True)
    recon = weights[:, 0, ..., None] * background + np.einsum(
        "bkhw,bkhwc->bhwc", weights[:, 1:], layers
    )
    return recon, weights


class CompositeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("init_background_logit", 11.0, 10.0, 3.0),
        ("comparable_logits", 0.5, 0.0, 2.0),
        ("background_weak", -4.0, 1.0, 1.0),
    )
    def test_equals_literal_formula(self, background_logit, logit_shift, logit_scale):
        layers, masks, logits, background = _random_inputs(0, logit_scale=logit_scale)
        logits = logits + logit_shift
        recon, weights = self.variant(composite)(
            layers, masks, logits, background, background_logit
        )
        chex.assert_shape([recon, weights], [(2, 5, 6, 3), (2, 4, 5, 6)])
        ref_recon, ref_weights = _literal_formula(
            layers, masks, logits, background, background_logit
        )
        np.testing.assert_allclose(weights, ref_weights, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(recon, ref_recon, rtol=2e-5, atol=1e-6)
        # Zero masks give exactly zero weight.
        np.testing.assert_array_equal(np.asarray(weights)[:, 1:, 0, 0], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("normal", 1.0, 0.0), ("huge", 1000.0, 0.0), ("tiny", 1000.0, -2000.0)
    )
    def test_weights_sum_to_one(self, logit_scale, logit_shift):
        layers, masks, logits, background = _random_inputs(1, logit_scale=logit_scale)
        _, weights = self.variant(composite)(
            layers, masks, logits + logit_shift, background, 11.0
        )
        self.assertTrue(np.all(np.isfinite(weights)))
        self.assertTrue(np.all(np.asarray(weights) >= 0))
        np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_one_hot_masks_give_one_hot_weights(self):
        """Disjoint binary masks and activations >> background: weights are one-hot."""
        b, k, h, w = 2, 3, 6, 6
        labels = np.random.default_rng(2).integers(0, k + 1, size=(b, h, w))
        masks = np.stack([(labels == i + 1) for i in range(k)], 1).astype(np.float32)
        layers, _, _, background = _random_inputs(2, b, k, h, w)
        logits = np.full((b, k), 200.0, np.float32)
        recon, weights = self.variant(composite)(
            layers, masks, logits, background, 11.0
        )
        one_hot = np.moveaxis(np.eye(k + 1)[labels], -1, 1)
        np.testing.assert_allclose(weights, one_hot, atol=1e-30)
        expected = np.where(
            (labels == 0)[..., None],
            background,
            np.take_along_axis(
                layers, np.maximum(labels - 1, 0)[:, None, ..., None], 1
            )[:, 0],
        )
        np.testing.assert_allclose(recon, expected, atol=1e-6)
        np.testing.assert_array_equal(segment(weights), labels)

    def test_gradients_equal_literal_formula(self):
        layers, masks, logits, background = _random_inputs(6)
        masks = np.maximum(
            masks, 0.05
        )  # the literal formula's gradient at M = 0 differs

        def literal(layers, masks, logits, background, background_logit):
            u = jnp.exp(logits)[:, :, None, None] * masks
            u0 = jnp.exp(background_logit) * jnp.ones_like(masks[:, :1])
            u = jnp.concatenate([u0, u], axis=1)
            weights = u / jnp.sum(u, axis=1, keepdims=True)
            recon = weights[:, 0, ..., None] * background + jnp.einsum(
                "bkhw,bkhwc->bhwc", weights[:, 1:], layers
            )
            return recon, weights

        cot_r = jnp.asarray(np.random.default_rng(7).normal(size=(2, 5, 6, 3)))
        cot_w = jnp.asarray(np.random.default_rng(8).normal(size=(2, 4, 5, 6)))

        def loss(fn):
            def inner(*args):
                recon, weights = fn(*args)
                return jnp.sum(recon * cot_r) + jnp.sum(weights * cot_w)

            return jax.jit(jax.grad(inner, argnums=range(5)))

        args = (layers, masks, logits + 9.0, background, jnp.float32(11.0))
        for ours, ref in zip(loss(composite)(*args), loss(literal)(*args), strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)

    def test_per_pixel_background_logit(self):
        layers, masks, logits, background = _random_inputs(3)
        bg_map = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
        _, weights = composite(layers, masks, logits, background, 0.5 + bg_map)
        ref = _literal_formula(layers, masks, logits, background, 0.0)[1]
        # Recompute the reference with the per-pixel background activation.
        u = ref[:, 1:] / ref[:, :1]  # alpha_k M_k / alpha_0 with alpha_0 = 1
        u = np.concatenate([np.ones_like(u[:, :1]), u * np.exp(-(0.5 + bg_map))], 1)
        np.testing.assert_allclose(weights, u / u.sum(1, keepdims=True), rtol=1e-5)

    @parameterized.named_parameters(
        ("huge_positive", 1000.0), ("huge_negative", -1000.0), ("overflowing_exp", 95.0)
    )
    def test_finite_gradients_for_huge_activations(self, logit_value):
        layers, masks, logits, background = _random_inputs(4)
        logits = np.full_like(logits, logit_value)
        logits[0, 0] = -logit_value
        raw_masks = jnp.asarray(np.where(masks > 0, (masks - 0.5) * 400.0, -400.0))

        def loss(layers, raw_masks, logits, background, background_logit):
            masks = jax.nn.sigmoid(raw_masks)  # saturated: exact 0 and 1 masks occur
            recon, weights = composite(
                layers, masks, logits, background, background_logit
            )
            return jnp.mean(recon**2) + jnp.mean(weights * jnp.log(weights + 1e-20))

        args = (layers, raw_masks, logits, background, jnp.float32(11.0))
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)
        self.assertTrue(np.isfinite(value))
        for grad in grads:
            self.assertTrue(np.all(np.isfinite(grad)))

    def test_shape_errors(self):
        layers, masks, logits, background = _random_inputs(5)
        with self.assertRaisesRegex(ValueError, "activation_logit"):
            composite(layers, masks, logits[:, :2], background, 0.0)
        with self.assertRaisesRegex(ValueError, "inconsistent shapes"):
            composite(layers, masks, logits, background[:, :4], 0.0)


class SegmentTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_argmax_with_ties_to_background(self):
        weights = np.array(
            [[[[0.5, 0.2]], [[0.5, 0.3]], [[0.0, 0.5]]]], np.float32
        )  # [1, 3, 1, 2]
        labels = self.variant(segment)(jnp.asarray(weights))
        chex.assert_type(labels, jnp.int32)
        np.testing.assert_array_equal(labels, [[[0, 2]]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_min_peak_weight_drops_slots_that_never_dominate(self):
        # Image 0: slot 1 peaks at 0.6 (its pixel 1 goes to slot 2 at 0.7 and above, to the background
        # below); slot 2 peaks at 0.9. Image 1: every slot peaks at 0.7 or more.
        weights = np.array(
            [
                [[[0.3, 0.4, 0.1]], [[0.5, 0.6, 0.0]], [[0.2, 0.0, 0.9]]],
                [[[0.3, 0.2, 0.1]], [[0.7, 0.0, 0.0]], [[0.0, 0.8, 0.9]]],
            ],
            np.float32,
        )  # [2, 3, 1, 3]
        for threshold, expected in [
            (0.0, [[[1, 1, 2]], [[1, 2, 2]]]),
            (0.6, [[[1, 1, 2]], [[1, 2, 2]]]),
            (0.7, [[[0, 0, 2]], [[1, 2, 2]]]),
            (0.95, [[[0, 0, 0]], [[0, 0, 0]]]),
        ]:
            labels = self.variant(segment, static_argnums=1)(
                jnp.asarray(weights), threshold
            )
            np.testing.assert_array_equal(labels, expected, err_msg=str(threshold))

    @chex.variants(with_jit=True, without_jit=True)
    def test_colour_rule_picks_the_closest_layer_among_those_that_draw_the_pixel(self):
        # One image of three pixels, background + 2 slots. The image is red, green, green; the
        # background is grey, slot 1 red and slot 2 green everywhere.
        weights = np.array(
            [[[[0.5, 0.1, 0.9]], [[0.3, 0.6, 0.05]], [[0.2, 0.3, 0.05]]]], np.float32
        )  # [1, 3, 1, 3]
        red, green = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
        image = np.array([[[red, green, green]]], np.float32)
        background = np.full((1, 1, 3, 3), 0.5, np.float32)
        layers = np.array([[[[red] * 3], [[green] * 3]]], np.float32)  # [1, 2, 1, 3, 3]

        def labels(*settings):
            return self.variant(segment, static_argnums=(1, 2))(
                jnp.asarray(weights),
                *settings,
                image=jnp.asarray(image),
                background=jnp.asarray(background),
                layers=jnp.asarray(layers),
            )

        np.testing.assert_array_equal(labels(0.0, 0.0), [[[0, 1, 0]]])  # the argmax
        # Pixel 0: background and slot 1 reach 0.25, slot 1 is red. Pixel 1: slots 1 and 2 reach it,
        # slot 2 is green. Pixel 2: only the background reaches it.
        np.testing.assert_array_equal(labels(0.0, 0.25), [[[1, 2, 0]]])
        # At 0.35 slot 2 (peak 0.3) is dropped, so pixel 1 goes to slot 1, the only candidate left.
        np.testing.assert_array_equal(labels(0.35, 0.25), [[[1, 1, 0]]])
        # A pixel that no layer reaches keeps the argmax (here with slot 2 dropped: background).
        np.testing.assert_array_equal(labels(0.35, 0.95), [[[0, 1, 0]]])
        with self.assertRaisesRegex(ValueError, "needs the image"):
            segment(jnp.asarray(weights), 0.0, 0.25)


if __name__ == "__main__":
    absltest.main()
