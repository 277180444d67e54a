"""Input pipelines: TFDS datasets and an embedded offline dataset, sharded over a JAX mesh.

Every dataset is read the same way, by name and split: any name `tfds.builder` knows
(imagenet2012, cifar10, oxford_flowers102, ...) from a configurable `data_dir` (local or
gs://), or an embedded dataset that ships inside an installed package and needs no download:

* `'digits'`: the 1,797 8x8 handwritten digits bundled with scikit-learn
  (`sklearn.datasets.load_digits`, read from the installed package). They are the test set of
  the UCI ML "Optical Recognition of Handwritten Digits" data (E. Alpaydin and C. Kaynak, 1998;
  13 writers; NIST-normalised 32x32 bitmaps, each 4x4 block's set pixels counted into one of
  8x8 values 0..16). Licenses: scikit-learn (which ships the file) BSD-3-Clause; the UCI
  repository lists the data set under CC BY 4.0. Each image
  is scaled to uint8 (v * 255 / 16, ink bright on a dark background), repeated over 3 channels
  and served at its native 8x8: the ordinary preprocessing upsamples it (bilinear) to the model
  resolution. Splits: a stratified split with fixed seed 0, 'train' 1,437 and 'test' 360;
  'validation' is a second name of 'test' (the digits have no separate validation set), so
  configs written for ImageNet's 'train' / 'validation' run on them with only the dataset name
  changed.

Preprocessing follows the original ViT and BiT releases (google-research/vision_transformer
`vit_jax/input_pipeline.py`; big_transfer `bit_pytorch/train.py`):

* eval: bilinear resize of the whole image to `[image_size, image_size]` (aspect ratio not
  kept, no crop, no antialiasing; `tf.image.resize` with half-pixel centres), then
  `x / 127.5 - 1` into [-1, 1]. `crop_fraction=c` instead resizes the shorter side to
  `round(image_size / c)` (aspect kept) and takes the central `image_size` square, the
  Inception / big_vision recipe (c = 0.875 gives 256 -> 224).
* train: Inception-style random resized crop (`sample_distorted_bounding_box` with area
  5%-100%, aspect ratio 3/4-4/3, no minimum object coverage), bilinear resize to
  `image_size`, random horizontal flip, `x / 127.5 - 1`. All randomness is stateless, keyed by
  (seed, epoch, example index), so a batch does not depend on when or where it is computed.

Example order and subsets. Examples are identified by their index in the split's canonical
(on-disk, unshuffled) order. `subset_fraction=f, subset_seed=s` keeps the first
`round(f * n)` entries of one fixed permutation of `range(n)` drawn from `jax.random.key(s)`,
so for one seed the 10% subset is inside the 30% one (nested data-scale study). Kept examples
are read in canonical order. Eval batches are the first `num_examples` of that sequence, or,
with `sample_seed=s`, `num_examples` of them drawn at random without replacement (a seeded
permutation; read in canonical order, e.g. the paper's 10,240 random validation images); the
last partial batch is dropped (a padded batch would add fake examples to CKA Gram matrices):
`EvalBatches.num_batches` / `.num_examples` say how many are used.

Multi-host: the numbers do not depend on the host count. An eval pass's sequence (canonical,
or one global permutation for a reshuffled pass) is laid out device-major: device d's rows of
every global batch are one contiguous run of it (`eval_plan`), host h loads rows
`parallel.host_shard(B)` of every batch, so the global batch, and every device's shard of it,
is the same for any number of hosts, and in canonical order each host reads one contiguous
run of records. A reshuffled pass over several hosts loads each host's own records and
exchanges rows on the devices (`EvalPlan.exchange`). Training cuts the subset into reader
shards; host h reads only its shards, which are its rows of every global batch (see
`train_batches`).

Only this module imports TensorFlow; it hides accelerators from TF before building a pipeline.
"""

import collections
import dataclasses
import difflib
import functools
import math
import types
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.sharding import Mesh

from vit_repr import parallel

# Inception crop area range and aspect-ratio range of the original ViT training code.
TRAIN_AREA_RANGE = (0.05, 1.0)
TRAIN_ASPECT_RANGE = (3 / 4, 4 / 3)
# Encoded examples held for the training shuffle, summed over hosts and reader shards.
DEFAULT_SHUFFLE_BUFFER = 50_000
# Batches of the next steps already transferred to the devices.
DEVICE_PREFETCH = 2
_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset contains.

  Attributes:
    name: the dataset name as passed to this module.
    num_classes: number of labels.
    splits: examples per split, e.g. `{'train': 1437, 'test': 360}`.
    image_shape: stored image shape `(H, W, C)`; `None` for sizes that vary.
    class_names: label names, index = label.
    description: human-readable description.
    license: license / redistribution terms as stated by the source.
    citation: BibTeX or text citation.
  """
  name: str
  num_classes: int
  splits: Mapping[str, int]
  image_shape: tuple[int | None, ...]
  class_names: tuple[str, ...]
  description: str
  license: str
  citation: str


@dataclasses.dataclass(frozen=True)
class _Source:
  """One split of one dataset, streamed in canonical order.

  `read(start, stop)` yields the records `[start, stop)` of the split as
  `{'image': raw, 'label': int64}`, where raw is encoded bytes (TFDS) or a uint8 array
  (embedded), reading no record outside that range where the format allows (TFDS split
  slicing, array slicing); `decode(raw)` returns uint8 `[h, w, 3]`.
  """
  info: DatasetInfo
  split: str
  num_examples: int
  read: Callable[[int, int], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]


# ---------------------------------------------------------------------------------------------
# Embedded datasets.


def _digits() -> tuple[DatasetInfo, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """scikit-learn's bundled digits: uint8 images `[1797, 8, 8, 3]`, labels, split indices."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=_DIGITS_TEST_SIZE, stratify=labels,
      random_state=_DIGITS_SPLIT_SEED)
  splits = {"train": train, "test": test, "validation": test}
  info = DatasetInfo(
      name="digits", num_classes=10, splits={k: len(v) for k, v in splits.items()},
      image_shape=(8, 8, 3), class_names=tuple(str(i) for i in range(10)),
      description=(
          "UCI ML hand-written digits (test set) as bundled with scikit-learn: 8x8 images of "
          "digits 0-9 from 13 writers, values 0..16 rescaled to 0..255, grey repeated to RGB; "
          "stratified seeded split (seed 0) into 1,437 train / 360 test ('validation' names "
          "the same 360 test images)."),
      license=("scikit-learn: BSD-3-Clause; UCI Optical Recognition of Handwritten Digits "
               "data set: CC BY 4.0."),
      citation=("E. Alpaydin and C. Kaynak. Optical Recognition of Handwritten Digits. UCI "
                "Machine Learning Repository, 1998. doi:10.24432/C50P49"))
  return info, images, labels, splits


# To add an embedded dataset, add one function returning (info, uint8 images [N, h, w, 3],
# int64 labels [N], {split: example indices}).
_EMBEDDED = types.MappingProxyType({"digits": _digits})


def _embedded_source(name: str, split: str) -> _Source:
  info, images, labels, splits = _EMBEDDED[name]()
  if split not in splits:
    raise ValueError(f"Dataset {name!r} has no split {split!r}; its splits are "
                     f"{sorted(splits)}.")
  split_images, split_labels = images[splits[split]], labels[splits[split]]
  return _Source(
      info=info, split=split, num_examples=len(split_labels),
      read=lambda start, stop: tf.data.Dataset.from_tensor_slices(
          {"image": split_images[start:stop], "label": split_labels[start:stop]}),
      decode=lambda image: image)


# ---------------------------------------------------------------------------------------------
# TFDS datasets.


def _unknown_name_error(name: str) -> ValueError:
  names = sorted(_EMBEDDED) + tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(name, names, n=5)
  return ValueError(
      f"Unknown dataset {name!r}. "
      + (f"Did you mean one of {close}? " if close else "")
      + f"Embedded (offline) datasets: {sorted(_EMBEDDED)}; any of the {len(names)} TFDS names "
      "(`tfds.list_builders()`, e.g. 'imagenet2012', 'cifar10', 'oxford_flowers102') works "
      "once prepared in data_dir. To add an offline dataset, write one loader function and "
      "register it in vit_repr.data._EMBEDDED.")


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_name_error(name) from None
  if not builder.is_prepared():
    root = str(builder.data_dir_root)
    how = f"`tfds build {name} --data_dir={root}` (this downloads it)"
    if name.split(":")[0].split("/")[0] == "imagenet2012":
      how = (f"`tfds build imagenet2012 --data_dir={root} --manual_dir=DIR`, where DIR holds "
             "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar downloaded by hand from "
             "https://image-net.org (registration needed)")
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in data_dir={root!r} (looked in "
        f"{builder.data_dir}). Nothing is downloaded at run time: prepare it once with {how}, "
        "then pass that data_dir. For an offline run use the embedded dataset 'digits'.")
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"TFDS dataset {name!r} has features {list(features)}; this pipeline "
                     "needs an 'image' and a 'label' feature (image classification).")
  return builder


def _tfds_info(name: str, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  info = builder.info
  redistribution = getattr(info, "redistribution_info", None)
  return DatasetInfo(
      name=name, num_classes=info.features["label"].num_classes,
      splits={k: v.num_examples for k, v in info.splits.items()},
      image_shape=tuple(info.features["image"].shape),
      class_names=tuple(info.features["label"].names),
      description=info.description or "",
      license=getattr(redistribution, "license", "") or f"see {info.homepage}",
      citation=info.citation or "")


def _tfds_source(name: str, split: str, data_dir: str | None) -> _Source:
  builder = _tfds_builder(name, data_dir)
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f"Dataset {name!r} has no split {split!r} ({e}); its splits are "
                     f"{sorted(builder.info.splits)} (TFDS slicing such as 'train[:90%]' "
                     "also works).") from None
  image_feature = builder.info.features["image"]

  def read(start: int, stop: int) -> tf.data.Dataset:
    sliced = _slice_split(builder, split, start, stop)
    ds = builder.as_dataset(split=sliced or split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    if sliced is None:
      ds = ds.skip(start).take(stop - start)
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def decode(raw: tf.Tensor) -> tf.Tensor:
    image = image_feature.decode_example(raw)
    return tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image

  return _Source(info=_tfds_info(name, builder), split=split, num_examples=num_examples,
                 read=read, decode=decode)


def _slice_split(builder: tfds.core.DatasetBuilder, split: str, start: int,
                 stop: int) -> str | None:
  """The TFDS split spec of records `[start, stop)` of `split` (a split or a slice of one,
  e.g. 'train[:90%]'), so TFDS reads only the files and records of that range; None for a
  composite spec ('train+test')."""
  instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  if len(instructions) != 1:
    return None
  offset = instructions[0].from_ or 0
  return f"{instructions[0].splitname}[{offset + start}:{offset + stop}]"


def _source(name: str, split: str, data_dir: str | None) -> _Source:
  _hide_accelerators_from_tf()
  if name in _EMBEDDED:
    return _embedded_source(name, split)
  return _tfds_source(name, split, data_dir)


def _hide_accelerators_from_tf() -> None:
  """Keeps TF off GPUs/TPUs so JAX owns them (possible only before TF touches a device)."""
  for kind in ("GPU", "TPU"):
    if tf.config.get_visible_devices(kind):
      try:
        tf.config.set_visible_devices([], kind)
      except RuntimeError:
        logging.warning("TensorFlow already initialised %s devices; could not hide them.", kind)


# ---------------------------------------------------------------------------------------------
# Public API: names, info, subsets.


def known_datasets() -> list[str]:
  """Embedded dataset names followed by every TFDS builder name."""
  return sorted(_EMBEDDED) + tfds.list_builders(with_community_datasets=False)


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Classes, split sizes, image shape and provenance of a dataset.

  Args:
    name: embedded name ('digits') or a TFDS name.
    data_dir: TFDS data directory (local or gs://); default TFDS's own.

  Returns:
    The dataset's `DatasetInfo`.

  Raises:
    ValueError: unknown name. FileNotFoundError: TFDS dataset not prepared in `data_dir`.
  """
  if name in _EMBEDDED:
    return _EMBEDDED[name]()[0]
  return _tfds_info(name, _tfds_builder(name, data_dir))


def subset_indices(num_examples: int, subset_fraction: float = 1.0,
                   subset_seed: int = 0) -> np.ndarray:
  """Sorted canonical indices of a nested, seed-controlled subset of a split.

  The subset is the first `round(subset_fraction * num_examples)` entries of
  `jax.random.permutation(jax.random.key(subset_seed), num_examples)`; for one seed a smaller
  fraction's subset is contained in a larger one's.

  Args:
    num_examples: size of the split.
    subset_fraction: fraction in (0, 1].
    subset_seed: which permutation.

  Returns:
    int64 `[round(subset_fraction * num_examples)]`, increasing.
  """
  if not 0.0 < subset_fraction <= 1.0:
    raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}.")
  size = int(round(subset_fraction * num_examples))
  if size == 0:
    raise ValueError(f"subset_fraction={subset_fraction} of {num_examples} examples keeps none; "
                     "use a larger fraction.")
  if size == num_examples:
    return np.arange(num_examples, dtype=np.int64)
  return np.sort(_permutation(num_examples, subset_seed)[:size])


def _permutation(size: int, seed: int) -> np.ndarray:
  """int64 `jax.random.permutation(jax.random.key(seed), size)` (the same on every backend and
  host: threefry bits and a stable sort), computed on this process's default device."""
  return np.asarray(jax.random.permutation(jax.random.key(seed), size), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Preprocessing (TF graph functions on one example).


def _to_model_range(image: tf.Tensor) -> tf.Tensor:
  return image / 127.5 - 1.0


def _eval_preprocess(image: tf.Tensor, image_size: int,
                     crop_fraction: float | None) -> tf.Tensor:
  """uint8 `[h, w, 3]` -> float32 `[image_size, image_size, 3]` in [-1, 1]."""
  if crop_fraction is None:
    return _to_model_range(tf.image.resize(image, [image_size, image_size]))
  shape = tf.cast(tf.shape(image)[:2], tf.float64)
  target = tf.constant(round(image_size / crop_fraction), tf.float64)
  new_shape = tf.cast(tf.round(shape * target / tf.reduce_min(shape)), tf.int32)
  image = tf.image.resize(image, new_shape)
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  return _to_model_range(tf.ensure_shape(image, [image_size, image_size, 3]))


def _train_preprocess(image: tf.Tensor, image_size: int, seed: tf.Tensor,
                      area_range: tuple[float, float]) -> tf.Tensor:
  """uint8 `[h, w, 3]` -> random resized crop + flip, float32 `[size, size, 3]` in [-1, 1].

  `seed` is the example's int64 pair (epoch seed, example index); the crop and the flip use
  the distinct stateless keys (epoch seed, 2 * index) and (epoch seed, 2 * index + 1).
  """
  crop_seed = seed * tf.constant([1, 2], tf.int64)
  flip_seed = crop_seed + tf.constant([0, 1], tf.int64)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=crop_seed,
      area_range=area_range, aspect_ratio_range=TRAIN_ASPECT_RANGE, min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, size)
  image = tf.image.resize(image, [image_size, image_size])
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return _to_model_range(image)


def _check_image_size(image_size: int) -> None:
  if image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}.")


def _read_indexed(source: _Source, start: int, stop: int, keep: np.ndarray) -> tf.data.Dataset:
  """Examples with canonical index in `[start, stop)` where `keep[index - start]`, in order."""
  keep = tf.constant(keep, tf.bool)
  ds = source.read(start, stop).enumerate(start)
  ds = ds.filter(lambda i, ex: tf.gather(keep, i - start))
  return ds.map(lambda i, ex: {"image": ex["image"], "label": ex["label"], "index": i})


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


# ---------------------------------------------------------------------------------------------
# Eval pipeline.


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Which examples an eval pass uses, and where each one goes.

  Attributes:
    num_batches: global batches per pass.
    global_batch_size: rows per global batch (all hosts), padding included.
    num_examples: examples used (the real rows of all the batches).
    num_dropped: requested examples left out (the last partial batch or minibatch).
    positions: `[num_batches, global_batch_size]` position in the pass's sequence of every
      row of every global batch (-1 for a padding row); the same on every host.
    host_indices: canonical indices this host loads, in load order (its rows of every global
      batch, batch after batch, or with `exchange` its buffer rows); -1 marks a padding row
      (an all-zero image, `valid` False).
    exchange: None when each host loads its own rows of every global batch. Otherwise
      `[num_batches, global_batch_size]`: global batch i is rows `exchange[i]` of the hosts'
      loaded batches `[hosts * buffer, ...]` (host h's buffer rows first `[h * buffer, (h + 1)
      * buffer)`): a reshuffled pass in which every host loads only its own records and the
      devices exchange them.
  """
  num_batches: int
  global_batch_size: int
  num_examples: int
  num_dropped: int
  positions: np.ndarray
  host_indices: np.ndarray
  exchange: np.ndarray | None = None


def eval_plan(num_split_examples: int, *, global_batch_size: int,
              num_examples: int | None = None, subset_fraction: float = 1.0,
              subset_seed: int = 0, sample_seed: int | None = None,
              shuffle_seed: int | None = None, minibatch_size: int | None = None,
              num_devices: int = 1, exchange: bool = False,
              process_index: int | None = None, process_count: int | None = None) -> EvalPlan:
  """The examples an eval pass reads: pure index arithmetic, no data access.

  The pass's sequence is the used examples in canonical order, or with `shuffle_seed` that
  sequence permuted by `jax.random.permutation(jax.random.key(shuffle_seed), used)`: one
  global permutation, so the batches are the same for any number of hosts.

  The sequence is cut into units read by one device each: without `minibatch_size`, the first
  `floor(n / B)` global batches' worth of examples (the rest dropped) in units of B / devices
  rows; with `minibatch_size` m (each device's shard of a batch is one minibatch: the studies
  whose numbers depend on the grouping, such as minibatch CKA), `M = floor(n / m)` minibatches
  (minibatch j = entries `[j m, (j + 1) m)`), so the examples used and the minibatches do not
  depend on the device count. The units fill the devices' slots of the global batches as
  `parallel.minibatch_slots` says: device d holds one contiguous run of the sequence, so in
  canonical order each host reads one contiguous run of records; slots left over at the end
  of a minibatch plan are padding (`valid` False). Host h loads the rows
  `parallel.host_shard(B)` of each global batch.

  A reshuffled pass over several hosts would have every host read nearly every record. With
  `exchange`, host h instead loads only the records of its canonical (pass 0) rows, those of
  each global batch into a buffer of the same size on every host, and the devices exchange
  rows (`EvalPlan.exchange`): the same batches, each record read by one host.

  Args:
    num_split_examples: size of the split.
    global_batch_size: rows per global batch (all hosts).
    num_examples: examples requested (default the whole subset).
    subset_fraction: nested subset fraction (see `subset_indices`).
    subset_seed: nested subset seed.
    sample_seed: None for the first `num_examples` of the subset; s for `num_examples` of it
      drawn at random without replacement (permutation from `jax.random.key(s)`), used in
      canonical order.
    shuffle_seed: None for canonical order; s to permute the used examples globally.
    minibatch_size: None, or the examples of one device's minibatch (divides B).
    num_devices: devices the global batch is sharded over (without `minibatch_size`, the
      layout of the examples over the batches depends on it; the examples used do not).
    exchange: let hosts exchange rows on the devices in a reshuffled multi-host pass.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    The `EvalPlan`.

  Raises:
    ValueError: more examples requested than the subset has, fewer than one batch (one
      minibatch), or sizes that do not divide.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  subset = subset_indices(num_split_examples, subset_fraction, subset_seed)
  if num_examples is None:
    num_examples = len(subset)
  if num_examples > len(subset):
    raise ValueError(
        f"num_examples={num_examples} but the split has only {len(subset)} examples "
        f"(subset_fraction={subset_fraction} of {num_split_examples}); lower num_examples or "
        "use a larger split / subset_fraction.")
  if sample_seed is not None:
    subset = np.sort(subset[_permutation(len(subset), sample_seed)[:num_examples]])
  if global_batch_size % process_count or global_batch_size % num_devices:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                     f"{num_devices} devices of {process_count} host(s).")
  lo, hi = parallel.host_shard(global_batch_size, process_index, process_count)
  if minibatch_size is None:
    unit, num_units = global_batch_size // num_devices, num_examples // global_batch_size
    used = num_units * global_batch_size
    slots = parallel.minibatch_slots(num_units * num_devices, num_devices)
  else:
    unit = minibatch_size
    if (hi - lo) % unit:
      raise ValueError(f"A global batch of {global_batch_size} over {process_count} host(s) "
                       f"does not split into whole minibatches of {unit} examples per host; "
                       "use a minibatch size that divides each host's share of the batch.")
    num_units = num_examples // unit
    used = num_units * unit
    slots = parallel.minibatch_slots(num_units, global_batch_size // unit)
  if num_units == 0:
    raise ValueError(
        f"num_examples={num_examples} is smaller than one " +
        ("global batch" if minibatch_size is None else "minibatch") +
        f" of {global_batch_size if minibatch_size is None else unit}; lower the batch size "
        "or use more examples.")
  positions = np.where(slots[..., None] >= 0, slots[..., None] * unit + np.arange(unit), -1)
  positions = positions.reshape(len(slots), global_batch_size)
  order = np.arange(used)
  if shuffle_seed is not None:
    order = _permutation(used, shuffle_seed)
  sequence = subset[:used][order]
  plan = EvalPlan(num_batches=len(slots), global_batch_size=global_batch_size,
                  num_examples=used, num_dropped=num_examples - used, positions=positions,
                  host_indices=np.where(positions >= 0, sequence[np.maximum(positions, 0)],
                                        -1)[:, lo:hi].ravel())
  if not exchange or shuffle_seed is None or process_count == 1:
    return plan
  return _exchange_plan(plan, subset[:used], order, process_index, process_count,
                        local_devices=num_devices // process_count)


def _exchange_plan(plan: EvalPlan, used: np.ndarray, order: np.ndarray, process_index: int,
                   process_count: int, local_devices: int) -> EvalPlan:
  """`plan` (a reshuffled pass) with each host loading only the records of its canonical
  rows: `used` are the examples in canonical order, `order` the pass's permutation of them."""
  host_of_row = np.arange(plan.global_batch_size) // (plan.global_batch_size // process_count)
  canonical = plan.positions  # Pass 0's positions: the same layout in canonical order.
  owner = np.empty(len(used), np.int64)  # Host reading each canonical position's record.
  owner[canonical[canonical >= 0]] = np.broadcast_to(host_of_row, canonical.shape)[canonical >= 0]
  # Each row's source host: the owner of its example; a padding row stays on its own host.
  source = np.where(plan.positions >= 0, owner[order[np.maximum(plan.positions, 0)]],
                    host_of_row)
  counts = np.stack([np.bincount(s, minlength=process_count) for s in source])
  buffer = -(-counts.max() // local_devices) * local_devices
  exchange = np.empty_like(plan.positions)
  host_indices = np.full((plan.num_batches, buffer), -1)
  for i, (rows_source, rows_position) in enumerate(zip(source, plan.positions)):
    by_host = np.argsort(rows_source, kind="stable")  # Rows grouped by source host, in order.
    first = np.concatenate([[0], np.cumsum(counts[i])[:-1]])
    rank = np.arange(plan.global_batch_size) - first[rows_source[by_host]]
    exchange[i, by_host] = rows_source[by_host] * buffer + rank
    mine = by_host[rows_source[by_host] == process_index]
    host_indices[i, :len(mine)] = np.where(rows_position[mine] >= 0,
                                           used[order[np.maximum(rows_position[mine], 0)]], -1)
  return dataclasses.replace(plan, host_indices=host_indices.ravel(), exchange=exchange)


def _eval_dataset(source: _Source, plan: EvalPlan, image_size: int, host_batch: int,
                  crop_fraction: float | None) -> tf.data.Dataset:
  """This host's batches `{'image', 'label', 'valid'}` of `plan`; it reads the records from
  its first index to its last (one contiguous run: its own records)."""
  idx = plan.host_indices
  real = idx[idx >= 0]
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros((image_size, image_size, 3)), "label": tf.constant(0),
      "valid": tf.constant(False)}).repeat()
  if not len(real):  # Fewer minibatches than devices: this host holds only padding.
    ds = padding.take(len(idx))
  else:
    start = real.min()
    keep = np.zeros(real.max() + 1 - start, bool)
    keep[real - start] = True
    ds = _read_indexed(source, start, start + len(keep), keep)
    canonical = np.sort(real)
    if not np.array_equal(real, canonical):
      # A globally permuted pass: this host's encoded records, read in canonical order, are
      # held (not decoded) and emitted in the plan's order.
      order = tf.constant(np.searchsorted(canonical, real))
      ds = ds.batch(len(real)).map(lambda ex: {k: tf.gather(v, order) for k, v in ex.items()})
      ds = ds.unbatch()

    def preprocess(ex):
      image = _eval_preprocess(source.decode(ex["image"]), image_size, crop_fraction)
      return {"image": image, "label": tf.cast(ex["label"], tf.int32),
              "valid": tf.constant(True)}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    if len(real) < len(idx):  # Padding rows where the plan has -1.
      choice = tf.data.Dataset.from_tensor_slices((idx < 0).astype(np.int64))
      ds = tf.data.Dataset.choose_from_datasets([ds, padding], choice)
  ds = ds.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options())


class EvalBatches:
  """A finite, re-iterable sequence of global eval batches; `len()` is the batch count.

  Each iteration yields `{'image': [B, H, W, 3] float32 in [-1, 1], 'label': [B] int32,
  'valid': [B] bool}` (`valid` False on the padding rows of a minibatch plan) as global
  `jax.Array`s sharded over the mesh's data axis, the next `DEVICE_PREFETCH` batches already
  on their way to the devices (and, for a plan with `exchange`, the rows then exchanged).
  Attributes `plan` and `info` describe what is read.
  """

  def __init__(self, dataset: tf.data.Dataset, mesh: Mesh, plan: EvalPlan, info: DatasetInfo):
    self._dataset = dataset
    self._mesh = mesh
    self.plan = plan
    self.info = info

  def __len__(self) -> int:
    return self.plan.num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    batches = _device_prefetch(self._dataset.as_numpy_iterator(), self._mesh)
    if self.plan.exchange is None:
      return batches
    sharding = parallel.batch_sharding(self._mesh)
    return (_take_rows(loaded, parallel.replicate(rows, self._mesh), sharding)
            for loaded, rows in zip(batches, self.plan.exchange))


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(batch: dict[str, jax.Array], rows: jax.Array,
               sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """`batch[rows]` for every entry, sharded as `sharding` (the devices' row exchange)."""
  return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x[rows], batch), sharding)


def _device_prefetch(host_batches: Iterator[dict[str, np.ndarray]],
                     mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """Transfers upcoming batches to the devices while the current one is being used."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(parallel.global_batch(batch, mesh))
    if len(queue) > DEVICE_PREFETCH:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def eval_numpy_batches(name: str, split: str, *, image_size: int, global_batch_size: int,
                       num_examples: int | None = None, data_dir: str | None = None,
                       subset_fraction: float = 1.0, subset_seed: int = 0,
                       sample_seed: int | None = None, crop_fraction: float | None = None,
                       shuffle_seed: int | None = None, minibatch_size: int | None = None,
                       num_devices: int = 1, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local eval batches as NumPy (this host's rows of each global batch).

  Same arguments and order as `eval_batches`, without a mesh and without the devices' row
  exchange (a reshuffled pass over several hosts reads every record of the used range).

  Args:
    name, split, image_size, global_batch_size, num_examples, data_dir, subset_fraction,
      subset_seed, sample_seed, crop_fraction, shuffle_seed, minibatch_size: as in
      `eval_batches`.
    num_devices: devices the global batch would be sharded over (its layout; default 1).
    process_index: host whose rows to load (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    `{'image': [B / hosts, H, W, 3] float32, 'label': [B / hosts] int32,
    'valid': [B / hosts] bool}`.
  """
  _check_image_size(image_size)
  source = _source(name, split, data_dir)
  plan = eval_plan(source.num_examples, global_batch_size=global_batch_size,
                   num_examples=num_examples, subset_fraction=subset_fraction,
                   subset_seed=subset_seed, sample_seed=sample_seed,
                   shuffle_seed=shuffle_seed, minibatch_size=minibatch_size,
                   num_devices=num_devices, process_index=process_index,
                   process_count=process_count)
  host_batch = len(plan.host_indices) // plan.num_batches
  return _eval_dataset(source, plan, image_size, host_batch,
                       crop_fraction).as_numpy_iterator()


def eval_batches(name: str, split: str, *, image_size: int, global_batch_size: int, mesh: Mesh,
                 num_examples: int | None = None, data_dir: str | None = None,
                 subset_fraction: float = 1.0, subset_seed: int = 0,
                 sample_seed: int | None = None, crop_fraction: float | None = None,
                 shuffle_seed: int | None = None,
                 minibatch_size: int | None = None) -> EvalBatches:
  """Deterministic eval batches for analyses, sharded over `mesh`.

  A pass uses the first `floor(n / B) * B` examples of the (subset) split (the rest are
  dropped, see `EvalBatches.plan`), the same for any number of hosts; device d's rows of
  every batch are one contiguous run of them, so each host reads one contiguous run of records
  (`eval_plan`: a consumer that needs canonical order reorders by `plan.positions`). With
  `shuffle_seed`, the same examples are used in an order permuted globally by that seed (the
  reshuffled passes of minibatch CKA: the examples stay, their grouping into minibatches
  changes, identically for any number of hosts); each host still reads only its own records,
  holds them (encoded) for the pass (ImageNet JPEGs average ~110 kB each), and with several
  hosts the devices exchange the rows of each batch.

  Args:
    name: dataset name ('digits' or any prepared TFDS name).
    split: split name or TFDS split spec ('validation', 'train[:10%]').
    image_size: model resolution H = W.
    global_batch_size: examples per global batch B, a multiple of the device count.
    mesh: mesh whose data axis shards the batch.
    num_examples: examples to use (default all of the subset).
    data_dir: TFDS data directory (local or gs://).
    subset_fraction: nested subset fraction in (0, 1].
    subset_seed: nested subset seed.
    sample_seed: None for the first `num_examples`; s for `num_examples` drawn at random
      without replacement with seed s (see `eval_plan`).
    crop_fraction: None for the ViT/BiT plain resize; c for resize-shorter-side to
      `round(image_size / c)` and central crop.
    shuffle_seed: None for canonical order; else the seed of a global permutation of the
      used examples (see `eval_plan`).
    minibatch_size: None, or the examples of each device's minibatch: then the examples
      used do not depend on the device count, each host reads one contiguous run of records
      in pass 0, and the last batch may hold padding minibatches (see `eval_plan`).

  Returns:
    `EvalBatches` yielding `{'image': [B, H, W, 3] float32, 'label': [B] int32,
    'valid': [B] bool}`.

  Raises:
    ValueError: unknown dataset or split, bad sizes, batch not divisible by the devices.
    FileNotFoundError: TFDS dataset not prepared in `data_dir`.
  """
  _check_image_size(image_size)
  parallel.check_global_batch_size(global_batch_size, mesh)
  source = _source(name, split, data_dir)
  plan = eval_plan(source.num_examples, global_batch_size=global_batch_size,
                   num_examples=num_examples, subset_fraction=subset_fraction,
                   subset_seed=subset_seed, sample_seed=sample_seed,
                   shuffle_seed=shuffle_seed, minibatch_size=minibatch_size,
                   num_devices=mesh.devices.size, exchange=True)
  if plan.num_dropped:
    logging.warning("%s/%s: using %d examples in %d batches of %d; the last %d are dropped.",
                    name, split, plan.num_examples, plan.num_batches, global_batch_size,
                    plan.num_dropped)
  host_batch = len(plan.host_indices) // plan.num_batches
  dataset = _eval_dataset(source, plan, image_size, host_batch, crop_fraction)
  return EvalBatches(dataset, mesh, plan, source.info)


# ---------------------------------------------------------------------------------------------
# Train pipeline.


def default_num_shards(global_batch_size: int) -> int:
  """Reader shards of a training pipeline: the largest power of two (at most 64) dividing
  the global batch (a function of the batch alone, so results do not depend on the hosts)."""
  return math.gcd(global_batch_size, 64)


def _train_dataset(source: _Source, *, image_size: int, global_batch_size: int, seed: int,
                   subset_fraction: float, subset_seed: int, start_step: int,
                   shuffle_buffer: int, area_range: tuple[float, float], num_shards: int,
                   process_index: int, process_count: int) -> tf.data.Dataset:
  """This host's rows of every global training batch (see `train_batches`)."""
  if num_shards < 1 or global_batch_size % num_shards or num_shards % process_count:
    raise ValueError(
        f"num_shards={num_shards} must divide the global batch {global_batch_size} and be a "
        f"multiple of the {process_count} hosts; set data.num_shards accordingly (e.g. "
        f"{math.lcm(process_count, default_num_shards(global_batch_size))} if it divides the "
        "batch).")
  subset = subset_indices(source.num_examples, subset_fraction, subset_seed)
  shard_size, shard_batch = len(subset) // num_shards, global_batch_size // num_shards
  if shard_size < shard_batch:
    raise ValueError(f"{source.info.name}/{source.split} has {len(subset)} (subset) examples, "
                     f"fewer than one global batch of {global_batch_size}; use a smaller batch "
                     "or more data.")
  steps_per_epoch = shard_size // shard_batch
  first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  buffer = max(1, min(shard_size, shuffle_buffer // num_shards))
  seed_scale = tf.constant(2**31 - 1, tf.int64)

  def shard_stream(shard: int) -> tf.data.Dataset:
    indices = subset[shard * shard_size:(shard + 1) * shard_size]
    start, stop = int(indices[0]), int(indices[-1]) + 1
    keep = np.zeros(stop - start, bool)
    keep[indices - start] = True
    base = _read_indexed(source, start, stop, keep)

    def epoch(e):
      # (seed, epoch) seeds the examples' augmentation; (seed, epoch, shard) the shard's order.
      epoch_seed = tf.constant(seed, tf.int64) * seed_scale + e
      ds = base.shuffle(buffer, seed=epoch_seed * num_shards + shard,
                        reshuffle_each_iteration=False)
      ds = ds.take(steps_per_epoch * shard_batch)
      return ds.map(lambda ex: {**ex, "seed": tf.stack([epoch_seed, ex["index"]])})

    return tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(
        skip_steps * shard_batch)

  host_shards = range(process_index * num_shards // process_count,
                      (process_index + 1) * num_shards // process_count)
  # Every step takes shard_batch consecutive examples of each shard, shard after shard.
  choice = tf.data.Dataset.from_tensor_slices(
      np.repeat(np.arange(len(host_shards), dtype=np.int64), shard_batch)).repeat()
  ds = tf.data.Dataset.choose_from_datasets([shard_stream(r) for r in host_shards], choice)

  def preprocess(ex):
    image = _train_preprocess(source.decode(ex["image"]), image_size, ex["seed"], area_range)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(shard_batch * len(host_shards), drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_numpy_batches(name: str, split: str, *, image_size: int, global_batch_size: int,
                        seed: int, data_dir: str | None = None, subset_fraction: float = 1.0,
                        subset_seed: int = 0, start_step: int = 0,
                        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                        area_range: tuple[float, float] = TRAIN_AREA_RANGE,
                        num_shards: int | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local training batches as NumPy; same arguments as `train_batches`, no mesh.

  Args:
    name, split, image_size, global_batch_size, seed, data_dir, subset_fraction, subset_seed,
      start_step, shuffle_buffer, area_range, num_shards: as in `train_batches`.
    process_index: host whose rows to load (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    `{'image': [B / hosts, H, W, 3] float32, 'label': [B / hosts] int32}`, forever: rows
    `parallel.host_shard(B)` of every global batch.
  """
  _check_image_size(image_size)
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} must be a positive multiple of "
                     f"the {process_count} hosts.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  source = _source(name, split, data_dir)
  return _train_dataset(
      source, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      subset_fraction=subset_fraction, subset_seed=subset_seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, area_range=area_range,
      num_shards=num_shards or default_num_shards(global_batch_size),
      process_index=process_index, process_count=process_count).as_numpy_iterator()


def train_batches(name: str, split: str, *, image_size: int, global_batch_size: int, mesh: Mesh,
                  seed: int, data_dir: str | None = None, subset_fraction: float = 1.0,
                  subset_seed: int = 0, start_step: int = 0,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  area_range: tuple[float, float] = TRAIN_AREA_RANGE,
                  num_shards: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Infinite augmented training batches, reshuffled every epoch from `seed`.

  The (subset) split is cut into `num_shards` contiguous reader shards of equal size. Every
  epoch each shard is shuffled (seed, epoch, shard) and global batch s takes B / num_shards
  consecutive examples of each shard, shard after shard. Host h reads only its shards
  (`num_shards / hosts` of them, TFDS split slicing), which are its rows of every global
  batch, so step s's batch depends on (config, seed, s) and not on the host or device count.
  The canonical order of a prepared TFDS split is already shuffled (and the digits split is
  seeded), so the strata are like random draws. An iterator started with `start_step=s`
  yields exactly the batches an uninterrupted run yields from step s on (it skips whole
  epochs without reading them and the rest of the epoch without decoding).

  Args:
    name: dataset name ('digits' or any prepared TFDS name).
    split: split name or TFDS split spec.
    image_size: model resolution H = W.
    global_batch_size: examples per step B, a multiple of the device count.
    mesh: mesh whose data axis shards the batch.
    seed: shuffle and augmentation seed.
    data_dir: TFDS data directory (local or gs://).
    subset_fraction: nested subset fraction in (0, 1] (data-scale study).
    subset_seed: nested subset seed.
    start_step: first step to produce (resume).
    shuffle_buffer: encoded examples held for shuffling, summed over all hosts and shards
      (each shard holds `shuffle_buffer / num_shards`; a full shuffle of each shard when
      that fits).
    area_range: random-crop area range as fractions of the image.
    num_shards: reader shards; must divide B and be a multiple of the host count (default
      `default_num_shards(B)`). Changing it changes the batches.

  Returns:
    Iterator of `{'image': [B, H, W, 3] float32 in [-1, 1], 'label': [B] int32}`.

  Raises:
    ValueError: unknown dataset or split, bad sizes, batch not divisible by the devices or
      the shards, shards not divisible by the hosts.
    FileNotFoundError: TFDS dataset not prepared in `data_dir`.
  """
  parallel.check_global_batch_size(global_batch_size, mesh)
  host_batches = train_numpy_batches(
      name, split, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      data_dir=data_dir, subset_fraction=subset_fraction, subset_seed=subset_seed,
      start_step=start_step, shuffle_buffer=shuffle_buffer, area_range=area_range,
      num_shards=num_shards)
  return _device_prefetch(host_batches, mesh)


# ---------------------------------------------------------------------------------------------
# Summary for the main job's first step.


def summarize(name: str, split: str, *, image_size: int, num_examples: int | None = None,
              data_dir: str | None = None, examples_per_class: int = 8, max_classes: int = 10,
              batch_size: int = 256) -> dict[str, object]:
  """Per-class counts, pixel statistics and a montage of eval-preprocessed examples.

  Reads the first `num_examples` (default all) of the split on this host, with the eval
  preprocessing (plain resize, [-1, 1]).

  Args:
    name: dataset name.
    split: split name or TFDS split spec.
    image_size: resolution of the montage tiles and of the statistics.
    num_examples: examples to read (default the whole split).
    data_dir: TFDS data directory.
    examples_per_class: montage columns.
    max_classes: montage rows (the first classes by label).
    batch_size: read batch size (memory only; results do not depend on it).

  Returns:
    dict with 'name', 'split', 'num_examples', 'num_classes', 'class_names',
    'class_counts' int64 `[num_classes]`, 'pixel_mean' / 'pixel_std' float64 `[3]` (of the
    [-1, 1] model inputs), 'image_shape' `(H, W, 3)`, 'montage' float32
    `[rows * H, examples_per_class * W, 3]` in [0, 1] (missing examples black) and
    'montage_labels' int64 `[rows]`.
  """
  _check_image_size(image_size)
  source = _source(name, split, data_dir)
  total = source.num_examples if num_examples is None else num_examples
  if not 0 < total <= source.num_examples:
    raise ValueError(f"num_examples={num_examples} must be in [1, {source.num_examples}] for "
                     f"{name}/{split}.")
  num_classes = source.info.num_classes
  rows = min(max_classes, num_classes)
  counts = np.zeros(num_classes, np.int64)
  sums, sq_sums = np.zeros(3), np.zeros(3)
  tiles = np.zeros((rows, examples_per_class, image_size, image_size, 3), np.float32)
  keep = np.ones(total, bool)
  ds = _read_indexed(source, 0, total, keep).map(
      lambda ex: {"image": _eval_preprocess(source.decode(ex["image"]), image_size, None),
                  "label": ex["label"]}, num_parallel_calls=tf.data.AUTOTUNE)
  for batch in ds.batch(batch_size).with_options(_options()).as_numpy_iterator():
    images, labels = batch["image"].astype(np.float64), batch["label"]
    sums += images.sum(axis=(0, 1, 2))
    sq_sums += np.square(images).sum(axis=(0, 1, 2))
    for image, label in zip(batch["image"], labels):
      if label < rows and counts[label] < examples_per_class:
        tiles[label, counts[label]] = (image + 1.0) / 2.0
      counts[label] += 1
  pixels = total * image_size * image_size
  mean = sums / pixels
  montage = tiles.transpose(0, 2, 1, 3, 4).reshape(
      rows * image_size, examples_per_class * image_size, 3)
  return {
      "name": name, "split": split, "num_examples": total, "num_classes": num_classes,
      "class_names": source.info.class_names, "class_counts": counts,
      "pixel_mean": mean, "pixel_std": np.sqrt(np.maximum(sq_sums / pixels - mean**2, 0.0)),
      "image_shape": (image_size, image_size, 3), "montage": montage,
      "montage_labels": np.arange(rows, dtype=np.int64),
  }
