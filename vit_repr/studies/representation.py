"""Study 1, representation structure: CKA heatmaps within and across models (paper Figs 1-2).

Streams one dataset through model A (and optionally models B and C) once per pass and
accumulates minibatch CKA (`vit_repr.cka.MinibatchCKA`, unbiased HSIC) between every pair of
selected layers. The layers of all models go into ONE accumulator, so a single Gram per layer
per minibatch gives every within-model and cross-model heatmap together (A, B, C, A x B, A x C,
B x C). Each device's shard
of a global batch is one minibatch of `analysis.minibatch_size` examples.

Passes: pass 0 reads the examples in canonical order, pass p > 0 in an order shuffled by
`analysis.shuffle_seed + p` (same examples, new minibatch grouping), as the reference
minibatch-CKA code does (10 passes over 10,000 examples, batch 256).

Preemption (`vit_repr.studies.runner`, `vit_repr.studies.resume`): the accumulator state is
saved atomically every `checkpoint_every` batches to `<workdir>/cka_state.npz` with a
fingerprint of the config; a rerun with the same config skips the batches already accumulated
(reading but not computing them) and ends with the same numbers as an uninterrupted run. A
state from another config is refused.

Outputs in the workdir: `cka_heatmap.{npz,json}` (heatmaps `cka_<xy>` for every pair of models
x <= y, e.g. `cka_aa`, `cka_bb`, `cka_ab`, with standard errors `stderr_<xy>`, layer names
`names_<x>`, example counts, config, models, versions) and
`figures/cka_heatmap.{png,pdf}`.
"""

import ml_collections
import numpy as np
from absl import logging

from vit_repr import cka, features, plotting
from vit_repr.studies import loading, runner

STATE_FILE = "cka_state.npz"


MODEL_KEYS = ("a", "b", "c")


def _model_specs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(key, spec) of model A and of each of models B, C that the config names, in that order."""
  specs = [("a", config.model_a)]
  for key in MODEL_KEYS[1:]:
    spec = config.get(f"model_{key}")
    if spec is not None and spec.name:
      specs.append((key, spec))
  if len(specs) == 2 and specs[1][0] == "c":
    raise ValueError(f"model_c ({config.model_c.name}) is set but model_b is not; name model B "
                     "first (--config.model_b.name=...).")
  return specs


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Computes the within- and cross-model CKA heatmaps of `config` into `workdir`.

  Args:
    config: a `configs/cka_heatmap.py` config (model_a, model_b, model_c, data, analysis).
    workdir: output directory (also holds the resumable accumulator state).

  Returns:
    The result: arrays `cka_<xy>`, `stderr_<xy>` (xy: every pair of models x <= y, e.g. aa, bb,
    ab), `names_<x>`; summary: example count, minibatches, layer counts, examples/s.

  Raises:
    ValueError: model C named without model B.
  """
  study = runner.Study(config, workdir)
  analysis = config.analysis
  extractors, params = {}, {}
  for key, spec in _model_specs(config):
    extractors[key], params[key] = study.extractor(spec, token_mode=analysis.token_mode)
    logging.info("Model %s (%s): %d layers, features per example %s.", key.upper(), spec.name,
                 len(extractors[key].names), sorted(set(extractors[key].feature_sizes.values())))
  layer_names = [f"{k}:{n}" for k, e in extractors.items() for n in e.names]
  estimator = cka.MinibatchCKA(study.mesh, grams=analysis.grams, gram_blocks=analysis.gram_blocks)

  def update(state: cka.MinibatchCKAState, batch: dict) -> cka.MinibatchCKAState:
    feats = {f"{k}:{n}": v for k, e in extractors.items()
             for n, v in e(params[k], batch["image"]).items()}
    return estimator.update(state, feats, valid=batch["valid"])

  state, progress = study.accumulate(
      estimator.init({n: None for n in layer_names}), update,
      study.passes(minibatch_size=analysis.minibatch_size, shuffle_seed=analysis.shuffle_seed),
      state_file=STATE_FILE, what="CKA", num_passes=analysis.num_passes)
  if not progress.complete:
    return runner.Interrupted(progress)
  return _finish(study, estimator.result(state), extractors, progress.examples_per_second)


def _finish(study: runner.Study, result: cka.CKAResult,
            extractors: dict[str, features.FeatureExtractor],
            examples_per_second: float | None) -> runner.StudyResult:
  """Splits the joint heatmap into its within/cross blocks; writes arrays, metadata, figure."""
  config = study.config
  sizes = {k: len(e.names) for k, e in extractors.items()}
  keys = list(sizes)
  offsets = dict(zip(keys, np.cumsum([0] + [sizes[k] for k in keys[:-1]])))
  arrays, panels = {}, []
  blocks = [(k, k) for k in keys] + [(row, col) for i, row in enumerate(keys)
                                     for col in keys[i + 1:]]
  for row, col in blocks:
    rows = slice(offsets[row], offsets[row] + sizes[row])
    cols = slice(offsets[col], offsets[col] + sizes[col])
    arrays[f"cka_{row}{col}"] = result.cka[rows, cols]
    arrays[f"stderr_{row}{col}"] = result.stderr[rows, cols]
    spec_row, spec_col = config[f"model_{row}"], config[f"model_{col}"]
    panels.append(plotting.HeatmapPanel(
        values=result.cka[rows, cols], row_names=extractors[row].names,
        column_names=extractors[col].names, row_label=f"Layers {spec_row.name}",
        column_label=f"Layers {spec_col.name}",
        title=spec_row.name if row == col else f"{spec_row.name} vs {spec_col.name}"))
  for key, extractor in extractors.items():
    arrays[f"names_{key}"] = np.asarray(extractor.names, dtype=str)
  metadata = {
      "models": {k: loading.describe(config[f"model_{k}"]) for k in extractors},
      "num_examples_per_pass": result.num_examples // config.analysis.num_passes,
      "num_examples_accumulated": result.num_examples,
      "num_minibatches": result.num_batches,
      "estimator": "minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021); delta-method "
                   "standard errors over minibatches",
      "token_mode": config.analysis.token_mode,
      "examples_per_second": examples_per_second,
  }
  summary = {"num_examples": result.num_examples, "num_minibatches": result.num_batches,
             "layers": sizes, "examples_per_second": examples_per_second}
  return study.finish("cka_heatmap", arrays, metadata, summary,
                      figures={"cka_heatmap": lambda path: plotting.plot_heatmaps(panels, path)})
