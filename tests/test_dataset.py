"""The dataset study's pipeline pass (vit_repr.studies.dataset).

The pipeline is replaced by a fake whose batches arrive after known delays (a slow first
batch, fast later ones), so the reported rate and start-up are checked against arithmetic.
"""

import time
import types

import ml_collections
import numpy as np

from vit_repr.studies import dataset

BATCH = 8
STARTUP, PER_BATCH = 0.3, 0.01  # Seconds before the first batch, before each later one.


class _SlowBatches:
  """`num_batches` batches of labels 0..7, the first after STARTUP s, the others PER_BATCH s."""

  def __init__(self, num_batches: int):
    self.info = types.SimpleNamespace(num_classes=BATCH)
    self.plan = types.SimpleNamespace(num_examples=num_batches * BATCH, num_batches=num_batches)
    self._num_batches = num_batches

  def __iter__(self):
    for i in range(self._num_batches):
      time.sleep(STARTUP if i == 0 else PER_BATCH)
      yield {"label": np.arange(BATCH, dtype=np.int32)}


def _pass(monkeypatch, num_batches: int) -> tuple[np.ndarray, dict]:
  monkeypatch.setattr(dataset.data, "eval_batches",
                      lambda *args, **kwargs: _SlowBatches(num_batches))
  cfg = ml_collections.ConfigDict(dict(name="fake", eval_split="test", image_size=8,
                                       global_batch_size=BATCH, data_dir=None))
  return dataset._pipeline_label_histogram(cfg)


def test_pipeline_rate_excludes_the_first_batch(monkeypatch):
  """10 batches: the 9 after the first take >= 0.09 s, so the rate is at most 72 / 0.09 = 800
  examples/s, and well above the 80 / 0.39 = 205 examples/s (at most) that counting the 0.3 s
  start-up would give."""
  histogram, meta = _pass(monkeypatch, num_batches=10)
  np.testing.assert_array_equal(histogram, np.full(BATCH, 10))
  assert meta["startup_seconds"] >= STARTUP
  assert not meta["rate_includes_startup"]
  assert 9 * BATCH / (9 * PER_BATCH) >= meta["examples_per_second"] > 1.5 * 10 * BATCH / (
      STARTUP + 9 * PER_BATCH)


def test_single_batch_rate_includes_the_start_up_and_says_so(monkeypatch):
  _, meta = _pass(monkeypatch, num_batches=1)
  assert meta["rate_includes_startup"]
  assert meta["startup_seconds"] >= STARTUP
  assert meta["examples_per_second"] <= BATCH / meta["startup_seconds"] <= BATCH / STARTUP
