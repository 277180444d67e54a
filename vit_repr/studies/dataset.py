"""The data every study of Raghu et al. (NeurIPS 2021) reads: a summary of the dataset.

Summarises both splits of `config.data` (`vit_repr.data.summarize`: per-class counts, pixel
statistics, a montage of examples per class), then streams the eval split once through the
sharded pipeline the studies use and counts its labels where they are (on the mesh), to show
that the pipeline sees exactly the examples the summary counted, and how fast.

Outputs in the workdir: `dataset_summary.{npz,json}` (arrays `<split>/class_counts` `[classes]`,
`<split>/pixel_mean` and `<split>/pixel_std` `[3]`, `montage` `[rows * H, columns * W, 3]` of
the eval split's first classes, `pipeline/label_histogram` `[classes]`; metadata: the data
config, each split's example and class counts, the pipeline's examples, batches, devices,
start-up seconds and steady-state throughput) and `figures/dataset_examples.{png,pdf}` (the
montage, one row per class).
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_repr import data, parallel, plotting
from vit_repr.studies import runner


def _pipeline_label_histogram(cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, dict]:
  """Label counts of the eval split as the sharded pipeline delivers it, and its metadata.

  The rate is the pipeline's steady state: its clock starts once the first batch has arrived
  and been counted, and only the later batches' examples count. The time until then (the
  tf.data start-up, the first transfer to the devices, the counting function's compilation)
  is `startup_seconds`. With a single batch there is no steady state: the rate is then the
  whole pass's, start-up included, and `rate_includes_startup` says so.

  Args:
    cfg: the `data` section of a config (name, data_dir, eval_split, image_size,
      global_batch_size).

  Returns:
    (label counts `[classes]` int64, metadata: 'num_examples', 'num_batches', 'num_devices',
    'startup_seconds', 'examples_per_second', 'rate_includes_startup').
  """
  mesh = parallel.make_mesh()
  batches = data.eval_batches(cfg.name, cfg.eval_split, image_size=cfg.image_size,
                              global_batch_size=cfg.global_batch_size, mesh=mesh,
                              data_dir=cfg.data_dir)
  count_labels = jax.jit(
      lambda counts, labels: counts + jnp.bincount(labels, length=batches.info.num_classes),
      out_shardings=parallel.replicated(mesh))
  label_histogram = parallel.replicate(np.zeros(batches.info.num_classes, np.int32), mesh)
  start = time.perf_counter()
  steady_start, steady_examples = None, 0
  for batch in batches:  # Global arrays: the histogram is computed where the labels are.
    label_histogram = count_labels(label_histogram, batch["label"])
    if steady_start is None:
      jax.block_until_ready(label_histogram)  # The first batch has arrived and been counted.
      steady_start = time.perf_counter()
    else:
      steady_examples += int(batch["label"].shape[0])
  label_histogram = parallel.to_host(label_histogram).astype(np.int64)
  end = time.perf_counter()
  includes_startup = steady_examples == 0
  rate = (batches.plan.num_examples / (end - start) if includes_startup
          else steady_examples / (end - steady_start))
  return label_histogram, {"num_examples": batches.plan.num_examples,
                           "num_batches": batches.plan.num_batches,
                           "num_devices": int(mesh.devices.size),
                           "startup_seconds": steady_start - start,
                           "examples_per_second": rate,
                           "rate_includes_startup": includes_startup}


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.StudyResult:
  """Summarises `config.data` into `workdir`.

  Args:
    config: a config with a `data` section (name, data_dir, train_split, eval_split,
      image_size, global_batch_size) and a `summary` section (num_examples: examples of each
      split summarised, None for all; examples_per_class: montage columns), e.g.
      `configs/reproduce.py`'s.
    workdir: output directory.

  Returns:
    The result; summary: 'splits' {split: examples}, 'num_classes' and
    'pipeline_examples_per_second' (rounded to 0.1; after the first batch, see
    `_pipeline_label_histogram`) and 'pipeline_rate_includes_startup' (True only for a
    single-batch pass).
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

  arrays["pipeline/label_histogram"], metadata["pipeline"] = _pipeline_label_histogram(cfg)
  rows = montage.shape[0] // cfg.image_size
  summary = {
      "splits": {s: metadata[s]["num_examples"] for s in (cfg.train_split, cfg.eval_split)},
      "num_classes": metadata[cfg.eval_split]["num_classes"],
      "pipeline_examples_per_second": round(metadata["pipeline"]["examples_per_second"], 1),
      "pipeline_rate_includes_startup": metadata["pipeline"]["rate_includes_startup"],
  }
  return runner.finish(config, workdir, "dataset_summary", arrays, metadata, summary, figures={
      "dataset_examples": lambda path: plotting.plot_montage(
          montage, path, row_labels=class_names[:rows],
          title=f"{cfg.name}/{cfg.eval_split} at {cfg.image_size}px")})
