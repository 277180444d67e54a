"""Dataset summary for the main job's first step: class counts, pixel statistics, a montage."""

import numpy as np
import tensorflow as tf

from vit_repr.data import preprocessing, sources


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
  preprocessing._check_image_size(image_size)
  source = sources._source(name, split, data_dir)
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
  ds = sources._read_indexed(source, 0, total, keep).map(
      lambda ex: {"image": preprocessing._eval_preprocess(source.decode(ex["image"]),
                                                          image_size, None),
                  "label": ex["label"]}, num_parallel_calls=tf.data.AUTOTUNE)
  for batch in ds.batch(batch_size).with_options(sources._options()).as_numpy_iterator():
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
