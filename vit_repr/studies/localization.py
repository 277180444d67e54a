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
`own_patch/<model>/<layer>` `[g, g]` each token's CKA with its own patch; metadata with the
config, models, grids, example counts and per-layer summaries) and
`figures/localization.{png,pdf}` (one row per model and layer, one column per position).
"""

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from vit_repr import data, features, files, localization, parallel, plotting, results
from vit_repr.models import display_name, layout
from vit_repr.studies import loading, resume

STATE_FILE = "localization_state.npz"


def _resolve_positions(positions: Any, grid: int) -> list[tuple[int, int]]:
  return [localization.position_index(p, grid) for p in positions]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Computes the token-vs-patch CKA maps of every model and layer of `config` into `workdir`.

  Args:
    config: a `configs/localization.py` config (models, data, analysis).
    workdir: output directory (also holds the resumable accumulator state).

  Returns:
    Headline numbers: example count, minibatches, and per model and layer the mean CKA of a
    token with its own patch and the fraction of tokens whose most similar patch is their own.

  Raises:
    ValueError: no models, a model without layers, a layer without spatial positions, an
      unknown position, or a saved state from another config.
  """
  files.makedirs(workdir)
  if not config.models:
    raise ValueError("config.models is empty; add at least one model spec (see "
                     "configs/localization.py).")
  mesh = parallel.make_mesh()
  cfg_data, analysis = config.data, config.analysis
  info = data.dataset_info(cfg_data.name, cfg_data.data_dir)
  names = sorted(config.models.keys())

  extractors, params, accumulators = {}, {}, {}
  for name in names:
    spec = config.models[name]
    if not spec.layers:
      raise ValueError(f"Model {name!r} selects no layers; set models.{name}.layers to block "
                       "outputs, e.g. ('Transformer/encoderblock_11/out',) or ('block4/out',).")
    model, params[name] = loading.load_model(spec, image_size=cfg_data.image_size,
                                             num_classes=info.num_classes, mesh=mesh)
    extractors[name] = features.FeatureExtractor(model, list(spec.layers),
                                                 image_size=cfg_data.image_size)
    tokens = model.token_layout()
    accumulators[name] = localization.LocalizationCKA(
        extractors[name].shapes, image_size=cfg_data.image_size,
        num_prefix_tokens=layout.num_prefix_tokens(tokens), token_grid=layout.token_grid(tokens),
        mesh=mesh, grams=analysis.grams,
        gram_blocks=analysis.gram_blocks)
    for grid in set(accumulators[name].grids.values()):
      _resolve_positions(analysis.positions, grid)  # Fails early on a bad position.
    logging.info("Model %s (%s): layers %s.", name, spec.name, accumulators[name].grids)

  pass_batches = resume.pass_reader(cfg_data, minibatch_size=analysis.minibatch_size,
                                    mesh=mesh, shuffle_seed=analysis.shuffle_seed)

  def update(states: dict[str, Any], batch: dict) -> dict[str, Any]:
    return {n: accumulators[n].update(states[n], extractors[n](params[n], batch["image"]),
                                      batch["image"], batch["valid"]) for n in names}

  states, progress = resume.accumulate(
      {n: accumulators[n].init() for n in names}, update, pass_batches, config=config,
      state_path=files.join(workdir, STATE_FILE), what="Localization",
      num_passes=analysis.num_passes)
  if not progress.complete:
    return progress.summary()
  found = {n: accumulators[n].result(states[n]) for n in names}
  return _write(config, workdir, found, progress.examples_per_second)


def _layer_summary(maps: np.ndarray) -> dict[str, float]:
  """Mean CKA with the own patch and with the other patches; fraction peaking at their own."""
  own = localization.own_patch_similarity(maps)
  g = maps.shape[0]
  flat = maps.reshape(g * g, g * g)
  others = flat[~np.eye(g * g, dtype=bool)]
  return {"own_patch_cka": round(float(np.nanmean(own)), 4),
          "other_patch_cka": round(float(np.nanmean(others)), 4) if others.size else None,
          "peak_at_own_patch": round(float(localization.peaks_at_own_patch(maps).mean()), 4)}


def _write(config: ml_collections.ConfigDict, workdir: str,
           found: dict[str, localization.LocalizationResult],
           examples_per_second: float | None) -> dict[str, Any]:
  """Writes the maps, metadata and figure; returns the headline numbers."""
  arrays, summaries, rows = {}, {}, []
  positions = config.analysis.positions
  for name, res in found.items():
    summaries[name] = {}
    arrays[f"layers/{name}"] = np.asarray(list(res.maps), dtype=str)
    for layer, maps in res.maps.items():
      arrays[f"maps/{name}/{layer}"] = maps
      arrays[f"stderr/{name}/{layer}"] = res.stderr[layer]
      arrays[f"own_patch/{name}/{layer}"] = localization.own_patch_similarity(maps)
      summaries[name][layer] = {"grid": res.grids[layer], **_layer_summary(maps)}
      rows.append(plotting.LocalizationRow(
          label=f"{name}\n{display_name(layer)}", maps=maps,
          positions=_resolve_positions(positions, res.grids[layer])))
  first = next(iter(found.values()))
  metadata = {
      "config": config.to_dict(),
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
  results.write_results(workdir, "localization", arrays, metadata)
  plotting.plot_localization(rows, files.join(workdir, "figures", "localization"),
                             column_titles=[str(p) for p in positions])
  return {"num_examples": first.num_examples, "num_minibatches": first.num_batches,
          "layers": {n: {display_name(l): {k: v for k, v in s.items()
                                                        if k != "other_patch_cka"}
                         for l, s in layer_summaries.items()}
                     for n, layer_summaries in summaries.items()},
          "examples_per_second": examples_per_second}
