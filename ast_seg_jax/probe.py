"""Shape probe: do the appearance vectors, and the masks, name each object's shape kind?

A model can put one slot on each object and still draw every object as a blob: then its appearance vectors
(z_what, what the glimpse generator decodes) carry colour and size but not shape. The probe measures this on
datasets that store each object's kind (the built-in `shapes` scenes: `objects/shape`, six kinds):

1. Run the model on the first images of a split and take the predicted label map (argmax of the layer
   weights, 0 = background).
2. Match objects to slots: each ground-truth object goes to the slot that covers most of its pixels (an
   object whose pixels are mostly background is "missed"); a slot that covers most of several objects keeps
   the one it overlaps most.
3. Fit a multinomial logistic regression from the matched slots' z_what (standardised) to the object kinds
   and report its 5-fold cross-validated accuracy, with the accuracy of always guessing the most frequent kind
   beside it. About 83 % is the ceiling on the built-in scenes: a square and a diamond are the same shape up
   to rotation and size.

The regression is L2-regularised (strength 1 on the standardised features, as scikit-learn's default
`C=1.0`) and fitted by SciPy's L-BFGS on the full fold, so the probe needs no extra dependency.

The **mask probe** asks the same question of what the renderer draws instead of z_what: the same
regression, fitted to fixed shape descriptors of each matched slot's segment (`shape_descriptors`:
moment invariants and a radial profile, unchanged when a shape moves, turns or is scaled). The
objects are rotated at random, so a linear probe of mask pixels cannot name the kind even from perfect
masks (about 25 % on the true masks, in the slots' windows or in the image); the descriptors take the
position, angle and size out. The same probe on the true masks of the same objects
(`mask_probe_reference`) is the score that perfect masks would get. On the built-in scenes a model that
draws rounded blobs scores about chance, a model whose masks follow the objects' outlines close to the
reference (docs/demo_experiments.md).
"""

import numpy as np
import scipy.optimize

from ast_seg_jax import input_pipeline

SHAPE_KEY = "shape"
# Fewest matched objects for which the probe reports an accuracy (NaN below).
MIN_OBJECTS = 10


def has_shape_labels(data_config) -> bool:
    """Whether the dataset of `data_config` stores each object's shape kind (`objects/shape`)."""
    if data_config.get("name", "") == "folder":
        return False
    features = input_pipeline.get_builder(data_config).info.features
    return "objects" in features and SHAPE_KEY in features["objects"].feature


def shape_examples(data_config, split: str, num_images: int):
    """Yields (image float32 [h, w, 3] in [0, 1], label map [h, w], object kinds [n]) in index order."""
    import tensorflow_datasets as tfds  # Only the probe's data reading needs TFDS.

    builder = input_pipeline.get_builder(data_config)
    ds = builder.as_dataset(split=f"{split}[:{num_images}]", shuffle_files=False)
    for example in tfds.as_numpy(ds):
        labels = np.asarray(example["segmentation"])
        yield (
            np.asarray(example["image"], np.float32) / 255.0,
            labels.reshape(labels.shape[:2]),
            np.asarray(example["objects"][SHAPE_KEY], np.int64),
        )


def match_objects(
    true_labels: np.ndarray, pred_labels: np.ndarray, num_objects: int
) -> dict[int, int]:
    """Maps ground-truth objects to the slots that cover them.

    Args:
      true_labels: int [h, w], 0 = background, j = object j (1..num_objects).
      pred_labels: int [h, w], 0 = background, k = slot k - 1.
      num_objects: number of ground-truth objects.

    Returns:
      {object index j - 1: slot index}, each slot at most once (the object it overlaps most).
    """
    best: dict[int, tuple[int, int]] = {}  # slot -> (overlap, object)
    for j in range(1, num_objects + 1):
        inside = pred_labels[true_labels == j]
        if inside.size == 0:
            continue
        counts = np.bincount(inside.ravel())
        label = int(counts.argmax())
        if label == 0:
            continue  # Missed: mostly background.
        overlap = int(counts[label])
        if label - 1 not in best or overlap > best[label - 1][0]:
            best[label - 1] = (overlap, j - 1)
    return {obj: slot for slot, (_, obj) in best.items()}


# Seven moment invariants and eight rings of the radial profile.
NUM_DESCRIPTORS = 15
_PROFILE_BINS = 8
_PROFILE_RANGE = 1.2


def shape_descriptors(mask: np.ndarray) -> np.ndarray:
    """Fixed features of a binary mask that do not change when the shape is moved, turned or scaled.

    - Seven rotation invariants of the normalised central moments eta_pq = mu_pq / m00^(1 + (p+q)/2), as
      logarithms: the squared magnitudes of the complex moments of orders 2 to 4 that do not cancel
      (Hu's first four and three of order 4: |c11|, |c20|^2, |c30|^2, |c21|^2, c22, |c31|^2, |c40|^2).
      A square has a fourfold c40, a triangle a threefold c30, a cross a large c22 for its area.
    - The share of the mask's area in each of eight rings around its centroid, at distances of 0 to 1.2
      times sqrt(area) (a disc ends at 0.56, a square's corners reach 0.71, a cross's arms further).

    Args:
      mask: [h, w], nonzero inside the shape.

    Returns:
      float64 [NUM_DESCRIPTORS]; zeros for an empty mask.
    """
    m = (np.asarray(mask) != 0).astype(np.float64)
    area = m.sum()
    if area == 0:
        return np.zeros(NUM_DESCRIPTORS)
    rows, cols = np.nonzero(m)
    x = cols - cols.mean()
    y = rows - rows.mean()

    def eta(p: int, q: int) -> float:
        return float(np.sum(x**p * y**q)) / area ** (1 + (p + q) / 2)

    e20, e02, e11 = eta(2, 0), eta(0, 2), eta(1, 1)
    e30, e03, e21, e12 = eta(3, 0), eta(0, 3), eta(2, 1), eta(1, 2)
    e40, e04, e22, e31, e13 = eta(4, 0), eta(0, 4), eta(2, 2), eta(3, 1), eta(1, 3)
    invariants = np.array(
        [
            e20 + e02,
            (e20 - e02) ** 2 + 4 * e11**2,
            (e30 - 3 * e12) ** 2 + (3 * e21 - e03) ** 2,
            (e30 + e12) ** 2 + (e21 + e03) ** 2,
            e40 + 2 * e22 + e04,
            (e40 - e04) ** 2 + 4 * (e31 + e13) ** 2,
            (e40 - 6 * e22 + e04) ** 2 + 16 * (e31 - e13) ** 2,
        ]
    )
    radius = np.sqrt(x**2 + y**2) / np.sqrt(area)
    profile = (
        np.histogram(radius, bins=_PROFILE_BINS, range=(0.0, _PROFILE_RANGE))[0] / area
    )
    return np.concatenate([np.log(invariants + 1e-12), profile])


def _softmax_loss(
    flat: np.ndarray, x: np.ndarray, y: np.ndarray, num_classes: int, l2: float
):
    d = x.shape[1]
    w = flat[: d * num_classes].reshape(d, num_classes)
    b = flat[d * num_classes :]
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(y)), y].sum() + 0.5 * l2 * np.sum(w * w)
    p = np.exp(log_p)
    p[np.arange(len(y)), y] -= 1.0
    grad_w = x.T @ p + l2 * w
    return loss, np.concatenate([grad_w.ravel(), p.sum(axis=0)])


def fit_logistic(
    x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L2 on the weights): returns (weights [d, c], bias [c])."""
    d = x.shape[1]
    result = scipy.optimize.minimize(
        _softmax_loss,
        np.zeros(d * num_classes + num_classes),
        args=(x, y, num_classes, l2),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 500},
    )
    return result.x[: d * num_classes].reshape(d, num_classes), result.x[
        d * num_classes :
    ]


def cross_validated_accuracy(
    x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0
) -> float:
    """Held-out accuracy of `fit_logistic` over `folds` folds (features standardised on each training fold)."""
    if len(y) < folds:
        raise ValueError(
            f"The probe needs at least {folds} matched objects, got {len(y)}."
        )
    order = np.random.default_rng(seed).permutation(len(y))
    correct = 0
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
        w, b = fit_logistic((x[train] - mean) / std, y[train], num_classes)
        predicted = (((x[fold] - mean) / std) @ w + b).argmax(axis=1)
        correct += int(np.sum(predicted == y[fold]))
    return correct / len(y)


def shape_probe(
    predict, data_config, *, split: str, num_images: int, batch_size: int
) -> dict:
    """Runs the probe.

    Args:
      predict: function from a float32 [b, h, w, 3] batch to (label maps [b, h, w], z_what [b, K, Z]).
      data_config: the run's `config.data` (a dataset with `objects/shape`).
      split: the split to read.
      num_images: how many of its first images to use.
      batch_size: images per call of `predict`.

    Returns:
      {'shape_probe': cross-validated accuracy from z_what (NaN with fewer than MIN_OBJECTS matched
       objects), 'mask_probe': the same from the descriptors of each matched slot's segment,
       'mask_probe_reference': the same from the descriptors of the matched objects' true masks,
       'shape_probe_chance': accuracy of the most frequent kind, 'shape_probe_objects': matched objects,
       'shape_probe_found': matched / ground-truth objects}.
    """
    features, masks, true_masks, kinds, total = [], [], [], [], 0
    examples = list(shape_examples(data_config, split, num_images))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        images = np.stack([image for image, _, _ in chunk])
        pred, z_what = predict(images)
        pred, z_what = np.asarray(pred), np.asarray(z_what)
        for i, (_, labels, shapes) in enumerate(chunk):
            total += len(shapes)
            for obj, slot in match_objects(labels, pred[i], len(shapes)).items():
                features.append(z_what[i, slot])
                masks.append(shape_descriptors(pred[i] == slot + 1))
                true_masks.append(shape_descriptors(labels == obj + 1))
                kinds.append(shapes[obj])
    x = np.asarray(features, np.float64) if features else np.zeros((0, 1))
    y = np.asarray(kinds, np.int64)
    num_classes = int(
        input_pipeline.get_builder(data_config)
        .info.features["objects"]
        .feature[SHAPE_KEY]
        .num_classes
    )

    def accuracy(x: np.ndarray) -> float:
        # Too few matched objects for 5 folds (an untrained model may cover none): no accuracy.
        if len(y) < MIN_OBJECTS:
            return np.nan
        return float(cross_validated_accuracy(x, y, num_classes))

    return {
        "shape_probe": accuracy(x),
        "mask_probe": accuracy(np.asarray(masks).reshape(len(y), NUM_DESCRIPTORS)),
        "mask_probe_reference": accuracy(
            np.asarray(true_masks).reshape(len(y), NUM_DESCRIPTORS)
        ),
        "shape_probe_chance": float(np.bincount(y).max() / len(y)) if len(y) else 0.0,
        "shape_probe_objects": len(y),
        "shape_probe_found": float(len(y) / max(total, 1)),
    }
