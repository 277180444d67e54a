r"""Pretraining data scale (Raghu et al. 2021, Figs 12-13): nested subsets, CKA, probes.

    python -m experiments.data_scale --config=configs/data_scale.py:local --workdir=/tmp/ds
    python -m experiments.data_scale --config=configs/data_scale.py:local,fractions=0.03/0.1/0.3 \
        --config.models_dir=/tmp/shared_models --workdir=/tmp/ds
    python -m experiments.data_scale --config=configs/data_scale.py:imagenet_vit_b16 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=gs://b/ds
    python -m experiments.data_scale --config=configs/data_scale.py:runlocal --workdir=/tmp/ds_smoke

Args after the colon: a setting, then comma-separated options.
  local             the demo: the `vit_cls` recipe of configs/train.py (ViT width 64, 6 blocks,
                    patch 8 at 32px, 1,500 steps) on all of 'digits' train (the reference,
                    named 'vit_cls' so a main job's model is reused) and on nested subsets
                    (default 10% and 30%, the same 1,500 steps: more epochs on less data);
                    CKA on the 360 test images; probes drawn from the training split.
  imagenet_vit_b16  ViT-B/16 trained from scratch on ImageNet-1k subsets (default 3%, 10%, 30%)
                    and all of it (configs/train.py:imagenet_vit_b16, 93,835 steps each: ~2.5k
                    TPU v3 core-days per model, one per fraction); CKA on 10,000 validation
                    images; probes as configs/linear_probes.py's paper settings plus the public
                    AugReg ViT-B/16 pre-trained on ImageNet-1k and on ImageNet-21k (Fig 13's
                    ImageNet vs ImageNet-21k comparison). The paper used JFT-300M subsets; its
                    schedule for the subset models is unknown here: they train for the same
                    number of steps as the full model (override per model with
                    --config.models.<name>.train.total_steps).
Options: `fractions=a/b/...` (subset fractions in (0, 1); the full-data reference is added);
`runlocal`, alone or after `local`: the local steps shrunk to a smoke test (configs/train.py
runlocal models, one 30% subset, a few training steps, a small CKA and probe run); after
`imagenet_vit_b16`: that setting with random narrow ViT-B/16s at full depth, a few embedded
images and training steps (`configs/common.smoke_test`).

One dataset for the whole study: the models' training data, the CKA data and the probes' data
are linked to `config.data` (name, data_dir, train_split, eval_split), so
`--config.data.name=X --config.data.data_dir=Y` reaches every part.

Model names follow the recipe: '<recipe>' for all the data, '<recipe>_fraction<f>' for a
subset, with 'p' for the decimal point (ConfigDict keys cannot contain dots): 10% of the data
is 'vit_cls_fraction0p1'. `models_dir` (None: <workdir>/models) holds the trained models;
point it at a shared directory so models trained once (e.g. by the main job) are reused.
"""

import ml_collections
from ml_collections import config_dict

from configs import cka_heatmap
from configs import common
from configs import linear_probes
from configs import train as train_configs

SETTINGS = ("local", "imagenet_vit_b16")
_DEFAULT_FRACTIONS = {"local": (0.1, 0.3), "imagenet_vit_b16": (0.03, 0.1, 0.3)}
_SMOKE_FRACTIONS = (0.3,)  # 'local,runlocal'.
_VIT_LAYERS = (r"Transformer/encoderblock_\d+/out",)


def model_name(recipe: str, fraction: float) -> str:
  """'vit_cls', 0.1 -> 'vit_cls_fraction0p1' (ConfigDict keys cannot hold dots)."""
  return f"{recipe}_fraction{fraction:g}".replace(".", "p")


def _fractions(parsed: ml_collections.ConfigDict) -> tuple[float, ...]:
  if parsed.fractions is None:
    local_smoke = parsed.setting == "local" and parsed.runlocal
    return _SMOKE_FRACTIONS if local_smoke else _DEFAULT_FRACTIONS[parsed.setting]
  try:
    fractions = tuple(float(f) for f in parsed.fractions.split("/"))
  except ValueError:
    fractions = ()
  if not fractions or not all(0.0 < f < 1.0 for f in fractions):
    raise ValueError(f"Bad fractions={parsed.fractions!r}: give subset fractions in (0, 1) "
                     "joined by '/', e.g. fractions=0.1/0.3.")
  return fractions


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  """Returns the data-scale config for `arg`: '[<setting>][,fractions=a/b][,runlocal]' (module
  docstring)."""
  parsed = common.parse_arg(arg, setting="local", fractions=str, runlocal=False)
  setting = parsed.setting
  if setting not in SETTINGS:
    raise ValueError(f"Bad data_scale config arg {arg!r}: settings are {SETTINGS}, options "
                     "'fractions=a/b/...' and 'runlocal'.")
  fractions = _fractions(parsed)
  local_smoke = setting == "local" and parsed.runlocal
  recipe = "imagenet_vit_b16" if setting == "imagenet_vit_b16" else "vit_cls"
  suffix = ",runlocal" if local_smoke else ""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012" if setting == "imagenet_vit_b16" else "digits",
      data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation" if setting == "imagenet_vit_b16" else "test"))
  # name -> configs/train.py config; trained (or reused) into <models_dir>/<name>.
  config.models = ml_collections.ConfigDict({recipe: train_configs.get_config(recipe + suffix)})
  for fraction in fractions:
    config.models[model_name(recipe, fraction)] = train_configs.get_config(
        f"{recipe}{suffix},fraction={fraction:g}")
  config.reference = recipe          # The full-data model every layer is compared with.
  config.models_dir = config_dict.placeholder(str)  # None: <workdir>/models.
  config.layers = _VIT_LAYERS        # Layers compared and probed (block outputs).

  # (a) CKA to the reference: Study 1's config; model_a / model_b are filled in at run time.
  if setting == "imagenet_vit_b16":
    config.cka = cka_heatmap.get_config("vit_b16")
    config.probes = linear_probes.get_config("vit_b16_i1k+vit_b16_i21k")
  else:
    config.cka = cka_heatmap.get_config("runlocal")
    config.probes = linear_probes.get_config("runlocal")
    config.probes.specs = ml_collections.ConfigDict()  # No public checkpoints offline.
    config.probes.probes.update(modes=("cls", "mean"), per_token=False)
  config.cka.model_a = common.model_spec()
  config.cka.model_b = common.model_spec()
  if local_smoke:
    config.cka.data.num_examples = 120
    config.cka.analysis.num_passes = 1
    config.probes.probes.update(shots=(1, 5), seeds=(0,))
    config.probes.linear.update(max_steps=60, patience=2)
  # (b) probes: `probes.specs` holds the public checkpoints probed beside the trained models.
  for section in (config.cka.data, config.probes.data,
                  *(train_config.data for train_config in config.models.values())):
    common.link_data(section, config.data)
  return common.smoke_test(config) if parsed.runlocal and not local_smoke else config
