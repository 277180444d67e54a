"""Linear probes per layer and per token position (Raghu et al. 2021, Fig 11; Figs 12-13 curves).

For every model of `config.specs`, streams the training pool (`data.train_split`, the first
`data.train_num_examples`) and the test examples (`data.test_split`) once through the model
(`features.FeatureExtractor`, batches sharded over the mesh) and keeps, for every selected layer:

  '<mode>:<layer>'  `[n, F]` for each token mode of `probes.modes`: 'cls' (the CLS token),
                    'mean' (mean over spatial tokens / locations), 'all' (every token,
                    flattened) (`features.reduce_tokens`); 'cls' is skipped, with a warning,
                    for models without a CLS token;
  'token:<layer>'   `[n, T, D]` every token position (`probes.per_token`), for one probe per
                    token (a ResNet map `[h, w, C]` is `h * w` tokens of width C); the model's
                    prefix tokens first (CLS, distillation, registers: their kinds, in order,
                    are the metadata's `prefix_tokens`), then its N patch tokens.

The token kinds come from the model's `token_layout()`: 'cls' is the CLS token wherever it sits
among the prefix tokens, and 'mean', the per-token summary and the per-token figure's spatial
curve take the patch tokens only (DINOv2's 4 registers, DeiT's distillation token and CLS left
out); a model without a CLS token (GAP, SigLIP's MAP head) has no 'cls' kind and no CLS curve.

The reduction runs inside the jitted forward pass, whose outputs are gathered (replicated over
the mesh) and copied to the host batch by batch. The feature matrices are materialised on the
host: `4 * (train + test examples) * sum of per-example feature sizes` bytes per model (logged
before streaming; e.g. ViT-B/16, 12 block outputs, 'cls' + 'mean', 50,000 + 10,000 examples:
4.4 GB; per-token features of ViT-B/16 cost 605 kB per example per layer, so keep the pool small
or the layers few for them).

Probes (`vit_repr.probes`): few-shot closed-form probes for each shot count and seed of
`probes` (big_vision's evaluator: 2 * onehot - 1 targets, ridge l2 2^10, bias as a constant
feature 100, features standardised) and, if `linear.enabled`, full softmax-regression probes
trained with Adam on the whole pool with early stopping on a held-out fraction of it.

The features extracted so far are saved every `checkpoint_every` batches to
`<workdir>/features_<model>_{pool,test}.npz`, so a killed run resumes its extraction where it
stopped (and a finished one reuses them).

Outputs in the workdir: `linear_probes.{npz,json}` with, per model m,
  '<m>/layers' names; '<m>/fewshot/<kind>' `[layers, shots, seeds]` (`[..., T]` for 'token');
  '<m>/linear/<kind>' test accuracy `[layers]` (`[layers, T]`), '<m>/linear_holdout/<kind>',
  '<m>/linear_best_step/<kind>'; per-token arrays of layers with fewer tokens than the
  longest (ResNet stages: 8x8, 4x4, ... locations) are NaN-padded on the token axis;
and `figures/linear_probes.{png,pdf}` (accuracy per layer, one curve per model, a panel per
mode; few-shot at the largest shot count, then full probes) and, with per-token probes,
`figures/linear_probes_tokens.{png,pdf}` (per model: the CLS token's probe against the mean
accuracy of the spatial tokens' probes, per layer: the paper's Fig 11 comparison; with register
tokens, their mean accuracy as a third curve). The summary's 'token' entries are the mean
accuracy of the spatial tokens' probes.
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from vit_repr import data, features, parallel, plotting, probes
from vit_repr.models import layout
from vit_repr.studies import loading, runner

TOKEN = "token"  # The per-token feature kind.


def _kinds(has_cls: bool, modes: Sequence[str], per_token: bool, name: str) -> list[str]:
  """The feature kinds probed for model `name`: its applicable modes, then 'token'."""
  unknown = [m for m in modes if m not in ("cls", "mean", "all")]
  if unknown:
    raise ValueError(f"Unknown probe modes {unknown}; use 'cls', 'mean' and/or 'all' "
                     "(per-token probes are switched on by probes.per_token).")
  kinds = []
  for mode in modes:
    if mode == "cls" and not has_cls:
      logging.warning("%s has no CLS token: mode 'cls' skipped for it.", name)
      continue
    kinds.append(mode)
  return kinds + ([TOKEN] if per_token else [])


def _spatial_tokens(per_token: np.ndarray, prefix: Sequence[str]) -> np.ndarray:
  """The patch tokens' values `[..., N]` of per-token values `[..., T]` whose first tokens
  have the kinds `prefix` (CLS, distillation, registers: left out)."""
  return per_token[..., len(prefix):]


def _last_layer(values: np.ndarray, kind: str, prefix: Sequence[str]) -> float:
  """The summary number of a probe array `[layers, ...]`: the last layer's mean accuracy (over
  shot seeds; for 'token', over the spatial tokens' probes)."""
  last = values[-1]
  return round(float(np.nanmean(_spatial_tokens(last, prefix)) if kind == TOKEN
                     else np.mean(last)), 4)


def _feature_fn(extractor: features.FeatureExtractor, kinds: Sequence[str], mesh: Mesh):
  """Jitted `(params, images, labels) -> {'<kind>:<layer>': array, 'label': labels}`,
  replicated."""
  shapes = extractor.shapes

  def fn(params, images, labels):
    flat = extractor(params, images)
    out = {"label": labels}
    for name in extractor.names:
      x = flat[name].reshape(images.shape[0], *shapes[name])
      for kind in kinds:
        if kind == TOKEN:
          tokens_and_width = probes.tokens_and_width(shapes[name], name)
          out[f"{kind}:{name}"] = x.reshape(x.shape[0], *tokens_and_width)
        else:
          out[f"{kind}:{name}"] = features.reduce_tokens(
              x, kind, token_layout=extractor.token_layout, name=name)
    return out

  return jax.jit(fn, out_shardings=parallel.replicated(mesh))


class _HostFeatures:
  """Feature matrices on the host, filled batch by batch (the resumable state of `extract`).

  Attributes:
    arrays: `{'<kind>:<layer>': [n, ...], 'label': [n]}`, preallocated.
    filled: rows written so far.
    pending: the last batch's device outputs, copied to the host while the next computes.
  """

  def __init__(self, shapes: dict[str, jax.ShapeDtypeStruct], num_examples: int):
    self.arrays = {k: np.zeros((num_examples, *s.shape[1:]), np.float32 if k != "label"
                               else np.int32) for k, s in shapes.items()}
    self.filled = 0
    self.pending = None

  def flush(self) -> None:
    """Copies the pending batch into the next rows."""
    if self.pending is not None:
      batch = jax.device_get(self.pending)
      size = len(batch["label"])
      for key, value in batch.items():
        self.arrays[key][self.filled:self.filled + size] = value
      self.filled += size
      self.pending = None

  def to_numpy(self) -> dict[str, np.ndarray]:
    """The rows filled so far (what `resume.accumulate` saves)."""
    self.flush()
    return {key: value[:self.filled] for key, value in self.arrays.items()}

  def from_numpy(self, saved: Mapping[str, np.ndarray]) -> "_HostFeatures":
    """Fills the first rows with saved `to_numpy` arrays (what `resume.accumulate` restores)."""
    self.filled = len(saved["label"])
    for key, value in self.arrays.items():
      value[:self.filled] = saved[key]
    return self


def extract(model: nn.Module, params: Any, layers: Sequence[str], kinds: Sequence[str],
            batches: data.EvalBatches, *, study: runner.Study, state_file: str, what: str = ""
            ) -> tuple[list[str], dict[str, np.ndarray], np.ndarray] | runner.Interrupted:
  """Streams `batches` through `model` and materialises the probe features on the host.

  The features extracted so far are saved to `<workdir>/<state_file>` every
  `config.checkpoint_every` batches; a rerun resumes there (`runner.Study.accumulate`).

  Args:
    model: the Flax module.
    params: its parameters.
    layers: layer names or patterns (`features.select_names`).
    kinds: token modes ('cls', 'mean', 'all') and/or 'token'.
    batches: the eval batches to stream (sharded over `study.mesh`).
    study: the study (its image size, mesh and config: `checkpoint_every`, `log_every`,
      `stop_after_batches`).
    state_file: the `.npz` holding the features extracted so far.
    what: a label for the log lines.

  Returns:
    (layer names, `{'<kind>:<layer>': float32 [n, F] or [n, T, D]}`, int `[n]` labels), or
    `Interrupted` for a pass stopped early (`stop_after_batches`).

  Raises:
    ValueError: unknown layers, or a kind that does not apply to a layer (e.g. 'token' on a
      layer without spatial tokens).
  """
  image_size = study.image_size
  extractor = features.FeatureExtractor(model, list(layers), image_size=image_size,
                                        token_mode="all")
  if TOKEN in kinds:
    for name in extractor.names:
      probes.tokens_and_width(extractor.shapes[name], name)
  fn = _feature_fn(extractor, kinds, study.mesh)
  shapes = jax.eval_shape(fn, params,
                          jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32),
                          jax.ShapeDtypeStruct((1,), np.int32))
  per_example = sum(int(np.prod(s.shape[1:])) for k, s in shapes.items() if k != "label")
  logging.info("%s: %d examples x %d features (%d layers, kinds %s): %.1f MB on the host.",
               what, batches.plan.num_examples, per_example, len(extractor.names),
               list(kinds), 4e-6 * batches.plan.num_examples * per_example)

  def update(state: _HostFeatures, batch: dict) -> _HostFeatures:
    outputs = fn(params, batch["image"], batch["label"])
    state.flush()  # Copies batch i - 1 while batch i computes.
    state.pending = outputs
    return state

  state, progress = study.accumulate(
      _HostFeatures(shapes, batches.plan.num_examples), update, lambda _: batches,
      state_file=state_file, what=what)
  if not progress.complete:
    return runner.Interrupted(progress)
  order = np.argsort(batches.plan.positions.ravel())  # Pass order (device-major) -> canonical.
  feats = {key: value[order] for key, value in state.to_numpy().items()}
  labels = feats.pop("label")
  return extractor.names, feats, labels


def _stack(values: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks per-layer arrays; per-token ones of layers with fewer tokens (ResNet stages) are
  padded with NaN along the last (token) axis."""
  longest = max(v.shape[-1] for v in values)
  return np.stack([np.pad(np.asarray(v, np.float64),
                          [(0, 0)] * (v.ndim - 1) + [(0, longest - v.shape[-1])],
                          constant_values=np.nan) for v in values])


def _probe_model(study: runner.Study, key: str, spec: ml_collections.ConfigDict
                 ) -> tuple[dict, dict] | runner.Interrupted:
  """Arrays '<key>/...' and metadata of every probe of one model (or `Interrupted` for a
  feature extraction stopped early)."""
  config, info = study.config, study.info
  cfg_data, cfg_probes, cfg_linear = config.data, config.probes, config.linear
  model, params = study.model(spec)
  tokens = model.token_layout()
  kinds = _kinds(layout.has_cls(tokens), cfg_probes.modes, cfg_probes.per_token, key)

  def batches(split, num_examples):
    return data.eval_batches(cfg_data.name, split, image_size=cfg_data.image_size,
                             global_batch_size=cfg_data.global_batch_size, mesh=study.mesh,
                             num_examples=num_examples, data_dir=cfg_data.data_dir,
                             crop_fraction=cfg_data.crop_fraction)

  extracted = {}
  for role, split, num_examples in (("pool", cfg_data.train_split, cfg_data.train_num_examples),
                                    ("test", cfg_data.test_split, cfg_data.test_num_examples)):
    extracted[role] = extract(
        model, params, spec.layers, kinds, batches(split, num_examples), study=study,
        state_file=f"features_{key}_{role}.npz", what=f"{key} {split}")
    if isinstance(extracted[role], runner.Interrupted):
      return extracted[role]
  (names, train, train_labels), (_, test, test_labels) = extracted["pool"], extracted["test"]
  arrays = {f"{key}/layers": np.asarray(names, dtype=str)}
  for kind in kinds:
    fewshot, linear = [], []
    for name in names:
      start = time.perf_counter()
      fewshot.append(probes.fewshot_accuracy(
          train[f"{kind}:{name}"], train_labels, test[f"{kind}:{name}"], test_labels,
          num_classes=info.num_classes, shots=tuple(cfg_probes.shots),
          seeds=tuple(cfg_probes.seeds), l2_reg=cfg_probes.l2_reg))
      if cfg_linear.enabled:
        linear.append(probes.linear_probe(
            train[f"{kind}:{name}"], train_labels, test[f"{kind}:{name}"], test_labels,
            num_classes=info.num_classes, holdout_fraction=cfg_linear.holdout_fraction,
            seed=cfg_linear.seed, learning_rate=cfg_linear.learning_rate,
            weight_decay=cfg_linear.weight_decay, max_steps=cfg_linear.max_steps,
            eval_every=cfg_linear.eval_every, patience=cfg_linear.patience,
            min_delta=cfg_linear.min_delta))
      logging.info("%s %s %s: %d-shot %.3f%s (%.1f s).", key, kind, name, cfg_probes.shots[-1],
                   float(np.mean(fewshot[-1][-1])),
                   f", linear {float(np.mean(linear[-1].test_accuracy)):.3f}" if linear else "",
                   time.perf_counter() - start)
    stack = _stack if kind == TOKEN else np.stack
    arrays[f"{key}/fewshot/{kind}"] = stack(fewshot)
    if linear:
      arrays[f"{key}/linear/{kind}"] = stack([r.test_accuracy for r in linear])
      arrays[f"{key}/linear_holdout/{kind}"] = stack([r.holdout_accuracy for r in linear])
      arrays[f"{key}/linear_best_step/{kind}"] = stack([r.best_step for r in linear])
  metadata = {"model": loading.describe(spec), "kinds": kinds,
              "has_cls_token": layout.has_cls(tokens),
              "num_prefix_tokens": layout.num_prefix_tokens(tokens),
              "prefix_tokens": list(layout.prefix_kinds(tokens)),
              "num_train_examples": int(len(train_labels)),
              "num_test_examples": int(len(test_labels)),
              "feature_sizes": {k: list(v.shape[1:]) for k, v in train.items()}}
  return arrays, metadata


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Probes every layer of every model of `config` and writes arrays, metadata and figures.

  Args:
    config: a `configs/linear_probes.py` config (specs, data, probes, linear).
    workdir: output directory.

  Returns:
    The result; summary per model: the last layer's accuracy per kind at the largest shot count
    (and of the full probe), example counts, seconds.
  """
  if not config.specs:
    raise ValueError("config.specs is empty: add at least one model spec to probe.")
  study = runner.Study(config, workdir)
  info = study.info
  arrays, models, summary = {}, {}, {}
  for key, spec in config.specs.items():
    start = time.perf_counter()
    probed = _probe_model(study, key, spec)
    if isinstance(probed, runner.Interrupted):
      return probed
    model_arrays, models[key] = probed
    arrays.update(model_arrays)
    kinds, prefix = models[key]["kinds"], models[key]["prefix_tokens"]
    summary[key] = {
        f"fewshot_{config.probes.shots[-1]}shot_last_layer": {
            kind: _last_layer(arrays[f"{key}/fewshot/{kind}"][:, -1], kind, prefix)
            for kind in kinds},
        "seconds": round(time.perf_counter() - start, 1)}
    if config.linear.enabled:
      summary[key]["linear_last_layer"] = {
          kind: _last_layer(arrays[f"{key}/linear/{kind}"], kind, prefix) for kind in kinds}
  metadata = {
      "models": models,
      "dataset": {"name": info.name, "num_classes": info.num_classes,
                  "train_split": config.data.train_split, "test_split": config.data.test_split},
      "fewshot": {"estimator": "big_vision few-shot linear regression: per-seed per-class "
                               "permutation, first n per class; features standardised with the "
                               "shot set's mean and std (+1e-5); constant feature 100 for the "
                               "bias; targets 2*onehot-1; (Z^T Z + l2 I) W = Z^T Y (dual form "
                               "when n < features); argmax accuracy on the test examples",
                  "shots": list(config.probes.shots), "seeds": list(config.probes.seeds),
                  "l2_reg": config.probes.l2_reg, "bias_constant": probes.BIAS_CONSTANT},
      "linear": {"estimator": "softmax regression on standardised features, full-batch Adam, "
                              "early stopping on held-out cross-entropy",
                 **config.linear.to_dict()},
      "chance_accuracy": 1.0 / info.num_classes,
  }
  return study.finish("linear_probes", arrays, metadata, summary,
                      figures=_figures(config, arrays, models, info.num_classes))


def _figures(config: ml_collections.ConfigDict, arrays: dict[str, np.ndarray], models: dict,
             num_classes: int) -> dict[str, runner.Draw]:
  """The per-layer accuracy figure and, with per-token probes, the CLS-vs-spatial figure."""
  shots = config.probes.shots[-1]
  modes = [m for m in config.probes.modes if any(m in meta["kinds"] for meta in models.values())]
  panels = []
  sections = [("fewshot", f"{shots}-shot")] + ([("linear", "linear")]
                                                if config.linear.enabled else [])
  for section, label in sections:
    for mode in modes:
      curves = {key: (arrays[f"{key}/{section}/{mode}"][:, -1].mean(-1) if section == "fewshot"
                      else arrays[f"{key}/{section}/{mode}"])
                for key, meta in models.items() if mode in meta["kinds"]}
      panels.append(plotting.CurvePanel(
          curves=curves, layer_names={key: list(arrays[f"{key}/layers"]) for key in curves},
          title=f"{label} probe, {mode}", ylabel="test accuracy", chance=1.0 / num_classes))
  figures = {"linear_probes": lambda path: plotting.plot_layer_curves(panels, path,
                                                                      columns=len(modes))}
  if not config.probes.per_token:
    return figures
  token_panels = []
  for key, meta in models.items():
    per_token = arrays[f"{key}/fewshot/{TOKEN}"][:, -1].mean(1)  # [layers, T]
    prefix = meta["prefix_tokens"]
    curves = {"spatial tokens (mean)": np.nanmean(_spatial_tokens(per_token, prefix), axis=-1)}
    if meta["has_cls_token"]:
      curves = {"CLS token": per_token[:, prefix.index("cls")], **curves}
    registers = [t for t, kind in enumerate(prefix) if kind == "register"]
    if registers:
      curves["register tokens (mean)"] = per_token[:, registers].mean(-1)
    token_panels.append(plotting.CurvePanel(
        curves=curves, layer_names=dict.fromkeys(curves, list(arrays[f"{key}/layers"])),
        title=f"{key}: {shots}-shot probe per token", ylabel="test accuracy",
        chance=1.0 / num_classes))
  figures["linear_probes_tokens"] = lambda path: plotting.plot_layer_curves(token_panels, path)
  return figures
