"""TFDS / image folder -> tf.data -> numpy batches -> global jax.Arrays sharded on the mesh axis "data".

Batches are dicts of numpy arrays (b = per-process batch = global_batch_size / jax.process_count()):
    image         float32 [b, h, w, 3] in [0, 1]
    segmentation  int32 [b, h, w], 0 = background (only when the dataset has label maps)
    index         int32 [b], position of the example within its split (0..N-1; -1 for eval padding)
    valid         bool [b] (eval iterators only): False for the padding that fills the last batch

`data_config` (an ml_collections.ConfigDict; missing keys take the defaults in brackets):
    name           shapes | clevrtex | clevr | objects_room | shapestacks | folder   [required]
    config         builder config: shapes: default / default_128 / textured / textured_128;
                   clevrtex: full / outd / camo; ignored for clevr, objects_room, shapestacks, folder  ['']
    data_dir       TFDS data dir; '' = TFDS default (~/tensorflow_datasets)  ['']
    manual_dir     downloaded raw files; when set, an unprepared dataset is prepared from it  ['']
    dir            root of the image folder (name=folder)  ['']
    image_size     (h, w): folder images are resized to it; the TFDS datasets are stored at their benchmark
                   resolution and it must equal that (checked)  [None = keep / no check]
    crop           folder only: 'center' (crop to the target aspect first) or 'none'  ['center']
    bad_images     folder only: 'skip' (report unusable files by name and leave them out) or 'error'  ['skip']
    max_image_side folder only: larger images are unusable files unless large_images='downscale'  [8192]
    large_images   folder only: 'reject' or 'downscale' (shrink to max_image_side when decoding)  ['reject']
    train_split    ['train']; eval_split ['test']  (TFDS split names; `validation` where it exists)
    shuffle_buffer examples in the shuffle buffer  [10_000]

TensorFlow and TFDS are imported when data is first read, not when this module is imported: the model,
the train steps and `to_global_arrays` work without them (e.g. on a GPU machine without TensorFlow).
TensorFlow is hidden from every GPU as soon as it is imported here. Multi-host: process p reads the
examples [p*N/P, (p+1)*N/P) of a split (TFDS sub-split, so only its own files are read).
"""

import importlib
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ast_seg_jax.image_io import MAX_IMAGE_SIDE
from ast_seg_jax.typing import IMAGE, INDEX, SEGMENTATION, VALID


class _LazyModule:
    """A module imported on its first attribute access; `after_import(module)` runs once, right then.

    `requires` names another `_LazyModule` to import first (TFDS imports TensorFlow, whose GPU set-up
    must come before anything else uses it).
    """

    def __init__(self, name: str, after_import=None, requires=None):
        self._name = name
        self._after_import = after_import
        self._requires = requires
        self._module = None

    def load(self):
        if self._module is None:
            if self._requires is not None:
                self._requires.load()
            module = importlib.import_module(self._name)
            if self._after_import is not None:
                self._after_import(module)
            self._module = module
        return self._module

    def __getattr__(self, attr: str):
        return getattr(self.load(), attr)


def _hide_gpus(tensorflow) -> None:
    """TF only feeds data; the accelerators are JAX's."""
    tensorflow.config.set_visible_devices([], "GPU")


tf = _LazyModule("tensorflow", after_import=_hide_gpus)
tfds = _LazyModule("tensorflow_datasets", requires=tf)

# name -> (module, builder class, fixed builder config or None = take data_config.config)
_TFDS_DATASETS = {
    "shapes": ("datasets.shapes", "AstShapes", None),
    "clevrtex": ("datasets.clevrtex", "AstClevrtex", None),
    "clevr": ("datasets.multi_object", "AstMultiObject", "clevr_with_masks"),
    "objects_room": ("datasets.multi_object", "AstMultiObject", "objects_room"),
    "shapestacks": ("datasets.shapestacks", "AstShapestacks", "default"),
}
DATASET_NAMES = (*_TFDS_DATASETS, "folder")
_DEFAULT_CONFIGS = {"shapes": "default", "clevrtex": "full"}
_README = {
    "clevrtex": "datasets/clevrtex/README.md",
    "clevr": "datasets/multi_object/README.md",
    "objects_room": "datasets/multi_object/README.md",
    "shapestacks": "datasets/shapestacks/README.md",
}


def _get(data_config, key: str, default):
    value = data_config.get(key, default) if hasattr(data_config, "get") else default
    return default if value is None else value


def builder_for(name: str, config: str = "", data_dir: str = ""):
    """The (possibly unprepared) TFDS builder of a dataset name and builder config.

    Raises:
      ValueError: for an unknown dataset name or builder config.
    """
    if name not in _TFDS_DATASETS:
        raise ValueError(
            f"Unknown dataset name {name!r}; choose one of {', '.join(DATASET_NAMES)}."
        )
    module_name, class_name, fixed = _TFDS_DATASETS[name]
    tf.load()  # TensorFlow, with its GPUs hidden, before the builder's module imports it.
    module = __import__(module_name, fromlist=[class_name])
    cls = getattr(module, class_name)
    config = fixed or config or _DEFAULT_CONFIGS[name]
    valid = [c.name for c in cls.BUILDER_CONFIGS]
    if config not in valid:
        raise ValueError(
            f"Unknown {name} config {config!r}; choose one of {', '.join(valid)}."
        )
    return cls(config=config, data_dir=data_dir or None)


def prepare(name: str, config: str = "", data_dir: str = "", manual_dir: str = ""):
    """Builds a dataset into data_dir (from manual_dir for the downloaded ones); returns the builder.

    TFDS writes into a temporary directory and renames it when done, so a failed build leaves nothing behind.
    """
    builder = builder_for(name, config, data_dir)
    if not builder.is_prepared():
        if name == "shapes":
            cfg = builder.builder_config
            print(
                f"Generating the synthetic shapes dataset '{cfg.name}' ({cfg.num_train} train + {cfg.num_test} "
                f"test images) into {builder.data_dir}; this happens once.",
                flush=True,
            )
            download_config = tfds.download.DownloadConfig()
        else:
            download_config = tfds.download.DownloadConfig(
                manual_dir=manual_dir or None
            )
        builder.download_and_prepare(download_config=download_config)
    return builder


def get_builder(data_config):
    """The prepared data source of `data_config`.

    Returns a prepared TFDS builder; the built-in `shapes` dataset is generated on first use, the others are
    prepared from `data_config.manual_dir` when it is set. For name='folder' it returns a
    `datasets.folder.FolderDataset` (read directly, nothing to prepare).

    Raises:
      ValueError: unknown dataset name or config.
      FileNotFoundError: a downloaded dataset that is not prepared and no manual_dir to prepare it from.
    """
    name = _get(data_config, "name", "")
    if name == "folder":
        tf.load()  # As in `builder_for`.
        from datasets.folder import FolderDataset

        size = _get(data_config, "image_size", None)
        return FolderDataset(
            _get(data_config, "dir", ""),
            tuple(size) if size else None,
            _get(data_config, "crop", "center"),
            bad_images=_get(data_config, "bad_images", "skip"),
            max_image_side=_get(data_config, "max_image_side", MAX_IMAGE_SIDE),
            large_images=_get(data_config, "large_images", "reject"),
        )
    config = _get(data_config, "config", "")
    data_dir = _get(data_config, "data_dir", "")
    manual_dir = _get(data_config, "manual_dir", "")
    builder = builder_for(name, config, data_dir)
    if builder.is_prepared():
        return builder
    if name == "shapes" or manual_dir:
        return prepare(name, config, data_dir, manual_dir)
    raise FileNotFoundError(
        f"Dataset {name} ({builder.builder_config.name}) is not prepared in {builder.data_dir}. Download it "
        f"as {_README[name]} says, then run `python -m experiments.prepare_data "
        f"--dataset={name}/{builder.builder_config.name} --manual_dir=DIR"
        + (f" --data_dir={data_dir}`" if data_dir else "`")
        + " (or set data_config.manual_dir)."
    )


def num_examples(data_config, split: str) -> int:
    """Number of examples of a split (over all processes)."""
    source = get_builder(data_config)
    if _get(data_config, "name", "") == "folder":
        return source.num_examples(split)
    if split not in source.info.splits:
        raise ValueError(
            f"Split {split!r} does not exist for {source.name}/{source.builder_config.name}; it has "
            f"{', '.join(source.info.splits)}."
        )
    return source.info.splits[split].num_examples


def _process_range(n: int) -> tuple[int, int]:
    """[start, end) of this process's share of n examples."""
    p, count = jax.process_index(), jax.process_count()
    return p * n // count, (p + 1) * n // count


def _local_batch(global_batch_size: int) -> int:
    count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be positive and divisible by the {count} processes."
        )
    return global_batch_size // count


def _encoded_examples(data_config, split: str, start: int, end: int):
    """(dataset of still-encoded examples, decode function) for examples [start, end) of a split."""
    source = get_builder(data_config)
    if _get(data_config, "name", "") == "folder":
        return source.as_dataset(split, start, end), source.decoder(split)
    features = source.info.features
    stored = tuple(features[IMAGE].shape[:2])
    wanted = _get(data_config, "image_size", None)
    if wanted and tuple(wanted) != stored:
        raise ValueError(
            f"data_config.image_size={tuple(wanted)} but {source.name}/{source.builder_config.name} is stored at "
            f"{stored}; TFDS datasets are not resized in the pipeline, so set image_size={stored}."
        )
    keys = [k for k in (IMAGE, SEGMENTATION, INDEX) if k in features]
    # The builders write examples in index order (disable_shuffling), so files are read in order and the
    # example shuffle buffer does the shuffling.
    ds = source.as_dataset(
        split=f"{split}[{start}:{end}]",
        shuffle_files=False,
        read_config=tfds.ReadConfig(try_autocache=False),
        decoders={IMAGE: tfds.decode.SkipDecoding()},
    )
    ds = ds.map(lambda x: {k: x[k] for k in keys})

    def decode(example):
        example = dict(example)
        example[IMAGE] = features[IMAGE].decode_example(example[IMAGE])
        return example

    return ds, decode


def _to_model_types(example):
    out = {
        IMAGE: tf.cast(example[IMAGE], tf.float32) / 255.0,
        INDEX: tf.cast(example[INDEX], tf.int32),
    }
    if SEGMENTATION in example:
        out[SEGMENTATION] = tf.cast(example[SEGMENTATION], tf.int32)
    return out


def _options():
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def create_train_iterator(
    data_config, *, global_batch_size: int, seed: int, start_step: int = 0
):
    """Infinite iterator of this process's training batches (numpy dicts, see the module docstring).

    Order: this process's examples in index order, a `shuffle_buffer` example shuffle (seeded, reshuffled each
    epoch), repeat, then batches of global_batch_size / process_count. The same seed gives the same batches, and
    `start_step=s` yields exactly the batches that follow the first s ones. Resuming skips s * b examples
    before decoding: it still reads and shuffles (but does not decode) them, about 14 s per 64k examples on
    the shared 2-core machine (0.2 ms each).
    """
    split = _get(data_config, "train_split", "train")
    local = _local_batch(global_batch_size)
    n = num_examples(data_config, split)
    start, end = _process_range(n)
    if end <= start:
        raise ValueError(
            f"Split {split!r} has {n} examples: too few for {jax.process_count()} processes."
        )
    ds, decode = _encoded_examples(data_config, split, start, end)
    ds = ds.shuffle(
        _get(data_config, "shuffle_buffer", 10_000),
        seed=seed,
        reshuffle_each_iteration=True,
    )
    ds = ds.repeat()
    if start_step:
        ds = ds.skip(start_step * local)
    ds = ds.map(
        lambda x: _to_model_types(decode(x)), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()


def create_eval_iterator(
    data_config, *, split: str | None = None, global_batch_size: int
):
    """One pass over a split in index order (each example exactly once over all processes).

    Every process yields the same number of batches; the last ones are filled with padding examples
    (zeros, index -1, valid False).
    """
    split = split or _get(data_config, "eval_split", "test")
    local = _local_batch(global_batch_size)
    n = num_examples(data_config, split)
    start, end = _process_range(n)
    largest = max(
        (p + 1) * n // jax.process_count() - p * n // jax.process_count()
        for p in range(jax.process_count())
    )
    num_batches = max(1, -(-largest // local))
    ds, decode = _encoded_examples(data_config, split, start, end)
    ds = ds.map(
        lambda x: _to_model_types(decode(x)), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.map(lambda x: {**x, VALID: tf.constant(True)})
    spec = ds.element_spec
    padding = {key: tf.zeros(s.shape, s.dtype) for key, s in spec.items()}
    padding[INDEX] = tf.constant(
        -1, tf.int32
    )  # Padding is marked by valid=False; -1 flags it too.
    pad = num_batches * local - (end - start)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad))
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()


def export_images(data_config, directory: str, *, split: str, num: int) -> list[str]:
    """Writes the first `num` images of a split as PNG files SPLIT_INDEX.png; returns their paths.

    Meant for trying `experiments.segment` on a prepared dataset's own images. Fewer files are written when
    the split is smaller than `num`.
    """
    from ast_seg_jax import visualize

    if num <= 0:
        raise ValueError(f"The number of images to export must be positive, got {num}.")
    num = min(num, num_examples(data_config, split))
    paths: list[str] = []
    batches = create_eval_iterator(
        data_config, split=split, global_batch_size=min(num, 64) * jax.process_count()
    )
    for batch in batches:
        for image, index, valid in zip(batch[IMAGE], batch[INDEX], batch[VALID]):
            if valid and len(paths) < num:
                path = os.path.join(directory, f"{split}_{int(index):05d}.png")
                visualize.save_png(path, image)
                paths.append(path)
        if len(paths) == num:
            break
    return paths


def to_global_arrays(
    batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """Assembles every process's local batch into global arrays sharded along the mesh axis "data".

    Args:
      batch: this process's numpy batch; leading dimension = per-process batch.
      mesh: device mesh with a "data" axis.

    Returns:
      dict of jax.Arrays with leading dimension = global batch, sharded as P("data").
    """
    sharding = NamedSharding(mesh, P("data"))
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }
