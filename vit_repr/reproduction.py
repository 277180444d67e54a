"""The main job (`experiments/reproduce.py`): every study of the paper into one work dir.

Each `Step` runs one study (`run(config, workdir) -> headline numbers`); its text (what the
paper found, how to read this run's numbers against it) is `vit_repr.findings.FINDINGS` under
the same key. `run` logs one progress line per step, records each finished step in
`<workdir>/steps/<key>.json` with a fingerprint of the config sections it read (a rerun skips
finished steps whose config is unchanged; the studies and the training runs themselves resume
mid-way), writes `summary.json` and renders `report.html` (`vit_repr.report`).
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import time
from concurrent import futures
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_repr import files, findings, judgements, report, results, training
from vit_repr.studies import (attention_distance, data_scale, dataset, linear_probes, loading,
                              localization, receptive_field, representation, runner,
                              skip_connections)

REPORT_FILE = "report.html"


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the main job.

  Attributes:
    key: short name: the step's output subdirectory, `steps/<key>.json` and its text in
      `findings.FINDINGS`.
    run: `(config, workdir) -> headline numbers` (JSON-ready dict).
    config_keys: the config sections the step reads (with the trained models it names in
      `config.use_trained[key]`, its resume fingerprint; shown in the report).
    figures: PNG paths relative to the workdir.
  """
  key: str
  run: Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
  config_keys: tuple[str, ...]
  figures: tuple[str, ...]

  @property
  def finding(self) -> findings.Finding:
    """The step's title, the paper's finding and the sentence on this run's numbers."""
    return findings.FINDINGS[self.key]


def model_dir(workdir: str, name: str) -> str:
  """Where the main job trains model `name` of `config.models`."""
  return files.join(workdir, "models", name)


def trained_model(config: ml_collections.ConfigDict, workdir: str,
                  name: str) -> training.TrainResult:
  """Model `name` of `config.models`, trained into `model_dir` now or reused from there."""
  if name not in config.models:
    raise ValueError(f"Model {name!r} is not in config.models ({sorted(config.models)}); add "
                     "its configs/train.py recipe there.")
  return training.run(config.models[name], model_dir(workdir, name))


def _test_accuracy(train_config: dict[str, Any], run_dir: str) -> float:
  """Trains (or reuses) one model and returns its test accuracy; runs in a worker process."""
  result = training.run(ml_collections.ConfigDict(train_config), run_dir)
  return round(float(result.final_eval.get("accuracy", float("nan"))), 4)


def train_models(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the models of `config.models` into `<workdir>/models/<name>`, or reuses them when
  a finished run is already there (each run is resumable).

  With `config.train_processes` > 1 on a single host, that many models train at a time, each in
  its own process: a small model's training step keeps only one CPU core busy.
  """
  processes = config.train_processes if jax.process_count() == 1 else 1
  runs = {}
  for name, train_config in config.models.items():
    logging.info("Training %s (%s, %d steps) or reusing it.", name, train_config.model.name,
                 train_config.train.total_steps)
    runs[name] = (train_config.to_dict(), model_dir(workdir, name))
  accuracies = {}
  with contextlib.ExitStack() as stack:
    if processes == 1:
      finished = ((name, _test_accuracy(*args)) for name, args in runs.items())
    else:
      pool = stack.enter_context(futures.ProcessPoolExecutor(
          processes, mp_context=multiprocessing.get_context("spawn")))
      names = {pool.submit(_test_accuracy, *args): name for name, args in runs.items()}
      finished = ((names[f], f.result()) for f in futures.as_completed(names))
    for name, accuracy in finished:
      accuracies[name] = accuracy
      logging.info("Model %d/%d: %s, test accuracy %.4f.", len(accuracies), len(runs), name,
                   accuracy)
  return {"test_accuracy": {name: accuracies[name] for name in runs}}


def completed(result: runner.Outcome, key: str) -> runner.StudyResult:
  """The result of step `key`'s study.

  Raises:
    ValueError: the study stopped early (its `stop_after_batches` is set): its state is saved,
      and a rerun of the main job resumes it.
  """
  if not result.complete:
    progress = result.progress
    raise ValueError(f"Step {key!r} stopped after {progress.batches_done} of "
                     f"{progress.batches_total} batches ({key}.stop_after_batches is set); its "
                     "state is saved. Unset it and rerun the same command to resume.")
  return result


def _judged(*judged: judgements.Judgement) -> dict[str, list[dict[str, Any]]]:
  """{'judgements': the JSON records of `judged`}, the key every step's numbers use."""
  return {"judgements": [judgement.to_json() for judgement in judged]}


def dataset_summary(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The dataset every study reads: class counts, pixel statistics, examples, the pipeline."""
  return dataset.run(config, workdir).summary


def representation_structure(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 1 (paper Figs 1-2): CKA heatmaps within and across the trained ViT and ResNet, the
  `findings` statistics of those heatmaps (rounded to 3 decimals), and the judgements of
  'ViT uniform, ResNet staged' and 'ResNet's lower half matches ViT's lower layers'."""
  study = study_config(config, workdir, "representation")
  heatmaps = completed(representation.run(study, files.join(workdir, "representation")),
                       "representation")
  arrays = heatmaps.arrays
  cross = arrays["cka_ab"]  # [ViT layers, ResNet layers]
  return {**heatmaps.summary,
          "mean_cka": {k: round(findings.mean_cka(arrays[k]), 3)
                       for k in ("cka_aa", "cka_bb", "cka_ab")},
          "vit_depth_matching_lower_resnet": round(
              findings.vit_depth_matching_lower_resnet(cross), 3),
          "top_vit_best_cka_to_resnet": round(findings.top_vit_best_cka_to_resnet(cross), 3),
          **_judged(judgements.judge_uniformity(arrays["cka_aa"], arrays["stderr_aa"],
                                                arrays["cka_bb"], arrays["stderr_bb"]),
                    judgements.judge_lower_vit_depth(cross, arrays["stderr_ab"]))}


def spatial_localization(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4a (paper Figs 9-10): token-vs-patch CKA maps of the ViT-CLS, ViT-GAP and ResNet,
  and the judgement of 'a CLS ViT keeps location better than a GAP ViT' on their top layers
  (the last layer each lists; models `config.findings.cls_vit` and `gap_vit`)."""
  result = completed(localization.run(study_config(config, workdir, "localization"),
                                      files.join(workdir, "localization")), "localization")
  summary = dict(result.summary)
  layers = summary.pop("layers")

  def top_layer(model: str) -> tuple[np.ndarray, np.ndarray]:
    """Own-patch CKA of each token of `model`'s last layer, and its standard error `[tokens]`."""
    layer = result.arrays[f"layers/{model}"][-1]
    return (result.arrays[f"own_patch/{model}/{layer}"].ravel(),
            result.arrays[f"own_patch_stderr/{model}/{layer}"].ravel())

  return {**summary, "own_patch": {f"{model}:{layer}": numbers
                                   for model, by_layer in layers.items()
                                   for layer, numbers in by_layer.items()},
          **_judged(judgements.judge_cls_localization(*top_layer(config.findings.cls_vit),
                                                      *top_layer(config.findings.gap_vit)))}


def attention_distances(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 2a (paper Figs 3-5): mean attention distance of every head of the trained ViT, the
  CKA of each lower-block head with the lower layers of the trained ResNet, and the judgement
  of 'lower blocks mix local and global heads, higher blocks are global'."""
  result = completed(attention_distance.run(study_config(config, workdir, "attention"),
                                            files.join(workdir, "attention")), "attention")
  return {**result.summary, **_judged(judgements.judge_local_and_global_heads(
      result.arrays["distance"], result.arrays["distance_stderr"]))}


def receptive_fields(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 2b (paper Fig 6): effective receptive fields of the trained ViT and ResNet."""
  result = receptive_field.run(study_config(config, workdir, "receptive_fields"),
                               files.join(workdir, "receptive_fields"))
  return {"models": completed(result, "receptive_fields").summary}


def skip_connection_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 3 (paper Figs 7-8): norm ratios of the trained models, ViTs trained without the
  skip connections of one block against the unablated ViT, and the judgements of 'the CLS
  token's norm ratio falls relative to the spatial tokens' with depth' (the ViT
  `config.findings.cls_vit`) and 'removing skip connections lowers accuracy'."""
  study = study_config(config, workdir, "skip_connections")
  study.models = config.models
  study.models_dir = files.join(workdir, "models")
  result = completed(skip_connections.run(study, files.join(workdir, "skip_connections")),
                     "skip_connections")
  norm_ratios = result.parts["norm_ratios"]
  ratios, vit = norm_ratios.arrays, config.findings.cls_vit
  cls, spatial = (norm_ratios.metadata["groups"].index(group) for group in ("cls", "spatial"))
  of_means, stderr = ratios[f"{vit}/ratio_of_means"], ratios[f"{vit}/ratio_of_means_stderr"]
  accuracy = result.summary["ablation"]["test_accuracy"]
  reference = config.skip_connections.ablation.reference
  test_examples = trained_model(config, workdir, reference).final_eval["num_examples"]
  return {**result.summary, **_judged(
      judgements.judge_norm_ratio_change(of_means[:, cls], of_means[:, spatial], stderr[:, cls],
                                         stderr[:, spatial]),
      judgements.judge_skip_removal(accuracy[reference],
                                    [accuracy[name] for name in accuracy if name != reference],
                                    test_examples))}


def probes(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4b (paper Fig 11): few-shot and full linear probes per layer and per token of the
  trained CLS-token and GAP ViTs."""
  result = linear_probes.run(study_config(config, workdir, "probes"),
                             files.join(workdir, "probes"))
  return {"models": completed(result, "probes").summary}


def data_scaling(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4c (paper Figs 12-13): ViTs trained on nested subsets of the training data against
  the full-data ViT, layer by layer (CKA) and by probe accuracy, and the judgement of
  'intermediate layers probe better with more data': the few-shot probe accuracy of the
  layers between the first and the last (per seed, averaged over those layers) of the
  full-data model against the model trained on the smallest subset."""
  study = study_config(config, workdir, "data_scale")
  study.models = {name: config.models[name] for name in study.models}
  study.models_dir = files.join(workdir, "models")
  result = completed(data_scale.run(study, files.join(workdir, "data_scale")), "data_scale")
  arrays, full = result.arrays, config.data_scale.reference
  smallest = str(arrays["models"][np.argmin(arrays["fractions"])])

  def intermediate_layers(model: str) -> np.ndarray:
    """`[seeds]` few-shot accuracy of `model`'s CLS token (mean-pooled tokens without one),
    averaged over its probed layers but the first and the last."""
    mode = "cls" if f"probe/fewshot_seeds/cls/{model}" in arrays else "mean"
    per_layer = arrays[f"probe/fewshot_seeds/{mode}/{model}"]  # [layers, seeds]
    return per_layer[1:-1].mean(0) if len(per_layer) > 2 else per_layer.mean(0)

  return {**result.summary, **_judged(judgements.judge_probe_data_scale(
      intermediate_layers(full), intermediate_layers(smallest),
      result.metadata["probe_test_examples"]))}


def trained_models_of(config: ml_collections.ConfigDict, key: str) -> dict[tuple[str, ...], str]:
  """{path of a model spec in study `key`'s config: name of the model of `config.models` that
  fills it}, from `config.use_trained[key]` (nested like the study's config)."""
  def leaves(node: Any, path: tuple[str, ...]):
    if isinstance(node, Mapping):
      for part, child in node.items():
        yield from leaves(child, path + (part,))
    else:
      yield path, node

  return dict(leaves(config.use_trained.get(key, ml_collections.ConfigDict()).to_dict(), ()))


def study_config(config: ml_collections.ConfigDict, workdir: str,
                 key: str) -> ml_collections.ConfigDict:
  """The config of study `key`: a copy of `config[key]` (its dataset is the job's, linked in
  configs/reproduce.py) with the model specs named in `config.use_trained[key]` replaced by
  the specs of the models trained by the main job (trained first if needed)."""
  study = ml_collections.ConfigDict(config[key].to_dict())
  for (*parents, leaf), name in trained_models_of(config, key).items():
    trained_model(config, workdir, name)
    specs = functools.reduce(lambda node, part: node[part], parents, study)
    specs[leaf] = loading.trained_spec(config.models[name], model_dir(workdir, name),
                                       specs[leaf].layers)
  return study


STEPS: tuple[Step, ...] = (
    Step(key="dataset", run=dataset_summary, config_keys=("data", "summary"),
         figures=("figures/dataset_examples.png",)),
    Step(key="models", run=train_models, config_keys=("models",), figures=()),
    Step(key="representation", run=representation_structure, config_keys=("representation",),
         figures=("representation/figures/cka_heatmap.png",)),
    Step(key="attention", run=attention_distances, config_keys=("attention",),
         figures=("attention/figures/attention_distance.png",
                  "attention/figures/head_cka_vs_distance.png")),
    Step(key="receptive_fields", run=receptive_fields, config_keys=("receptive_fields",),
         figures=("receptive_fields/figures/receptive_field.png",)),
    Step(key="skip_connections", run=skip_connection_study,
         config_keys=("models", "skip_connections", "findings"),
         figures=("skip_connections/figures/norm_ratios.png",
                  "skip_connections/figures/skip_ablation_self.png",
                  "skip_connections/figures/skip_ablation_vs_reference.png")),
    Step(key="localization", run=spatial_localization, config_keys=("localization", "findings"),
         figures=("localization/figures/localization.png",)),
    Step(key="probes", run=probes, config_keys=("probes",),
         figures=("probes/figures/linear_probes.png",
                  "probes/figures/linear_probes_tokens.png")),
    Step(key="data_scale", run=data_scaling, config_keys=("models", "data_scale"),
         figures=("data_scale/figures/data_scale.png",)),
)


def _fingerprint(config: ml_collections.ConfigDict, step: Step) -> str:
  """Hash of the config sections `step` reads, and of the trained models it names."""
  sections = {k: config[k].to_dict() for k in step.config_keys if k in config}
  named = trained_models_of(config, step.key)
  sections["use_trained"] = {"/".join(path): name for path, name in named.items()}
  sections["trained_models"] = {name: config.models[name].to_dict() for name in named.values()}
  return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def _finished(path: str, fingerprint: str) -> dict[str, Any] | None:
  """The recorded numbers of a finished step, or None when it must (re)run."""
  contents = files.read_shared(path)
  if contents is None:
    return None
  record = json.loads(contents)
  return record["numbers"] if record["fingerprint"] == fingerprint else None


def _record(path: str, fingerprint: str, numbers: dict[str, Any]) -> None:
  files.write_json(path, {"fingerprint": fingerprint, "numbers": numbers}, indent=2)


def default_command(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The command line that reproduces `config` into `workdir`."""
  return (f"python -m experiments.reproduce --config=configs/reproduce.py:{config.arg} "
          f"--workdir={workdir}")


def observations(summary: dict[str, dict[str, Any]]) -> dict[str, str]:
  """{step key: the sentence saying what this run shows} for the steps in `summary`."""
  return {step.key: step.finding.observed(summary[step.key])
          for step in STEPS if step.key in summary}


def judged(summary: Mapping[str, Mapping[str, Any]]) -> list[judgements.Judgement]:
  """The findings judged in `summary` ({step key: numbers}), in step order."""
  return [judgements.Judgement.from_json(record) for step in STEPS if step.key in summary
          for record in summary[step.key].get("judgements", ())]


def judgement_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """The findings judged in `summary`, as a plain-text table (`judgements.table`)."""
  return judgements.table(judged(summary))


def figures(workdir: str, key: str) -> list[str]:
  """The PNG figures step `key` wrote into `workdir`."""
  return [files.join(workdir, f) for step in STEPS if step.key == key for f in step.figures]


def run(config: ml_collections.ConfigDict, workdir: str, *, steps: Sequence[str] | None = None,
        command: str | None = None) -> dict[str, dict[str, Any]]:
  """Runs the steps of `STEPS` into `workdir` (skipping finished ones) and writes the report.

  Args:
    config: a `configs/reproduce.py` config.
    workdir: output directory; rerun with the same config to resume.
    steps: keys of the steps to run (a notebook's figures); None runs them all, then writes
      `summary.json` and the report.
    command: the command line shown in the report (default: `default_command`).

  Returns:
    {step key: headline numbers, with the step's 'seconds'}.
  """
  known = [step.key for step in STEPS]
  unknown = sorted(set(steps or ()) - set(known))
  if unknown:
    raise ValueError(f"Unknown steps {unknown}; the main job's steps are {known}.")
  selected = [step for step in STEPS if steps is None or step.key in steps]
  training.check_checkpoint_dir(workdir)  # Before any step: the studies use trained models.
  files.makedirs(workdir)
  command = command or default_command(config, workdir)
  summary, sections = {}, []
  for index, step in enumerate(selected, start=1):
    record_path = files.join(workdir, "steps", f"{step.key}.json")
    fingerprint = _fingerprint(config, step)
    numbers = _finished(record_path, fingerprint)
    finding = step.finding
    if numbers is not None:
      logging.info("[%d/%d] %s: finished earlier (%s), skipped.", index, len(selected),
                   finding.title, record_path)
    else:
      logging.info("[%d/%d] %s ...", index, len(selected), finding.title)
      start = time.perf_counter()
      numbers = {**step.run(config, workdir), "seconds": round(time.perf_counter() - start, 1)}
      _record(record_path, fingerprint, numbers)
      logging.info("[%d/%d] %s done in %.1f s: %s", index, len(selected), finding.title,
                   numbers["seconds"], finding.observed(numbers))
    summary[step.key] = numbers
    sections.append(report.Section(
        title=finding.title, paper_finding=finding.paper_finding,
        observed=finding.observed(numbers),
        figures=[files.join(workdir, f) for f in step.figures], command=command,
        config={k: config[k].to_dict() for k in step.config_keys if k in config},
        numbers={k: v for k, v in numbers.items() if k != "judgements"},
        judgements=judged({step.key: numbers})))
  if steps is None:
    files.write_json(files.join(workdir, "summary.json"), summary, indent=2)
  if steps is None and jax.process_index() == 0:  # The report reads every figure back.
    path = report.write_html_report(
        files.join(workdir, REPORT_FILE),
        title="Do Vision Transformers See Like Convolutional Neural Networks? — reproduction",
        intro=(f"Raghu et al., NeurIPS 2021, reproduced by vit_repr on {config.data.name!r} "
               f"with `{command}`."),
        sections=sections, judgements=judged(summary),
        environment=results.environment_metadata())
    logging.info("Report: %s", path)
  return summary
