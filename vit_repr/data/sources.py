"""Dataset sources: TFDS datasets and an embedded offline dataset, read by name and split.

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

* `'cluttered_digits'`: the same digits with spatial structure, built offline and
  deterministically from them (`_cluttered_digits`): each digit, drawn at 24x24 (every pixel
  repeated 3x3), is placed at a uniformly random position on a dark 32x32 canvas (a shift of up
  to 8 px) over 2 clutter fragments (random 2x2 crops of other digits of the same split, drawn
  as 6x6 at half the ink at random positions, overlapping ink kept at its maximum), in the
  manner of cluttered MNIST (Mnih et al., "Recurrent Models of Visual Attention", NeurIPS 2014).
  At 32 px with 4-px patches a ViT sees an 8x8 token grid in which the digit covers 6x6 tokens
  at a varying place, so local and global heads, localization and the CLS-vs-GAP contrast have
  room to appear. Splits follow the source digits (no digit is in two splits): 'train' 5,748
  (4 placements of each of the 1,437 train digits), 'test' 720 (2 placements of each of the 360
  test digits); 'validation' names 'test'. Same provenance and licenses as 'digits'; served at
  its native 32x32.

Example order and subsets. Examples are identified by their index in the split's canonical
(on-disk, unshuffled) order. `subset_fraction=f, subset_seed=s` keeps the first
`round(f * n)` entries of one fixed permutation of `range(n)` drawn from `jax.random.key(s)`,
so for one seed the 10% subset is inside the 30% one (nested data-scale study). Kept examples
are read in canonical order (`_read_indexed`).

`_source` hides accelerators from TensorFlow before it builds anything, so JAX owns them.
"""

import dataclasses
import difflib
import functools
import types
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0
_DIGITS_LICENSE = ("scikit-learn: BSD-3-Clause; UCI Optical Recognition of Handwritten Digits "
                   "data set: CC BY 4.0.")
_DIGITS_CITATION = ("E. Alpaydin and C. Kaynak. Optical Recognition of Handwritten Digits. UCI "
                    "Machine Learning Repository, 1998. doi:10.24432/C50P49")
# 'cluttered_digits': canvas side, digit magnification, clutter fragments per image, their side
# in source pixels and their ink relative to the digit's, placements of each source digit per
# split, and the seed of each split.
_CLUTTER_CANVAS = 32
_CLUTTER_SCALE = 3
_CLUTTER_FRAGMENTS = 2
_CLUTTER_FRAGMENT_SIZE = 2
_CLUTTER_INTENSITY = 0.5
_CLUTTER_PLACEMENTS = {"train": 4, "test": 2}
_CLUTTER_SEEDS = {"train": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset contains.

  Attributes:
    name: the dataset name as passed to `vit_repr.data`.
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
      license=_DIGITS_LICENSE, citation=_DIGITS_CITATION)
  return info, images, labels, splits


def place_with_clutter(digit: np.ndarray, fragments: np.ndarray, rng: np.random.Generator,
                       canvas_size: int = _CLUTTER_CANVAS) -> np.ndarray:
  """One cluttered canvas: `fragments` then `digit` pasted at uniformly random positions.

  Args:
    digit: uint8 `[h, w]`, the magnified digit.
    fragments: uint8 `[k, f, f]`, the magnified clutter fragments.
    rng: draws each fragment's top-left corner, then the digit's (row before column), each
      uniform over the positions where it fits on the canvas.
    canvas_size: side of the square canvas, at least the digit's and the fragments' sides.

  Returns:
    uint8 `[canvas_size, canvas_size]`: zero where nothing is drawn, else the maximum of the
    overlapping pasted pixels.
  """
  canvas = np.zeros((canvas_size, canvas_size), np.uint8)
  for piece in (*fragments, digit):
    rows, cols = piece.shape
    top, left = rng.integers(0, canvas_size - rows + 1), rng.integers(0, canvas_size - cols + 1)
    window = canvas[top:top + rows, left:left + cols]
    np.maximum(window, piece, out=window)
  return canvas


def _cluttered_split(digits: np.ndarray, placements: int, seed: int) -> np.ndarray:
  """uint8 `[placements * n, 32, 32]` from grey digits `[n, 8, 8]`: placement p of digit i is
  row p * n + i; its fragments are crops of other digits of the same `digits`."""
  rng = np.random.default_rng(seed)
  magnified = digits.repeat(_CLUTTER_SCALE, axis=1).repeat(_CLUTTER_SCALE, axis=2)
  size, side = _CLUTTER_FRAGMENT_SIZE * _CLUTTER_SCALE, magnified.shape[1]
  canvases = []
  for _ in range(placements):
    for index, digit in enumerate(magnified):
      others = (index + rng.integers(1, len(digits), size=_CLUTTER_FRAGMENTS)) % len(digits)
      corners = rng.integers(0, side - size + 1, size=(_CLUTTER_FRAGMENTS, 2))
      fragments = np.stack([magnified[o, r:r + size, c:c + size]
                            for o, (r, c) in zip(others, corners)])
      fragments = np.round(fragments * _CLUTTER_INTENSITY).astype(np.uint8)
      canvases.append(place_with_clutter(digit, fragments, rng))
  return np.stack(canvases)


@functools.cache
def _cluttered_digits() -> tuple[DatasetInfo, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """The digits placed on cluttered 32x32 canvases: uint8 images `[6468, 32, 32, 3]`, labels,
  split indices (module docstring). Built once per process (0.4 s here), read-only."""
  _, digit_images, digit_labels, digit_splits = _digits()
  images, labels, splits = [], [], {}
  for split in ("train", "test"):
    indices = digit_splits[split]
    canvases = _cluttered_split(digit_images[indices, ..., 0], _CLUTTER_PLACEMENTS[split],
                                _CLUTTER_SEEDS[split])
    start = sum(len(i) for i in images)
    splits[split] = np.arange(start, start + len(canvases))
    images.append(np.repeat(canvases[..., None], 3, axis=-1))
    labels.append(np.tile(digit_labels[indices], _CLUTTER_PLACEMENTS[split]))
  splits["validation"] = splits["test"]
  images, labels = np.concatenate(images), np.concatenate(labels)
  for array in (images, labels, *splits.values()):
    array.setflags(write=False)
  info = DatasetInfo(
      name="cluttered_digits", num_classes=10, splits={k: len(v) for k, v in splits.items()},
      image_shape=(_CLUTTER_CANVAS, _CLUTTER_CANVAS, 3),
      class_names=tuple(str(i) for i in range(10)),
      description=(
          "The 'digits' (UCI ML hand-written digits as bundled with scikit-learn), each drawn "
          "at 24x24 at a random position on a 32x32 canvas over 2 clutter fragments (2x2 crops "
          "of other digits of its split, drawn at 6x6 with half the ink); 4 placements of "
          "each of the 1,437 train digits (5,748 'train'), 2 of each of the 360 test digits "
          "(720 'test', also named 'validation'); seeded, built offline."),
      license=_DIGITS_LICENSE, citation=_DIGITS_CITATION)
  return info, images, labels, splits


# To add an embedded dataset, add one function returning (info, uint8 images [N, h, w, 3],
# int64 labels [N], {split: example indices}).
_EMBEDDED = types.MappingProxyType({"digits": _digits, "cluttered_digits": _cluttered_digits})


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
      "register it in vit_repr.data.sources._EMBEDDED.")


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
# Reading records.


def _read_indexed(source: _Source, start: int, stop: int, keep: np.ndarray) -> tf.data.Dataset:
  """Examples with canonical index in `[start, stop)` where `keep[index - start]`, in order."""
  keep = tf.constant(keep, tf.bool)
  ds = source.read(start, stop).enumerate(start)
  ds = ds.filter(lambda i, ex: tf.gather(keep, i - start))
  return ds.map(lambda i, ex: {"image": ex["image"], "label": ex["label"], "index": i})


def _options() -> tf.data.Options:
  """tf.data options of every pipeline built on a source: deterministic order."""
  options = tf.data.Options()
  options.deterministic = True
  return options
