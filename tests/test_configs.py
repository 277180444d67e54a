"""Every field of every config in configs/, for every arg, is settable with `--config.x=y`.

ml_collections refuses a command-line override of a field whose default is a bare None, so
such a field would be a dead end for a user; optional fields must be typed placeholders. Each
config is parsed through absl flags exactly as the mains parse it, with every leaf overridden.
"""

import ast
import importlib
import itertools
import os
import re

import ml_collections
import pytest
from absl import flags
from ml_collections.config_flags import config_flags, config_path

from configs import attention_distance, cka_heatmap, data_scale, linear_probes, localization
from configs import common, receptive_field, skip_connections, train
from tests.conftest import REPO_ROOT

# Every documented arg of every config (model combinations: each model once, and options).
ARGS = {
    "cka_heatmap": ["runlocal", *cka_heatmap.MODELS, "vit_b16+r50", "vit_l16,cheap",
                    "vit_b16+r50,runlocal", "dinov2_b14+siglip_b16,runlocal",
                    "dinov2_b14+siglip_b16+r50", "dinov2_b14+siglip_b16+r50,runlocal"],
    "attention_distance": ["runlocal", *attention_distance.VITS, "vit_b16+r50",
                           "vit_b16+r50,runlocal", "dinov2_b14+r50,runlocal"],
    "receptive_field": ["runlocal", *receptive_field.MODELS, "vit_b32+r50", "vit_b32+r50,runlocal",
                        "dinov2_b14+siglip_b16,runlocal"],
    "skip_connections": ["vit_b16", "local", "runlocal", "vit_b16,runlocal",
                         *(key for key in skip_connections.MODELS if key != "vit_b16"),
                         "vit_b16+mixer_b16+r50", "dinov2_b14+siglip_b16,runlocal"],
    "localization": ["runlocal", *localization.MODELS, "vit_b16+r50,gap=/runs/gap/params,cheap",
                     "vit_b16+r50,runlocal", "dinov2_b14+siglip_b16,runlocal",
                    "dinov2_b14+siglip_b16+r50", "dinov2_b14+siglip_b16+r50,runlocal"],
    "linear_probes": ["runlocal", *linear_probes.PAPER_MODELS, "vit_b16+r50,full",
                      "vit_b16+r50,runlocal", "dinov2_b14+siglip_b16,runlocal"],
    "data_scale": [*data_scale.SETTINGS, "runlocal", "local,fractions=0.03/0.1/0.3",
                   "imagenet_vit_b16,runlocal"],
    "train": [*train.EMBEDDED, *train.REAL, "vit_noskip,block=2,runlocal", "vit_cls,fraction=0.1",
              "imagenet_vit_b16,runlocal"],
    "reproduce": ["local", "runlocal", "paper", "paper,runlocal"],
}


def test_every_config_file_is_covered():
  files = {f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "configs"))
           if f.endswith(".py") and f not in ("__init__.py", "common.py")}
  assert files == set(ARGS)


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, path + ".")
    else:
      yield path


def _new_value(config: ml_collections.ConfigDict, path: str, index: int) -> str:
  """A command-line value of the field's type that differs from every other one given."""
  kind = config_path.get_type(path, config)
  current = config_path.get_value(path, config)
  if kind is bool:
    return str(not current)
  if kind is int:
    return str(1000 + index)
  if kind is float:
    return str(1000.5 + index)
  if kind is str:
    return f"value{index}"
  if kind in (tuple, list):
    return repr(tuple(current) + (f"value{index}",))
  raise AssertionError(f"Field {path!r} has type {kind}: it cannot be set from the command line "
                       "(use config_dict.placeholder(type) for an optional field).")


def _parse(config_file: str, arg: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  argv = ["main", f"--config={config_file}:{arg}",
          *(f"--config.{path}={value}" for path, value in overrides.items())]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def _parsed(value: str, kind: type):
  return {bool: lambda v: v == "True", int: int, float: float, str: str}.get(
      kind, ast.literal_eval)(value)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args],
                         ids=[f"{n}:{a}" for n, args in ARGS.items() for a in args])
def test_every_field_is_settable_from_the_command_line(name, arg):
  config_file = os.path.join(REPO_ROOT, "configs", f"{name}.py")
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  paths = list(_leaves(config))
  given = {path: _new_value(config, path, i) for i, path in enumerate(paths)}
  kinds = {path: config_path.get_type(path, config) for path in paths}
  parsed = _parse(config_file, arg, given)
  # Linked fields (one dataset per job) are one value: the last override of the group wins,
  # so each field that did not keep its own value is checked again on its own.
  for path in paths:
    value = config_path.get_value(path, parsed)
    if value != _parsed(given[path], kinds[path]):
      alone = config_path.get_value(path, _parse(config_file, arg, {path: given[path]}))
      assert alone == _parsed(given[path], kinds[path]), path


def test_a_bare_none_field_is_caught():
  """The check above fails on the very mistake it guards against."""
  config = ml_collections.ConfigDict({"data_dir": None})
  with pytest.raises(AssertionError, match="data_dir.*placeholder"):
    _new_value(config, "data_dir", 0)


def test_one_data_setting_reaches_every_step():
  """--config.data.name / data_dir of a multi-step job reach every study and trained model."""
  for name, arg in itertools.product(["reproduce"], ["local", "paper"]):
    parsed = _parse(os.path.join(REPO_ROOT, "configs", f"{name}.py"), arg,
                    {"data.name": "cifar10", "data.data_dir": "/data/tfds",
                     "data.eval_split": "test"})
    sections = {path[:-len(".data_dir")]: None for path in _leaves(parsed)
                if path.endswith("data.data_dir")}
    assert len(sections) > 10
    for section in sections:
      assert config_path.get_value(f"{section}.name", parsed) == "cifar10", section
      assert config_path.get_value(f"{section}.data_dir", parsed) == "/data/tfds", section
      split = next(f for f in ("eval_split", "test_split", "split")
                   if f"{section}.{f}" in set(_leaves(parsed)))
      assert config_path.get_value(f"{section}.{split}", parsed) == "test", section
  for name, arg in (("skip_connections", "vit_b16"), ("data_scale", "imagenet_vit_b16")):
    parsed = _parse(os.path.join(REPO_ROOT, "configs", f"{name}.py"), arg,
                    {"data.name": "cifar10", "data.data_dir": "/data/tfds"})
    names = [config_path.get_value(p, parsed) for p in _leaves(parsed) if p.endswith("data.name")]
    assert len(names) > 3 and set(names) == {"cifar10"}


# The one arg grammar (configs/common.parse_arg) and `runlocal` composed with a paper setting.


def test_parse_arg_types_values_and_takes_the_setting_first():
  parsed = common.parse_arg("vit_b16+r50,cheap,block=3,fraction=0.25,gap=/a/b",
                            models="", cheap=False, runlocal=False, block=int, fraction=float,
                            gap=str)
  assert parsed.to_dict() == dict(models="vit_b16+r50", cheap=True, runlocal=False, block=3,
                                  fraction=0.25, gap="/a/b")
  assert common.parse_arg("", models="", runlocal=False).to_dict() == dict(models="",
                                                                            runlocal=False)
  assert common.parse_arg("runlocal=false", models="", runlocal=True).runlocal is False


@pytest.mark.parametrize("arg,match", [
    ("vit_b16,colour=red", "unknown option 'colour'; options are models=<str>, runlocal, "
                           "block=<int>"),
    ("vit_b16,r50", "'r50' is not an option"),
    ("vit_b16,block=two", "option 'block' needs a value of type int, got 'two'"),
    ("vit_b16,runlocal=maybe", "option 'runlocal' is a flag"),
    ("vit_b16,runlocal,runlocal", "option 'runlocal' is given twice"),
])
def test_parse_arg_names_what_is_wrong(arg, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    common.parse_arg(arg, models="", runlocal=False, block=int)


@pytest.mark.parametrize("name,arg", [
    (n, a) for n, args in ARGS.items() for a in args if a.endswith(",runlocal") and n != "train"])
def test_runlocal_of_a_paper_setting_keeps_models_and_layers_and_downloads_nothing(name, arg):
  module = importlib.import_module(f"configs.{name}")
  paper = module.get_config(arg.removesuffix(",runlocal")).to_dict()
  smoke = module.get_config(arg).to_dict()
  specs = dict(_specs(paper))
  assert specs, f"{name}:{arg} has no model"
  smoke_specs = dict(_specs(smoke))
  assert set(smoke_specs) == set(specs)
  for path, spec in specs.items():
    small = smoke_specs[path]
    # Same model, layers and depth / grid fields; random init at the family's narrow width.
    assert (small["name"], small["layers"]) == (spec["name"], spec["layers"]), path
    assert small["checkpoint"] in ("", None), path
    for field, value in common.SMOKE_WIDTHS[spec["name"].partition("-")[0]].items():
      assert small["overrides"][field] == value, (path, field)
    assert {k: v for k, v in small["overrides"].items() if k not in common.WIDTH_FIELDS[
        spec["name"].partition("-")[0]]} == {k: v for k, v in spec["overrides"].items()
                                              if k not in common.WIDTH_FIELDS[
                                                  spec["name"].partition("-")[0]]}, path
  for path, value in _flat(smoke):
    assert not str(value).startswith("gs://"), (path, value)
    if path.endswith("data.name") or path == "data.name":
      assert value == "digits", path
    if path.endswith("image_size"):
      assert value == dict(_flat(paper))[path], path  # The paper's resolution.
    small = [v for k, v in common.SMOKE_COUNTS.items() if path == k or path.endswith("." + k)]
    if small:
      assert value == small[0], path


def _flat(node, path=""):
  if isinstance(node, dict):
    for key, value in node.items():
      yield from _flat(value, f"{path}.{key}" if path else key)
  else:
    yield path, node


def _specs(node, path=""):
  """(path, model spec or training config's model) of every named model in a config dict."""
  if not isinstance(node, dict):
    return
  if {"name", "checkpoint", "layers", "overrides"} <= set(node) and node["name"]:
    yield path, node
  elif {"model", "train", "init"} <= set(node):
    yield f"{path}.model", {**node["model"], "checkpoint": node["init"]["checkpoint"],
                            "layers": ()}
  else:
    for key, value in node.items():
      yield from _specs(value, f"{path}.{key}" if path else key)


@pytest.mark.parametrize("key", common.FAMILY_OVERRIDES)
@pytest.mark.parametrize("name", ["cka_heatmap", "attention_distance", "receptive_field",
                                  "localization", "linear_probes", "skip_connections"])
def test_todays_vit_families_carry_their_overrides(name, key):
  """Every study that names a family key builds that family's model (its public checkpoint and
  every constructor field of `common.FAMILY_OVERRIDES`), not a plain ViT-B/16."""
  config = importlib.import_module(f"configs.{name}").get_config(key).to_dict()
  (spec,) = dict(_specs(config)).values()
  assert (spec["name"], spec["checkpoint"]) == common.PUBLIC_CHECKPOINTS[key]
  family = common.FAMILY_OVERRIDES[key]
  assert {field: spec["overrides"][field] for field in family} == family
