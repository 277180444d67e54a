r"""The main job: every study of the paper, on the embedded dataset by default.

    python -m experiments.reproduce --workdir=outputs/reproduce
    python -m experiments.reproduce --config=configs/reproduce.py:local --workdir=/tmp/r \
        --config.data.name=cifar10 --config.data.data_dir=~/tensorflow_datasets

Args after the colon: `local` (default: the embedded 'digits' data, CPU, minutes).
"""

import ml_collections


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  """Returns the reproduction config for `arg` ('local')."""
  if arg not in ("local",):
    raise ValueError(f"Unknown reproduce config {arg!r}; use 'local'.")
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name="digits",           # Any TFDS name (e.g. 'imagenet2012') or an embedded dataset.
      data_dir=None,           # TFDS data directory, local or gs://.
      train_split="train",
      eval_split="test",
      image_size=32,           # Model resolution the images are resized to.
      global_batch_size=120,   # Divisible by the device count (1, 2, 4, 8, 10, 12, ...).
  ))
  config.summary = ml_collections.ConfigDict(dict(
      examples_per_class=10,   # Montage columns.
  ))
  return config
