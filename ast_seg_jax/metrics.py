"""Segmentation and reconstruction metrics of the AST paper, computed per image on the host.

All segmentation metrics take integer label maps `[b, h, w]` (0 = background; the
prediction is the argmax over the model's k+1 compositing weights) and return one
float64 value per image, shape `[b]`. They reproduce the reference implementations
the paper's tables were computed with (see `metrics_and_datasets.md`, section 1):

* `miou`: Hungarian-matched mean IoU of the ClevrTex evaluator
  (`CLEVRTEX_Evaluator.ious_alignment`): variant `"fg"` is the ClevrTex tables'
  mIoU, `"all"` includes the background pair (what the official AST code prints),
  `"gt"` divides by the number of non-empty true channels.
* `ari_fg`: `sklearn.metrics.adjusted_rand_score` on the ground-truth foreground
  pixels, with sklearn's degenerate cases, computed from contingency tables.
* `msc_fg`: GENESIS's unweighted mean segmentation covering of the ground-truth
  foreground segments (`average_segcover(true, pred, ignore_background=True)`).
* `mse`: per-image sum of squared errors over pixels and channels on [0, 1] images.

Dataset scores are plain means over images (the papers report mIoU, ARI and MSC
x100). `nanmean` is the mean to use for `miou`: its `"fg"` variant is NaN for an
image with nothing to score (see `miou`). `SegmentationMetrics` wraps the per-image
values of `evaluate_batch` as a CLU collection for training summaries.
"""

import clu.metrics as clu_metrics
import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int
from scipy.optimize import linear_sum_assignment

MIOU_VARIANTS = ("fg", "all", "gt")

# Largest channel count `miou` accepts: its IoU matrices are K x K per image.
_MAX_MIOU_CHANNELS = 4096
# Dense contingency tables are used while b * (#true labels) * (#pred labels) stays below this.
_MAX_DENSE_CELLS = 1 << 24


def _check_label_maps(
    true: Int[np.ndarray, "b h w"], pred: Int[np.ndarray, "b h w"]
) -> tuple[Int[np.ndarray, "b n"], Int[np.ndarray, "b n"]]:
    """Validates a pair of label maps and returns them flattened to `[b, h*w]` int64."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    for name, labels in (("true", true), ("pred", pred)):
        if labels.ndim != 3:
            raise ValueError(
                f"`{name}` must be a [b, h, w] label map, got shape {labels.shape}."
            )
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
            raise ValueError(
                f"`{name}` must hold integer labels, got dtype {labels.dtype}."
            )
        if labels.size and labels.min() < 0:
            raise ValueError(
                f"`{name}` holds negative labels (min {labels.min()}); labels must be >= 0."
            )
    if true.shape != pred.shape:
        raise ValueError(
            f"`true` and `pred` must have the same shape, got {true.shape} and {pred.shape}."
        )
    b = true.shape[0]
    return true.reshape(b, -1).astype(np.int64), pred.reshape(b, -1).astype(np.int64)


def miou(
    true: Int[np.ndarray, "b h w"],
    pred: Int[np.ndarray, "b h w"],
    variant: str = "fg",
    num_channels: int | None = None,
) -> Float[np.ndarray, " b"]:
    """Hungarian-matched mean IoU per image, exactly as the ClevrTex evaluator.

    Both label maps are one-hot encoded into K channels, K = max(`num_channels`,
    largest true label in the batch + 1). For each image the float32 IoU matrix
    `M[t, p]` (true rows, predicted columns; 0 where either mask is empty) is matched
    with `scipy.optimize.linear_sum_assignment(M, maximize=True)`, so every true
    channel, the background and empty padding channels included, gets one predicted
    partner. A pair counts when its true or its predicted mask is non-empty; with
    `n_pairs` counted pairs and `iou_t` the matched IoUs:

    * `"fg"`:  sum_{t>=1} iou_t / (n_pairs - 1), the ClevrTex benchmark's mIoU;
    * `"all"`: sum_t iou_t / n_pairs, background pair included (official AST code);
    * `"gt"`:  sum_t iou_t / (number of non-empty true channels).

    Ties between zero-IoU pairings change `n_pairs`, and scipy breaks them depending
    on the matrix size, so pass `num_channels=num_slots + 1` (the model's k+1 layers,
    what the reference uses) to reproduce benchmark numbers exactly.

    NaN handling: like the reference, `"fg"` is 0/0 = NaN for an image whose only
    counted pair is the background (no object and no foreground prediction); average
    such values with `nanmean`, which leaves them out. When the ground truth has no
    background pixel at all, the reference's `n_pairs - 1` can also be 0 while an
    object is matched, giving +inf; that is reproduced too.

    Args:
      true: [b, h, w] ground-truth labels, 0 = background.
      pred: [b, h, w] predicted labels in [0, num_channels), 0 = background slot.
      variant: "fg", "all" or "gt".
      num_channels: K (number of model slots + 1). Defaults to the largest label in
        either map (over the whole batch) + 1.

    Returns:
      [b] float64 mIoU per image.

    Raises:
      ValueError: on malformed label maps, an unknown variant, or predicted labels
        that do not fit into `num_channels`.
    """
    if variant not in MIOU_VARIANTS:
        raise ValueError(f"variant must be one of {MIOU_VARIANTS}, got {variant!r}.")
    t, p = _check_label_maps(true, pred)
    b = t.shape[0]
    if b == 0:
        return np.zeros((0,), np.float64)
    max_true = int(t.max()) if t.size else 0
    max_pred = int(p.max()) if p.size else 0
    if num_channels is None:
        num_channels = max(max_true, max_pred) + 1
    elif max_pred >= num_channels:
        raise ValueError(
            f"`pred` holds label {max_pred} but num_channels={num_channels}; predicted "
            "labels must lie in [0, num_channels)."
        )
    k = max(int(num_channels), max_true + 1)
    if k > _MAX_MIOU_CHANNELS:
        raise ValueError(
            f"miou needs a {k}x{k} IoU matrix per image (largest label {k - 1}); "
            f"relabel the maps to fewer than {_MAX_MIOU_CHANNELS} channels."
        )
    image = np.arange(b, dtype=np.int64)[:, None]
    inter = np.bincount(((image * k + t) * k + p).ravel(), minlength=b * k * k).reshape(
        b, k, k
    )
    area_t = inter.sum(2)
    area_p = inter.sum(1)
    union = area_t[:, :, None] + area_p[:, None, :] - inter
    nonempty = (area_t[:, :, None] > 0) & (area_p[:, None, :] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter.astype(np.float32) / union.astype(np.float32)
    iou = np.where(nonempty, iou, np.float32(0.0))

    out = np.empty((b,), np.float64)
    for i in range(b):
        rows, cols = linear_sum_assignment(iou[i], maximize=True)
        matched = iou[i][rows, cols].astype(np.float64)
        counted = (area_t[i, rows] > 0) | (area_p[i, cols] > 0)
        n_pairs = float(counted.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            if variant == "fg":
                value = np.float64(matched[rows >= 1].sum()) / np.float64(n_pairs - 1)
            elif variant == "all":
                value = np.float64(matched.sum()) / np.float64(n_pairs)
            else:
                value = np.float64(matched.sum()) / np.float64((area_t[i] > 0).sum())
        out[i] = value
    return out


def _contingency_cells(
    t: Int[np.ndarray, "b n"], p: Int[np.ndarray, "b n"], fg_only: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty cells of every image's contingency table (true x pred labels).

    Args:
      t: [b, n] true labels (>= 0).
      p: [b, n] predicted labels (>= 0).
      fg_only: keep only pixels with a true label > 0.

    Returns:
      (image, true_label, pred_label, count), 1-D arrays over the non-empty cells,
      sorted by (image, true_label, pred_label). Labels are the original values.
    """
    b = t.shape[0]
    image = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None], t.shape)
    if fg_only:
        keep = t > 0
        image, t, p = image[keep], t[keep], p[keep]
    else:
        image, t, p = image.ravel(), t.ravel(), p.ravel()
    if t.size == 0:
        empty = np.zeros((0,), np.int64)
        return empty, empty, empty, empty

    # Compact large label values so that tables stay small (no label is ever capped).
    t_values = p_values = None
    nt, np_ = int(t.max()) + 1, int(p.max()) + 1
    if nt > t.size:
        t_values, t = np.unique(t, return_inverse=True)
        nt = t_values.size
    if np_ > p.size:
        p_values, p = np.unique(p, return_inverse=True)
        np_ = p_values.size

    if b * nt * np_ <= _MAX_DENSE_CELLS:
        table = np.bincount((image * nt + t) * np_ + p, minlength=b * nt * np_)
        cells = np.nonzero(table.reshape(b, nt, np_))
        cell_image, cell_t, cell_p = (c.astype(np.int64) for c in cells)
        counts = table.reshape(b, nt, np_)[cells].astype(np.int64)
    else:
        order = np.lexsort((p, t, image))
        image, t, p = image[order], t[order], p[order]
        change = np.ones(image.size, bool)
        change[1:] = (image[1:] != image[:-1]) | (t[1:] != t[:-1]) | (p[1:] != p[:-1])
        starts = np.flatnonzero(change)
        cell_image, cell_t, cell_p = image[starts], t[starts], p[starts]
        counts = np.diff(np.append(starts, image.size)).astype(np.int64)
    if t_values is not None:
        cell_t = t_values[cell_t]
    if p_values is not None:
        cell_p = p_values[cell_p]
    return cell_image, cell_t, cell_p, counts


def _group_sums(
    keys: tuple[np.ndarray, ...], counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sums `counts` over runs of equal keys (the arrays must be sorted by `keys`).

    Returns:
      (starts, sums): index of the first cell of every group and the group's total.
    """
    if counts.size == 0:
        return np.zeros((0,), np.int64), counts
    change = np.zeros(counts.size, bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    starts = np.flatnonzero(change)
    return starts, np.add.reduceat(counts, starts)


def ari_fg(
    true: Int[np.ndarray, "b h w"], pred: Int[np.ndarray, "b h w"]
) -> Float[np.ndarray, " b"]:
    """Adjusted Rand index on the ground-truth foreground pixels of every image.

    Equal to `sklearn.metrics.adjusted_rand_score(true[i][true[i] > 0],
    pred[i][true[i] > 0])`, degenerate cases included: identical partitions (up to
    relabelling), 0 or 1 foreground pixels, and one object predicted as one
    cluster all give 1.0; several objects predicted as one cluster give 0.0. The
    predicted background is an ordinary cluster. Any label values are allowed.

    Args:
      true: [b, h, w] ground-truth labels, 0 = background (ignored).
      pred: [b, h, w] predicted labels.

    Returns:
      [b] float64 ARI-FG per image.
    """
    t, p = _check_label_maps(true, pred)
    b = t.shape[0]
    image, cell_t, cell_p, counts = _contingency_cells(t, p, fg_only=True)
    # Sums of squares are exact in float64 below 2**53, i.e. up to ~9e7 pixels per image.
    n = np.rint(np.bincount(image, weights=counts, minlength=b)).astype(np.int64)
    sum_cells = np.rint(
        np.bincount(image, weights=counts.astype(np.float64) ** 2, minlength=b)
    ).astype(np.int64)
    starts, row_sums = _group_sums((image, cell_t), counts)
    sum_rows = np.rint(
        np.bincount(
            image[starts], weights=row_sums.astype(np.float64) ** 2, minlength=b
        )
    ).astype(np.int64)
    order = np.lexsort((cell_p, image))
    starts, col_sums = _group_sums((image[order], cell_p[order]), counts[order])
    sum_cols = np.rint(
        np.bincount(
            image[order][starts],
            weights=col_sums.astype(np.float64) ** 2,
            minlength=b,
        )
    ).astype(np.int64)

    out = np.empty((b,), np.float64)
    for i in range(b):
        # sklearn's pair confusion matrix (ordered pairs), in exact Python integers.
        n_i, s, a2, b2 = (
            int(n[i]),
            int(sum_cells[i]),
            int(sum_rows[i]),
            int(sum_cols[i]),
        )
        tp = s - n_i
        fp = b2 - s
        fn = a2 - s
        tn = n_i * n_i - fp - fn - s
        if fn == 0 and fp == 0:
            out[i] = 1.0
        else:
            out[i] = (
                2.0
                * (tp * tn - fn * fp)
                / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
            )
    return out


def msc_fg(
    true: Int[np.ndarray, "b h w"], pred: Int[np.ndarray, "b h w"]
) -> Float[np.ndarray, " b"]:
    """GENESIS mean segmentation covering of the ground-truth foreground segments.

    For every true segment with label > 0 present in the image, the best float32
    IoU with any predicted segment of the image (the predicted background
    included; one predicted segment may cover several true ones), averaged with
    equal weight per true segment. An image without foreground segments scores 0
    (GENESIS divides by max(N, 1)).

    Args:
      true: [b, h, w] ground-truth labels, 0 = background.
      pred: [b, h, w] predicted labels.

    Returns:
      [b] float64 MSC-FG per image.
    """
    t, p = _check_label_maps(true, pred)
    b = t.shape[0]
    image, cell_t, cell_p, counts = _contingency_cells(t, p, fg_only=False)
    # Predicted segment sizes over the whole image, then true segment sizes.
    order = np.lexsort((cell_p, image))
    starts, col_sums = _group_sums((image[order], cell_p[order]), counts[order])
    pred_area = np.empty_like(counts)
    pred_area[order] = np.repeat(col_sums, np.diff(np.append(starts, counts.size)))
    starts, row_sums = _group_sums((image, cell_t), counts)
    sizes = np.diff(np.append(starts, counts.size))
    true_area = np.repeat(row_sums, sizes)

    union = true_area + pred_area - counts
    iou = counts.astype(np.float32) / union.astype(np.float32)
    if iou.size:
        best = np.maximum.reduceat(iou, starts)
    else:
        best = iou
    group_image = image[starts]
    foreground = cell_t[starts] > 0
    total = np.bincount(
        group_image[foreground],
        weights=best[foreground].astype(np.float64),
        minlength=b,
    )
    num_segments = np.bincount(group_image[foreground], minlength=b)
    return total / np.maximum(num_segments, 1)


def mse(
    image: Float[np.ndarray, "b h w c"], recon: Float[np.ndarray, "b h w c"]
) -> Float[np.ndarray, " b"]:
    """Per-image sum over pixels and channels of (image - recon)^2, images in [0, 1].

    This is the ClevrTex / AST "MSE" (a sum, not a per-pixel mean: AST's CLEVRTEX
    139 is a per-element error of 2.8e-3 at 128x128x3).

    Args:
      image: [b, h, w, c] input images in [0, 1].
      recon: [b, h, w, c] reconstructions in [0, 1].

    Returns:
      [b] float64 sums of squared errors.
    """
    image = np.asarray(image, np.float64)
    recon = np.asarray(recon, np.float64)
    if image.ndim != 4 or image.shape != recon.shape:
        raise ValueError(
            "`image` and `recon` must be [b, h, w, c] arrays of the same shape, got "
            f"{image.shape} and {recon.shape}."
        )
    return np.square(image - recon).sum(axis=(1, 2, 3))


def nanmean(
    values: Float[np.ndarray, " b"], valid: Bool[np.ndarray, " b"] | None = None
) -> float:
    """Mean over the non-NaN entries (and, if given, those with `valid` True).

    Use it for dataset-level `miou`: its "fg" variant is NaN for images with no
    object and no foreground prediction, which the reference would propagate into
    the mean. Returns NaN when no entry is left.
    """
    values = np.asarray(values, np.float64).ravel()
    keep = ~np.isnan(values)
    if valid is not None:
        valid = np.asarray(valid, bool).ravel()
        if valid.shape != values.shape:
            raise ValueError(
                f"`valid` has shape {valid.shape}, expected {values.shape}."
            )
        keep &= valid
    if not keep.any():
        return float("nan")
    return float(values[keep].mean())


def evaluate_batch(
    true: Int[np.ndarray, "b h w"],
    pred: Int[np.ndarray, "b h w"],
    image: Float[np.ndarray, "b h w 3"],
    recon: Float[np.ndarray, "b h w 3"],
    num_slots: int,
) -> dict[str, Float[np.ndarray, " b"]]:
    """All per-image metrics of the paper for one batch.

    Args:
      true: [b, h, w] ground-truth labels, 0 = background.
      pred: [b, h, w] predicted labels in [0, num_slots], 0 = background slot.
      image: [b, h, w, 3] input images in [0, 1].
      recon: [b, h, w, 3] reconstructions in [0, 1].
      num_slots: the model's number of object slots k (mIoU uses k + 1 channels).

    Returns:
      Per-image [b] float64 arrays: `miou` (ClevrTex foreground mIoU, may be NaN),
      `miou_all` (background pair included), `ari_fg`, `msc_fg` and `mse`.
    """
    return {
        "miou": miou(true, pred, "fg", num_channels=num_slots + 1),
        "miou_all": miou(true, pred, "all", num_channels=num_slots + 1),
        "ari_fg": ari_fg(true, pred),
        "msc_fg": msc_fg(true, pred),
        "mse": mse(image, recon),
    }


@flax.struct.dataclass
class NanAverage(clu_metrics.Average):
    """A CLU `Average` of per-image values that leaves out NaN entries (see `miou`)."""

    @classmethod
    def from_model_output(
        cls, values: Float[np.ndarray, " b"], mask: np.ndarray | None = None, **_
    ) -> "NanAverage":
        values = jnp.asarray(values, jnp.float32)
        finite = ~jnp.isnan(values)
        mask = finite if mask is None else jnp.asarray(mask, bool) & finite
        return super().from_model_output(jnp.where(finite, values, 0.0), mask=mask)


@flax.struct.dataclass
class SegmentationMetrics(clu_metrics.Collection):
    """CLU collection over the per-image outputs of `evaluate_batch`.

    Usage (host side, `valid` masks padding images of the last eval batch):
    `SegmentationMetrics.single_from_model_output(**evaluate_batch(...), mask=valid)`,
    then `merge` across batches and `compute()`. Totals are float32 (CLU's
    `Average`); for final numbers prefer `nanmean` over the concatenated values.
    """

    miou: NanAverage.from_output("miou")
    miou_all: clu_metrics.Average.from_output("miou_all")
    ari_fg: clu_metrics.Average.from_output("ari_fg")
    msc_fg: clu_metrics.Average.from_output("msc_fg")
    mse: clu_metrics.Average.from_output("mse")
