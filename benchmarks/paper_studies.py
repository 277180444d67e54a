"""Wall time, longest compile and peak memory of every study at the paper's size.

Runs each paper command of the README (its absl main, in a child process) on full-size models:
random `.npz` checkpoints of ViT-B/16, ViT-B/32, BiT-R50x1 and Mixer-B/16 at full width and
depth (written here in the public layouts), the embedded 'digits' images upsampled to 224 px
(`--config.data.name=digits`) and small example counts (`--examples`, `--minibatch`; training
commands run `--train_steps` steps of batch `--minibatch`). Prints per study: wall seconds, the
longest single XLA compilation and the total compile time (JAX's backend-compile events), peak
resident memory of the process, and the float32 GEMM peak measured in the same run.

  python -m benchmarks.paper_studies                          # every study (~1 hour here)
  python -m benchmarks.paper_studies --studies=cka_heatmap,localization --examples=32

The cost of the paper's counts scales from these: each study's docstring in configs/ gives the
per-example work (a forward pass per image and pass; receptive fields: one backward pass per
channel, see benchmarks/receptive_field_bench.py).
"""

import importlib
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util

from benchmarks import timing

_STUDIES = flags.DEFINE_list(
    "studies", ["cka_heatmap", "attention_distance", "receptive_field", "localization",
                "linear_probes", "skip_connections", "data_scale", "train"], "Mains to run.")
_EXAMPLES = flags.DEFINE_integer("examples", 16, "Examples per pass (eval data).")
_MINIBATCH = flags.DEFINE_integer(
    "minibatch", 8, "Minibatch (per device; every receptive-field section, alone or in "
    "reproduce, keeps its config's, whose memory grows with it) and training batch.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 2, "Steps of every training run.")
_CHANNELS = flags.DEFINE_integer("channels", 8, "Receptive fields: channels per layer.")

# The README's paper commands: main -> config arg.
COMMANDS = {
    "cka_heatmap": "vit_b16+r50", "attention_distance": "vit_b16+r50",
    "receptive_field": "vit_b32+r50", "skip_connections": "vit_b16",
    "localization": "vit_b16+r50", "linear_probes": "vit_b16",
    "data_scale": "imagenet_vit_b16", "train": "imagenet_vit_b16",
    "reproduce": "paper",
}
_CHILD = "--child"


def _write_checkpoint(directory: str, basename: str, name: str) -> str:
  """A random full-size checkpoint of registered model `name` in its public layout."""
  from vit_repr import models  # pylint: disable=g-import-not-at-top
  model = models.create(name, num_classes=1000, image_size=224)
  variables = timing.random_variables(model, jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  prefix = "resnet/" if name.startswith("BiT") else ""
  path = os.path.join(directory, basename)
  np.savez(path, **{prefix + k: np.asarray(v) for k, v in traverse_util.flatten_dict(
      variables["params"], sep="/").items()})
  return path


def _flags(main: str, arg: str, directory: str) -> list[str]:
  """The command's flags: digits at 224 px, local checkpoints, small counts."""
  config = importlib.import_module(f"configs.{main}").get_config(arg).to_dict()
  examples, minibatch = _EXAMPLES.value, _MINIBATCH.value
  counts = {"num_examples": examples, "minibatch_size": minibatch, "num_passes": 2,
            "max_channels": _CHANNELS.value, "train_num_examples": 10 * examples,
            "test_num_examples": examples, "eval_num_examples": examples,
            "eval_global_batch_size": minibatch, "total_steps": _TRAIN_STEPS.value,
            "warmup_steps": 1, "eval_every": _TRAIN_STEPS.value,
            "checkpoint_every": _TRAIN_STEPS.value}
  result = [f"--config=configs/{main}.py:{arg}", f"--workdir={directory}/{main}",
            "--config.data.name=digits"]

  def walk(node, path):
    for key, value in node.items():
      child = f"{path}.{key}" if path else key
      if isinstance(value, dict):
        walk(value, child)
      elif key == "checkpoint" and str(value).startswith("gs://"):
        local = os.path.join(directory, os.path.basename(value))
        if not os.path.exists(local):
          _write_checkpoint(directory, os.path.basename(value), node["name"])
        result.append(f"--config.{child}={local}")
      elif key in counts and not (key == "minibatch_size" and "channel_chunk" in node):
        result.append(f"--config.{child}={counts[key]}")
      elif key == "global_batch_size":  # Training, probes' and norm ratios' batches.
        result.append(f"--config.{child}={minibatch if 'train' in path else examples}")

  walk(config, "")
  return result


def _child(module: str, argv: list[str]) -> None:
  """Runs `python -m module argv` here, then prints its compile times and peak memory."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **_: compiles.append(seconds)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  sys.argv = [module, *argv]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as exit_:
    if exit_.code:
      raise
  print(json.dumps({"longest_compile": max(compiles, default=0.0),
                    "total_compile": sum(compiles),
                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv):
  del argv
  peaks = timing.gemm_peaks()
  print(f"float32 GEMM peak: NumPy {peaks['numpy']:.0f}, XLA {peaks['xla']:.0f} GFLOP/s; "
        f"{_EXAMPLES.value} examples per pass, minibatch {_MINIBATCH.value}, "
        f"{_TRAIN_STEPS.value} training steps, {_CHANNELS.value} channels per ERF layer.")
  print("| study | config | wall s | longest compile s | all compiles s | peak GB |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as directory:
    for main_name in _STUDIES.value:
      arg = COMMANDS[main_name]
      start = time.perf_counter()
      child = subprocess.run(
          [sys.executable, "-m", "benchmarks.paper_studies", _CHILD, f"experiments.{main_name}",
           *_flags(main_name, arg, directory)],
          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
      wall = time.perf_counter() - start
      if child.returncode:
        print(f"| {main_name} | {arg} | failed: {child.stderr[-300:]!r} |")
        continue
      stats = json.loads(child.stdout.strip().splitlines()[-1])
      print(f"| {main_name} | {arg} | {wall:.0f} | {stats['longest_compile']:.1f} | "
            f"{stats['total_compile']:.0f} | {stats['peak_rss_gb']:.1f} |", flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == _CHILD:
    _child(sys.argv[2], sys.argv[3:])
  else:
    app.run(main)
