"""The main job end to end on the embedded dataset (what `make demo` runs)."""

import json
import os

import numpy as np
import pytest

from configs import reproduce as reproduce_config
from vit_repr import reproduction, results


@pytest.mark.slow
def test_reproduce_writes_every_step_output(tmp_path):
  config = reproduce_config.get_config("runlocal")
  summary = reproduction.run(config, str(tmp_path))

  assert list(summary) == [name for name, _ in reproduction.STEPS]
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
    assert json.load(f)["dataset summary"]["num_classes"] == 10
  # The small models were trained (smoke-test length) and their final parameters saved.
  assert set(summary["train the small models"]["test_accuracy"]) == {"vit_cls", "bit"}
  for name in ("vit_cls", "bit"):
    assert os.path.isdir(tmp_path / "models" / name / "params")
  # Study 1 ran on them: two sub-layers per ViT block, one unit per BiT stage.
  cka, metadata = results.read_results(str(tmp_path / "representation"), "cka_heatmap")
  depth = config.models.vit_cls.model.overrides.depth
  assert cka["cka_ab"].shape == (2 * depth, 4)
  np.testing.assert_allclose(np.diag(cka["cka_aa"]), 1.0, atol=1e-5)
  assert metadata["models"]["a"]["checkpoint"].endswith("models/vit_cls/params")
  assert os.path.getsize(tmp_path / "representation" / "figures" / "cka_heatmap.png") > 1000
  # A second run reuses the trained models instead of training them again.
  before = os.path.getmtime(tmp_path / "models" / "bit" / "params")
  again = reproduction.train_models(config, str(tmp_path))
  assert again["test_accuracy"] == summary["train the small models"]["test_accuracy"]
  assert os.path.getmtime(tmp_path / "models" / "bit" / "params") == before


def test_unknown_reproduce_config_is_rejected():
  with pytest.raises(ValueError, match="runlocal"):
    reproduce_config.get_config("imagenet")
