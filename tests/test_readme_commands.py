"""Every paper-setting command of the README, run as written through its absl main.

The commands are read from README.md itself and run in a subprocess exactly as printed there,
with these substitutions and no others:
- `--workdir=` and `--config.data.data_dir=`: directories of the test;
- `--config.data.name=digits`: the embedded dataset (its 'train' / 'validation' splits), at
  the command's own resolution (224 px);
- every public checkpoint (`...checkpoint=gs://...`): a random file in the original layout at
  the registered model's full depth and token grid (tests/paper_checkpoints.py), and every
  model's width fields (`...overrides.hidden_size=96`, ...), the documented narrowing;
- small counts (`SMALL_COUNTS`): examples, minibatches, passes, training steps, and a random
  4 channels per receptive-field layer.
Each run must exit with status 0 and write its outputs; every layer-name array it saves and
every layer axis of its figures must be in computation order (block 2 before block 10, token
mixing before channel mixing), with all 12 blocks of ViT-B present. No paper finding is
asserted: the weights are random.
"""

import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from configs import common
from tests import paper_checkpoints
from tests.conftest import REPO_ROOT
from tests.layer_order import layer_key, out_of_order

# Leaf path (or the end of one) -> the small value the test substitutes: the counts of a
# config's `runlocal` smoke test.
SMALL_COUNTS = common.SMOKE_COUNTS
# What each main must write, relative to its workdir.
OUTPUTS = {
    "cka_heatmap": ["cka_heatmap.npz", "figures/cka_heatmap.png"],
    "attention_distance": ["attention_distance.npz", "figures/attention_distance.png",
                           "figures/head_cka_vs_distance.png"],
    "receptive_field": ["receptive_field.npz", "figures/receptive_field.png"],
    "skip_connections": ["norm_ratios.npz", "skip_ablation.npz", "figures/norm_ratios.png",
                         "figures/skip_ablation_self.png"],
    "localization": ["localization.npz", "figures/localization.png"],
    "linear_probes": ["linear_probes.npz", "figures/linear_probes.png"],
    "data_scale": ["data_scale.npz", "figures/data_scale.png"],
    "train": ["params", "metrics.jsonl"],
    "reproduce": ["report.html", "summary.json", "representation/cka_heatmap.npz",
                  "data_scale/data_scale.npz"],
}
_SPEC_FIELDS = {"name", "checkpoint", "layers", "overrides", "seed"}


def readme_commands() -> list[list[str]]:
  """The `python -m experiments.<main>` commands of README.md's code blocks, as argv lists."""
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  commands = []
  for block in blocks:
    for command in block.replace("\\\n", " ").splitlines():
      command = command.strip()  # Blocks inside list items are indented.
      if command.startswith("python -m experiments."):
        commands.append(shlex.split(command)[2:])
  return commands


COMMANDS = {f"{argv[0].split('.')[1]}:{argv[1].rsplit(':', 1)[1]}": argv
            for argv in readme_commands()}


def _leaves(node: Any, path: str = ""):
  """(dotted path, value) of every leaf of a config's `to_dict()`; dicts are also yielded."""
  yield path, node
  if isinstance(node, dict):
    for key, value in node.items():
      yield from _leaves(value, f"{path}.{key}" if path else key)


def substitutions(config: dict, checkpoint_dir: str) -> list[str]:
  """The flags that make a paper config runnable here (see the module docstring)."""
  flags = ["--config.data.name=digits"]
  for path, node in _leaves(config):
    if isinstance(node, dict) and _SPEC_FIELDS <= set(node) and node["name"]:
      flags += paper_checkpoints.width_flags(path, node["name"])
      if str(node["checkpoint"]).startswith("gs://"):
        local = os.path.join(checkpoint_dir, os.path.basename(node["checkpoint"]))
        if not os.path.exists(local):
          seed = int(hashlib.sha256(local.encode()).hexdigest()[:8], 16)
          paper_checkpoints.write(checkpoint_dir, os.path.basename(local), node["name"], seed)
        flags.append(f"--config.{path}.checkpoint={local}")
    elif isinstance(node, dict) and {"model", "train"} <= set(node):
      prefix = f"{path}.model" if path else "model"
      flags += paper_checkpoints.width_flags(prefix, node["model"]["name"])
    elif not isinstance(node, dict):
      small = [v for k, v in SMALL_COUNTS.items() if path == k or path.endswith("." + k)]
      if small:
        flags.append(f"--config.{path}={small[0]}")
  return flags


def _order_errors_in_arrays(workdir: str) -> tuple[dict[str, list[str]], set[str]]:
  """Out-of-order layer names of every saved string array, and every name saved."""
  errors, names = {}, set()
  for root, _, files in os.walk(workdir):
    for file in files:
      if not file.endswith(".npz") or file.endswith("_state.npz") or file.startswith(
          "features_"):
        continue
      with np.load(os.path.join(root, file), allow_pickle=False) as saved:
        for key in saved.files:
          value = saved[key]
          if value.dtype.kind == "U" and value.ndim == 1:
            names.update(value.tolist())
            if bad := out_of_order(value.tolist()):
              errors[f"{file}:{key}"] = bad
  return errors, names


def _runs(labels: list[str]) -> list[list[str]]:
  """Labels split where the model prefix ('ViT-B/16 0/mid', 'vit_b16\\n11/out') changes; a
  label without a prefix continues the current run."""
  runs, prefix = [], None
  for label in labels:
    head = label.strip().rsplit(None, 1)[0] if len(label.split()) > 1 else prefix
    if head != prefix or not runs:
      runs.append([])
      prefix = head
    runs[-1].append(label)
  return runs


def _order_errors_in_figures(workdir: str) -> dict[str, list[str]]:
  """Out-of-order layer labels on the axes of every figure (tests/figure_spy.py records)."""
  errors = {}
  for root, _, files in os.walk(workdir):
    for file in files:
      if file.endswith(".png"):
        assert f"{file}.axes.json" in files, f"{root}/{file}: the figure spy recorded no axes"
      if not file.endswith(".axes.json"):
        continue
      with open(os.path.join(root, file)) as f:
        axes = json.load(f)
      sequences = [ax[k] for ax in axes for k in ("xticks", "yticks")]
      sequences += _runs([ax["title"] for ax in axes if layer_key(ax["title"])])
      sequences += _runs([ax["ylabel"] for ax in axes if layer_key(ax["ylabel"])])
      for sequence in sequences:
        if bad := out_of_order(sequence):
          errors.setdefault(file, []).extend(bad)
  return errors


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("public_checkpoints"))


# Measured seconds of the longest commands (2 cores, cold compilation cache), for the order.
_SECONDS = {"reproduce:paper": 640, "data_scale:imagenet_vit_b16": 290,
            "skip_connections:vit_b16": 240, "receptive_field:vit_b32+r50": 160}


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.seconds(_SECONDS[c])) if c in _SECONDS else c
    for c in COMMANDS], ids=list(COMMANDS))
def test_readme_command_runs_as_written(command, tmp_path, checkpoint_dir):
  argv = COMMANDS[command]
  main = argv[0].split(".")[1]
  config_file, _, arg = next(a for a in argv if a.startswith("--config=")).partition(
      "=")[2].partition(":")
  module = importlib.import_module(f"configs.{os.path.basename(config_file)[:-3]}")
  config = module.get_config(arg).to_dict()
  workdir = str(tmp_path / "workdir")
  written = []
  for flag in argv[1:]:
    if flag.startswith("--workdir="):
      flag = f"--workdir={workdir}"
    elif flag.startswith("--config.data.data_dir="):
      flag = f"--config.data.data_dir={tmp_path / 'tensorflow_datasets'}"
    written.append(flag)
  flags = written + substitutions(config, checkpoint_dir)
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "tests", "figure_spy.py"), argv[0], *flags],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, (f"{shlex.join(argv)} with {flags} failed:\n"
                                  f"{result.stderr[-6000:]}")
  for output in OUTPUTS[main]:
    assert os.path.exists(os.path.join(workdir, output)), output
  array_errors, names = _order_errors_in_arrays(workdir)
  assert not array_errors, f"layer names out of computation order: {array_errors}"
  figure_errors = _order_errors_in_figures(workdir)
  assert not figure_errors, f"figure axes out of computation order: {figure_errors}"
  if main != "train":
    assert any("encoderblock_11/" in n for n in names), \
        "ViT-B's 12th block is missing from the saved names"
