"""The study runner (vit_repr.studies.runner): batches, outputs and how studies compose."""

import ast
import os

import numpy as np
import pytest

from configs import cka_heatmap
from tests.conftest import REPO_ROOT
from vit_repr import data, parallel, results
from vit_repr.studies import resume, runner


def digits_config(num_examples: int = 48):
  config = cka_heatmap.get_config("runlocal")
  config.data.num_examples = num_examples
  return config


def test_passes_take_exactly_one_batch_size(tmp_path):
  study = runner.Study(digits_config(), str(tmp_path))
  for sizes in ({}, {"minibatch_size": 4, "global_batch_size": 8}):
    with pytest.raises(ValueError, match="exactly one of minibatch_size and global_batch_size"):
      study.passes(**sizes)


def test_later_passes_reorder_the_same_examples(tmp_path):
  """Pass 0 is the canonical order; pass p > 0 holds the same examples in another order, so
  every minibatch groups other examples (the reference minibatch-CKA passes)."""
  config = digits_config()
  study = runner.Study(config, str(tmp_path))
  passes = study.passes(minibatch_size=8, shuffle_seed=3)

  def labels_and_pixels(batches):
    rows = [(np.asarray(b["label"]), np.asarray(b["image"]).reshape(len(b["label"]), -1))
            for b in batches]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])

  canonical = data.eval_batches("digits", config.data.split, image_size=config.data.image_size,
                                global_batch_size=48, mesh=parallel.make_mesh(),
                                num_examples=48)
  expected_labels, expected_pixels = labels_and_pixels(canonical)
  first_labels, first_pixels = labels_and_pixels(passes(0))
  np.testing.assert_array_equal(first_labels, expected_labels)
  np.testing.assert_array_equal(first_pixels, expected_pixels)
  second_labels, second_pixels = labels_and_pixels(passes(1))
  assert not np.array_equal(second_pixels, first_pixels)
  by_pixels = [np.lexsort(pixels.T) for pixels in (second_pixels, first_pixels)]
  np.testing.assert_array_equal(second_pixels[by_pixels[0]], first_pixels[by_pixels[1]])
  np.testing.assert_array_equal(np.sort(second_labels), np.sort(first_labels))


def test_finish_writes_what_it_returns(tmp_path):
  study = runner.Study(digits_config(), str(tmp_path))
  drawn = []
  arrays = {"cka": np.arange(6.0).reshape(2, 3), "names": np.asarray(["a", "b"])}
  result = study.finish("example", arrays, {"num_examples": 48}, {"headline": 1.5},
                        figures={"example_figure": drawn.append})
  saved, metadata = results.read_results(str(tmp_path), "example")
  assert set(saved) == set(result.arrays)
  for name, value in saved.items():
    np.testing.assert_array_equal(result.arrays[name], value)
  assert list(metadata)[:2] == ["config", "num_examples"]
  assert metadata["config"]["data"]["name"] == "digits" and metadata["num_examples"] == 48
  assert result.metadata["config"] == study.config.to_dict()  # JSON turns tuples to lists.
  assert result.summary == {"headline": 1.5} and result.complete
  assert drawn == [os.path.join(str(tmp_path), "figures", "example_figure")]


def test_interrupted_reports_where_it_stopped():
  stopped = runner.Interrupted(resume.Progress(3, 12, None))
  assert not stopped.complete
  assert stopped.summary == {"batches_done": 3, "batches_total": 12}


def test_studies_never_read_another_studys_files():
  """Composed studies (skip ablation, data scale, the main job) take result objects: no study
  module and not the main job calls `results.read_results`."""
  readers = []
  modules = [os.path.join("vit_repr", "studies", n)
             for n in sorted(os.listdir(os.path.join(REPO_ROOT, "vit_repr", "studies")))
             if n.endswith(".py")] + [os.path.join("vit_repr", "reproduction.py")]
  for path in modules:
    with open(os.path.join(REPO_ROOT, path)) as f:
      tree = ast.parse(f.read())
    readers += [f"{path}:{node.lineno}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr == "read_results"]
  assert len(modules) > 10 and not readers
