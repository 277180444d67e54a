"""Study 1, representation structure: CKA heatmaps within and across models (paper Figs 1-2).

Streams one dataset through model A (and optionally model B) once per pass and accumulates
minibatch CKA (`vit_repr.cka.MinibatchCKA`, unbiased HSIC) between every pair of selected
layers. The layers of both models go into ONE accumulator, so a single Gram per layer per
minibatch gives the within-A, within-B and cross A x B heatmaps together. Each device's shard
of a global batch is one minibatch of `analysis.minibatch_size` examples.

Passes: pass 0 reads the examples in canonical order, pass p > 0 in an order shuffled by
`analysis.shuffle_seed + p` (same examples, new minibatch grouping), as the reference
minibatch-CKA code does (10 passes over 10,000 examples, batch 256).

Preemption (`vit_repr.studies.resume`): the accumulator state is saved atomically every
`checkpoint_every` batches to `<workdir>/cka_state.npz` with a fingerprint of the config; a
rerun with the same config skips the batches already accumulated (reading but not computing
them) and ends with the same numbers as an uninterrupted run. A state from another config is
refused.

Outputs in the workdir: `cka_heatmap.{npz,json}` (heatmaps `cka_aa`, `cka_bb`, `cka_ab` with
standard errors `stderr_*`, layer names, example counts, config, models, versions) and
`figures/cka_heatmap.{png,pdf}`.
"""

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vit_repr import cka, data, features, files, parallel, plotting, results
from vit_repr.studies import loading, resume

STATE_FILE = "cka_state.npz"


def _model_specs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  specs = [("a", config.model_a)]
  if config.model_b.name:
    specs.append(("b", config.model_b))
  return specs


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Computes the within- and cross-model CKA heatmaps of `config` into `workdir`.

  Args:
    config: a `configs/cka_heatmap.py` config (model_a, model_b, data, analysis).
    workdir: output directory (also holds the resumable accumulator state).

  Returns:
    Headline numbers: example count, batches, layer counts, examples/s.
  """
  files.makedirs(workdir)
  mesh = parallel.make_mesh()
  cfg_data, analysis = config.data, config.analysis
  info = data.dataset_info(cfg_data.name, cfg_data.data_dir)

  extractors, params = {}, {}
  for key, spec in _model_specs(config):
    model, params[key] = loading.load_model(spec, image_size=cfg_data.image_size,
                                            num_classes=info.num_classes, mesh=mesh)
    extractors[key] = features.FeatureExtractor(model, list(spec.layers),
                                                image_size=cfg_data.image_size,
                                                token_mode=analysis.token_mode)
    logging.info("Model %s (%s): %d layers, features per example %s.", key.upper(), spec.name,
                 len(extractors[key].names), sorted(set(extractors[key].feature_sizes.values())))
  layer_names = [f"{k}:{n}" for k, e in extractors.items() for n in e.names]

  pass_batches = resume.pass_reader(cfg_data, minibatch_size=analysis.minibatch_size,
                                    mesh=mesh, shuffle_seed=analysis.shuffle_seed)
  estimator = cka.MinibatchCKA(mesh, grams=analysis.grams, gram_blocks=analysis.gram_blocks)

  def update(state: cka.MinibatchCKAState, batch: dict) -> cka.MinibatchCKAState:
    feats = {f"{k}:{n}": v for k, e in extractors.items()
             for n, v in e(params[k], batch["image"]).items()}
    return estimator.update(state, feats, valid=batch["valid"])

  state, progress = resume.accumulate(
      estimator.init({n: None for n in layer_names}), update, pass_batches, config=config,
      state_path=files.join(workdir, STATE_FILE), what="CKA", num_passes=analysis.num_passes)
  if not progress.complete:
    return progress.summary()

  result = estimator.result(state)
  return _write(config, workdir, result, extractors, progress.examples_per_second)


def _write(config: ml_collections.ConfigDict, workdir: str, result: cka.CKAResult,
           extractors: dict[str, features.FeatureExtractor],
           examples_per_second: float | None) -> dict[str, Any]:
  """Splits the joint heatmap into its within/cross blocks; writes arrays, metadata, figure."""
  sizes = {k: len(e.names) for k, e in extractors.items()}
  offsets = {"a": 0, "b": sizes["a"]}
  arrays, panels = {}, []
  blocks = [("a", "a"), ("b", "b"), ("a", "b")] if "b" in sizes else [("a", "a")]
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
      "config": config.to_dict(),
      "models": {k: loading.describe(config[f"model_{k}"]) for k in extractors},
      "num_examples_per_pass": result.num_examples // config.analysis.num_passes,
      "num_examples_accumulated": result.num_examples,
      "num_minibatches": result.num_batches,
      "estimator": "minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021); delta-method "
                   "standard errors over minibatches",
      "token_mode": config.analysis.token_mode,
      "examples_per_second": examples_per_second,
  }
  results.write_results(workdir, "cka_heatmap", arrays, metadata)
  plotting.plot_heatmaps(panels, files.join(workdir, "figures", "cka_heatmap"))
  return {"num_examples": result.num_examples, "num_minibatches": result.num_batches,
          "layers": sizes, "examples_per_second": examples_per_second}
