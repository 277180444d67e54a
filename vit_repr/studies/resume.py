"""Preemption-safe accumulation for the studies that stream passes over a dataset.

A study saves its accumulator state (NumPy arrays) atomically every few batches, with a
fingerprint of its config; a rerun with the same config resumes after the saved batch (reading
but not computing the batches before it, so every minibatch holds the same examples) and ends
with the numbers of an uninterrupted run. A state saved under another config is refused.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vit_repr import data

# Config entries that do not change the numbers (left out of the fingerprint).
RUN_ONLY_KEYS = ("checkpoint_every", "log_every", "stop_after_batches")


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of every config entry that changes the numbers."""
  kept = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_KEYS}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def save_state(path: str, arrays: Mapping[str, np.ndarray], batches_done: int,
               config_fingerprint: str) -> None:
  """Writes the state arrays atomically (a temporary file, then a rename); process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays, batches_done=np.asarray(batches_done),
           fingerprint=np.asarray(config_fingerprint))
  os.replace(tmp, path)


def load_state(path: str, config_fingerprint: str
               ) -> tuple[dict[str, np.ndarray], int] | None:
  """(state arrays, batches done) saved at `path`, or None when there is nothing to resume.

  Raises:
    ValueError: the state was accumulated under another config.
  """
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as saved:
    arrays = {k: saved[k] for k in saved.files}
  if str(arrays.pop("fingerprint")) != config_fingerprint:
    raise ValueError(f"{path} holds a state accumulated with a different config; resuming "
                     "would mix two analyses. Use a new --workdir, or rerun with the original "
                     "config to resume.")
  return arrays, int(arrays.pop("batches_done"))


def remaining_batches(pass_batches: Callable[[int], Iterable[Any]], *, num_passes: int,
                      batches_per_pass: int, done: int,
                      stop_at: int) -> Iterator[tuple[int, int, Any]]:
  """(global step, pass index, batch) for steps `done` .. `stop_at` - 1 of all the passes.

  Passes already finished are not read; within a partly finished pass the batches before
  `done` are read and dropped, so the pass's order (and every minibatch) is unchanged.
  """
  for pass_index in range(num_passes):
    if done >= min(stop_at, (pass_index + 1) * batches_per_pass):
      continue
    for batch_index, batch in enumerate(pass_batches(pass_index)):
      step = pass_index * batches_per_pass + batch_index
      if step >= stop_at:
        return
      if step >= done:
        yield step, pass_index, batch


def pass_reader(cfg_data: ml_collections.ConfigDict, *, global_batch_size: int, mesh: Mesh,
                shuffle_seed: int) -> Callable[[int], data.EvalBatches]:
  """`pass_index -> batches` over `cfg_data` (name, split, data_dir, image_size, num_examples,
  crop_fraction): pass 0 in canonical order, pass p > 0 reshuffled by `shuffle_seed + p` (same
  examples, new minibatches), as the reference minibatch-CKA code does."""
  def batches(pass_index: int) -> data.EvalBatches:
    return data.eval_batches(
        cfg_data.name, cfg_data.split, image_size=cfg_data.image_size,
        global_batch_size=global_batch_size, mesh=mesh, num_examples=cfg_data.num_examples,
        data_dir=cfg_data.data_dir, crop_fraction=cfg_data.crop_fraction,
        shuffle_seed=None if pass_index == 0 else shuffle_seed + pass_index)
  return batches


class Throughput:
  """Examples/s and ETA of the hot loop, timed from the first finished batch (after compiling).

  Blocks on the state only for the first batch and when a report is asked for.
  """

  def __init__(self, global_batch: int):
    self._global_batch = global_batch
    self._start = None
    self._batches = 0
    self._leaf = None

  def batch_done(self, state: Any) -> None:
    if self._start is None:
      jax.block_until_ready(state)
      self._start = time.perf_counter()
    else:
      self._batches += 1
    self._leaf = state

  def examples_per_second(self) -> float | None:
    if not self._batches:
      return None
    jax.block_until_ready(self._leaf)
    return round(self._batches * self._global_batch / (time.perf_counter() - self._start), 1)

  def report(self, batches_left: int) -> str:
    rate = self.examples_per_second()
    if rate is None:
      return "compiled"
    return f"{rate:.1f} examples/s, ETA {batches_left * self._global_batch / rate:.0f} s"
