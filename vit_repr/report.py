"""A self-contained HTML report of the main job: one section per finding of the paper.

The page opens with a table of the paper's findings judged on this run (`vit_repr.judgements`:
statistic, value, interval, shown or not). Each section shows its figures (PNG embedded as
base64 data URIs, so the file can be mailed or opened anywhere), a two-line caption (what Raghu
et al., NeurIPS 2021, found; what this run shows), the findings it judges, the exact command
and config that produced it, its headline numbers (example counts, accuracies, ...) and its
wall time. The page ends with the library versions and devices.
"""

import base64
import dataclasses
import html
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from vit_repr import files, judgements as judgements_lib


@dataclasses.dataclass(frozen=True)
class Section:
  """One finding of the paper as reproduced by one step of the main job.

  Attributes:
    title: heading, e.g. 'Representation structure (Figs 1-2)'.
    paper_finding: one sentence: what the paper found.
    observed: one sentence: what this run shows, with its numbers.
    figures: PNG paths (their PDF twins sit beside them).
    command: the shell command that recomputes this section alone.
    config: the config the step ran with (JSON-ready).
    numbers: headline numbers (example counts, accuracies, timings).
    judgements: the paper's findings this section judges.
  """
  title: str
  paper_finding: str
  observed: str
  figures: Sequence[str]
  command: str
  config: Mapping[str, Any]
  numbers: Mapping[str, Any]
  judgements: Sequence[judgements_lib.Judgement] = ()


_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.caption p { margin: 0.2em 0; } .paper { color: #555; }
.shown { color: #1a7f37; font-weight: bold; } .not-shown { color: #9a6700; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
"""


def _image_tag(png_path: str) -> str:
  encoded = base64.b64encode(files.read_bytes(png_path)).decode("ascii")
  name = html.escape(posixpath.basename(png_path))
  return (f'<figure><img alt="{name}" src="data:image/png;base64,{encoded}">'
          f"<figcaption>{name} (PDF beside the PNG)</figcaption></figure>")


def _numbers_table(numbers: Mapping[str, Any]) -> str:
  rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                 for k, v in numbers.items())
  return f"<table>{rows}</table>"


def _judgements_table(judged: Sequence[judgements_lib.Judgement]) -> str:
  """One row per finding: the finding, its statistic, value [interval] and the verdict."""
  def row(judgement: judgements_lib.Judgement) -> str:
    verdict = judgement.verdict()
    value = f"{judgement.value:+.3f} [{judgement.low:+.3f}, {judgement.high:+.3f}]"
    return ("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
        judgement.finding, f"{judgement.statistic}; needs {judgement.side} "
        f"{judgement.threshold:g} ({judgement.interval})", value))
            + f'<td class="{"shown" if judgement.shown else "not-shown"}">'
            f"{html.escape(verdict)}</td></tr>")
  header = "".join(f"<th>{h}</th>" for h in ("finding", "statistic", "value [interval]",
                                             "verdict"))
  return f"<table><tr>{header}</tr>{''.join(row(j) for j in judged)}</table>"


def _section_html(index: int, section: Section) -> str:
  missing = [p for p in section.figures if not files.exists(p)]
  if missing:
    raise FileNotFoundError(f"Section {section.title!r} lists figures that were not written: "
                            f"{missing}. Rerun its step (delete its entry under steps/).")
  config_json = html.escape(json.dumps(section.config, indent=1, sort_keys=True, default=str))
  return "\n".join([
      f'<section id="step{index}"><h2>{index}. {html.escape(section.title)}</h2>',
      *(_image_tag(p) for p in section.figures),
      '<div class="caption">',
      f'<p class="paper"><b>Paper:</b> {html.escape(section.paper_finding)}</p>',
      f"<p><b>This run:</b> {html.escape(section.observed)}</p></div>",
      *([_judgements_table(section.judgements)] if section.judgements else []),
      f"<p>Command:</p><pre>{html.escape(section.command)}</pre>",
      _numbers_table(section.numbers),
      f"<details><summary>Config</summary><pre>{config_json}</pre></details></section>",
  ])


def write_html_report(path: str, *, title: str, intro: str, sections: Sequence[Section],
                      environment: Mapping[str, Any],
                      judgements: Sequence[judgements_lib.Judgement] = ()) -> str:
  """Writes the report to `path` and returns `path`.

  Args:
    path: output `.html` file.
    title: page title.
    intro: one paragraph under the title (what ran, on what data, the full command).
    sections: one per finding, in order.
    judgements: every judged finding, tabled under the intro (none: no table).
    environment: versions and devices (`vit_repr.results.environment_metadata()`).

  Raises:
    FileNotFoundError: a section lists a figure that does not exist.
  """
  body = "\n".join(_section_html(i, s) for i, s in enumerate(sections, start=1))
  contents = "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
      f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
      *([f"<h2>Findings judged on this run: {sum(j.shown for j in judgements)} of "
         f"{len(judgements)} shown</h2>", _judgements_table(judgements)] if judgements else []),
      body,
      "<h2>Environment</h2>",
      f"<pre>{html.escape(json.dumps(environment, indent=1, sort_keys=True))}</pre>",
      "</body></html>",
  ])
  return files.write_text(path, contents)
