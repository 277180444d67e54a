"""The main job end to end on the embedded dataset (what `make demo` runs)."""

import json
import os

import numpy as np
import pytest

from configs import reproduce as reproduce_config
from tests.conftest import images_loaded_in_chromium
from vit_repr import reproduction, results


@pytest.mark.slow
def test_reproduce_writes_every_step_output(tmp_path):
  config = reproduce_config.get_config("runlocal")
  summary = reproduction.run(config, str(tmp_path))

  assert list(summary) == [step.key for step in reproduction.STEPS]
  arrays, metadata = results.read_results(str(tmp_path), "dataset_summary")
  # sklearn's digits: 1,797 images, a stratified 1,437 / 360 split.
  assert metadata["train"]["num_examples"] == 1437
  assert metadata["test"]["num_examples"] == 360
  assert arrays["train/class_counts"].sum() + arrays["test/class_counts"].sum() == 1797
  # The sharded pipeline sees exactly the labels the summary counted (360 = 3 batches of 120).
  np.testing.assert_array_equal(arrays["pipeline/label_histogram"],
                                arrays["test/class_counts"])
  assert np.all(np.abs(arrays["test/pixel_mean"]) < 1.0)
  for ext in ("png", "pdf"):
    assert os.path.getsize(tmp_path / "figures" / f"dataset_examples.{ext}") > 1000
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["dataset"]["num_classes"] == 10
  # The small models were trained (smoke-test length) and their final parameters saved.
  assert set(summary["models"]["test_accuracy"]) == set(config.models)
  for name in config.models:
    assert os.path.isdir(tmp_path / "models" / name / "params")
  # Study 1 ran on them: two sub-layers per ViT block, one unit per BiT stage.
  cka, metadata = results.read_results(str(tmp_path / "representation"), "cka_heatmap")
  depth = config.models.vit_cls.model.overrides.depth
  assert cka["cka_ab"].shape == (2 * depth, 4)
  np.testing.assert_allclose(np.diag(cka["cka_aa"]), 1.0, atol=1e-5)
  assert metadata["models"]["a"]["checkpoint"].endswith("models/vit_cls/params")
  assert os.path.getsize(tmp_path / "representation" / "figures" / "cka_heatmap.png") > 1000
  # The report embeds every figure of every step, and Chromium displays each of them.
  report_path = str(tmp_path / reproduction.REPORT_FILE)
  figures = [f for step in reproduction.STEPS for f in step.figures]
  loaded = images_loaded_in_chromium(report_path, str(tmp_path))
  assert [alt for alt, _ in loaded] == [os.path.basename(f) for f in figures]
  assert all(ok for _, ok in loaded), loaded
  # Training alone reuses the trained models instead of training them again.
  before = os.path.getmtime(tmp_path / "models" / "bit" / "params")
  again = reproduction.train_models(config, str(tmp_path))
  assert again["test_accuracy"] == summary["models"]["test_accuracy"]
  assert os.path.getmtime(tmp_path / "models" / "bit" / "params") == before
  # A rerun skips every finished step and gives the same numbers; a changed study reruns.
  assert reproduction.run(config, str(tmp_path)) == summary
  config.summary.examples_per_class = 4
  rerun = reproduction.run(config, str(tmp_path))
  assert rerun["dataset"]["seconds"] != summary["dataset"]["seconds"]
  assert {k: v for k, v in rerun.items() if k != "dataset"} == {
      k: v for k, v in summary.items() if k != "dataset"}


def test_unknown_reproduce_config_is_rejected():
  with pytest.raises(ValueError, match="runlocal"):
    reproduce_config.get_config("imagenet")
