"""Evaluation of a trained model on a dataset split, and the pictures of what it sees.

The eval step runs the model in eval mode (BatchNorm running statistics, no dropout) with the live
background network, as the official evaluation does for the curriculum and baseline scenarios. Every image
of the split is scored (the last batch is padded and the padding masked out), unlike the official loader,
which shuffles and drops the last partial batch.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ast_seg_jax import input_pipeline, metrics, probe, visualize
from ast_seg_jax.models.ast_model import predicted_labels
from ast_seg_jax.typing import IMAGE, SEGMENTATION, VALID

# Order of the printed table: the paper's columns.
TABLE_KEYS = ("miou", "miou_all", "ari_fg", "msc_fg", "mse")


def variables_of(state) -> dict:
    """The apply() variables of a TrainState."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def eval_step(variables, image, *, model):
    """Predicted label maps [b, h, w] (0 = background) and reconstructions [b, h, w, 3]."""
    out = model.apply(variables, image, None, train=False)
    return predicted_labels(model, out, image), out.reconstruction


def find_intermediate(tree, name: str):
    """The first value sown under `name` anywhere in an 'intermediates' collection, or None."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for key, value in tree.items():
            if key == name:
                return value[0] if isinstance(value, tuple) else value
            found = find_intermediate(value, name)
            if found is not None:
                return found
    return None


@functools.partial(jax.jit, static_argnames="model")
def _forward_with_intermediates(variables, image, *, model):
    # Keyed on the (hashable) module, so periodic image summaries compile once per run.
    out, state = model.apply(
        variables, image, None, train=False, mutable=["intermediates"]
    )
    return out, state, predicted_labels(model, out, image)


def visual_sample(model, variables, batch: dict) -> dict:
    """Numpy arrays for `visualize.sample_figure` from one forward pass in eval mode."""
    image = jnp.asarray(batch[IMAGE])
    out, state, labels = _forward_with_intermediates(variables, image, model=model)
    inter = state.get("intermediates", {})
    sample = {
        "image": image,
        "reconstruction": out.reconstruction,
        "background": out.background,
        "weights": out.weights,
        "labels": labels,
        "layers": out.layers,
        "masks": out.masks,
        "xy": out.xy,
    }
    for name in ("attention", "xy_pooled"):
        value = find_intermediate(inter, name)
        if value is not None:
            sample[name] = value
    if SEGMENTATION in batch:
        sample["segmentation"] = batch[SEGMENTATION]
    return {k: np.asarray(jax.device_get(v)) for k, v in sample.items()}


def figure_for_batch(model, state, batch: dict, mesh: Mesh | None = None) -> np.ndarray:
    """A uint8 figure of the model's view of `batch` (see `visualize.sample_figure`)."""
    del mesh  # A handful of images: computed on the default device.
    variables = jax.device_get(variables_of(state))
    return visualize.sample_figure(visual_sample(model, variables, batch))


def evaluate(
    model,
    variables,
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    num_slots: int,
    mesh: Mesh,
    max_images: int = -1,
):
    """Scores every image of `split` (or the first `max_images`).

    Returns:
      (means, per_image): dataset means of each metric (the paper's numbers are these x100, except MSE)
      and the per-image numpy values, keyed by metric name. Segmentation metrics are present only when the
      dataset has label maps. `means['num_images']` is the number of images scored.
    """
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put(variables, replicated)
    # Replicated outputs, so that every process can fetch the whole batch (multi-host).
    step = jax.jit(functools.partial(eval_step, model=model), out_shardings=replicated)
    per_image: dict[str, list] = {}
    count, start = 0, time.time()
    total = input_pipeline.num_examples(data_config, split)
    if max_images > 0:
        total = min(total, max_images)
    for batch in input_pipeline.create_eval_iterator(
        data_config, split=split, global_batch_size=batch_size
    ):
        image = input_pipeline.to_global_arrays({IMAGE: batch[IMAGE]}, mesh)[IMAGE]
        if jax.process_count() > 1:
            # The outputs are the whole global batch on every process; score them against the whole
            # global batch too (process-major rows, as `to_global_arrays` lays them out).
            batch = {
                key: multihost_utils.process_allgather(batch[key], tiled=True)
                for key in (IMAGE, SEGMENTATION, VALID)
                if key in batch
            }
        valid = np.asarray(batch[VALID], bool)
        if max_images > 0:
            valid = valid & (np.cumsum(valid) + count <= max_images)
        if not valid.any():
            break
        pred, recon = jax.device_get(step(variables, image))
        pred, recon = np.asarray(pred)[valid], np.asarray(recon)[valid]
        values = {"mse": metrics.mse(batch[IMAGE][valid], recon)}
        if SEGMENTATION in batch:
            values.update(
                metrics.evaluate_batch(
                    batch[SEGMENTATION][valid],
                    pred,
                    batch[IMAGE][valid],
                    recon,
                    num_slots,
                )
            )
        for key, value in values.items():
            per_image.setdefault(key, []).append(np.asarray(value, np.float64))
        count += int(valid.sum())
        logging.log_every_n_seconds(
            logging.INFO,
            "  evaluated %d/%d images (%.0f s)",
            10,
            count,
            total,
            time.time() - start,
        )
    if count == 0:
        raise ValueError(f"The {split!r} split of {data_config.name!r} has no images.")
    per_image = {k: np.concatenate(v) for k, v in per_image.items()}
    means = {k: float(np.nanmean(v)) for k, v in per_image.items()}
    means["num_images"] = count
    return means, per_image


def run_shape_probe(
    model, variables, data_config, *, split: str, num_images: int, batch_size: int
) -> dict:
    """`probe.shape_probe` of the model's appearance vectors and masks on the first images of a split."""

    @jax.jit
    def predict(image):
        out = model.apply(variables, image, None, train=False)
        return predicted_labels(model, out, image), out.z_what

    return probe.shape_probe(
        lambda images: jax.device_get(predict(jnp.asarray(images))),
        data_config,
        split=split,
        num_images=num_images,
        batch_size=batch_size,
    )


def format_probe(means: dict) -> str:
    """Two lines: the shape probe from z_what against chance (and how many objects it saw), and the mask probe
    against the same probe on the true masks."""
    if not np.isfinite(means["shape_probe"]):
        return (
            f"Shape probe: not scored, {means['shape_probe_objects']} objects have a slot "
            f"(it needs at least {probe.MIN_OBJECTS})."
        )
    return (
        f"Shape probe (linear, 5-fold): {100 * means['shape_probe']:.1f} % of "
        f"{means['shape_probe_objects']} objects (chance "
        f"{100 * means['shape_probe_chance']:.1f} %; "
        f"{100 * means['shape_probe_found']:.1f} % of the objects have a slot)\n"
        f"Mask probe (the same, on shape descriptors of each slot's segment): "
        f"{100 * means['mask_probe']:.1f} % (on the true masks of the same objects: "
        f"{100 * means['mask_probe_reference']:.1f} %)"
    )


def format_table(means: dict, name: str) -> str:
    """The paper's table row: mIoU / ARI-FG / MSC-FG x100, MSE as is."""
    header = (
        f"{'dataset':<24}" + "".join(f"{k:>10}" for k in TABLE_KEYS) + f"{'images':>9}"
    )
    cells = []
    for key in TABLE_KEYS:
        if key not in means:
            cells.append(f"{'-':>10}")
        elif key == "mse":
            cells.append(f"{means[key]:>10.1f}")
        else:
            cells.append(f"{100 * means[key]:>10.2f}")
    row = f"{name:<24}" + "".join(cells) + f"{means['num_images']:>9d}"
    return header + "\n" + row


def evaluate_and_write(
    config,
    workdir: str,
    model,
    variables,
    mesh: Mesh,
    *,
    split: str = "",
    tag: str = "",
) -> dict:
    """Evaluates `variables` on a split, prints the table and writes its results.

    Writes WORKDIR/eval/<tag or split>/metrics.json (the dataset means and `num_images`) and samples.png
    (a figure of the first images of the split); only process 0 writes.

    Args:
      config: the run's config (its `data`, `model.num_slots`, `eval_batch_size`, `num_eval_images`).
      workdir: the run's workdir.
      model: the AST model.
      variables: {'params', 'batch_stats'} (see `variables_of`).
      mesh: the device mesh.
      split: the split to score (default `config.data.eval_split`).
      tag: the results folder's name under WORKDIR/eval (default: the split).

    Returns:
      The dataset means.
    """
    split = split or config.data.eval_split
    means, _ = evaluate(
        model,
        variables,
        config.data,
        split=split,
        batch_size=config.eval_batch_size,
        num_slots=config.model.num_slots,
        mesh=mesh,
        max_images=config.num_eval_images,
    )
    name = config.data.name + (f"/{config.data.config}" if config.data.config else "")
    text = f"Evaluation on {name} ({split}):\n{format_table(means, name)}"
    num_probe = config.get("num_probe_images", 512)
    if (
        num_probe > 0
        and jax.process_count() == 1
        and probe.has_shape_labels(config.data)
    ):
        means.update(
            run_shape_probe(
                model,
                variables,
                config.data,
                split=split,
                num_images=num_probe,
                batch_size=config.eval_batch_size,
            )
        )
        text += "\n" + format_probe(means)
    logging.info(text)
    if jax.process_index() != 0:
        return means
    print(text, flush=True)
    out_dir = os.path.join(workdir, "eval", tag or split)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(means, f, indent=2)
    batch = next(
        iter(
            input_pipeline.create_eval_iterator(
                config.data, split=split, global_batch_size=config.eval_batch_size
            )
        )
    )
    sample = visual_sample(
        model, jax.device_get(variables), {k: v[:6] for k, v in batch.items()}
    )
    visualize.save_png(
        os.path.join(out_dir, "samples.png"), visualize.sample_figure(sample)
    )
    return means
