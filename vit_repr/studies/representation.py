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

Measures (`analysis.measure`, `vit_repr.similarity`): 'cka' (the above) and 'angular_cka'
(arccos of it, a metric; standard errors by the delta method, intervals mapped through
arccos, the chance level the angle of the null's mean CKA) stream. Every other measure ('svcca', 'pwcca', 'procrustes', 'rsa',
'mutual_knn', 'cknna') needs every example at once: one pass (pass 0; `num_passes` is for the
streaming measures) materialises each layer's `[n, features]` on the host (resumable like the
probes' features: `features_<model>.npz`), refused beforehand with a message when it would
exceed `analysis.max_host_gib`; then one `similarity.heatmap` over the layers of all models
(each layer prepared once). `analysis.measure_options` holds the measure's options (unset:
its defaults).

Calibration (`analysis.num_permutations` K > 0): a permutation null per cell, the examples of
the column layers shuffled against the row layers K times: p-values `p_value_<xy>` and chance
levels `null_mean_<xy>` (streamed inside minibatch CKA for the streaming measures,
`similarity.permutation_test` for the others); the figure marks the cells NOT above chance
(p >= `analysis.alpha`) with a dot. `analysis.num_bootstrap` B > 0 (streaming measures):
Poisson-bootstrap intervals over minibatches `ci_low_<xy>`, `ci_high_<xy>` at
`analysis.confidence`.

Outputs in the workdir: `cka_heatmap.{npz,json}` (heatmaps `<measure>_<xy>` for every pair of
models x <= y, e.g. `cka_aa`, `cka_bb`, `cka_ab`, with standard errors `stderr_<xy>` (streaming
measures), the calibration arrays above, layer names `names_<x>`, example counts, config,
models, versions) and `figures/cka_heatmap.{png,pdf}`.
"""

import ml_collections
import numpy as np
from absl import logging

from vit_repr import cka, features, plotting, similarity
from vit_repr.studies import linear_probes, loading, runner

STATE_FILE = "cka_state.npz"
MODEL_KEYS = ("a", "b", "c")
# Colour range of each measure's heatmap (None: the data's largest value).
_COLOUR_RANGE = {"rsa": (-1.0, 1.0), "cknna": (-1.0, 1.0), "angular_cka": (0.0, np.pi / 2),
                 "procrustes": (0.0, np.sqrt(2.0))}


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


def measure_of(analysis: ml_collections.ConfigDict) -> similarity.Measure:
  """The study's `similarity.Measure`: `analysis.measure` with the options that are set.

  Raises:
    ValueError: an unknown measure, an option it does not take, a bad option value, or a
      bootstrap asked of a measure without a streaming form.
  """
  options = {k: v for k, v in analysis.measure_options.items() if v is not None}
  measure = similarity.get_measure(analysis.measure, **options)
  if analysis.num_bootstrap and not measure.streaming:
    raise ValueError(f"analysis.num_bootstrap={analysis.num_bootstrap}: bootstrap intervals are "
                     f"computed for the streaming measures (cka, angular_cka), not "
                     f"{measure.name!r}; set it to 0, or use num_permutations for a chance level.")
  return measure


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Computes the within- and cross-model heatmaps of `config` into `workdir`.

  Args:
    config: a `configs/cka_heatmap.py` config (model_a, model_b, model_c, data, analysis).
    workdir: output directory (also holds the resumable accumulator state).

  Returns:
    The result: arrays `<measure>_<xy>` (xy: every pair of models x <= y, e.g. aa, bb, ab),
    `stderr_<xy>` (streaming measures), the calibration arrays (module docstring),
    `names_<x>`; summary: measure, example count, minibatches, layer counts, examples/s.

  Raises:
    ValueError: model C named without model B, a bad measure or option (`measure_of`), or
      features of a full-set measure that would not fit in `analysis.max_host_gib`.
  """
  measure = measure_of(config.analysis)
  study = runner.Study(config, workdir)
  models = {key: study.model(spec) for key, spec in _model_specs(config)}
  extractors = {}
  for key, (model, _) in models.items():
    spec = config[f"model_{key}"]
    extractors[key] = features.FeatureExtractor(model, list(spec.layers),
                                                image_size=study.image_size,
                                                token_mode=config.analysis.token_mode)
    logging.info("Model %s (%s): %d layers, features per example %s.", key.upper(), spec.name,
                 len(extractors[key].names), sorted(set(extractors[key].feature_sizes.values())))
  params = {key: p for key, (_, p) in models.items()}
  if measure.streaming:
    return _streaming(study, measure, extractors, params)
  return _full_set(study, measure, models, extractors)


def _streaming(study: runner.Study, measure: similarity.Measure,
               extractors: dict[str, features.FeatureExtractor],
               params: dict) -> runner.Outcome:
  """Minibatch CKA over every pair of layers (with its calibrations), resumable."""
  analysis = study.config.analysis
  layer_names = [f"{k}:{n}" for k, e in extractors.items() for n in e.names]
  estimator = cka.MinibatchCKA(
      study.mesh, grams=analysis.grams, gram_blocks=analysis.gram_blocks,
      num_permutations=analysis.num_permutations, num_bootstrap=analysis.num_bootstrap,
      confidence=analysis.confidence, seed=analysis.calibration_seed)

  def update(state: cka.MinibatchCKAState, batch: dict) -> cka.MinibatchCKAState:
    feats = {f"{k}:{n}": v for k, e in extractors.items()
             for n, v in e(params[k], batch["image"]).items()}
    return estimator.update(state, feats, valid=batch["valid"],
                            minibatch_index=batch["minibatch"])

  state, progress = study.accumulate(
      estimator.init({n: None for n in layer_names}), update,
      study.passes(minibatch_size=analysis.minibatch_size, shuffle_seed=analysis.shuffle_seed,
                   numbered=True),
      state_file=STATE_FILE, what="CKA", num_passes=analysis.num_passes)
  if not progress.complete:
    return runner.Interrupted(progress)
  result = estimator.result(state)
  joint = {"values": result.cka, "stderr": result.stderr}
  calibrated = {"p_value": result.p_value, "null_mean": result.null_mean,
                "ci_low": result.ci_low, "ci_high": result.ci_high}
  if measure.name == "angular_cka":  # arccos is decreasing: intervals swap ends.
    angle = lambda c: None if c is None else np.arccos(np.clip(c, -1.0, 1.0))
    joint = {"values": angle(result.cka),
             # Delta method: d arccos(c) / dc = -1 / sqrt(1 - c²).
             "stderr": result.stderr / np.sqrt(np.maximum(1.0 - result.cka**2, 1e-12))}
    calibrated.update(null_mean=angle(result.null_mean), ci_low=angle(result.ci_high),
                      ci_high=angle(result.ci_low))
  joint.update({k: v for k, v in calibrated.items() if v is not None})
  counts = {"num_examples": result.num_examples, "num_minibatches": result.num_batches,
            "num_examples_per_pass": result.num_examples // analysis.num_passes}
  estimator_text = ("minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021); delta-method "
                    "standard errors over minibatches")
  if measure.name == "angular_cka":
    estimator_text = "arccos of " + estimator_text
  return _finish(study, measure, joint, extractors, counts, estimator_text,
                 progress.examples_per_second)


def _full_set(study: runner.Study, measure: similarity.Measure, models: dict,
              extractors: dict[str, features.FeatureExtractor]) -> runner.Outcome:
  """Every example's features on the host (one pass), then one heatmap over all layers."""
  analysis = study.config.analysis
  batches = study.passes(minibatch_size=analysis.minibatch_size)(0)
  num_examples = batches.plan.num_examples
  per_example = sum(sum(e.feature_sizes.values()) for e in extractors.values())
  needed_gib = 4 * num_examples * per_example / 2**30
  if needed_gib > analysis.max_host_gib:
    raise ValueError(
        f"Measure {measure.name!r} needs every example's features at once: {num_examples} "
        f"examples x {per_example} features (token_mode={analysis.token_mode!r}, all layers) = "
        f"{needed_gib:.1f} GiB on the host, over analysis.max_host_gib={analysis.max_host_gib}. "
        "Use a pooled token_mode ('mean' or 'cls'), fewer examples (data.num_examples) or "
        "layers, raise max_host_gib if the host has the memory, or use a streaming measure "
        "('cka', 'angular_cka').")
  layers = {}
  for key, (model, params) in models.items():
    extracted = linear_probes.extract(
        model, params, study.config[f"model_{key}"].layers, [analysis.token_mode], batches,
        study=study, state_file=f"features_{key}.npz", what=f"{measure.name} features {key}")
    if isinstance(extracted, runner.Interrupted):
      return extracted
    names, feats, _ = extracted
    layers.update({f"{key}:{n}": feats[f"{analysis.token_mode}:{n}"] for n in names})
  options = dict(measure.options)
  if analysis.num_permutations:
    tested = similarity.permutation_test(layers, None, measure.name,
                                         num_permutations=analysis.num_permutations,
                                         seed=analysis.calibration_seed, **options)
    joint = {"values": tested.values, "p_value": tested.p_value, "null_mean": tested.null_mean}
  else:
    joint = {"values": similarity.heatmap(layers, None, measure.name, **options)}
  counts = {"num_examples": num_examples, "num_minibatches": None,
            "num_examples_per_pass": num_examples}
  estimator_text = f"{measure.name} over all examples at once ({measure.reference})"
  return _finish(study, measure, joint, extractors, counts, estimator_text, None)


def _finish(study: runner.Study, measure: similarity.Measure, joint: dict[str, np.ndarray],
            extractors: dict[str, features.FeatureExtractor], counts: dict,
            estimator_text: str, examples_per_second: float | None) -> runner.StudyResult:
  """Splits the joint `[L, L]` arrays into their within/cross blocks; writes arrays, metadata,
  figure."""
  config = study.config
  analysis = config.analysis
  sizes = {k: len(e.names) for k, e in extractors.items()}
  keys = list(sizes)
  offsets = dict(zip(keys, np.cumsum([0] + [sizes[k] for k in keys[:-1]])))
  arrays, panels = {}, []
  blocks = [(k, k) for k in keys] + [(row, col) for i, row in enumerate(keys)
                                     for col in keys[i + 1:]]
  for row, col in blocks:
    rows = slice(offsets[row], offsets[row] + sizes[row])
    cols = slice(offsets[col], offsets[col] + sizes[col])
    for field, values in joint.items():
      prefix = measure.name if field == "values" else field
      arrays[f"{prefix}_{row}{col}"] = values[rows, cols]
    spec_row, spec_col = config[f"model_{row}"], config[f"model_{col}"]
    marked = (joint["p_value"][rows, cols] >= analysis.alpha) if "p_value" in joint else None
    panels.append(plotting.HeatmapPanel(
        values=joint["values"][rows, cols], row_names=extractors[row].names,
        column_names=extractors[col].names, row_label=f"Layers {spec_row.name}",
        column_label=f"Layers {spec_col.name}",
        title=spec_row.name if row == col else f"{spec_row.name} vs {spec_col.name}",
        marked=marked))
  for key, extractor in extractors.items():
    arrays[f"names_{key}"] = np.asarray(extractor.names, dtype=str)
  calibration = {}
  if "p_value" in joint:
    calibration["permutations"] = analysis.num_permutations
    calibration["marked"] = f"p >= {analysis.alpha}: not above chance"
  if "ci_low" in joint:
    calibration["bootstrap"] = (f"{analysis.num_bootstrap} Poisson-bootstrap replicates over "
                                f"minibatches, {analysis.confidence:.0%} percentile intervals")
  metadata = {
      "models": {k: loading.describe(config[f"model_{k}"]) for k in extractors},
      "measure": {"name": measure.name, "kind": measure.kind, "options": dict(measure.options),
                  "reference": measure.reference, "streaming": measure.streaming},
      "num_examples_per_pass": counts["num_examples_per_pass"],
      "num_examples_accumulated": counts["num_examples"],
      "num_minibatches": counts["num_minibatches"],
      "estimator": estimator_text,
      "calibration": calibration,
      "token_mode": analysis.token_mode,
      "examples_per_second": examples_per_second,
  }
  summary = {"measure": measure.name, "num_examples": counts["num_examples"],
             "num_minibatches": counts["num_minibatches"], "layers": sizes,
             "examples_per_second": examples_per_second}
  low, high = _COLOUR_RANGE.get(measure.name, (0.0, 1.0 if measure.kind == "similarity"
                                               else None))
  if high is None:
    high = float(np.nanmax(joint["values"])) if np.isfinite(joint["values"]).any() else 1.0

  def draw(path: str):
    return plotting.plot_heatmaps(panels, path, vmin=low, vmax=high,
                                  colorbar_label=measure.name.replace("_", " "))
  return study.finish("cka_heatmap", arrays, metadata, summary, figures={"cka_heatmap": draw})
