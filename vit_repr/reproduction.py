"""The main job (`experiments/reproduce.py`): every study of the paper into one work dir.

Each `Step` runs one study (`run(config, workdir) -> headline numbers`) and says what the
paper found and how to read this run's numbers against it. `run` logs one progress line per
step, records each finished step in `<workdir>/steps/<key>.json` with a fingerprint of the
config sections it read (a rerun skips finished steps whose config is unchanged; the studies
and the training runs themselves resume mid-way), writes `summary.json` and renders
`report.html` (`vit_repr.report`).
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
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_repr import data, files, parallel, plotting, report, results, training
from vit_repr.studies import (attention_distance, data_scale, linear_probes, loading,
                              localization, receptive_field, representation, skip_connections)

REPORT_FILE = "report.html"


@dataclasses.dataclass(frozen=True)
class Step:
  """One step of the main job.

  Attributes:
    key: short name: the step's output subdirectory and `steps/<key>.json`.
    title: report heading, naming the paper's figures.
    run: `(config, workdir) -> headline numbers` (JSON-ready dict).
    config_keys: the config sections the step reads (with the trained models it names in
      `config.use_trained[key]`, its resume fingerprint; shown in the report).
    paper_finding: one sentence: what the paper found.
    observed: headline numbers -> one sentence: what this run shows.
    figures: PNG paths relative to the workdir.
  """
  key: str
  title: str
  run: Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
  config_keys: tuple[str, ...]
  paper_finding: str
  observed: Callable[[dict[str, Any]], str]
  figures: tuple[str, ...]


def dataset_summary(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Summarises the dataset and streams its eval split through the sharded pipeline.

  Writes `dataset_summary.{npz,json}` (per-class counts and pixel statistics of each split,
  the label histogram seen by the sharded eval pipeline and its throughput) and
  `figures/dataset_examples.{png,pdf}` (a montage of examples per class).
  """
  cfg = config.data
  arrays, metadata = {}, {"dataset": cfg.to_dict()}
  for split in (cfg.train_split, cfg.eval_split):
    summary = data.summarize(cfg.name, split, image_size=cfg.image_size,
                             data_dir=cfg.data_dir, num_examples=config.summary.num_examples,
                             examples_per_class=config.summary.examples_per_class)
    arrays[f"{split}/class_counts"] = summary["class_counts"]
    arrays[f"{split}/pixel_mean"] = summary["pixel_mean"]
    arrays[f"{split}/pixel_std"] = summary["pixel_std"]
    metadata[split] = {"num_examples": summary["num_examples"],
                       "num_classes": summary["num_classes"]}
    if split == cfg.eval_split:
      montage, class_names = summary["montage"], summary["class_names"]
      arrays["montage"] = montage

  mesh = parallel.make_mesh()
  batches = data.eval_batches(cfg.name, cfg.eval_split, image_size=cfg.image_size,
                              global_batch_size=cfg.global_batch_size, mesh=mesh,
                              data_dir=cfg.data_dir)
  count_labels = jax.jit(
      lambda counts, labels: counts + jnp.bincount(labels, length=batches.info.num_classes),
      out_shardings=parallel.replicated(mesh))
  label_histogram = parallel.replicate(np.zeros(batches.info.num_classes, np.int32), mesh)
  start = time.perf_counter()
  for batch in batches:  # Global arrays: the histogram is computed where the labels are.
    label_histogram = count_labels(label_histogram, batch["label"])
  label_histogram = parallel.to_host(label_histogram).astype(np.int64)
  seconds = time.perf_counter() - start
  arrays["pipeline/label_histogram"] = label_histogram
  metadata["pipeline"] = {"num_examples": batches.plan.num_examples,
                          "num_batches": batches.plan.num_batches,
                          "num_devices": int(mesh.devices.size),
                          "examples_per_second": batches.plan.num_examples / seconds}
  results.write_results(workdir, "dataset_summary", arrays, metadata)
  rows = montage.shape[0] // cfg.image_size
  plotting.plot_montage(montage, files.join(workdir, "figures", "dataset_examples"),
                        row_labels=class_names[:rows],
                        title=f"{cfg.name}/{cfg.eval_split} at {cfg.image_size}px")
  return {
      "splits": {s: metadata[s]["num_examples"] for s in (cfg.train_split, cfg.eval_split)},
      "num_classes": metadata[cfg.eval_split]["num_classes"],
      "pipeline_examples_per_second": round(metadata["pipeline"]["examples_per_second"], 1),
  }


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


def representation_structure(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 1 (paper Figs 1-2): CKA heatmaps within and across the trained ViT and ResNet."""
  study = study_config(config, workdir, "representation")
  summary = representation.run(study, files.join(workdir, "representation"))
  arrays, _ = results.read_results(files.join(workdir, "representation"), "cka_heatmap")
  cross = arrays["cka_ab"]  # [ViT layers, ResNet layers]
  lower_resnet = cross[:, :max(1, cross.shape[1] // 2)]
  top_vit = cross[-max(1, cross.shape[0] // 4):]
  return {**summary,
          "mean_cka": {k: round(float(np.nanmean(arrays[k])), 3)
                       for k in ("cka_aa", "cka_bb", "cka_ab")},
          # Relative depth (0 = first, 1 = last) of the ViT layer most similar to each layer
          # of ResNet's lower half, averaged.
          "vit_depth_matching_lower_resnet": round(float(np.mean(
              np.nanargmax(lower_resnet, axis=0) / max(1, cross.shape[0] - 1))), 3),
          # Best CKA of the top quarter of ViT layers to any ResNet layer, averaged.
          "top_vit_best_cka_to_resnet": round(float(np.mean(np.nanmax(top_vit, axis=1))), 3)}


def spatial_localization(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4a (paper Figs 9-10): token-vs-patch CKA maps of the ViT-CLS, ViT-GAP and ResNet."""
  summary = localization.run(study_config(config, workdir, "localization"),
                             files.join(workdir, "localization"))
  layers = summary.pop("layers")
  return {**summary, "own_patch": {f"{model}:{layer}": numbers
                                   for model, by_layer in layers.items()
                                   for layer, numbers in by_layer.items()}}


def attention_distances(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 2a (paper Figs 3-5): mean attention distance of every head of the trained ViT, and
  the CKA of each lower-block head with the lower layers of the trained ResNet."""
  return attention_distance.run(study_config(config, workdir, "attention"),
                                files.join(workdir, "attention"))


def receptive_fields(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 2b (paper Fig 6): effective receptive fields of the trained ViT and ResNet."""
  summary = receptive_field.run(study_config(config, workdir, "receptive_fields"),
                                files.join(workdir, "receptive_fields"))
  return {"models": summary}


def skip_connection_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 3 (paper Figs 7-8): norm ratios of the trained models, and ViTs trained without the
  skip connections of one block against the unablated ViT."""
  study = study_config(config, workdir, "skip_connections")
  study.models = config.models
  study.models_dir = files.join(workdir, "models")
  return skip_connections.run(study, files.join(workdir, "skip_connections"))


def probes(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4b (paper Fig 11): few-shot and full linear probes per layer and per token of the
  trained CLS-token and GAP ViTs."""
  return {"models": linear_probes.run(study_config(config, workdir, "probes"),
                                      files.join(workdir, "probes"))}


def data_scaling(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 4c (paper Figs 12-13): ViTs trained on nested subsets of the training data against
  the full-data ViT, layer by layer (CKA) and by probe accuracy."""
  study = study_config(config, workdir, "data_scale")
  study.models = {name: config.models[name] for name in study.models}
  study.models_dir = files.join(workdir, "models")
  return data_scale.run(study, files.join(workdir, "data_scale"))


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


def _fraction(value: float) -> str:
  return f"{100 * value:.0f}%"


STEPS: tuple[Step, ...] = (
    Step(key="dataset", title="The data", run=dataset_summary, config_keys=("data", "summary"),
         paper_finding="The paper analyses ImageNet validation images; this run uses the data "
                       "named below, read through the same sharded pipeline.",
         observed=lambda n: (f"{sum(n['splits'].values())} images in {n['num_classes']} classes "
                             f"({n['splits']}); the sharded pipeline streamed "
                             f"{n['pipeline_examples_per_second']} images/s."),
         figures=("figures/dataset_examples.png",)),
    Step(key="models", title="The models the studies analyse", run=train_models,
         config_keys=("models",),
         paper_finding="The paper analyses ViTs and BiT ResNets pretrained on JFT-300M or "
                       "ImageNet-21k, plus controlled variants trained for the study.",
         observed=lambda n: "Test accuracy of each model trained here: " + ", ".join(
             f"{name} {_fraction(acc)}" for name, acc in n["test_accuracy"].items()) + ".",
         figures=()),
    Step(key="representation", title="Representation structure (Figs 1-2)",
         run=representation_structure, config_keys=("representation",),
         paper_finding="ViT's CKA heatmap is uniform, with high similarity between lower and "
                       "higher layers, while ResNet's shows stages; ResNet's lower half "
                       "resembles roughly ViT's lowest quarter, and ViT's top layers resemble "
                       "no ResNet layer.",
         observed=lambda n: (
             f"Mean CKA within ViT {n['mean_cka']['cka_aa']:.2f}, within ResNet "
             f"{n['mean_cka']['cka_bb']:.2f}, across {n['mean_cka']['cka_ab']:.2f}; ResNet's "
             f"lower half best matches ViT layers at relative depth "
             f"{n['vit_depth_matching_lower_resnet']:.2f} (0 = first, 1 = last); ViT's top "
             f"quarter reaches CKA {n['top_vit_best_cka_to_resnet']:.2f} with its best ResNet "
             f"layer ({n['num_examples']} examples accumulated)."),
         figures=("representation/figures/cka_heatmap.png",)),
    Step(key="attention", title="Mean attention distance (Figs 3-5)",
         run=attention_distances, config_keys=("attention",),
         paper_finding="With enough pretraining data, ViT's lower blocks mix local and global "
                       "heads while its higher blocks are all global; local heads are the ones "
                       "most similar to ResNet's lower layers.",
         observed=lambda n: (
             f"Mean distance per block (px): {n['mean_distance_per_layer']}; first block's "
             f"heads span {n['first_layer_distance_range']} px, last block's "
             f"{n['last_layer_distance_range']} px; correlation of a head's distance with its "
             f"CKA to ResNet layers: {n.get('distance_cka_correlation', 'not computed')} "
             f"({n['num_examples']} examples)."),
         figures=("attention/figures/attention_distance.png",
                  "attention/figures/head_cka_vs_distance.png")),
    Step(key="receptive_fields", title="Effective receptive fields (Fig 6)",
         run=receptive_fields, config_keys=("receptive_fields",),
         paper_finding="ResNet's effective receptive fields grow gradually with depth; ViT's "
                       "become global early, yet stay peaked at the centre patch because of the "
                       "skip connections.",
         observed=lambda n: "Receptive-field radius (px) from the first to the last layer: " + (
             "; ".join(f"{name} " + " → ".join(f"{r:.1f}" for r in m["radius_px"].values())
                       for name, m in n["models"].items()) + "."),
         figures=("receptive_fields/figures/receptive_field.png",)),
    Step(key="skip_connections", title="Skip connections (Figs 7-8)",
         run=skip_connection_study,
         config_keys=("models", "skip_connections"),
         paper_finding="The norm ratio ||z|| / ||f(z)|| of the residual stream to each branch is "
                       "much higher in ViT than in ResNet, with a phase transition between the "
                       "CLS and the spatial tokens in the middle of the network; removing one "
                       "block's skip connection breaks ViT's uniform representation structure "
                       "at that block and lowers accuracy.",
         observed=lambda n: (
             "Mean norm ratio (CLS / spatial tokens): " + "; ".join(
                 f"{name} " + " / ".join(f"{v:.2f}" for v in groups.values())
                 for name, groups in n["norm_ratios"]["mean_ratio_of_means"].items())
             + ". Test accuracy: " + ", ".join(
                 f"{name} {_fraction(acc)}"
                 for name, acc in n["ablation"]["test_accuracy"].items())
             + "; mean diagonal CKA of each ablated ViT with the unablated one: " + ", ".join(
                 f"{name} {v:.2f}"
                 for name, v in n["ablation"]["mean_diagonal_cka_vs_reference"].items())
             + "."),
         figures=("skip_connections/figures/norm_ratios.png",
                  "skip_connections/figures/skip_ablation_self.png",
                  "skip_connections/figures/skip_ablation_vs_reference.png")),
    Step(key="localization", title="Spatial localization (Figs 9-10)",
         run=spatial_localization, config_keys=("localization",),
         paper_finding="A CLS-trained ViT's output tokens stay most similar to the input patch at "
                       "their own position; ResNet's localization is weaker, and a GAP-trained "
                       "ViT loses it in its top layers.",
         observed=lambda n: "Mean CKA of each token with its own patch (fraction of tokens "
                            "most similar to their own patch): " + "; ".join(
             f"{name} {v['own_patch_cka']:.2f} ({v['peak_at_own_patch']:.0%})"
             for name, v in n["own_patch"].items()) + f" ({n['num_examples']} examples).",
         figures=("localization/figures/localization.png",)),
    Step(key="probes", title="Linear probes per layer and per token (Fig 11)",
         run=probes, config_keys=("probes",),
         paper_finding="Linear probe accuracy rises through the blocks; probing individual "
                       "tokens separates the models: a CLS-trained ViT's spatial tokens probe "
                       "poorly in the top blocks, a GAP-trained ViT's tokens probe well.",
         observed=lambda n: "Few-shot probe accuracy on the last block (CLS token / mean of the "
                            "spatial tokens): " + "; ".join((
             f"{name} " + " / ".join(f"{_fraction(acc)}" for kind, acc in next(
                 v for k, v in m.items() if k.startswith("fewshot")).items()
                                     if kind in ("cls", "mean"))
             for name, m in n["models"].items())) + ".",
         figures=("probes/figures/linear_probes.png",
                  "probes/figures/linear_probes_tokens.png")),
    Step(key="data_scale", title="Pretraining data scale (Figs 12-13)",
         run=data_scaling, config_keys=("models", "data_scale"),
         paper_finding="Models trained on less data form weaker intermediate representations: "
                       "their higher layers differ most from the full-data model's, while lower "
                       "layers converge first.",
         observed=lambda n: "CKA with the full-data model, first → last layer: " + "; ".join((
             f"{name} ({_fraction(m['fraction'])} of the data, test accuracy "
             f"{_fraction(m['test_accuracy'])}) {m['cka_first_layer']:.2f} → "
             f"{m['cka_last_layer']:.2f}"
             for name, m in n["models"].items() if "cka_first_layer" in m)) + ".",
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
  return {step.key: step.observed(summary[step.key]) for step in STEPS if step.key in summary}


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
    if numbers is not None:
      logging.info("[%d/%d] %s: finished earlier (%s), skipped.", index, len(selected),
                   step.title, record_path)
    else:
      logging.info("[%d/%d] %s ...", index, len(selected), step.title)
      start = time.perf_counter()
      numbers = {**step.run(config, workdir), "seconds": round(time.perf_counter() - start, 1)}
      _record(record_path, fingerprint, numbers)
      logging.info("[%d/%d] %s done in %.1f s: %s", index, len(selected), step.title,
                   numbers["seconds"], numbers)
    summary[step.key] = numbers
    sections.append(report.Section(
        title=step.title, paper_finding=step.paper_finding, observed=step.observed(numbers),
        figures=[files.join(workdir, f) for f in step.figures], command=command,
        config={k: config[k].to_dict() for k in step.config_keys if k in config},
        numbers=numbers))
  if steps is None:
    files.write_json(files.join(workdir, "summary.json"), summary, indent=2)
  if steps is None and jax.process_index() == 0:  # The report reads every figure back.
    path = report.write_html_report(
        files.join(workdir, REPORT_FILE),
        title="Do Vision Transformers See Like Convolutional Neural Networks? — reproduction",
        intro=(f"Raghu et al., NeurIPS 2021, reproduced by vit_repr on {config.data.name!r} "
               f"with `{command}`."),
        sections=sections, environment=results.environment_metadata())
    logging.info("Report: %s", path)
  return summary
