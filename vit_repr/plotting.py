"""Figures of the paper's layout, drawn from result arrays (no model or data access here).

Every function takes arrays (as written by the studies) and an output path stem, and saves
both `<stem>.png` and `<stem>.pdf`, returning the two paths. Layer axes are labelled with each
model family's short names (`vit_repr.models.layout.display_name`: '3/mid', '2.03').

One module for every figure (~450 lines): each is a short function over the same few helpers
(axes grids, colour bars, saving), so a reader finds any of the paper's figures here.
"""

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from vit_repr import files
from vit_repr.models.layout import display_name


def _subplots(rows: int = 1, columns: int = 1, *, figsize: tuple[float, float],
              layout: str | None = None, **subplots_kwargs) -> tuple[Figure, Any]:
  """A figure and its axes, made without pyplot: no global figure registry and no backend
  switch, so plotting neither leaks figures nor changes a notebook's backend."""
  fig = Figure(figsize=figsize, layout=layout)
  return fig, fig.subplots(rows, columns, **subplots_kwargs)


def save_figure(fig: Figure, stem: str) -> tuple[str, str]:
  """Saves `fig` as `<stem>.png` (150 dpi) and `<stem>.pdf` (local or URI, process 0 only,
  atomically; `vit_repr.files`), returns the paths."""
  paths = (f"{stem}.png", f"{stem}.pdf")
  for path in paths:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.rsplit(".", 1)[1], dpi=150, bbox_inches="tight")
    files.write_bytes(path, buffer.getvalue())
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
  fig, ax = _subplots(figsize=(min(12.0, 0.02 * width + 1.5), min(12.0, 0.02 * height + 1.0)))
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
    marked: `[rows, columns]` bool or None: cells drawn with a dot (e.g. not above chance).
  """
  values: np.ndarray
  row_names: Sequence[str]
  column_names: Sequence[str]
  row_label: str
  column_label: str
  title: str = ""
  marked: np.ndarray | None = None


def _layer_ticks(names: Sequence[str], max_ticks: int = 16) -> tuple[np.ndarray, list[str]]:
  """Every k-th layer position and its short name (`display_name`), at most `max_ticks`."""
  step = max(1, int(np.ceil(len(names) / max_ticks)))
  positions = np.arange(0, len(names), step)
  return positions, [display_name(names[i]) for i in positions]


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
  fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.0, 4.0),
                        squeeze=False, layout="constrained")
  image = None
  for ax, panel in zip(axes[0], panels):
    values = np.asarray(panel.values, np.float64)
    if values.shape != (len(panel.row_names), len(panel.column_names)):
      raise ValueError(f"Panel {panel.title!r}: values {values.shape} do not match "
                       f"{len(panel.row_names)} row and {len(panel.column_names)} column names.")
    image = ax.imshow(values, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap,
                      aspect="auto", interpolation="nearest")
    if panel.marked is not None:
      if np.shape(panel.marked) != values.shape:
        raise ValueError(f"Panel {panel.title!r}: marked {np.shape(panel.marked)} does not "
                         f"match values {values.shape}.")
      rows, columns = np.nonzero(np.asarray(panel.marked, bool))
      ax.scatter(columns, rows, s=4, c="white", edgecolors="black", linewidths=0.3)
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


@dataclasses.dataclass(frozen=True)
class NormRatioPanel:
  """One model's skip-connection norm ratios per residual sub-layer (paper Fig 7).

  Attributes:
    names: `[L]` sub-layer names, input side first.
    cls: `[L]` ratio for the CLS token (NaN where there is none: not drawn).
    spatial: `[L]` ratio for the spatial tokens / feature-map locations.
    identity_shortcut: `[L]` bool; False (ResNet projection shortcuts) is drawn hollow.
    title: panel title.
    register: `[L]` ratio for the register tokens (DINOv2's); None or NaN where a model has
      none: not drawn.
  """
  names: Sequence[str]
  cls: np.ndarray
  spatial: np.ndarray
  identity_shortcut: np.ndarray
  title: str = ""
  register: np.ndarray | None = None


def plot_norm_ratios(panels: Sequence[NormRatioPanel], stem: str, *,
                     ylabel: str = "||z|| / ||f(z)||") -> tuple[str, str]:
  """Draws ratio-of-norms curves, CLS vs spatial tokens, one panel per model (paper Fig 7).

  A panel with finite register ratios (`NormRatioPanel.register`) draws them as a third curve.

  The y axis is logarithmic and shared, so ViT and ResNet ratios compare directly; a dashed
  line marks ratio 1 (skip and branch equally strong).

  Args:
    panels: one per model, left to right.
    stem: output path without extension.
    ylabel: y-axis label (say which statistic is drawn).

  Returns:
    The PNG and PDF paths.
  """
  if not panels:
    raise ValueError("plot_norm_ratios needs at least one panel.")
  fig, axes = _subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False,
                        sharey=True, layout="constrained")
  for ax, panel in zip(axes[0], panels):
    size = len(panel.names)
    register = np.full(size, np.nan) if panel.register is None else panel.register
    columns = {"cls": panel.cls, "spatial": panel.spatial, "register": register,
               "identity_shortcut": panel.identity_shortcut}
    bad = {k: np.shape(v) for k, v in columns.items() if np.shape(v) != (size,)}
    if bad:
      raise ValueError(f"Panel {panel.title!r}: {bad} do not match its {size} sub-layer names.")
    x = np.arange(size)
    identity = np.asarray(panel.identity_shortcut, bool)
    for values, label, colour in ((panel.cls, "CLS token", "tab:orange"),
                                  (panel.spatial, "spatial tokens", "tab:blue"),
                                  (register, "register tokens", "tab:green")):
      values = np.asarray(values, np.float64)
      if not np.isfinite(values).any():
        continue
      ax.plot(x, values, color=colour, label=label)
      ax.scatter(x[identity], values[identity], color=colour, s=14)
      if not identity.all():
        ax.scatter(x[~identity], values[~identity], facecolors="none", edgecolors=colour, s=14,
                   label=f"{label} (projection shortcut)")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    positions, labels = _layer_ticks(list(panel.names))
    ax.set_xticks(positions, labels=labels, fontsize=6, rotation=90)
    ax.set_xlabel("Sub-layer")
    ax.set_title(panel.title)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel(ylabel)
  return save_figure(fig, stem)


def plot_attention_distance(distance: np.ndarray, layer_labels: Sequence[str], stem: str, *,
                            title: str = "", image_size: int | None = None) -> tuple[str, str]:
  """Mean attention distance of every head against its layer, as the paper's Figure 3.

  Heads are sorted by distance within each layer; the k-th smallest of every layer shares a
  colour.

  Args:
    distance: `[layers, heads]` mean attention distance in pixels.
    layer_labels: `[layers]` x-axis labels.
    stem: output path without extension.
    title: figure title.
    image_size: if given, the y axis spans [0, image_size] pixels.

  Returns:
    The PNG and PDF paths.
  """
  distance = np.asarray(distance, np.float64)
  if distance.ndim != 2 or distance.shape[0] != len(layer_labels):
    raise ValueError(f"distance must be [layers, heads] with one label per layer; got "
                     f"{distance.shape} and {len(layer_labels)} labels.")
  ordered = np.sort(distance, axis=1)
  layers, heads = ordered.shape
  fig, ax = _subplots(figsize=(max(4.0, 0.35 * layers + 2.0), 3.6), layout="constrained")
  colours = matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, heads))
  for head in range(heads):
    ax.scatter(np.arange(layers), ordered[:, head], s=14, color=colours[head],
               label=f"head {head} (sorted)" if heads <= 16 else None)
  positions, labels = _layer_ticks(list(layer_labels), max_ticks=24)
  ax.set_xticks(positions, labels=labels, fontsize=7, rotation=90)
  ax.set_xlabel("Layer")
  ax.set_ylabel("Mean attention distance (pixels)")
  if image_size:
    ax.set_ylim(0, image_size)
  if heads <= 16:
    ax.legend(fontsize=6, ncol=2)
  if title:
    ax.set_title(title)
  return save_figure(fig, stem)


def plot_head_cka_vs_distance(head_distance: np.ndarray, head_cka: np.ndarray,
                              head_block: np.ndarray, resnet_names: Sequence[str], stem: str, *,
                              title: str = "") -> tuple[str, str]:
  """CKA of each attention head to ResNet layers against its mean distance (paper Figure 5).

  Args:
    head_distance: `[heads]` mean attention distance of each head (pixels).
    head_cka: `[heads, resnet_layers]` CKA of each head to each ResNet layer.
    head_block: `[heads]` the ViT block of each head (colour).
    resnet_names: `[resnet_layers]` one panel each.
    stem: output path without extension.
    title: figure title.

  Returns:
    The PNG and PDF paths.
  """
  head_cka = np.asarray(head_cka, np.float64)
  head_distance = np.asarray(head_distance, np.float64)
  if head_cka.shape != (len(head_distance), len(resnet_names)):
    raise ValueError(f"head_cka must be [heads, resnet_layers] = ({len(head_distance)}, "
                     f"{len(resnet_names)}); got {head_cka.shape}.")
  blocks = np.asarray(head_block)
  panels = len(resnet_names)
  fig, axes = _subplots(1, panels, figsize=(3.2 * panels + 1.0, 3.2), squeeze=False,
                        sharey=True, layout="constrained")
  colours = matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, max(1, len(np.unique(blocks)))))
  for ax, column, name in zip(axes[0], head_cka.T, resnet_names):
    for colour, block in zip(colours, np.unique(blocks)):
      chosen = blocks == block
      ax.scatter(head_distance[chosen], column[chosen], s=16, color=colour,
                 label=f"block {block}")
    ax.set_xlabel("Mean attention distance (pixels)")
    ax.set_title(f"ResNet {display_name(name)}", fontsize=9)
  axes[0][0].set_ylabel("CKA (head vs ResNet layer)")
  axes[0][-1].legend(fontsize=6)
  if title:
    fig.suptitle(title)
  return save_figure(fig, stem)


def plot_receptive_fields(panels: Sequence[tuple[str, np.ndarray, Sequence[str]]], stem: str, *,
                          max_columns: int = 12) -> tuple[str, str]:
  """Effective receptive field images, one per layer, one block of rows per model (Figure 6).

  Args:
    panels: `(model name, maps [layers, H, W] normalised to max 1, layer labels)` per model.
    stem: output path without extension.
    max_columns: layers per row before wrapping.

  Returns:
    The PNG and PDF paths.
  """
  if not panels:
    raise ValueError("plot_receptive_fields needs at least one model's maps.")
  columns = min(max_columns, max(len(labels) for _, _, labels in panels))
  rows_of = [int(np.ceil(len(labels) / columns)) for _, _, labels in panels]
  fig, axes = _subplots(sum(rows_of), columns, figsize=(1.3 * columns, 1.5 * sum(rows_of)),
                        squeeze=False, layout="constrained")
  for ax in axes.ravel():
    ax.axis("off")
  row = 0
  for (model_name, maps, labels), rows in zip(panels, rows_of):
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(labels):
      raise ValueError(f"{model_name}: maps must be [layers, H, W] with one label per layer; "
                       f"got {maps.shape} and {len(labels)} labels.")
    for i, (image, label) in enumerate(zip(maps, labels)):
      ax = axes[row + i // columns][i % columns]
      ax.imshow(image, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
      ax.set_title(f"{model_name} {label}" if i == 0 else label, fontsize=6)
    row += rows
  return save_figure(fig, stem)


@dataclasses.dataclass(frozen=True)
class LocalizationRow:
  """One model's (and layer's) token-vs-patch CKA maps to draw as a row of panels.

  Attributes:
    label: row label, e.g. 'ViT-B/16 CLS, block 11'.
    maps: `[g, g, g, g]` CKA of the token at (q_row, q_col) with the patch at (p_row, p_col),
      as `vit_repr.localization` computes.
    positions: the (q_row, q_col) token positions to draw, one per column.
  """
  label: str
  maps: np.ndarray
  positions: Sequence[tuple[int, int]]


def plot_localization(rows: Sequence[LocalizationRow], stem: str, *,
                      column_titles: Sequence[str] = (), vmin: float = 0.0, vmax: float = 1.0,
                      cmap: str = "magma") -> tuple[str, str]:
  """Draws token-vs-input-patch CKA maps, as the paper's Figures 9-10.

  One row per model/layer, one column per token position; each panel is the `[g, g]` map of
  that token's CKA with every input patch, the token's own patch outlined in cyan.

  Args:
    rows: the rows to draw, top to bottom (all with the same number of positions).
    stem: output path without extension.
    column_titles: one title per column (e.g. 'corner', 'edge', 'centre').
    vmin, vmax: shared colour scale limits.
    cmap: matplotlib colour map.

  Returns:
    The PNG and PDF paths.
  """
  if not rows:
    raise ValueError("plot_localization needs at least one row.")
  columns = len(rows[0].positions)
  if columns == 0 or any(len(r.positions) != columns for r in rows):
    raise ValueError("Every row needs the same, non-zero number of positions; got "
                     f"{[len(r.positions) for r in rows]}.")
  if column_titles and len(column_titles) != columns:
    raise ValueError(f"{len(column_titles)} column titles for {columns} columns.")
  fig, axes = _subplots(len(rows), columns, figsize=(1.9 * columns + 1.6, 1.8 * len(rows)),
                        squeeze=False, layout="constrained")
  image = None
  for r, row in enumerate(rows):
    maps = np.asarray(row.maps, np.float64)
    grid = maps.shape[0]
    if maps.shape != (grid,) * 4:
      raise ValueError(f"Row {row.label!r}: maps must be [g, g, g, g]; got {maps.shape}.")
    for c, (q_row, q_col) in enumerate(row.positions):
      ax = axes[r][c]
      image = ax.imshow(maps[q_row, q_col], vmin=vmin, vmax=vmax, cmap=cmap,
                        interpolation="nearest")
      ax.add_patch(matplotlib.patches.Rectangle((q_col - 0.5, q_row - 0.5), 1, 1, fill=False,
                                                edgecolor="cyan", linewidth=1.5))
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0 and column_titles:
        ax.set_title(column_titles[c], fontsize=8)
      if c == 0:
        ax.set_ylabel(row.label, fontsize=7)
  fig.colorbar(image, ax=axes.ravel().tolist(), label="CKA (token vs input patch)", shrink=0.8)
  return save_figure(fig, stem)


@dataclasses.dataclass(frozen=True)
class CurvePanel:
  """Per-layer curves to draw in one panel (the layout of the paper's Figs 11-13).

  Attributes:
    curves: `{label: [layers]}` values per layer, one line each, input side first.
    layer_names: `{label: [layers]}` each curve's layer names in computation order. Curves
      whose models have the same layers share an x axis ticked with the (shortened) names;
      curves of models with different layers (a ViT beside a ResNet) are drawn against each
      model's relative depth (first layer 0, last layer 1).
    title: panel title.
    ylabel: y-axis label, e.g. 'test accuracy' or 'CKA to the full-data model'.
    chance: a dashed horizontal reference line (e.g. chance accuracy), or None.
  """
  curves: Mapping[str, np.ndarray]
  layer_names: Mapping[str, Sequence[str]]
  title: str = ""
  ylabel: str = ""
  chance: float | None = None


def plot_layer_curves(panels: Sequence[CurvePanel], stem: str, *, columns: int | None = None,
                      ylim: tuple[float, float] | None = (0.0, 1.02)) -> tuple[str, str]:
  """Draws per-layer curves (probe accuracy, CKA to a reference model), a panel each.

  Args:
    panels: the panels, filled row by row.
    stem: output path without extension.
    columns: panels per row (default all in one row).
    ylim: y-axis limits shared by all panels (None: automatic).

  Returns:
    The PNG and PDF paths.

  Raises:
    ValueError: a curve that is not 1-D or whose layer names are missing or of another length.
  """
  if not panels:
    raise ValueError("plot_layer_curves needs at least one panel.")
  columns = columns or len(panels)
  rows = int(np.ceil(len(panels) / columns))
  fig, axes = _subplots(rows, columns, figsize=(3.8 * columns, 3.0 * rows), squeeze=False,
                        layout="constrained")
  for ax in axes.ravel()[len(panels):]:
    ax.set_visible(False)
  for ax, panel in zip(axes.ravel(), panels):
    names = {label: list(panel.layer_names.get(label, ())) for label in panel.curves}
    shared = len({tuple(n) for n in names.values()}) <= 1
    for label, values in panel.curves.items():
      values = np.asarray(values, np.float64)
      if values.ndim != 1 or len(values) != len(names[label]):
        raise ValueError(f"Panel {panel.title!r}: curve {label!r} must be [layers] with one "
                         f"layer name per value; got shape {values.shape} and "
                         f"{len(names[label])} names.")
      x = np.arange(len(values)) if shared else np.linspace(0.0, 1.0, len(values))
      ax.plot(x, values, marker="o", markersize=3, label=label)
    if panel.chance is not None:
      ax.axhline(panel.chance, color="gray", linestyle="--", linewidth=0.8, label="chance")
    if shared and names:
      positions, labels = _layer_ticks(next(iter(names.values())))
      ax.set_xticks(positions, labels=labels, fontsize=6, rotation=90)
      ax.set_xlabel("layer")
    else:
      ax.set_xlabel("relative depth (first layer 0, last 1)")
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=9)
    ax.legend(fontsize=6)
  return save_figure(fig, stem)
