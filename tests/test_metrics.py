"""Tests of the per-image metrics against hand-worked values, sklearn and brute force."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ast_seg_jax import metrics

# 4x4 ground truth: object 1 top right (4 px), object 2 bottom left (4 px), 8 px background.
TRUE = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 0, 0],
        [2, 2, 0, 0],
    ]
)


def _f32(x):
    return float(np.float32(x))


def _case(name):
    """(true [1,4,4], pred [1,4,4], num_channels, expected values) for a hand-made case."""
    bg = TRUE == 0
    obj1 = TRUE == 1
    obj2 = TRUE == 2
    if name == "perfect":
        pred = TRUE.copy()
        return TRUE, pred, 3, {"fg": 1.0, "all": 1.0, "ari": 1.0, "msc": 1.0}
    if name == "swapped":
        # Objects swap ids and the background is predicted by slot 3, not slot 0.
        pred = np.where(obj1, 2, np.where(obj2, 1, 3))
        # Pairs t0->p3, t1->p2, t2->p1 (all IoU 1); t3 and p0 are empty: 3 pairs.
        return TRUE, pred, 4, {"fg": 1.0, "all": 1.0, "ari": 1.0, "msc": 1.0}
    if name == "merged":
        pred = np.where(bg, 0, 1)
        # IoU(t1, p1) = IoU(t2, p1) = 4/8; t2 (or t1) is left with the empty p2: 3 pairs.
        return TRUE, pred, 3, {"fg": 0.5 / 2, "all": 1.5 / 3, "ari": 0.0, "msc": 0.5}
    if name == "empty_fg":
        true = np.zeros((4, 4), int)
        pred = np.zeros((4, 4), int)
        # Only the background pair counts: fg is 0/0 (NaN), all = 1; no fg segment -> MSC 0.
        return true, pred, 2, {"fg": np.nan, "all": 1.0, "ari": 1.0, "msc": 0.0}
    if name == "empty_fg_spurious":
        true = np.zeros((4, 4), int)
        pred = np.zeros((4, 4), int)
        pred[:2, :2] = 1
        # t0-p0 IoU 12/16, empty t1 paired with the non-empty p1 (IoU 0, counted).
        return true, pred, 2, {"fg": 0.0, "all": 0.75 / 2, "ari": 1.0, "msc": 0.0}
    if name == "one_object":
        true = np.where(obj1, 1, 0)
        pred = np.where(obj1, 2, 0)
        pred[2, 2:] = 2  # the object's segment spills onto 2 background pixels
        # t0-p0: 10/12, t1-p2: 4/6; t2 and p1 are empty: 2 pairs.
        iou_bg, iou_obj = _f32(10 / 12), _f32(4 / 6)
        return (
            true,
            pred,
            3,
            {"fg": iou_obj, "all": (iou_bg + iou_obj) / 2, "ari": 1.0, "msc": iou_obj},
        )
    if name == "over_segmented":
        # Three predicted objects for two true ones: object 1 split into rows 0 and 1.
        pred = np.where(obj2, 2, 0)
        pred[0, 2:] = 1
        pred[1, 2:] = 3
        # t0-p0 1, t2-p2 1, t1 takes one half (0.5), the other half pairs with the
        # empty t3 (IoU 0, counted): 4 pairs. ARI: sum C(n_ij,2) = 8, rows 12, cols 8,
        # C(8,2) = 28 -> (8 - 96/28) / (10 - 96/28) = 16/23.
        return (
            TRUE,
            pred,
            4,
            {"fg": 1.5 / 3, "all": 2.5 / 4, "ari": 16 / 23, "msc": (0.5 + 1.0) / 2},
        )
    raise KeyError(name)


CASES = [
    "perfect",
    "swapped",
    "merged",
    "empty_fg",
    "empty_fg_spurious",
    "one_object",
    "over_segmented",
]


@pytest.mark.parametrize("name", CASES)
def test_hand_made_cases(name):
    true, pred, k, expected = _case(name)
    true, pred = true[None], pred[None]
    fg = metrics.miou(true, pred, "fg", num_channels=k)
    assert fg.shape == (1,) and fg.dtype == np.float64
    np.testing.assert_allclose(fg, [expected["fg"]], rtol=1e-7, equal_nan=True)
    np.testing.assert_allclose(
        metrics.miou(true, pred, "all", num_channels=k), [expected["all"]], rtol=1e-7
    )
    np.testing.assert_allclose(
        metrics.ari_fg(true, pred), [expected["ari"]], rtol=1e-12
    )
    np.testing.assert_allclose(metrics.msc_fg(true, pred), [expected["msc"]], rtol=1e-7)


def test_hand_made_cases_batched_equal_single():
    cases = [_case(name) for name in CASES if _case(name)[2] == 3]
    true = np.stack([c[0] for c in cases])
    pred = np.stack([c[1] for c in cases])
    out = metrics.evaluate_batch(
        true, pred, np.zeros(true.shape + (3,)), np.zeros(true.shape + (3,)), 2
    )
    np.testing.assert_allclose(out["miou"], [c[3]["fg"] for c in cases], rtol=1e-7)
    np.testing.assert_allclose(out["miou_all"], [c[3]["all"] for c in cases], rtol=1e-7)
    np.testing.assert_allclose(out["ari_fg"], [c[3]["ari"] for c in cases], rtol=1e-12)
    np.testing.assert_allclose(out["msc_fg"], [c[3]["msc"] for c in cases], rtol=1e-7)
    np.testing.assert_array_equal(out["mse"], np.zeros(len(cases)))


def test_miou_gt_variant_and_true_labels_above_num_channels():
    true, pred, _, _ = _case("merged")
    # gt variant divides by the 3 non-empty true channels.
    np.testing.assert_allclose(metrics.miou(true[None], pred[None], "gt"), [0.5])
    # A true label beyond num_channels widens K instead of vanishing (no silent cap).
    true = np.where(TRUE == 2, 7, TRUE)[None]
    pred = TRUE[None]
    np.testing.assert_allclose(metrics.miou(true, pred, "fg", num_channels=3), [1.0])


def test_miou_rejects_predictions_outside_num_channels_and_bad_input():
    with pytest.raises(ValueError, match="num_channels"):
        metrics.miou(TRUE[None], TRUE[None] * 2, num_channels=3)
    with pytest.raises(ValueError, match="variant"):
        metrics.miou(TRUE[None], TRUE[None], variant="bg")
    with pytest.raises(ValueError, match="same shape"):
        metrics.ari_fg(TRUE[None], TRUE[None, :2])
    with pytest.raises(ValueError, match="integer"):
        metrics.msc_fg(TRUE[None].astype(np.float32), TRUE[None])
    with pytest.raises(ValueError, match="negative"):
        metrics.ari_fg(TRUE[None], -TRUE[None])
    with pytest.raises(ValueError, match=r"\[b, h, w\]"):
        metrics.miou(TRUE, TRUE)
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 1)))


def _brute_force_miou_values(true, pred, k):
    """All (fg, all, total) values reachable by an IoU-maximising permutation."""
    t_masks = [true == i for i in range(k)]
    p_masks = [pred == i for i in range(k)]
    iou = np.zeros((k, k), np.float32)
    for i, tm in enumerate(t_masks):
        for j, pm in enumerate(p_masks):
            if tm.any() and pm.any():
                iou[i, j] = np.float32(
                    np.float32((tm & pm).sum()) / np.float32((tm | pm).sum())
                )
    totals = {}
    for perm in itertools.permutations(range(k)):
        matched = [float(iou[i, perm[i]]) for i in range(k)]
        pairs = sum(t_masks[i].any() or p_masks[perm[i]].any() for i in range(k))
        totals[perm] = (sum(matched), sum(matched[1:]), pairs)
    best = max(v[0] for v in totals.values())
    reachable = [v for v in totals.values() if v[0] >= best - 1e-6]
    values = {
        "all": [v[0] / v[2] for v in reachable],
        "fg": [v[1] / (v[2] - 1) for v in reachable if v[2] > 1],
    }
    return best, values


def test_miou_equals_brute_force_permutation_search():
    rng = np.random.default_rng(0)
    for _ in range(40):
        k = int(rng.integers(2, 6))
        h, w = rng.integers(3, 7, size=2)
        true = rng.integers(0, k, size=(1, h, w))
        # Mix random predictions with ones that copy (then corrupt) the ground truth.
        if rng.random() < 0.5:
            pred = rng.integers(0, k, size=(1, h, w))
        else:
            pred = rng.permutation(k)[true]
            flip = rng.random(true.shape) < 0.3
            pred = np.where(flip, rng.integers(0, k, size=true.shape), pred)
        best, values = _brute_force_miou_values(true[0], pred[0], k)
        n_true = len(np.unique(true))
        gt = metrics.miou(true, pred, "gt", num_channels=k)[0]
        np.testing.assert_allclose(gt * n_true, best, rtol=1e-6)
        for variant in ("all", "fg"):
            value = metrics.miou(true, pred, variant, num_channels=k)[0]
            if values[variant]:
                assert np.isclose(values[variant], value, rtol=1e-9).any(), (
                    variant,
                    value,
                    values[variant],
                )


def test_ari_fg_equals_sklearn_on_random_and_degenerate_maps(monkeypatch):
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(30):
        b = 3
        h, w = rng.integers(1, 9, size=2)
        true = rng.integers(0, rng.integers(1, 6), size=(b, h, w))
        pred = rng.integers(0, rng.integers(1, 8), size=(b, h, w))
        batches.append((true, pred))
    t = rng.integers(0, 4, size=(4, 6, 6))
    batches += [
        (np.zeros((2, 4, 4), int), rng.integers(0, 3, (2, 4, 4))),  # no foreground
        (t, t),  # identical
        (t, (t * 7 + 3) % 31),  # identical up to relabelling
        (t, np.zeros_like(t)),  # everything predicted as one cluster
        (np.where(t > 0, 1, 0), rng.integers(0, 5, t.shape)),  # one object, split
        (np.where(t > 0, 1, 0), np.full(t.shape, 9)),  # one object, one cluster
        (np.pad(np.ones((1, 1, 1), int), ((0, 0), (2, 2), (2, 2))), t[:1, :5, :5]),
        (rng.integers(0, 3, (2, 5, 5)), rng.integers(0, 2**40, (2, 5, 5))),  # huge ids
        (rng.integers(0, 2000, (2, 64, 64)), rng.integers(0, 4096, (2, 64, 64))),
    ]

    def reference(true, pred):
        return [
            adjusted_rand_score(true[i][true[i] > 0], pred[i][true[i] > 0])
            for i in range(true.shape[0])
        ]

    for true, pred in batches:
        np.testing.assert_allclose(
            metrics.ari_fg(true, pred), reference(true, pred), rtol=1e-12, atol=1e-15
        )
    # The same values through the sparse (sorted) contingency path.
    monkeypatch.setattr(metrics, "_MAX_DENSE_CELLS", 0)
    for true, pred in batches[-10:]:
        np.testing.assert_allclose(
            metrics.ari_fg(true, pred), reference(true, pred), rtol=1e-12, atol=1e-15
        )


def _genesis_msc_fg(true, pred):
    """Loop-based mean segmentation covering (GENESIS semantics), one image."""
    scores = []
    for t in np.unique(true[true > 0]):
        tm = true == t
        best = 0.0
        for p in np.unique(pred):
            pm = pred == p
            iou = np.float32((tm & pm).sum()) / np.float32((tm | pm).sum())
            best = max(best, float(iou))
        scores.append(best)
    return sum(scores) / max(len(scores), 1)


@pytest.mark.parametrize("dense", [True, False])
def test_msc_fg_equals_loop_reference(monkeypatch, dense):
    if not dense:
        monkeypatch.setattr(metrics, "_MAX_DENSE_CELLS", 0)
    rng = np.random.default_rng(2)
    for _ in range(20):
        h, w = rng.integers(1, 8, size=2)
        true = rng.integers(0, rng.integers(1, 6), size=(3, h, w))
        pred = rng.integers(0, rng.integers(1, 6), size=(3, h, w)) * 1000
        expected = [_genesis_msc_fg(true[i], pred[i]) for i in range(3)]
        np.testing.assert_allclose(metrics.msc_fg(true, pred), expected, rtol=1e-12)


def test_mse_known_values():
    image = np.zeros((2, 2, 2, 3), np.float32)
    recon = np.full((2, 2, 2, 3), 0.5, np.float32)
    recon[1] = 0.0
    recon[1, 0, 0, 0] = 1.0
    out = metrics.mse(image, recon)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [12 * 0.25, 1.0])


def test_nanmean_and_clu_collection_skip_nan_and_padding():
    values = np.array([0.5, np.nan, 1.0, 0.0])
    valid = np.array([True, True, True, False])
    assert metrics.nanmean(values) == pytest.approx(0.5)
    assert metrics.nanmean(values, valid) == pytest.approx(0.75)
    assert np.isnan(metrics.nanmean(np.array([np.nan])))
    with pytest.raises(ValueError, match="valid"):
        metrics.nanmean(values, valid[:2])

    batch = {
        "miou": values,
        "miou_all": np.array([1.0, 0.5, 0.0, 9.0]),
        "ari_fg": np.array([1.0, 1.0, 0.0, 9.0]),
        "msc_fg": np.array([0.2, 0.4, 0.6, 9.0]),
        "mse": np.array([3.0, 6.0, 9.0, 99.0]),
    }
    first = metrics.SegmentationMetrics.single_from_model_output(**batch, mask=valid)
    second = metrics.SegmentationMetrics.single_from_model_output(
        **{key: value[:1] for key, value in batch.items()}, mask=valid[:1]
    )
    result = first.merge(second).compute()
    np.testing.assert_allclose(float(result["miou"]), (0.5 + 1.0 + 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(result["miou_all"]), 2.5 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(result["ari_fg"]), 3.0 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(result["msc_fg"]), 1.4 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(result["mse"]), 21.0 / 4, rtol=1e-6)
