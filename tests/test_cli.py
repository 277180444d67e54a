"""The command line on bad input: one clear message, exit status 1, no traceback (`experiments`).

Known user errors are the ValueError / FileNotFoundError messages the library raises; the
config is written to the workdir before anything can fail, and `--verbosity=1` adds the
traceback and the config dump.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# A paper command made cheap: the ViT-B/16 heatmap on the embedded data, narrow.
_COMMAND = ["-m", "experiments.cka_heatmap", "--config=configs/cka_heatmap.py:vit_b16",
            "--config.data.name=digits", "--config.model_a.overrides.hidden_size=48",
            "--config.model_a.overrides.mlp_dim=96"]
BAD_INPUTS = {
    "missing_checkpoint": (["--config.model_a.checkpoint=/no/such/ViT-B_16.npz"],
                           "No checkpoint at /no/such/ViT-B_16.npz"),
    "dataset_not_prepared": (["--config.data.name=cifar10", "--config.data.data_dir={tmp}",
                              "--config.model_a.checkpoint="],
                             "Dataset 'cifar10' is not prepared in data_dir="),
    "bad_field": (["--config.analysis.token_mode=patches", "--config.model_a.checkpoint="],
                  "Unknown token_mode 'patches'"),
}


def _run(argv: list[str], workdir: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *_COMMAND, *argv, f"--workdir={workdir}"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=BAD_INPUTS)
def test_user_error_prints_one_message_and_exits_1(case, tmp_path):
  flags, message = BAD_INPUTS[case]
  flags = [f.format(tmp=tmp_path / "tensorflow_datasets") for f in flags]
  result = _run(flags, str(tmp_path / "workdir"))
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "Config:\n" not in result.stderr  # The dump is for --verbosity=1.
  assert os.path.exists(tmp_path / "workdir" / "config.json")


@pytest.mark.slow
def test_verbosity_1_shows_the_traceback_and_the_config(tmp_path):
  flags, message = BAD_INPUTS["missing_checkpoint"]
  result = _run([*flags, "--verbosity=1"], str(tmp_path))
  assert result.returncode == 1
  assert "Traceback" in result.stderr and message in result.stderr
  assert "Config:" in result.stderr and "token_mode: all" in result.stderr
