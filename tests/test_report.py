"""The HTML report of the main job (vit_repr.report), rendered in headless Chromium."""

import base64
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import pytest

from tests.conftest import images_loaded_in_chromium
from vit_repr import judgements, plotting, report, results


def _figure(stem: str, value: float) -> str:
  fig, ax = plt.subplots(figsize=(2, 2))
  ax.plot([0, 1], [0, value])
  png, _ = plotting.save_figure(fig, stem)
  return png


def _section(figures, **changes) -> report.Section:
  fields = dict(title="Representation structure (Figs 1-2)",
                paper_finding="ViT's heatmap is uniform.", observed="Mean CKA 0.90 < 1 & > 0.",
                figures=figures, command="python -m experiments.reproduce --workdir=/tmp/r",
                config={"data": {"name": "digits"}}, numbers={"num_examples": 720})
  return report.Section(**{**fields, **changes})


def test_report_embeds_every_figure_and_caption(tmp_path):
  figures = [_figure(str(tmp_path / "figures" / f"fig{i}"), i + 1.0) for i in range(2)]
  path = report.write_html_report(
      str(tmp_path / "report.html"), title="Reproduction", intro="On <digits>.",
      sections=[_section(figures[:1]), _section(figures[1:], title="Skip connections")],
      environment=results.environment_metadata())
  with open(path) as f:
    page = f.read()
  embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  for figure, encoded in zip(figures, embedded, strict=True):
    with open(figure, "rb") as f:
      assert base64.b64decode(encoded) == f.read()
  assert page.count("<section") == 2
  assert "1. Representation structure (Figs 1-2)" in page and "2. Skip connections" in page
  # Text is escaped, never interpreted as markup.
  assert "Mean CKA 0.90 &lt; 1 &amp; &gt; 0." in page and "On &lt;digits&gt;." in page
  assert "python -m experiments.reproduce --workdir=/tmp/r" in page
  assert '"jax":' in page or "&quot;jax&quot;" in page  # Versions.
  assert "num_examples" in page


def _judgement(finding: str, low: float) -> judgements.Judgement:
  return judgements.Judgement(finding=finding, statistic="CKA <difference>", value=low + 0.1,
                              low=low, high=low + 0.2, threshold=0.0, side="above",
                              interval="95% interval")


def test_report_tables_the_judged_findings_on_top_and_in_their_sections(tmp_path):
  shown, not_shown = _judgement("ViT is uniform", 0.05), _judgement("heads & depth", -0.05)
  path = report.write_html_report(
      str(tmp_path / "report.html"), title="Reproduction", intro="On digits.",
      sections=[_section([], judgements=[shown]), _section([], title="Attention",
                                                           judgements=[not_shown])],
      environment={}, judgements=[shown, not_shown])
  with open(path) as f:
    page = f.read()
  top = page[:page.index("<section")]
  assert "Findings judged on this run: 1 of 2 shown" in top
  for judgement in (shown, not_shown):
    finding = judgement.finding.replace("&", "&amp;")
    assert page.count(f"<td>{finding}</td>") == 2  # On top and in its section.
  assert '<td class="shown">shown</td>' in top
  assert '<td class="not-shown">not shown on this data</td>' in top
  assert "+0.150 [+0.050, +0.250]" in top and "+0.050 [-0.050, +0.150]" in top
  assert "CKA &lt;difference&gt;; needs above 0 (95% interval)" in top
  sections = page[page.index("<section"):]
  assert sections.index("ViT is uniform") < sections.index("<h2>2. Attention")
  assert sections.index("heads &amp; depth") > sections.index("<h2>2. Attention")


def test_missing_figure_names_the_section(tmp_path):
  with pytest.raises(FileNotFoundError, match="Representation structure.*nothing.png"):
    report.write_html_report(str(tmp_path / "r.html"), title="t", intro="i",
                             sections=[_section([str(tmp_path / "nothing.png")])],
                             environment={})


def test_chromium_loads_every_image_and_flags_a_broken_one(tmp_path):
  good = _figure(str(tmp_path / "good"), 1.0)
  path = report.write_html_report(str(tmp_path / "report.html"), title="t", intro="i",
                                  sections=[_section([good])], environment={})
  assert images_loaded_in_chromium(path, str(tmp_path)) == [("good.png", True)]
  # The check can fail: a corrupt image is reported as not loaded.
  with open(path) as f:
    page = f.read()
  broken = str(tmp_path / "broken.html")
  with open(broken, "w") as f:
    f.write(re.sub(r"base64,[^\"]+", "base64,AAAA", page))
  assert images_loaded_in_chromium(broken, str(tmp_path)) == [("good.png", False)]
