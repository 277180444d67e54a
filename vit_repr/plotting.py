"""Figures of the paper's layout, drawn from result arrays (no model or data access here).

Every function takes arrays (as written by the studies) and an output path stem, and saves
both `<stem>.png` and `<stem>.pdf`, returning the two paths.
"""

import os
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
