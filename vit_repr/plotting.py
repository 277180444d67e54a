"""Figures of the paper's layout, drawn from result arrays (no model or data access here).

Every function takes arrays (as written by the studies) and an output path stem, and saves
both `<stem>.png` and `<stem>.pdf`, returning the two paths.
"""

import dataclasses
import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np


def save_figure(fig: plt.Figure, stem: str) -> tuple[str, str]:
  """Saves `fig` as `<stem>.png` (150 dpi) and `<stem>.pdf`, closes it, returns the paths."""
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = (f"{stem}.png", f"{stem}.pdf")
  for path in paths:
    fig.savefig(path, dpi=150, bbox_inches="tight")
  plt.close(fig)
  return paths


def plot_montage(montage: np.ndarray, stem: str, *, row_labels: Sequence[str] = (),
                 title: str = "") -> tuple[str, str]:
  """Draws a montage of example images, one row per class.

  Args:
    montage: `[rows * H, columns * W, 3]` in [0, 1], as `vit_repr.data.summarize` returns.
    stem: output path without extension.
    row_labels: one label per row (e.g. class names), drawn on the left.
    title: figure title.

  Returns:
    The PNG and PDF paths.
  """
  montage = np.asarray(montage)
  if montage.ndim != 3 or montage.shape[-1] != 3:
    raise ValueError(f"montage must be [rows * H, columns * W, 3]; got {montage.shape}.")
  height, width = montage.shape[:2]
  fig, ax = plt.subplots(figsize=(min(12.0, 0.02 * width + 1.5), min(12.0, 0.02 * height + 1.0)))
  ax.imshow(np.clip(montage, 0.0, 1.0), interpolation="nearest")
  ax.set_xticks([])
  if row_labels:
    tile = height / len(row_labels)
    ax.set_yticks((np.arange(len(row_labels)) + 0.5) * tile, labels=list(row_labels))
  else:
    ax.set_yticks([])
  if title:
    ax.set_title(title)
  return save_figure(fig, stem)


@dataclasses.dataclass(frozen=True)
class HeatmapPanel:
  """One layer-by-layer similarity matrix to draw (rows on the y axis, from the bottom).

  Attributes:
    values: `[rows, columns]` similarities (NaN cells are drawn blank).
    row_names: `[rows]` layer names (model A).
    column_names: `[columns]` layer names (model B).
    row_label: y-axis label, e.g. 'Layers ViT-B/16'.
    column_label: x-axis label.
    title: panel title.
  """
  values: np.ndarray
  row_names: Sequence[str]
  column_names: Sequence[str]
  row_label: str
  column_label: str
  title: str = ""


_SHORT_NAMES = (
    (re.compile(r"Transformer/encoderblock_(\d+)/"), r"\1/"),  # ViT: '3/mid'.
    (re.compile(r"MixerBlock_(\d+)/"), r"\1/"),                # Mixer: '3/out'.
    (re.compile(r"block(\d)/unit(\d+)/out"), r"\1.\2"),        # ResNet: stage.unit '2.03'.
)


def short_layer_name(name: str) -> str:
  """A compact axis label: 'Transformer/encoderblock_3/mid' -> '3/mid', 'block2/unit03/out'
  -> '2.03'; other names unchanged."""
  for pattern, replacement in _SHORT_NAMES:
    name = pattern.sub(replacement, name)
  return name


def _layer_ticks(names: Sequence[str], max_ticks: int = 16) -> tuple[np.ndarray, list[str]]:
  """Every k-th layer position and its short name, at most `max_ticks` of them."""
  step = max(1, int(np.ceil(len(names) / max_ticks)))
  positions = np.arange(0, len(names), step)
  return positions, [short_layer_name(names[i]) for i in positions]


def plot_heatmaps(panels: Sequence[HeatmapPanel], stem: str, *, vmin: float = 0.0,
                  vmax: float = 1.0, cmap: str = "magma",
                  colorbar_label: str = "CKA") -> tuple[str, str]:
  """Draws layer-by-layer heatmaps side by side, as the paper's Figures 1-2.

  Layer 0 (the input side) is at the bottom-left of each panel, as in the paper.

  Args:
    panels: the matrices to draw, left to right.
    stem: output path without extension.
    vmin, vmax: colour scale limits shared by all panels.
    cmap: matplotlib colour map.
    colorbar_label: label of the shared colour bar.

  Returns:
    The PNG and PDF paths.
  """
  if not panels:
    raise ValueError("plot_heatmaps needs at least one panel.")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.0, 4.0),
                           squeeze=False, layout="constrained")
  image = None
  for ax, panel in zip(axes[0], panels):
    values = np.asarray(panel.values, np.float64)
    if values.shape != (len(panel.row_names), len(panel.column_names)):
      raise ValueError(f"Panel {panel.title!r}: values {values.shape} do not match "
                       f"{len(panel.row_names)} row and {len(panel.column_names)} column names.")
    image = ax.imshow(values, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap,
                      aspect="auto", interpolation="nearest")
    for set_ticks, names in ((ax.set_yticks, panel.row_names),
                             (ax.set_xticks, panel.column_names)):
      positions, labels = _layer_ticks(list(names))
      set_ticks(positions, labels=labels, fontsize=6)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_ylabel(panel.row_label)
    ax.set_xlabel(panel.column_label)
    ax.set_title(panel.title)
  fig.colorbar(image, ax=axes[0].tolist(), label=colorbar_label, shrink=0.9)
  return save_figure(fig, stem)
