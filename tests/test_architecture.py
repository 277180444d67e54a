"""The README's architecture section, enforced: what each part of vit_repr may import.

Imports are read from the source (`ast`, nothing is executed), including imports inside
functions. A part may import itself, the parts it is allowed, and anything outside the project.
The analyses take arrays only, so they never import models, data, configs or the layers above.
"""

import ast
import os

import pytest

from tests.conftest import REPO_ROOT

# Part -> its modules (module paths relative to the repository root, without '.py').
PARTS = {
    "base": ["vit_repr/parallel", "vit_repr/files"],
    "models": ["vit_repr/models"],
    "checkpoints": ["vit_repr/checkpoints", "vit_repr/timm_checkpoints"],
    "data": ["vit_repr/data"],
    "analyses": ["vit_repr/streaming", "vit_repr/cka", "vit_repr/attention",
                 "vit_repr/receptive_field", "vit_repr/residual", "vit_repr/localization",
                 "vit_repr/probes", "vit_repr/similarity"],
    "features": ["vit_repr/features"],
    "outputs": ["vit_repr/plotting", "vit_repr/report", "vit_repr/results", "vit_repr/findings",
                "vit_repr/judgements"],
    "training": ["vit_repr/recipe", "vit_repr/training", "vit_repr/metrics_log"],
    "studies": ["vit_repr/studies"],
    "main_job": ["vit_repr/reproduction"],
    "configs": ["configs"],
    "experiments": ["experiments"],
}
# Part -> the parts it may import. Models and analyses are the leaves researchers reuse alone.
ALLOWED = {
    "base": set(),
    "models": set(),
    "checkpoints": {"base"},
    "data": {"base"},
    "analyses": {"base"},
    "features": {"models"},
    "outputs": {"base", "models"},
    "training": {"base", "models", "checkpoints", "data"},
    "studies": {"base", "models", "checkpoints", "data", "analyses", "features", "outputs",
                "training"},
    "main_job": {"base", "models", "checkpoints", "data", "features", "outputs", "training",
                 "studies"},
    "configs": set(),
    "experiments": {"base", "studies", "training", "main_job", "configs"},
}


def _part_of(module: str) -> str | None:
  """The part a dotted module name ('vit_repr.models.vit') belongs to; None: outside."""
  path = module.replace(".", "/")
  for part, prefixes in PARTS.items():
    if any(path == p or path.startswith(p + "/") for p in prefixes):
      return part
  if path == "vit_repr":
    return "package root"
  return None


def _source_files(root: str) -> list[str]:
  """Every `.py` file of the project's parts under `root`, relative to it."""
  found = []
  for top in ("vit_repr", "configs", "experiments"):
    for directory, _, names in os.walk(os.path.join(root, top)):
      found += [os.path.relpath(os.path.join(directory, n), root) for n in names
                if n.endswith(".py")]
  return sorted(found)


def imported_modules(root: str, path: str) -> set[str]:
  """Dotted names of the project modules (or their members) `path` imports: 'from vit_repr
  import cka' -> 'vit_repr.cka', 'from vit_repr.data import EvalBatches' ->
  'vit_repr.data.EvalBatches' (in the part of vit_repr.data either way)."""
  with open(os.path.join(root, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  package = os.path.dirname(path).split("/")
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative import: resolve against the file's package.
        parent = ".".join(package[:len(package) - node.level + 1])
        base = f"{parent}.{base}" if base else parent
      modules.update(f"{base}.{alias.name}" for alias in node.names)
  return {m for m in modules if m.split(".")[0] in ("vit_repr", "configs", "experiments")}


def violations(root: str = REPO_ROOT) -> list[str]:
  """'<file> (<part>) imports <module> (<part>)' for every import the rules forbid."""
  found = []
  for path in _source_files(root):
    part = _part_of(path[:-3].removesuffix("/__init__"))
    assert part is not None, f"{path} belongs to no part: add it to PARTS (and the README)"
    if part == "package root":
      continue
    for module in sorted(imported_modules(root, path)):
      other = _part_of(module)
      if other in (None, part, "package root") or other in ALLOWED[part]:
        continue
      found.append(f"{path} ({part}) imports {module} ({other})")
  return found


def test_every_part_imports_only_what_the_readme_allows():
  assert not violations(), "\n".join(violations())


def test_readme_architecture_section_names_every_part():
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    readme = f.read()
  section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
  for part, prefixes in PARTS.items():
    for prefix in prefixes:
      name = prefix.replace("/", ".") if prefix.startswith("vit_repr") else prefix + "/"
      assert name in section, f"README's architecture section does not mention {name}"


@pytest.mark.parametrize("source, forbidden", [
    ("from vit_repr import models\n", "vit_repr.models"),
    ("from vit_repr.data import EvalBatches\n", "vit_repr.data.EvalBatches"),
    ("def f():\n  from configs import common\n", "configs.common"),
    ("from .models import vit\n", "vit_repr.models.vit"),
    ("import vit_repr.studies.resume\n", "vit_repr.studies.resume"),
])
def test_an_analysis_importing_models_data_or_configs_is_caught(source, forbidden, tmp_path):
  os.makedirs(tmp_path / "vit_repr")
  (tmp_path / "vit_repr" / "cka.py").write_text("import numpy as np\n" + source)
  (tmp_path / "vit_repr" / "parallel.py").write_text("import jax\n")
  assert violations(str(tmp_path)) == [f"vit_repr/cka.py (analyses) imports {forbidden} (" +
                                       f"{_part_of(forbidden)})"]
