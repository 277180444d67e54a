"""The main job (`experiments/reproduce.py`): runs every study in order into one work dir.

Each step is a function `(config, workdir) -> dict` of headline numbers; `run` logs one
progress line per step and writes `summary.json` listing every step's outputs. Studies add
their step to `STEPS` as they land.
"""

import json
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from vit_repr import data, parallel, plotting, results, training
from vit_repr.studies import loading, representation

Step = Callable[[ml_collections.ConfigDict, str], dict]


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
                             data_dir=cfg.data_dir,
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
  label_histogram = np.zeros(batches.info.num_classes, np.int64)
  start = time.perf_counter()
  for batch in batches:
    label_histogram += np.bincount(np.asarray(batch["label"]),
                                   minlength=batches.info.num_classes)
  seconds = time.perf_counter() - start
  arrays["pipeline/label_histogram"] = label_histogram
  metadata["pipeline"] = {"num_examples": batches.plan.num_examples,
                          "num_batches": batches.plan.num_batches,
                          "num_devices": int(mesh.devices.size),
                          "examples_per_second": batches.plan.num_examples / seconds}
  results.write_results(workdir, "dataset_summary", arrays, metadata)
  rows = montage.shape[0] // cfg.image_size
  plotting.plot_montage(montage, os.path.join(workdir, "figures", "dataset_examples"),
                        row_labels=class_names[:rows],
                        title=f"{cfg.name}/{cfg.eval_split} at {cfg.image_size}px")
  return {
      "splits": {s: metadata[s]["num_examples"] for s in (cfg.train_split, cfg.eval_split)},
      "num_classes": metadata[cfg.eval_split]["num_classes"],
      "pipeline_examples_per_second": round(metadata["pipeline"]["examples_per_second"], 1),
  }


def _model_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "models", name)


def train_models(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the small models of `config.models` into `<workdir>/models/<name>`, or reuses them
  when a finished run is already there (each run is resumable)."""
  accuracies = {}
  for name, train_config in config.models.items():
    logging.info("Training %s (%s, %d steps) or reusing it.", name, train_config.model.name,
                 train_config.train.total_steps)
    result = training.run(train_config, _model_dir(workdir, name))
    accuracies[name] = round(float(result.final_eval.get("accuracy", float("nan"))), 4)
  return {"test_accuracy": accuracies}


def representation_structure(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Study 1 (paper Figs 1-2): CKA heatmaps within and across the trained ViT and ResNet."""
  study_dict = config.representation.to_dict()
  names = study_dict.pop("models")
  study = ml_collections.ConfigDict(study_dict)
  for key, name in zip(("model_a", "model_b"), names):
    study[key] = loading.trained_spec(config.models[name], _model_dir(workdir, name),
                                      study[key].layers)
  summary = representation.run(study, os.path.join(workdir, "representation"))
  arrays, _ = results.read_results(os.path.join(workdir, "representation"), "cka_heatmap")
  return {**summary, "mean_cka": {k: round(float(np.nanmean(arrays[k])), 3)
                                  for k in ("cka_aa", "cka_bb", "cka_ab")}}


STEPS: tuple[tuple[str, Step], ...] = (
    ("dataset summary", dataset_summary),
    ("train the small models", train_models),
    ("representation structure (CKA heatmaps, Figs 1-2)", representation_structure),
)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every step of `STEPS` into `workdir`; returns {step name: headline numbers}."""
  os.makedirs(workdir, exist_ok=True)
  summary = {}
  for index, (name, step) in enumerate(STEPS, start=1):
    logging.info("[%d/%d] %s ...", index, len(STEPS), name)
    start = time.perf_counter()
    summary[name] = {**step(config, workdir), "seconds": round(time.perf_counter() - start, 1)}
    logging.info("[%d/%d] %s done in %.1f s: %s", index, len(STEPS), name,
                 summary[name]["seconds"], summary[name])
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
