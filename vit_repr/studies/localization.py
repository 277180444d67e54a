"""Study 7, spatial localization: token-vs-input-patch CKA maps (paper Figures 9-10).

For every model of `config.models` (ViT with a CLS head, ViT with a GAP head, ResNet, ...)
and every chosen layer, streams the data once per pass and accumulates the minibatch CKA
between the token at each grid position and the raw input patch at every grid position
(`vit_repr.localization.LocalizationCKA`; ResNet feature-map locations against the patches of
the image split into the feature map's grid). Each device's shard of a global batch is one
minibatch of `analysis.minibatch_size` examples; pass 0 reads the examples in canonical
order, pass p > 0 in an order shuffled by `analysis.shuffle_seed + p`, as the CKA heatmaps.

Preemption: all accumulators are saved atomically every `checkpoint_every` batches to
`<workdir>/localization_state.npz` with a fingerprint of the config; a rerun with the same
config resumes there and ends with the same numbers. A state from another config is refused.

Outputs in the workdir: `localization.{npz,json}` (`layers/<model>` the model's layers in
computation order, `maps/<model>/<layer>` `[g, g, g, g]` CKA of
the token at (q_row, q_col) with the patch at (p_row, p_col), `stderr/<model>/<layer>`,
`own_patch/<model>/<layer>` `[g, g]` each token's CKA with its own patch and
`own_patch_stderr/<model>/<layer>` its standard error; metadata with the
config, models, grids, example counts and per-layer summaries) and
`figures/localization.{png,pdf}` (one row per model and layer, one column per position).
"""

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vit_repr import localization, plotting
from vit_repr.models import display_name, layout
from vit_repr.studies import loading, runner

STATE_FILE = "localization_state.npz"


def _resolve_positions(positions: Any, grid: int) -> list[tuple[int, int]]:
  return [localization.position_index(p, grid) for p in positions]


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Computes the token-vs-patch CKA maps of every model and layer of `config` into `workdir`.

  Args:
    config: a `configs/localization.py` config (models, data, analysis).
    workdir: output directory (also holds the resumable accumulator state).

  Returns:
    The result; summary: example count, minibatches, and per model and layer the mean CKA of a
    token with its own patch and the fraction of tokens whose most similar patch is their own.

  Raises:
    ValueError: no models, a model without layers, a layer without spatial positions, an
      unknown position, or a saved state from another config.
  """
  if not config.models:
    raise ValueError("config.models is empty; add at least one model spec (see "
                     "configs/localization.py).")
  study = runner.Study(config, workdir)
  analysis = config.analysis
  names = sorted(config.models.keys())

  extractors, params, accumulators = {}, {}, {}
  for name in names:
    spec = config.models[name]
    if not spec.layers:
      raise ValueError(f"Model {name!r} selects no layers; set models.{name}.layers to block "
                       "outputs, e.g. ('Transformer/encoderblock_11/out',) or ('block4/out',).")
    extractors[name], params[name] = study.extractor(spec)
    tokens = extractors[name].token_layout
    accumulators[name] = localization.LocalizationCKA(
        extractors[name].shapes, image_size=study.image_size,
        num_prefix_tokens=layout.num_prefix_tokens(tokens), token_grid=layout.token_grid(tokens),
        mesh=study.mesh, grams=analysis.grams, gram_blocks=analysis.gram_blocks)
    for grid in set(accumulators[name].grids.values()):
      _resolve_positions(analysis.positions, grid)  # Fails early on a bad position.
    logging.info("Model %s (%s): layers %s.", name, spec.name, accumulators[name].grids)

  def update(states: dict[str, Any], batch: dict) -> dict[str, Any]:
    return {n: accumulators[n].update(states[n], extractors[n](params[n], batch["image"]),
                                      batch["image"], batch["valid"]) for n in names}

  states, progress = study.accumulate(
      {n: accumulators[n].init() for n in names}, update,
      study.passes(minibatch_size=analysis.minibatch_size, shuffle_seed=analysis.shuffle_seed),
      state_file=STATE_FILE, what="Localization", num_passes=analysis.num_passes)
  if not progress.complete:
    return runner.Interrupted(progress)
  found = {n: accumulators[n].result(states[n]) for n in names}
  return _finish(study, found, progress.examples_per_second)


def _layer_summary(maps: np.ndarray) -> dict[str, float]:
  """Mean CKA with the own patch and with the other patches; fraction peaking at their own."""
  own = localization.own_patch_similarity(maps)
  g = maps.shape[0]
  flat = maps.reshape(g * g, g * g)
  others = flat[~np.eye(g * g, dtype=bool)]
  return {"own_patch_cka": round(float(np.nanmean(own)), 4),
          "other_patch_cka": round(float(np.nanmean(others)), 4) if others.size else None,
          "peak_at_own_patch": round(float(localization.peaks_at_own_patch(maps).mean()), 4)}


def _finish(study: runner.Study, found: dict[str, localization.LocalizationResult],
            examples_per_second: float | None) -> runner.StudyResult:
  """Writes the maps, metadata and figure."""
  config = study.config
  arrays, summaries, rows = {}, {}, []
  positions = config.analysis.positions
  for name, res in found.items():
    summaries[name] = {}
    arrays[f"layers/{name}"] = np.asarray(list(res.maps), dtype=str)
    for layer, maps in res.maps.items():
      arrays[f"maps/{name}/{layer}"] = maps
      arrays[f"stderr/{name}/{layer}"] = res.stderr[layer]
      arrays[f"own_patch/{name}/{layer}"] = localization.own_patch_similarity(maps)
      arrays[f"own_patch_stderr/{name}/{layer}"] = localization.own_patch_similarity(
          res.stderr[layer])
      summaries[name][layer] = {"grid": res.grids[layer], **_layer_summary(maps)}
      rows.append(plotting.LocalizationRow(
          label=f"{name}\n{display_name(layer)}", maps=maps,
          positions=_resolve_positions(positions, res.grids[layer])))
  first = next(iter(found.values()))
  metadata = {
      "models": {n: loading.describe(config.models[n]) for n in found},
      "layers": summaries,
      "num_examples_per_pass": first.num_examples // config.analysis.num_passes,
      "num_examples_accumulated": first.num_examples,
      "num_minibatches": first.num_batches,
      "estimator": "minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021), between the "
                   "token (feature-map location) at grid position q and the raw input patch at "
                   "p; delta-method standard errors over minibatches",
      "tokens": "spatial tokens row-major, prefix (CLS) tokens dropped; ResNet locations of "
                "an h x h map against the image split into h x h patches",
      "patches": "raw model-input pixels in [-1, 1], each patch flattened (row, column, "
                 "channel)",
      "examples_per_second": examples_per_second,
  }
  summary = {"num_examples": first.num_examples, "num_minibatches": first.num_batches,
             "layers": {n: {display_name(l): {k: v for k, v in s.items()
                                              if k != "other_patch_cka"}
                            for l, s in layer_summaries.items()}
                        for n, layer_summaries in summaries.items()},
             "examples_per_second": examples_per_second}
  return study.finish("localization", arrays, metadata, summary, figures={
      "localization": lambda path: plotting.plot_localization(
          rows, path, column_titles=[str(p) for p in positions])})
