"""Pretraining data scale: layer-wise CKA to the full-data model and probe curves (Figs 12-13).

Raghu et al. (NeurIPS 2021, Section 6) train the same architecture on nested subsets of the
pretraining data and ask which layers form "the same" representation as with all the data
(CKA of each layer against the same layer of the full-data model, Fig 12) and how linearly
decodable each layer is (per-layer linear probes, Fig 13, also comparing public checkpoints
pre-trained on ImageNet-1k against ImageNet-21k).

Steps:
1. every model of `config.models` (name -> `configs/train.py` config; the subset ones with
   `data.subset_fraction` < 1, the nested subsets of `vit_repr.data.subset_indices`) is trained,
   or reused when finished, by `vit_repr.training.run` in `<models_dir>/<name>`;
2. (a) for every model but the reference (`config.reference`, the full-data model), Study 1
   (`vit_repr.studies.representation.run`) computes minibatch CKA between its layers (model A)
   and the reference's (model B) into `<workdir>/cka/<name>`; the diagonal of the cross
   heatmap is the per-layer CKA to the full-data model (no new CKA code);
3. (b) the linear-probe study (`vit_repr.studies.linear_probes.run`) probes every trained model
   and the public checkpoints of `config.probes.specs` into `<workdir>/probes`.

Outputs in the workdir: `data_scale.{npz,json}` with 'models' (trained names, by fraction),
'fractions', 'layers', 'cka_to_reference' `[models, layers]` (NaN for the reference itself:
1 by definition), 'cka_stderr', the reference's layer names, and the probe curves
'probe/<section>/<mode>/<model>' `[layers]` (section 'fewshot' at the largest shot count, mean
over seeds, or 'linear') with each model's layer names 'probe/layers/<model>', and per seed
'probe/fewshot_seeds/<mode>/<model>' `[layers, seeds]` (metadata 'probe_test_examples': the
examples each probe is tested on);
`figures/data_scale.{png,pdf}` (left: Fig 12, CKA per layer to the full-data model, one curve
per fraction; right: Fig 13, probe accuracy per layer, one curve per model).
"""

import copy

import ml_collections
import numpy as np
from absl import logging

from vit_repr import files, plotting, training
from vit_repr.studies import linear_probes, loading, representation, runner


def _label(name: str, fraction: float) -> str:
  return f"{name} ({100 * fraction:g}% data)"


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Trains (or reuses) the subset models, then CKA to the full-data model and probes.

  Args:
    config: a `configs/data_scale.py` config (models, reference, models_dir, layers, cka,
      probes).
    workdir: output directory.

  Returns:
    The result; summary: per model its fraction, test accuracy, mean CKA to the reference over
    layers and the CKA of its first and last layers, and the probe study's summary.

  Raises:
    ValueError: the reference is not one of the models, or is not trained on all the data.
  """
  files.makedirs(workdir)
  if config.reference not in config.models:
    raise ValueError(f"config.reference={config.reference!r} is not among config.models "
                     f"({list(config.models)}); name the full-data model.")
  reference_config = config.models[config.reference]
  if reference_config.data.subset_fraction != 1.0:
    raise ValueError(f"The reference {config.reference!r} is trained on subset_fraction="
                     f"{reference_config.data.subset_fraction}; the reference must use all the "
                     "data (1.0).")
  models_dir = config.models_dir or files.join(workdir, "models")
  fractions = {name: float(tc.data.subset_fraction) for name, tc in config.models.items()}
  order = sorted(config.models, key=lambda n: (fractions[n], n))
  specs, accuracies = {}, {}
  for name in order:
    train_config = config.models[name]
    logging.info("Model %s (fraction %g): training or reusing.", name, fractions[name])
    result = training.run(train_config, files.join(models_dir, name))
    accuracies[name] = float(result.final_eval.get("accuracy", float("nan")))
    specs[name] = loading.trained_spec(train_config, files.join(models_dir, name),
                                       tuple(config.layers))

  cka_rows, stderr_rows, layer_names = [], [], None
  for name in order:
    if name == config.reference:
      continue
    study = copy.deepcopy(config.cka)
    study.model_a, study.model_b = specs[name], specs[config.reference]
    heatmaps = representation.run(study, files.join(workdir, "cka", name))
    if not heatmaps.complete:
      return heatmaps
    arrays = heatmaps.arrays
    cka_rows.append(np.diag(arrays["cka_ab"]))
    stderr_rows.append(np.diag(arrays["stderr_ab"]))
    layer_names = [str(n) for n in arrays["names_b"]]
  trained = [n for n in order if n != config.reference]
  cka = np.stack(cka_rows) if cka_rows else np.zeros((0, 0))

  probe_config = copy.deepcopy(config.probes)
  public = probe_config.specs.to_dict()
  probe_config.specs = ml_collections.ConfigDict(
      {**{n: specs[n] for n in order}, **public})
  probed = linear_probes.run(probe_config, files.join(workdir, "probes"))
  if not probed.complete:
    return probed
  probe_arrays, probe_meta = probed.arrays, probed.metadata

  arrays = {"models": np.asarray(order, dtype=str),
            "fractions": np.asarray([fractions[n] for n in order]),
            "test_accuracy": np.asarray([accuracies[n] for n in order]),
            "cka_models": np.asarray(trained, dtype=str),
            "cka_to_reference": cka, "cka_stderr": np.stack(stderr_rows) if stderr_rows
            else np.zeros((0, 0)),
            "layers": np.asarray(layer_names or [], dtype=str)}
  sections = ["fewshot"] + (["linear"] if config.probes.linear.enabled else [])
  for key, meta in probe_meta["models"].items():
    arrays[f"probe/layers/{key}"] = probe_arrays[f"{key}/layers"]
    for mode in meta["kinds"]:
      if mode == linear_probes.TOKEN:
        continue
      for section in sections:
        values = probe_arrays[f"{key}/{section}/{mode}"]
        arrays[f"probe/{section}/{mode}/{key}"] = (values[:, -1].mean(-1) if section == "fewshot"
                                                   else values)
      arrays[f"probe/fewshot_seeds/{mode}/{key}"] = probe_arrays[f"{key}/fewshot/{mode}"][:, -1]
  metadata = {
      "reference": config.reference,
      "models": {n: {**loading.describe(specs[n]), "subset_fraction": fractions[n],
                     "train_steps": config.models[n].train.total_steps,
                     "test_accuracy": accuracies[n]} for n in order},
      "public_models": {k: loading.describe(config.probes.specs[k]) for k in public},
      "cka": "Study 1 (minibatch linear CKA, unbiased HSIC) between each subset model and the "
             "reference; per-layer values are the diagonal of the cross heatmap",
      "probes": probe_meta["fewshot"],
      "probe_test_examples": next(iter(probe_meta["models"].values()))["num_test_examples"],
      "models_dir": files.absolute(models_dir),
  }
  summary = {n: {"fraction": fractions[n], "test_accuracy": round(accuracies[n], 4)}
             for n in order}
  for name, row in zip(trained, cka):
    summary[name].update(mean_cka_to_reference=round(float(np.nanmean(row)), 4),
                         cka_first_layer=round(float(row[0]), 4),
                         cka_last_layer=round(float(row[-1]), 4))
  return runner.finish(config, workdir, "data_scale", arrays, metadata,
                       {"models": summary, "probes": probed.summary},
                       figures={"data_scale": _figure(config, arrays, order, fractions,
                                                      probe_meta)})


def _figure(config: ml_collections.ConfigDict, arrays: dict[str, np.ndarray], order: list[str],
            fractions: dict[str, float], probe_meta: dict) -> runner.Draw:
  """Fig 12 (CKA to the full-data model per layer) beside Fig 13 (probe accuracy per layer)."""
  labels = {n: _label(n, fractions[n]) for n in order}
  layer_names = list(arrays["layers"])
  # Every panel lists the models in the same order (by fraction, then the public ones), so a
  # model has the same colour everywhere; the reference's CKA to itself is 1 by definition.
  cka_rows = dict(zip(arrays["cka_models"], arrays["cka_to_reference"]))
  cka_rows[config.reference] = np.ones(len(layer_names))
  panels = [plotting.CurvePanel(
      curves={labels[n]: cka_rows[n] for n in order},
      layer_names={labels[n]: layer_names for n in order},
      title=f"CKA to {config.reference} (same layer)", ylabel="CKA")]
  chance = probe_meta["chance_accuracy"]
  shots = config.probes.probes.shots[-1]
  probed = order + [k for k in probe_meta["models"] if k not in order]
  for mode in config.probes.probes.modes:
    drawn = [k for k in probed if f"probe/fewshot/{mode}/{k}" in arrays]
    if drawn:
      panels.append(plotting.CurvePanel(
          curves={labels.get(k, k): arrays[f"probe/fewshot/{mode}/{k}"] for k in drawn},
          layer_names={labels.get(k, k): list(arrays[f"probe/layers/{k}"]) for k in drawn},
          title=f"{shots}-shot probe, {mode}", ylabel="test accuracy", chance=chance))
  return lambda path: plotting.plot_layer_curves(panels, path)
