"""Study 3, skip connections: norm ratios and training without skips (paper Figs 7-8).

Raghu et al., "Do Vision Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021,
Section 6) show that ViT's skip connections carry much more of the representation than
ResNet's, with a phase transition from CLS-token- to spatial-token-dominated propagation in the
middle of the network (Fig 7), and that removing the skip connection of one block breaks the
uniform CKA structure of the model around that block and costs accuracy (Fig 8).

(a) Norm ratios: for each model of `config.norm_ratio.models` (model specs, e.g. public
    checkpoints) and each trained model named in `config.norm_ratio.trained`, one pass over
    `config.data`, accumulating ||z|| / ||f(z)|| of every residual sub-layer the model lists
    (its `residual_sublayers()`; `vit_repr.residual.NormRatio`, definitions there) in one
    jitted step per batch (forward pass and accumulation fused, batch sharded over the mesh).
    Writes `norm_ratios.{npz,json}` (per model: `<key>/ratio_of_means`, its standard error
    `<key>/ratio_of_means_stderr`, `<key>/mean_of_ratios`, `<key>/norm_stream`, `<key>/norm_branch` and `<key>/num_tokens`
    `[L, 3]` with columns `residual.GROUPS` (cls, spatial, register: the CLS and distillation
    tokens, the patch tokens, the register tokens, from the model's `token_layout().prefix`;
    NaN for a group the model lacks), `<key>/names`, `<key>/blocks`,
    `<key>/identity_shortcut`) and `figures/norm_ratios` (the register curve only for models
    with registers).
(b) Ablation: trains (or reuses) `config.ablation.reference` and every model of
    `config.ablation.models` with `training.run` into `<models_dir>/<name>`, then runs Study 1
    (`vit_repr.studies.representation.run`) once per ablated model with model A = the ablated
    model and model B = the reference into `<workdir>/ablation/<name>`, which gives the heatmap
    of the ablated model against itself (`cka_aa`) and against the reference (`cka_ab`) from
    one accumulator. Writes `skip_ablation.{npz,json}` (per ablated model `<name>/cka_self`,
    `<name>/cka_vs_reference`, the reference's own heatmap, test accuracies, removed blocks)
    and the figures `skip_ablation_self` (the paper's row of heatmaps, one per ablated block,
    accuracy in the titles) and `skip_ablation_vs_reference`.

Training runs, the norm-ratio passes (`<workdir>/norm_ratio_state_<key>.npz`) and Study 1's CKA
runs resume after a preemption.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_repr import files, models, plotting, residual, training
from vit_repr.models import layout
from vit_repr.studies import loading, representation, runner


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, before anything is trained, for names or settings that cannot work."""
  ablation = config.ablation
  names = list(config.norm_ratio.trained)
  if ablation.reference:
    names += [ablation.reference, *ablation.models]
  missing = [n for n in names if n not in config.models]
  if missing:
    raise ValueError(f"Models {missing} are not in config.models ({sorted(config.models)}); "
                     "add their configs/train.py configs there.")
  if ablation.reference and not ablation.models:
    raise ValueError("config.ablation.reference is set but config.ablation.models is empty; "
                     "name the ablated models (configs/train.py 'vit_noskip,block=i').")
  for name in ablation.models if ablation.reference else ():
    if not config.models[name].model.overrides.get("remove_skips"):
      raise ValueError(f"Ablated model {name!r} removes no skip connection: set "
                       f"config.models.{name}.model.overrides.remove_skips.")
  if config.norm_ratio.statistic not in residual.STATISTICS:
    raise ValueError(f"norm_ratio.statistic must be one of {residual.STATISTICS}; got "
                     f"{config.norm_ratio.statistic!r}.")
  if not (config.norm_ratio.models or config.norm_ratio.trained or ablation.reference):
    raise ValueError("Nothing to do: set config.norm_ratio.models / .trained and/or "
                     "config.ablation.reference and .models.")


def _trained(config: ml_collections.ConfigDict, name: str, models_dir: str
             ) -> tuple[training.TrainResult, str]:
  run_dir = files.join(models_dir, name)
  logging.info("Training %s into %s, or reusing it.", name, run_dir)
  return training.run(config.models[name], run_dir), run_dir


def _norm_ratio_specs(config: ml_collections.ConfigDict, models_dir: str
                      ) -> dict[str, ml_collections.ConfigDict]:
  specs = dict(config.norm_ratio.models.items())
  for name in config.norm_ratio.trained:
    _, run_dir = _trained(config, name, models_dir)
    specs[name] = loading.trained_spec(config.models[name], run_dir)
  return specs


def norm_ratios(spec: ml_collections.ConfigDict, study: runner.Study, state_file: str
                ) -> tuple[residual.NormRatioResult | runner.Interrupted,
                           tuple[models.SubLayer, ...]]:
  """Norm ratios of every residual sub-layer of one model over `config.data`, resumably.

  Args:
    spec: the model spec (`vit_repr.studies.loading`).
    study: the study (its config's `data`, `norm_ratio`, `checkpoint_every`, ...).
    state_file: where the running sums are saved (and resumed from) in the work directory.

  Returns:
    (the accumulated `NormRatioResult`, or `Interrupted`; the model's sub-layers in
    computation order, the order of the result's rows).
  """
  model, params = study.model(spec)
  layers = model.residual_sublayers()
  tokens = model.token_layout()

  def streams_and_branches(params, images):
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    return models.streams_and_branches(layers, models.flatten_intermediates(state))

  estimator = residual.NormRatio(study.mesh)

  def accumulate(state, params, images):
    # One jitted step: the intermediates that are not z or f(z) are never materialised.
    return estimator.update(state, *streams_and_branches(params, images))

  step = jax.jit(accumulate, donate_argnums=0)
  batch_size = study.config.norm_ratio.global_batch_size
  images = jax.ShapeDtypeStruct((batch_size, study.image_size, study.image_size, 3),
                                jnp.float32)
  streams, _ = jax.eval_shape(streams_and_branches, params, images)
  # eval_shape returns the dict with sorted keys: the state's rows follow the model's order.
  state = estimator.init({layer.name: streams[layer.name] for layer in layers},
                         prefix=layout.prefix_kinds(tokens))
  state, progress = study.accumulate(
      state, lambda state, batch: step(state, params, batch["image"]),
      study.passes(global_batch_size=batch_size), state_file=state_file,
      what=f"{spec.name} norm ratios")
  return (estimator.result(state) if progress.complete else runner.Interrupted(progress)), layers


def _run_norm_ratios(study: runner.Study, models_dir: str) -> runner.Outcome:
  config = study.config
  specs = _norm_ratio_specs(config, models_dir)
  statistic = config.norm_ratio.statistic
  arrays, panels, summary, described = {}, [], {}, {}
  for key, spec in specs.items():
    result, layers = norm_ratios(spec, study, f"norm_ratio_state_{key}.npz")
    if isinstance(result, runner.Interrupted):
      return result
    for field in ("ratio_of_means", "ratio_of_means_stderr", "mean_of_ratios", "norm_stream",
                  "norm_branch", "num_tokens"):
      arrays[f"{key}/{field}"] = getattr(result, field)
    arrays[f"{key}/names"] = np.asarray(result.names, dtype=str)
    arrays[f"{key}/blocks"] = np.asarray([layer.block for layer in layers])
    arrays[f"{key}/identity_shortcut"] = np.asarray(
        [layer.identity_shortcut for layer in layers])
    values = getattr(result, statistic)
    panels.append(plotting.NormRatioPanel(
        names=result.names, cls=values[:, 0], spatial=values[:, 1], register=values[:, 2],
        identity_shortcut=arrays[f"{key}/identity_shortcut"], title=f"{key} ({spec.name})"))
    with np.errstate(all="ignore"):
      summary[key] = {group: round(float(np.nanmean(values[:, g])), 3)
                      for g, group in enumerate(residual.GROUPS)
                      if not np.all(np.isnan(values[:, g]))}
    described[key] = loading.describe(spec)
    logging.info("%s: mean %s per group %s over %d sub-layers.", key, statistic, summary[key],
                 len(layers))
  metadata = {
      "models": described,
      "dataset": config.data.to_dict(),
      "num_examples": result.num_examples,
      "groups": list(residual.GROUPS),
      "statistic": statistic,
      "definition": "per example e and token t: n_z = ||z[e,t,:]||_2, n_f = ||f(z)[e,t,:]||_2 "
                    "(L2 over width); ratio_of_means = mean_{e,t} n_z / mean_{e,t} n_f; "
                    "mean_of_ratios = mean_{e,t} n_z / n_f; groups: 'cls' the CLS (and "
                    "distillation) token, 'spatial' the patch tokens / every feature-map "
                    "location, 'register' the register tokens; NaN for a group a model lacks",
      "sublayers": "ViT: attn (z = block in, f = attn_branch), mlp (z = mid, f = mlp_branch); "
                   "Mixer: token_mixing, channel_mixing likewise; ResNet unit: f = branch, z = "
                   "the unit input if the shortcut is the identity, else the projected "
                   "shortcut out - branch (identity_shortcut False); blocks without skips "
                   "(remove_skips) left out",
  }
  return study.finish("norm_ratios", arrays, metadata, {f"mean_{statistic}": summary}, figures={
      "norm_ratios": lambda path: plotting.plot_norm_ratios(
          panels, path, ylabel=f"||z|| / ||f(z)|| ({statistic})")})


def _run_ablation(study: runner.Study, models_dir: str) -> runner.Outcome:
  config, ablation = study.config, study.config.ablation
  reference, reference_dir = _trained(config, ablation.reference, models_dir)
  accuracies = {ablation.reference: float(reference.final_eval.get("accuracy", np.nan))}
  reference_spec = loading.trained_spec(config.models[ablation.reference], reference_dir,
                                        ablation.layers)
  arrays, self_panels, cross_panels, removed = {}, [], [], {}
  for name in ablation.models:
    blocks = tuple(int(b) for b in config.models[name].model.overrides.remove_skips)
    trained, run_dir = _trained(config, name, models_dir)
    accuracies[name] = float(trained.final_eval.get("accuracy", np.nan))
    removed[name] = blocks
    cka_config = ml_collections.ConfigDict(ablation.cka.to_dict())
    cka_config.model_a = loading.trained_spec(config.models[name], run_dir, ablation.layers)
    cka_config.model_b = reference_spec
    cka = representation.run(cka_config, study.path("ablation", name))
    if not cka.complete:
      return cka
    heatmaps = cka.arrays
    arrays[f"{name}/cka_self"] = heatmaps["cka_aa"]
    arrays[f"{name}/cka_vs_reference"] = heatmaps["cka_ab"]
    arrays[f"{name}/stderr_self"] = heatmaps["stderr_aa"]
    arrays[f"{name}/stderr_vs_reference"] = heatmaps["stderr_ab"]
    arrays["reference/cka_self"] = heatmaps["cka_bb"]
    arrays["names"] = heatmaps["names_a"]
    names = list(heatmaps["names_a"])
    title = f"no skip, block {', '.join(map(str, blocks))} ({100 * accuracies[name]:.1f}%)"
    self_panels.append(plotting.HeatmapPanel(heatmaps["cka_aa"], names, names, "Layers",
                                             "Layers", title))
    cross_panels.append(plotting.HeatmapPanel(
        heatmaps["cka_ab"], names, list(heatmaps["names_b"]), f"Layers {name}",
        f"Layers {ablation.reference}", title))
  reference_title = f"{ablation.reference} ({100 * accuracies[ablation.reference]:.1f}%)"
  reference_names = list(arrays["names"])
  self_panels.insert(0, plotting.HeatmapPanel(arrays["reference/cka_self"], reference_names,
                                              reference_names, "Layers", "Layers",
                                              reference_title))
  arrays["accuracy"] = np.asarray([accuracies[n] for n in accuracies])
  arrays["accuracy_models"] = np.asarray(list(accuracies), dtype=str)
  metadata = {
      "reference": {"name": ablation.reference, **loading.describe(reference_spec)},
      "removed_blocks": removed,
      "test_accuracy": accuracies,
      "cka": "Study 1 (vit_repr.studies.representation) with model A = the ablated model and "
             "model B = the reference; per-model outputs in ablation/<name>/cka_heatmap.*",
  }
  mean_diagonal = {n: round(float(np.mean(np.diag(arrays[f"{n}/cka_vs_reference"]))), 3)
                   for n in ablation.models}
  summary = {"test_accuracy": {k: round(v, 4) for k, v in accuracies.items()},
             "mean_diagonal_cka_vs_reference": mean_diagonal}
  return study.finish("skip_ablation", arrays, metadata, summary, figures={
      "skip_ablation_self": lambda path: plotting.plot_heatmaps(self_panels, path),
      "skip_ablation_vs_reference": lambda path: plotting.plot_heatmaps(cross_panels, path)})


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Runs the norm ratios and the skip-removal ablation of `config` into `workdir`.

  Args:
    config: a `configs/skip_connections.py` config.
    workdir: output directory.

  Returns:
    The result, with parts 'norm_ratios' and/or 'ablation'; summary: mean norm ratio per model
    and group; test accuracies and the mean diagonal CKA of each ablated model against the
    reference.
  """
  _check_config(config)
  study = runner.Study(config, workdir)
  models_dir = config.models_dir or study.path("models")
  parts = {}
  if config.norm_ratio.models or config.norm_ratio.trained:
    parts["norm_ratios"] = _run_norm_ratios(study, models_dir)
    if not parts["norm_ratios"].complete:
      return parts["norm_ratios"]
  if config.ablation.reference:
    parts["ablation"] = _run_ablation(study, models_dir)
    if not parts["ablation"].complete:
      return parts["ablation"]
  return runner.StudyResult(summary={k: part.summary for k, part in parts.items()},
                            parts=parts)
