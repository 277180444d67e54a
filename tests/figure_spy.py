"""Records what every saved figure shows on its axes, for tests that run a main in a subprocess.

`install()` wraps `vit_repr.plotting.save_figure`: beside each `<stem>.png` it writes
`<stem>.png.axes.json` (a local path), per visible axes its title, axis labels and tick
labels. `run_module` runs an absl main (`python -m <module> <argv>`) with the spy installed.
"""

import json
import runpy
import sys

import matplotlib.figure

from vit_repr import plotting


def describe(figure: matplotlib.figure.Figure) -> list[dict]:
  """Per visible axes: title, axis labels and tick labels."""
  figure.draw_without_rendering()  # Tick labels are filled in when the figure is drawn.
  return [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
           "xticks": [t.get_text() for t in ax.get_xticklabels()],
           "yticks": [t.get_text() for t in ax.get_yticklabels()]}
          for ax in figure.axes if ax.get_visible()]


def install() -> None:
  """Wraps `plotting.save_figure` to record the axes of every figure it saves."""
  save_figure = plotting.save_figure

  def recording_save_figure(fig, stem):
    paths = save_figure(fig, stem)
    with open(f"{stem}.png.axes.json", "w") as f:
      json.dump(describe(fig), f)
    return paths

  plotting.save_figure = recording_save_figure


def run_module(module: str, argv: list[str]) -> None:
  """Runs `python -m module *argv` in this process with the spy installed."""
  install()
  sys.argv = [module, *argv]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  run_module(sys.argv[1], sys.argv[2:])
