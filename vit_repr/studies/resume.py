"""Preemption-safe passes over a dataset: the loop every streaming study runs.

Each analysis keeps its running state as a small pytree of arrays with pure `update`s (as
optax does; `vit_repr.streaming`). `accumulate` streams one or more passes over the data into
that state (or a dict of states) and saves its `to_numpy` arrays atomically every
`checkpoint_every` batches with a fingerprint of the study's config and of the device count; a
rerun resumes after the saved batch (reading but not computing the batches before it, so every
minibatch holds the same examples) and ends with the numbers of an uninterrupted run, also on
another number of hosts. A state saved under another config or
another device count is refused with a message that says why, never mixed in.
"""

import dataclasses
import datetime
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_repr import data, files, streaming

State = TypeVar("State")
# Config entries that do not change the numbers (left out of the fingerprint).
RUN_ONLY_KEYS = ("checkpoint_every", "log_every", "stop_after_batches")


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of every config entry that changes the numbers."""
  kept = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_KEYS}
  return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def device_layout() -> str:
  """The device count, which decides what a saved batch count means. The process count does
  not: every global batch is the same for any number of hosts (`data.eval_plan`), so a state
  saved by 2 hosts of 4 devices continues exactly on 4 hosts of 2 (or 1 host of 4)."""
  return f"{jax.device_count()} devices"


def save_state(path: str, arrays: Mapping[str, np.ndarray], batches_done: int,
               config_fingerprint: str) -> None:
  """Writes the state arrays atomically (`files.write_npz`: process 0, temporary + rename)."""
  files.write_npz(path, {**arrays, "batches_done": np.asarray(batches_done),
                         "fingerprint": np.asarray(config_fingerprint),
                         "layout": np.asarray(device_layout())})


def load_state(path: str, config_fingerprint: str
               ) -> tuple[dict[str, np.ndarray], int] | None:
  """(state arrays, batches done) saved at `path`, or None when there is nothing to resume.

  Every process reads the file and checks that all read the same (`files.read_shared`).

  Raises:
    ValueError: the state was accumulated under another config or device layout, or the
      processes do not see the same state (a work directory that is not shared).
  """
  contents = files.read_shared(path)
  if contents is None:
    return None
  arrays = files.npz_arrays(contents)
  if str(arrays.pop("fingerprint")) != config_fingerprint:
    raise ValueError(f"{path} holds a state accumulated with a different config; resuming "
                     "would mix two analyses. Use a new --workdir, or rerun with the original "
                     "config to resume.")
  saved_layout = str(arrays.pop("layout"))
  if saved_layout != device_layout():
    raise ValueError(f"{path} was accumulated with {saved_layout}, this run has "
                     f"{device_layout()}: its batch count would not mean the same examples. "
                     "Resume with the original device count (any number of hosts), or use a "
                     "new --workdir.")
  return arrays, int(arrays.pop("batches_done"))


def _state_arrays(state: Any) -> dict[str, np.ndarray]:
  """`state.to_numpy()`; of a dict of states, each one's under '<key>/'."""
  if isinstance(state, Mapping):
    return streaming.prefixed({key: _state_arrays(s) for key, s in state.items()})
  return state.to_numpy()


def _restored(template: State, arrays: Mapping[str, np.ndarray]) -> State:
  """Inverse of `_state_arrays`: `template.from_numpy(arrays)` with every array placed like the
  template's (replicated on the mesh), so the jitted update reads no host array.

  Raises:
    ValueError: the arrays are another analysis's (fields, keys or shapes differ).
  """
  if isinstance(template, Mapping):
    parts = streaming.unprefixed(arrays, template)
    return {key: _restored(s, parts[key]) for key, s in template.items()}

  def placed(like: Any, value: Any) -> Any:
    if not isinstance(like, jax.Array):
      return value
    if np.shape(value) != like.shape:
      raise ValueError(f"a saved array has shape {np.shape(value)}, the state's {like.shape}: "
                       "it belongs to another analysis. Use a new --workdir.")
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])

  return jax.tree.map(placed, template, template.from_numpy(arrays))


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
    return self._batches * self._global_batch / (time.perf_counter() - self._start)

  def report(self, batches_left: int) -> str:
    """'12.3 examples/s, ETA 0:01:05' (three significant digits, so slow rates do not read
    0.0), or 'compiled' before a second batch has been timed."""
    rate = self.examples_per_second()
    if rate is None:
      return "compiled"
    eta = datetime.timedelta(seconds=round(batches_left * self._global_batch / rate))
    return f"{rate:.3g} examples/s, ETA {eta}"


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a resumable pass stands.

  Attributes:
    batches_done: global batches accumulated (over all passes).
    batches_total: global batches of all the passes.
    examples_per_second: measured rate of this run's batches (None if fewer than two ran).
  """
  batches_done: int
  batches_total: int
  examples_per_second: float | None

  @property
  def complete(self) -> bool:
    return self.batches_done >= self.batches_total

  def summary(self) -> dict[str, int]:
    """The headline numbers of an interrupted study."""
    return {"batches_done": self.batches_done, "batches_total": self.batches_total}


def accumulate(state: State, update: Callable[[State, dict[str, jax.Array]], State],
               pass_batches: Callable[[int], data.EvalBatches], *,
               config: ml_collections.ConfigDict, state_path: str, what: str,
               num_passes: int = 1) -> tuple[State, Progress]:
  """Streams `num_passes` passes of `pass_batches` into `state`, resumably.

  Args:
    state: the initial state, with `to_numpy()` and `from_numpy(arrays)` (a
      `streaming.State`), or a dict of such states; also the template a saved state is
      restored into (`state.from_numpy`, then placed like it).
    update: `(state, batch) -> state`, one global batch `{'image', 'label'}`.
    pass_batches: `pass_index -> batches` (e.g. `runner.Study.passes`); every pass has as
      many.
    config: the study's config: its fingerprint, `checkpoint_every`, `log_every` and
      `stop_after_batches` (a simulated preemption: stop there, a rerun resumes).
    state_path: the `.npz` file holding the saved state.
    what: a label for the log lines.
    num_passes: passes over the data.

  Returns:
    (the state, its `Progress`); the state is complete when `progress.complete`.

  Raises:
    ValueError: a saved state from another config, device layout or analysis.
  """
  config_fingerprint = fingerprint(config)
  saved = load_state(state_path, config_fingerprint)
  done = 0
  if saved is not None:
    arrays, done = saved
    try:
      state = _restored(state, arrays)
    except ValueError as error:
      raise ValueError(f"{state_path} cannot be resumed: {error}") from error
    logging.info("%s: resuming after %d batches from %s.", what, done, state_path)
  first = pass_batches(0)
  batches_per_pass, global_batch = len(first), first.plan.global_batch_size
  total = num_passes * batches_per_pass
  stop_at = min(total, config.get("stop_after_batches") or total)
  timer = Throughput(global_batch)
  for step, pass_index, batch in remaining_batches(
      lambda p: first if p == 0 else pass_batches(p), num_passes=num_passes,
      batches_per_pass=batches_per_pass, done=done, stop_at=stop_at):
    state = update(state, batch)
    done = step + 1
    timer.batch_done(state)
    if done % config.checkpoint_every == 0 or done == stop_at:
      save_state(state_path, _state_arrays(state), done, config_fingerprint)
    if done % config.log_every == 0 or done == stop_at:
      logging.info("%s: batch %d/%d (pass %d/%d), %s.", what, done, total, pass_index + 1,
                   num_passes, timer.report(total - done))
  if done < total:
    logging.info("%s: stopped after %d of %d batches (stop_after_batches); rerun to resume.",
                 what, done, total)
  return state, Progress(done, total, timer.examples_per_second())
