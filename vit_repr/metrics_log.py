"""The metrics log of a training run: `<workdir>/metrics.jsonl` and TensorBoard event files.

`vit_repr.training` writes one record per logging step ('split' 'train') and per evaluation
('split' 'eval'), each `{'split', 'step', name: value, ...}`, to `<workdir>/metrics.jsonl` and
as TensorBoard scalars `<split>/<name>` in `<workdir>/tensorboard` (tensorboardX, no
TensorFlow). The work directory may be a local path or a URI (`vit_repr.files`).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import tensorboardX

from vit_repr import files

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Records in `<workdir>/metrics.jsonl` (rewritten atomically on every write: object stores
  have no append) and TensorBoard event files in `<workdir>/tensorboard`; process 0 only.

  tensorboardX writes local files only (its gs:// writer needs a GCS client library), so for a
  URI work directory the events go to a local temporary folder and are copied through
  `vit_repr.files` after every write.
  """

  def __init__(self, workdir: str, start_step: int):
    """Opens the log of `workdir`, dropping records after `start_step` (a killed run's)."""
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._path = files.join(workdir, METRICS_FILE)
    self._lines = []
    if files.exists(self._path):  # Drop records a killed run wrote after its checkpoint.
      self._lines = [line for line in files.read_text(self._path).splitlines(keepends=True)
                     if json.loads(line)["step"] <= start_step]
    self._events_dir = files.join(workdir, "tensorboard")
    self._local_dir = (tempfile.mkdtemp(prefix="vit_repr_tensorboard_")
                       if files.is_uri(workdir) else self._events_dir)
    self._tensorboard = tensorboardX.SummaryWriter(self._local_dir, purge_step=start_step + 1)

  def write(self, split: str, step: int, values: Mapping[str, float]) -> None:
    """Appends the record `{'split': split, 'step': step, **values}` and its scalars."""
    if not self._active:
      return
    self._lines.append(json.dumps({"split": split, "step": step, **values}) + "\n")
    files.write_text(self._path, "".join(self._lines))
    for name, value in values.items():
      self._tensorboard.add_scalar(f"{split}/{name}", value, step)
    self._tensorboard.flush()
    self._copy_events()

  def _copy_events(self) -> None:
    """Copies the local event files to a URI work directory (nothing for a local one)."""
    if self._local_dir == self._events_dir:
      return
    for name in os.listdir(self._local_dir):
      with open(os.path.join(self._local_dir, name), "rb") as events:
        files.write_bytes(files.join(self._events_dir, name), events.read())

  def close(self) -> None:
    """Closes the event file (a URI work directory gets its last copy)."""
    if self._active:
      self._tensorboard.close()
      self._copy_events()
      if self._local_dir != self._events_dir:
        shutil.rmtree(self._local_dir)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` ('split': 'train' | 'eval', 'step', values), the
  same on every host (`files.read_shared`: every process calls it); [] without the file."""
  contents = files.read_shared(files.join(workdir, METRICS_FILE))
  return [] if contents is None else [json.loads(line)
                                      for line in contents.decode("utf-8").splitlines()]
