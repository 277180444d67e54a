"""The notebooks (colabs/) and the main job end to end at their smallest size (config 'runlocal').

One test: the notebooks of colabs/ run first, in one work directory, each computing its steps;
then the main job (`make demo`'s command) completes the same directory, writes the report and
must reuse what the notebooks computed.
"""

import ast
import base64
import glob
import html
import json
import os
import re
import subprocess
import sys

import nbclient
import nbformat
import numpy as np
import pytest

from configs import reproduce as reproduce_config
from tests.conftest import REPO_ROOT, images_loaded_in_chromium
from vit_repr import reproduction, results

COLABS = os.path.join(REPO_ROOT, "colabs")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))


def _notebook_steps(notebook: nbformat.NotebookNode) -> tuple[str, ...]:
  for cell in notebook.cells:
    found = re.search(r"^STEPS = (.*)$", cell.source, re.M)
    if cell.cell_type == "code" and found:
      return ast.literal_eval(found.group(1))
  raise AssertionError("The notebook names no STEPS.")


def test_the_notebooks_cover_every_figure():
  covered = {key for path in NOTEBOOKS for key in _notebook_steps(nbformat.read(path, 4))}
  with_figures = {step.key for step in reproduction.STEPS if step.figures}
  assert with_figures <= covered, with_figures - covered
  assert len(NOTEBOOKS) == 5


def _run_notebook_and_check_its_figures(path: str, workdir: str) -> None:
  notebook = nbformat.read(path, as_version=4)
  parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1 and 'MODE = "local"' in parameters[0].source
  # The smallest size of the 'local' mode, into the shared work directory.
  parameters[0].source = f'MODE = "runlocal"\nDATA_DIR = None\nWORKDIR = {workdir!r}'
  nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                          resources={"metadata": {"path": COLABS}}).execute()

  shown = [base64.b64decode(output["data"]["image/png"])
           for cell in notebook.cells if cell.cell_type == "code"
           for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
  expected = [figure for key in _notebook_steps(notebook)
              for figure in reproduction.figures(workdir, key)]
  if any("beyond-paper" in c.metadata.get("tags", []) for c in notebook.cells):
    # Today's families (DINOv2, SigLIP, BiT-R50) in one CKA study, at full depth.
    expected.append(os.path.join(workdir, "families", "figures", "cka_heatmap.png"))
    _, metadata = results.read_results(os.path.join(workdir, "families"), "cka_heatmap")
    assert [metadata["models"][k]["name"] for k in "abc"] == [
        "ViT-B/16", "ViT-B/16", "BiT-R50x1"]
    assert metadata["models"]["a"]["overrides"]["patch_size"] == 14
  assert len(shown) == len(expected) > 0
  for png, figure in zip(shown, expected):
    with open(figure, "rb") as f:
      assert png == f.read(), (path, figure)
  printed = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
  for key in _notebook_steps(notebook):
    assert f"{key}: " in printed, path


def _judged_values_from_saved_arrays(workdir: str, summary: dict) -> list[float]:
  """The seven judged statistics, in step order, recomputed with NumPy from the arrays the
  steps saved (the definitions of vit_repr.judgements, written out here)."""
  def load(subdir, name):
    return results.read_results(os.path.join(workdir, subdir), name)[0]

  def cross_half(heatmap):  # Lower-half rows x upper-half columns.
    half = len(heatmap) // 2
    return np.nanmean(heatmap[:half, len(heatmap) - half:])

  def spread(rows):  # Mean over blocks of the range of head distances.
    return np.mean([row.max() - row.min() for row in rows])

  def halves(values):  # Mean of the lower half minus the mean of the upper half.
    half = len(values) // 2
    return np.nanmean(values[:half]) - np.nanmean(values[len(values) - half:])

  cka = load("representation", "cka_heatmap")
  cross = cka["cka_ab"]
  lower_resnet = cross[:, :max(1, cross.shape[1] // 2)]
  distance = load("attention", "attention_distance")["distance"]
  third = max(1, len(distance) // 3)
  ratios = load("skip_connections", "norm_ratios")["vit_cls/ratio_of_means"]
  accuracy = summary["skip_connections"]["ablation"]["test_accuracy"]
  maps = load("localization", "localization")

  def top_own_patch(model):
    return np.nanmean(maps[f"own_patch/{model}/{maps[f'layers/{model}'][-1]}"])

  scale = load("data_scale", "data_scale")
  smallest = scale["models"][np.argmin(scale["fractions"])]

  def intermediate(model):  # Layers but the first and the last, when there are more than 2.
    per_layer = scale[f"probe/fewshot_seeds/cls/{model}"]
    return (per_layer[1:-1] if len(per_layer) > 2 else per_layer).mean()

  return [cross_half(cka["cka_aa"]) - cross_half(cka["cka_bb"]),
          np.mean(np.nanargmax(lower_resnet, axis=0)) / (len(cross) - 1),
          spread(distance[:third]) - spread(distance[-third:]),
          halves(np.log(ratios[:, 0] / ratios[:, 1])),
          accuracy["vit_cls"] - accuracy["vit_noskip_block1"],
          top_own_patch("vit_cls") - top_own_patch("vit_gap"),
          intermediate("vit_cls") - intermediate(smallest)]


@pytest.mark.slow
@pytest.mark.seconds(350)
def test_notebooks_then_the_demo_command(tmp_path):
  workdir = str(tmp_path)
  for path in NOTEBOOKS:
    _run_notebook_and_check_its_figures(path, workdir)

  config = reproduce_config.get_config("runlocal")
  computed_by_notebooks = {os.path.basename(p)[:-5]
                           for p in glob.glob(os.path.join(workdir, "steps", "*.json"))}
  before = {k: os.path.getmtime(os.path.join(workdir, "steps", f"{k}.json"))
            for k in computed_by_notebooks}
  printed = subprocess.run([sys.executable, "-m", "experiments.reproduce",
                            "--config=configs/reproduce.py:runlocal", f"--workdir={workdir}"],
                           cwd=REPO_ROOT, check=True, capture_output=True, timeout=1800,
                           text=True).stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert list(summary) == [step.key for step in reproduction.STEPS]

  # Seven findings judged, each value the statistic of the saved arrays, each verdict its
  # interval's; the terminal ends with their table and the report's path.
  judged = reproduction.judged(summary)
  assert [len(summary[k].get("judgements", ())) for k in summary] == [0, 0, 2, 1, 0, 2, 1, 0, 1]
  np.testing.assert_allclose([j.value for j in judged],
                             _judged_values_from_saved_arrays(workdir, summary), atol=1.5e-4)
  for judgement in judged:
    assert judgement.low <= judgement.value <= judgement.high or judgement.low == judgement.high
  shown = sum(j.shown for j in judged)
  lines = printed.rstrip().splitlines()
  assert lines[-3:-1] == [f"Shown: {shown} of 7 findings.", ""]
  assert lines[-1] == f"Report: {os.path.join(workdir, reproduction.REPORT_FILE)}"
  table = lines[next(i for i, line in enumerate(lines) if line.startswith("#  finding")):-2]
  assert len(table) > 7 and all(len(line) <= 100 for line in table)
  for judgement in judged:
    assert judgement.verdict() in printed
  # What the notebooks computed was reused, not recomputed.
  assert computed_by_notebooks >= {"representation", "attention", "localization"}
  for key, mtime in before.items():
    assert os.path.getmtime(os.path.join(workdir, "steps", f"{key}.json")) == mtime, key

  arrays, metadata = results.read_results(workdir, "dataset_summary")
  # The cluttered digits: 4 placements of the 1,437 train digits, 2 of the 360 test digits.
  assert metadata["train"]["num_examples"] == 5748
  assert metadata["test"]["num_examples"] == 720
  assert arrays["train/class_counts"].sum() + arrays["test/class_counts"].sum() == 6468
  # The sharded pipeline sees exactly the labels the summary counted (720 = 6 batches of 120).
  np.testing.assert_array_equal(arrays["pipeline/label_histogram"],
                                arrays["test/class_counts"])
  # Every model was trained (smoke-test length) and its final parameters saved.
  assert set(summary["models"]["test_accuracy"]) == set(config.models)
  for name in config.models:
    assert os.path.isdir(os.path.join(workdir, "models", name, "params"))
  # Study 1 ran on the trained models: two sub-layers per ViT block, one unit per BiT stage.
  cka, metadata = results.read_results(os.path.join(workdir, "representation"), "cka_heatmap")
  depth = config.models.vit_cls.model.overrides.depth
  assert cka["cka_ab"].shape == (2 * depth, 4)
  np.testing.assert_allclose(np.diag(cka["cka_aa"]), 1.0, atol=1e-5)
  assert metadata["models"]["a"]["checkpoint"].endswith("models/vit_cls/params")
  # Every figure exists as PNG and PDF.
  for step in reproduction.STEPS:
    for figure in reproduction.figures(workdir, step.key):
      assert os.path.getsize(figure) > 1000 and os.path.getsize(figure[:-3] + "pdf") > 1000

  # The report embeds every figure of every step, and Chromium displays each of them.
  report_path = os.path.join(workdir, reproduction.REPORT_FILE)
  with open(report_path) as f:
    page = f.read()
  for step in reproduction.STEPS:
    assert (html.escape(step.finding.title) in page
            and html.escape(step.finding.paper_finding) in page)
  assert "python -m experiments.reproduce --config=configs/reproduce.py:runlocal" in page
  assert f"Findings judged on this run: {shown} of 7 shown" in page
  for judgement in judged:  # In the table at the top and in its step's section.
    assert page.count(html.escape(judgement.finding)) == 2
  figures = [f for step in reproduction.STEPS for f in step.figures]
  loaded = images_loaded_in_chromium(report_path, workdir)
  assert [alt for alt, _ in loaded] == [os.path.basename(f) for f in figures]
  assert all(ok for _, ok in loaded), loaded

  # A rerun skips every finished step; a changed config section reruns that step alone.
  again = reproduction.run(config, workdir)
  assert again == summary
  config.summary.examples_per_class = 4
  record = os.path.join(workdir, "steps", "dataset.json")
  written = os.stat(record).st_mtime_ns
  rerun = reproduction.run(config, workdir)
  # The changed step ran again (its record is rewritten; its time, rounded to 0.1 s, may repeat).
  assert os.stat(record).st_mtime_ns != written
  assert {k: v for k, v in rerun.items() if k != "dataset"} == {
      k: v for k, v in summary.items() if k != "dataset"}


def test_unknown_reproduce_config_is_rejected():
  with pytest.raises(ValueError, match="runlocal"):
    reproduce_config.get_config("imagenet")


def test_paper_config_trains_each_shared_model_once():
  config = reproduce_config.get_config("paper")
  assert config.data.name == "imagenet2012" and config.train_processes == 1
  # The skip-connection and data-scale studies share their unablated full-data reference.
  assert config.skip_connections.ablation.reference == config.data_scale.reference
  assert len(config.models) == 8
  assert config.representation.model_a.checkpoint.startswith("gs://vit_models/")
