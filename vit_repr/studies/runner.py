"""The study runner: what every study does around its analysis, written once.

A study's `run(config, workdir)` is

    study = runner.Study(config, workdir)     # mesh, dataset of config.data, workdir
    model, params = study.model(spec)         # a model spec -> module, params on the mesh
    state, progress = study.accumulate(       # the resumable pass, with progress lines
        analysis.init(), update, study.passes(minibatch_size=...), state_file=..., what=...)
    if not progress.complete:
      return runner.Interrupted(progress)     # rerun the same config to resume
    return study.finish("name", arrays, metadata, summary, figures={...})

`finish` writes `<name>.{npz,json}` and the figures, and returns the `StudyResult`: the same
arrays and metadata in memory, with the headline numbers. Composed studies (the skip-connection
ablation, data scale, the main job) take these objects from the studies they run; they never
read another study's files back.
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vit_repr import data, features, files, parallel, results
from vit_repr.studies import loading, resume

State = TypeVar("State")
# A figure: `draw(path)` writes `<path>.{png,pdf}` (a `vit_repr.plotting` function, bound).
Draw = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class StudyResult:
  """A finished study (or one part of it), in memory.

  Attributes:
    summary: its headline numbers (JSON-ready), as logged and recorded by the main job.
    arrays: what it wrote to `<name>.npz` (empty for a study made of parts).
    metadata: what it wrote to `<name>.json`: config, models, counts, definitions.
    parts: the results of the parts of a composed study, by name.
  """
  summary: dict[str, Any]
  arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  parts: Mapping[str, "StudyResult"] = dataclasses.field(default_factory=dict)
  complete: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Interrupted:
  """A study stopped before its end (`stop_after_batches`); rerunning its config resumes it.

  Attributes:
    progress: where the stopped pass stands.
  """
  progress: resume.Progress
  complete: ClassVar[bool] = False

  @property
  def summary(self) -> dict[str, int]:
    """`{'batches_done': ..., 'batches_total': ...}` of the stopped pass."""
    return self.progress.summary()


# What a study's `run` returns.
Outcome = StudyResult | Interrupted


class NumberedMinibatches:
  """The batches of a minibatch plan, each with its rows' global minibatch numbers.

  Yields the batches of `batches` with `'minibatch'`: `[B]` int32, sharded like the batch, the
  number of the minibatch each row belongs to (-1 on padding rows): minibatch j of pass p
  (the examples at positions `[j m, (j + 1) m)` of the pass's sequence) is `p * M + j`, M the
  minibatches per pass. The numbers depend on neither the device nor the host count, so draws
  seeded by them (`cka.MinibatchCKA`'s calibrations) do not either. `len`, `plan` and `info`
  are those of `batches`.
  """

  def __init__(self, batches: data.EvalBatches, minibatch_size: int, pass_index: int,
               mesh: jax.sharding.Mesh):
    self._batches = batches
    self._sharding = parallel.batch_sharding(mesh)
    self.plan, self.info = batches.plan, batches.info
    positions = self.plan.positions
    first = pass_index * (self.plan.num_examples // minibatch_size)
    self._numbers = np.where(positions >= 0, first + positions // minibatch_size,
                             -1).astype(np.int32)

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    for batch, numbers in zip(self._batches, self._numbers):
      yield {**batch, "minibatch": jax.make_array_from_callback(
          numbers.shape, self._sharding, lambda index, numbers=numbers: numbers[index])}


class Study:
  """One study's run in one work directory.

  Attributes:
    config: the study's config; `config.data` is its dataset section (configs/common.py).
    workdir: the output directory (created here).
    mesh: the data-parallel mesh over every device.
    info: the dataset's `data.DatasetInfo`.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    files.makedirs(workdir)
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.make_mesh()
    self.info = data.dataset_info(config.data.name, config.data.data_dir)

  @property
  def image_size(self) -> int:
    return self.config.data.image_size

  def model(self, spec: ml_collections.ConfigDict) -> tuple[nn.Module, Any]:
    """(module, params) of a model spec (`loading.load_model`), params replicated on the mesh."""
    return loading.load_model(spec, image_size=self.image_size,
                              num_classes=self.info.num_classes, mesh=self.mesh)

  def extractor(self, spec: ml_collections.ConfigDict, token_mode: str = "all"
                ) -> tuple[features.FeatureExtractor, Any]:
    """(the jitted extractor of `spec.layers` with `token_mode`, the model's params)."""
    model, params = self.model(spec)
    return features.FeatureExtractor(model, list(spec.layers), image_size=self.image_size,
                                     token_mode=token_mode), params

  def passes(self, *, minibatch_size: int | None = None, global_batch_size: int | None = None,
             shuffle_seed: int | None = None, numbered: bool = False
             ) -> Callable[[int], "data.EvalBatches | NumberedMinibatches"]:
    """`pass_index -> batches` over `config.data`.

    Args:
      minibatch_size: each device's shard is one minibatch of this many examples (the
        examples used then do not depend on the device count); or
      global_batch_size: plain global batches of this size.
      shuffle_seed: pass p > 0 reads the examples in an order shuffled by `shuffle_seed + p`
        (same examples, new minibatches), as the reference minibatch-CKA code does; None:
        every pass in canonical order.
      numbered: with minibatch_size, each batch also holds its rows' global minibatch numbers
        (`NumberedMinibatches`).
    """
    if (minibatch_size is None) == (global_batch_size is None):
      raise ValueError("Give exactly one of minibatch_size and global_batch_size.")
    if numbered and minibatch_size is None:
      raise ValueError("numbered=True needs minibatch_size: plain global batches have no "
                       "minibatches to number.")
    if minibatch_size is not None:
      global_batch_size = minibatch_size * self.mesh.devices.size

    def batches(pass_index: int) -> data.EvalBatches:
      seed = None if pass_index == 0 or shuffle_seed is None else shuffle_seed + pass_index
      cfg = self.config.data
      read = data.eval_batches(
          cfg.name, cfg.split, image_size=cfg.image_size, global_batch_size=global_batch_size,
          mesh=self.mesh, num_examples=cfg.num_examples, data_dir=cfg.data_dir,
          crop_fraction=cfg.crop_fraction, sample_seed=cfg.sample_seed, shuffle_seed=seed,
          minibatch_size=minibatch_size)
      return NumberedMinibatches(read, minibatch_size, pass_index, self.mesh) if numbered else read
    return batches

  def accumulate(self, state: State, update: Callable[[State, dict], State],
                 passes: Callable[[int], data.EvalBatches], *, state_file: str, what: str,
                 num_passes: int = 1) -> tuple[State, resume.Progress]:
    """`resume.accumulate` of the study's config, saving to `<workdir>/<state_file>`."""
    return resume.accumulate(state, update, passes, config=self.config,
                             state_path=files.join(self.workdir, state_file), what=what,
                             num_passes=num_passes)

  def path(self, *parts: str) -> str:
    """A path inside the work directory."""
    return files.join(self.workdir, *parts)

  def finish(self, name: str, arrays: dict[str, np.ndarray], metadata: dict[str, Any],
             summary: dict[str, Any], figures: Mapping[str, Draw] | None = None
             ) -> StudyResult:
    """`finish` in the study's work directory, with its config."""
    return finish(self.config, self.workdir, name, arrays, metadata, summary, figures)


def finish(config: ml_collections.ConfigDict, workdir: str, name: str,
           arrays: dict[str, np.ndarray], metadata: dict[str, Any], summary: dict[str, Any],
           figures: Mapping[str, Draw] | None = None) -> StudyResult:
  """Writes `<workdir>/<name>.{npz,json}` (the metadata with the config first, and the
  versions) and each figure to `<workdir>/figures/<figure name>.{png,pdf}`; returns the
  `StudyResult`."""
  metadata = {"config": config.to_dict(), **metadata}
  results.write_results(workdir, name, arrays, metadata)
  for figure, draw in (figures or {}).items():
    draw(files.join(workdir, "figures", figure))
  return StudyResult(summary=summary, arrays=arrays, metadata=metadata)
