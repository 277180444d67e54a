"""Records what every saved figure shows on its axes, for tests that run a main in a subprocess.

`install()` wraps `matplotlib.figure.Figure.savefig`: beside each `<stem>.png` it writes
`<stem>.png.axes.json`, per visible axes its title, axis labels and tick labels. `run_module`
runs an absl main (`python -m <module> <argv>`) with the spy installed.
"""

import json
import runpy
import sys

import matplotlib.figure


def describe(figure: matplotlib.figure.Figure) -> list[dict]:
  """Per visible axes: title, axis labels and tick labels (draw the figure first)."""
  return [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
           "xticks": [t.get_text() for t in ax.get_xticklabels()],
           "yticks": [t.get_text() for t in ax.get_yticklabels()]}
          for ax in figure.axes if ax.get_visible()]


def install() -> None:
  """Wraps `Figure.savefig` to record the axes of every PNG it writes."""
  savefig = matplotlib.figure.Figure.savefig

  def recording_savefig(self, fname, *args, **kwargs):
    if str(fname).endswith(".png"):
      self.canvas.draw()  # Tick labels are filled in when the figure is drawn.
      with open(f"{fname}.axes.json", "w") as f:
        json.dump(describe(self), f)
    return savefig(self, fname, *args, **kwargs)

  matplotlib.figure.Figure.savefig = recording_savefig


def run_module(module: str, argv: list[str]) -> None:
  """Runs `python -m module *argv` in this process with the spy installed."""
  install()
  sys.argv = [module, *argv]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  run_module(sys.argv[1], sys.argv[2:])
