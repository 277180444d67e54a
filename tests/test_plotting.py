"""Figures (vit_repr.plotting): layer axes follow the computation order at 12 and 24 blocks."""

import numpy as np
import pytest

from tests import figure_spy
from tests.layer_order import out_of_order
from vit_repr import plotting
from vit_repr.models.layout import display_name


@pytest.fixture
def drawn(monkeypatch):
  """The axes (`figure_spy.describe`) of every figure saved during the test."""
  figures = []
  save = plotting.save_figure

  def recording_save(fig, stem):
    figures.append(figure_spy.describe(fig))
    return save(fig, stem)

  monkeypatch.setattr(plotting, "save_figure", recording_save)
  return figures


def vit_names(depth, tag="out"):
  return [f"Transformer/encoderblock_{i}/{tag}" for i in range(depth)]


RESNET_NAMES = [f"block{s}/unit{u:02d}/out" for s, units in enumerate((3, 4, 6, 3), start=1)
                for u in range(1, units + 1)]


@pytest.mark.parametrize("depth", [12, 24])
def test_curves_of_one_architecture_share_ticks_in_computation_order(depth, drawn, tmp_path):
  names = vit_names(depth)
  panel = plotting.CurvePanel(curves={"a": np.linspace(0, 1, depth), "b": np.ones(depth)},
                              layer_names={"a": names, "b": names})
  plotting.plot_layer_curves([panel], str(tmp_path / "curves"))
  (axes,) = drawn[0]
  ticks = [t for t in axes["xticks"] if t]
  assert axes["xlabel"] == "layer" and ticks[0] == "0/out"
  assert f"{depth - 1}/out" in ticks or len(ticks) < depth  # Every k-th layer is ticked.
  assert "10/out" in ticks and not out_of_order(ticks)


def test_curves_of_different_architectures_use_relative_depth(drawn, tmp_path):
  """A 12-block ViT beside a 16-unit ResNet: neither model's names label the other's layers."""
  panel = plotting.CurvePanel(
      curves={"vit_b16": np.zeros(12), "r50": np.ones(16)},
      layer_names={"vit_b16": vit_names(12), "r50": RESNET_NAMES})
  plotting.plot_layer_curves([panel], str(tmp_path / "curves"))
  (axes,) = drawn[0]
  assert axes["xlabel"].startswith("relative depth")
  labels = {display_name(n) for n in vit_names(12) + RESNET_NAMES}
  assert axes["xticks"] and not labels & set(axes["xticks"])


def test_curve_without_its_layer_names_is_refused(tmp_path):
  panel = plotting.CurvePanel(curves={"a": np.zeros(3)}, layer_names={"a": vit_names(4)},
                              title="probe")
  with pytest.raises(ValueError, match="'a' must be \\[layers\\] with one layer name per"):
    plotting.plot_layer_curves([panel], str(tmp_path / "curves"))


@pytest.mark.parametrize("depth", [12, 24])
def test_heatmap_and_norm_ratio_axes_in_computation_order(depth, drawn, tmp_path):
  names = [n for i in range(depth) for n in (f"Transformer/encoderblock_{i}/mid",
                                               f"Transformer/encoderblock_{i}/out")]
  plotting.plot_heatmaps([plotting.HeatmapPanel(np.eye(len(names)), names, names, "a", "b")],
                         str(tmp_path / "heatmap"))
  sublayers = [n.replace("/mid", "/attn").replace("/out", "/mlp") for n in names]
  values = np.ones(len(sublayers))
  plotting.plot_norm_ratios([plotting.NormRatioPanel(sublayers, values, values,
                                                     np.ones(len(sublayers), bool))],
                            str(tmp_path / "norm_ratios"))
  for figure in drawn:
    for axes in figure:
      for ticks in (axes["xticks"], axes["yticks"]):
        assert not out_of_order(ticks), ticks
  for ticks in (drawn[0][0]["yticks"], drawn[1][0]["xticks"]):  # Blocks 10+ are drawn.
    assert max(int(t.split("/")[0]) for t in ticks if "/" in t) >= 10
