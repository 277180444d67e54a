"""The main job end to end on the embedded dataset (what `make demo` runs)."""

import json
import os

import numpy as np
import pytest

from configs import reproduce as reproduce_config
from vit_repr import reproduction, results


@pytest.mark.slow
def test_reproduce_writes_every_step_output(tmp_path):
  config = reproduce_config.get_config("local")
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


def test_unknown_reproduce_config_is_rejected():
  with pytest.raises(ValueError, match="local"):
    reproduce_config.get_config("imagenet")
