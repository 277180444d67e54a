"""Pieces every study config shares: model specs, public checkpoints, data sections, links.

Configs hold data only. Every field is overridable on the command line (`--config.x=y`):
optional fields are typed placeholders (`config_dict.placeholder`), never a bare None.

Model specs (`model_spec`) name a registered model, its checkpoint and the layers a study
selects. Their `overrides` hold the family's width fields as placeholders (None = the registered
width), so a smoke run or a test can shrink a model's width from the command line while its
depth and token grid stay those of the paper, e.g.
`--config.model_a.overrides.hidden_size=96 --config.model_a.overrides.mlp_dim=192`.

One dataset per job: in a config that holds several steps (a study with trained models, the
main job), every step's dataset name, TFDS directory and splits are linked to the job's
`config.data` (`link_data`: ml_collections FieldReferences), so
`--config.data.name=X --config.data.data_dir=Y` reaches every step; setting a linked field
anywhere sets it everywhere.
"""

from typing import Any

import ml_collections
from ml_collections import config_dict

# The width fields of each family (types for the placeholders). Depth, patch size and
# resolution are not among them: the paper's layer order and token grid never shrink.
WIDTH_FIELDS = {
    "ViT": {"hidden_size": int, "mlp_dim": int},
    "BiT": {"width_factor": float},
    "Mixer": {"hidden_size": int, "tokens_mlp_dim": int, "channels_mlp_dim": int},
}

# The public checkpoints of the paper's models: key -> (registered model, path). ImageNet-21k
# pre-training (vision_transformer's 'imagenet21k' bucket, BiT-M); the paper's JFT-300M ones
# are not public.
PUBLIC_CHECKPOINTS = {
    "vit_b32": ("ViT-B/32", "gs://vit_models/imagenet21k/ViT-B_32.npz"),
    "vit_b16": ("ViT-B/16", "gs://vit_models/imagenet21k/ViT-B_16.npz"),
    "vit_l16": ("ViT-L/16", "gs://vit_models/imagenet21k/ViT-L_16.npz"),
    "vit_h14": ("ViT-H/14", "gs://vit_models/imagenet21k/ViT-H_14.npz"),
    "r50": ("BiT-R50x1", "gs://bit_models/BiT-M-R50x1.npz"),
    "r152": ("BiT-R152x2", "gs://bit_models/BiT-M-R152x2.npz"),
    "mixer_b16": ("Mixer-B/16", "gs://mixer_models/imagenet21k/Mixer-B_16.npz"),
    # Beyond the paper: the ViT families studied today. SigLIP's image tower from big_vision's
    # bucket; the others are timm's `.safetensors` files on the Hugging Face hub, fetched with
    # `huggingface-cli download timm/<repo> model.safetensors --local-dir checkpoints/<repo>`
    # (their paths here are relative to where the study runs).
    "siglip_b16": ("ViT-B/16", "gs://big_vision/siglip/webli_en_b16_224_63724782.npz"),
    "dinov2_b14": ("ViT-B/16", "checkpoints/vit_base_patch14_reg4_dinov2.lvd142m/"
                               "model.safetensors"),
    "deit3_b16": ("ViT-B/16", "checkpoints/deit3_base_patch16_224.fb_in22k_ft_in1k/"
                              "model.safetensors"),
    "clip_b16": ("ViT-B/16", "checkpoints/vit_base_patch16_clip_224.openai/model.safetensors"),
    "mae_b16": ("ViT-B/16", "checkpoints/vit_base_patch16_224.mae/model.safetensors"),
}
# The constructor fields that make the registered ViT one of those families (vit_repr.models.vit;
# timm's models use exact GELU but for OpenAI CLIP's quick GELU, big_vision's the tanh
# approximation, the default).
FAMILY_OVERRIDES = {
    "siglip_b16": dict(classifier="map", posemb_includes_cls=False),
    "dinov2_b14": dict(patch_size=14, num_registers=4, layer_scale_init=1e-5,
                       posemb_includes_cls=False, mlp_activation="gelu"),
    "deit3_b16": dict(layer_scale_init=1e-6, posemb_includes_cls=False, mlp_activation="gelu"),
    # OpenAI's CLIP uses quick GELU (timm's `*_clip_quickgelu_224.openai`, the same file).
    "clip_b16": dict(pre_norm=True, layer_norm_eps=1e-5, patch_bias=False,
                     mlp_activation="quick_gelu"),
    "mae_b16": dict(mlp_activation="gelu"),
}

# The paper's minibatch-CKA settings (Raghu et al. 2021, Appendix A): minibatch 1024, 10,240
# examples sampled without replacement, the estimate repeated 20 times (reshuffled minibatches)
# and averaged. The public minibatch-CKA code's defaults (Nguyen et al. 2021: minibatch 256,
# 10 passes over 10,000 examples) are the cheaper alternative (config option 'cheap').
PAPER_CKA = dict(minibatch_size=1024, num_examples=10_240, num_passes=20)
CHEAP_CKA = dict(minibatch_size=256, num_examples=10_000, num_passes=10)


def width_placeholders(name: str) -> dict[str, config_dict.FieldReference]:
  """The width fields of model `name`'s family as unset placeholders ({} for '' or unknown)."""
  family = name.partition("-")[0]
  return {field: config_dict.placeholder(kind)
          for field, kind in WIDTH_FIELDS.get(family, {}).items()}


def model_spec(name: str = "", checkpoint: str = "", layers=(), overrides=None,
               seed: int = 0) -> ml_collections.ConfigDict:
  """A model spec: registered name, checkpoint ('' = random init from seed), layer patterns.

  `overrides` are constructor fields of the model (None = the registered value); the family's
  width fields are always present as placeholders.
  """
  return ml_collections.ConfigDict(dict(
      name=name, checkpoint=checkpoint, layers=tuple(layers),
      overrides=ml_collections.ConfigDict({**width_placeholders(name), **(overrides or {})}),
      seed=seed))


def public_model(key: str, layers=()) -> ml_collections.ConfigDict:
  """The spec of public checkpoint `key` of `PUBLIC_CHECKPOINTS` (with its family's
  `FAMILY_OVERRIDES`)."""
  name, checkpoint = PUBLIC_CHECKPOINTS[key]
  return model_spec(name, checkpoint, layers, overrides=FAMILY_OVERRIDES.get(key))


def eval_data(**values) -> ml_collections.ConfigDict:
  """The data section of a study streaming evaluation images (ImageNet validation at 224 px).

  Fields: name (embedded or TFDS), split, data_dir (TFDS, local or gs://; None: TFDS's
  default), image_size, num_examples, crop_fraction (None: the original plain resize; c:
  resize the shorter side to size / c and centre-crop), sample_seed (None: the first
  num_examples in the split's canonical order; s: num_examples drawn at random without
  replacement with seed s).
  """
  section = dict(name="imagenet2012", split="validation",
                 data_dir=config_dict.placeholder(str), image_size=224, num_examples=10_000,
                 crop_fraction=config_dict.placeholder(float),
                 sample_seed=config_dict.placeholder(int))
  section.update(values)
  return ml_collections.ConfigDict(section)


def _eval_split(section: ml_collections.ConfigDict) -> str:
  """The field naming a section's evaluation split: 'eval_split', 'test_split' or 'split'."""
  return next(f for f in ("eval_split", "test_split", "split") if f in section)


def link_data(section: ml_collections.ConfigDict, job: ml_collections.ConfigDict) -> None:
  """Links a step's data section to the job's: name, data_dir, the training split (if the
  section reads one) and the evaluation split, whatever each section calls it."""
  section.name = job.get_ref("name")
  section.data_dir = job.get_ref("data_dir")
  if "train_split" in section:
    section.train_split = job.get_ref("train_split")
  section[_eval_split(section)] = job.get_ref(_eval_split(job))


# `runlocal` on a paper setting (`common.smoke_test`): the width each family shrinks to (depth,
# patch size and resolution stay: ViT-B/16 keeps 12 blocks on a 14x14 grid) and the counts that
# make every study, training run and main job a CPU smoke test on the embedded data. A leaf
# whose dotted path ends in a key here takes its value.
SMOKE_WIDTHS = {"ViT": dict(hidden_size=96, mlp_dim=192),
                "BiT": dict(width_factor=0.5),
                "Mixer": dict(hidden_size=96, tokens_mlp_dim=48, channels_mlp_dim=192)}
SMOKE_COUNTS = {
    "data.num_examples": 16, "analysis.minibatch_size": 8, "analysis.num_passes": 2,
    "analysis.max_channels": 4, "norm_ratio.global_batch_size": 8,
    "data.train_num_examples": 200, "data.test_num_examples": 40, "data.global_batch_size": 40,
    "summary.num_examples": 40,
    "train.global_batch_size": 8, "train.accum_steps": 1, "train.total_steps": 2,
    "schedule.warmup_steps": 1, "train.eval_every": 2, "train.checkpoint_every": 2,
    "train.log_every": 1, "data.eval_num_examples": 16, "data.eval_global_batch_size": 8,
}
_SPEC_FIELDS = {"name", "checkpoint", "layers", "overrides", "seed"}


def parse_arg(arg: str | None, **fields) -> ml_collections.ConfigDict:
  """The arg after a config file's colon, in the one grammar of every config in configs/.

  Comma-separated items, each `key=value` or a bare `flag` (a bool field set to True); the first
  item may also be a bare value of the first field (the setting: models joined by '+', a
  recipe, 'local' or 'paper'). `runlocal` is a flag of every config and composes with every
  setting, e.g. 'vit_b16+r50,cheap', 'vit_b16+r50,runlocal', 'imagenet_vit_b16,fraction=0.1'.

  Args:
    arg: the text after the colon (None or '': every field at its default).
    **fields: name -> default (its type types the value given), or a type for a field with no
      default (None unless given). Order matters: the first field takes a bare first item.

  Returns:
    A ConfigDict with one entry per field.

  Raises:
    ValueError: an unknown or repeated field, a value of the wrong type, or a bare item that is
      neither the first item nor a flag (the message lists the fields).
  """
  defaults = {k: None if isinstance(v, type) else v for k, v in fields.items()}
  kinds = {k: v if isinstance(v, type) else type(v) for k, v in fields.items()}
  usage = ", ".join(f"{k}=<{kinds[k].__name__}>" if kinds[k] is not bool else k for k in fields)
  values, given = dict(defaults), set()
  items = [item.strip() for item in (arg or "").split(",") if item.strip()]
  for index, item in enumerate(items):
    key, has_value, value = item.partition("=")
    if not has_value:
      if kinds.get(item) is bool:
        key, value = item, "True"
      elif index == 0 and fields:
        key, value = next(iter(fields)), item
      else:
        raise ValueError(f"Config arg {arg!r}: {item!r} is not an option; the grammar is "
                         f"'[<{next(iter(fields), 'setting')}>][,option...]' with options "
                         f"{usage}.")
    if key not in fields:
      raise ValueError(f"Config arg {arg!r}: unknown option {key!r}; options are {usage}.")
    if key in given:
      raise ValueError(f"Config arg {arg!r}: option {key!r} is given twice.")
    given.add(key)
    values[key] = _typed(value, kinds[key], key, arg)
  return ml_collections.ConfigDict(values)


def _typed(value: str, kind: type, key: str, arg: str) -> Any:
  """`value` as a `kind`, or a ValueError that names the option."""
  if kind is bool:
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"Config arg {arg!r}: option {key!r} is a flag; write '{key}' or "
                       f"'{key}=false', not {value!r}.")
    return value.lower() in ("true", "1")
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f"Config arg {arg!r}: option {key!r} needs a value of type "
                     f"{kind.__name__}, got {value!r}.") from None


def smoke_test(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`runlocal` of a paper setting, in place: the same study, models, layers, depth, token grid
  and resolution, on the embedded 'digits' data with a few examples and training steps, every
  model randomly initialised at a narrow width (`SMOKE_WIDTHS`): a CPU smoke test of the exact
  setting that downloads nothing. Returns `config`."""
  def visit(node: ml_collections.ConfigDict, path: str) -> None:
    if _SPEC_FIELDS <= set(node.keys()) and node.name:  # A model spec.
      node.checkpoint = ""
      _narrow(node.overrides, node.name)
    if {"model", "train", "init"} <= set(node.keys()):  # A configs/train.py config.
      node.init.checkpoint = None
      _narrow(node.model.overrides, node.model.name)
    if "name" in node and "image_size" in node and "data_dir" in node:  # A data section.
      node.name = "digits"
    for key in list(node.keys()):
      leaf = f"{path}.{key}" if path else key
      if isinstance(node[key], ml_collections.ConfigDict):
        visit(node[key], leaf)
      elif small := [v for k, v in SMOKE_COUNTS.items() if leaf == k or leaf.endswith("." + k)]:
        node[key] = small[0]

  visit(config, "")
  return config


def _narrow(overrides: ml_collections.ConfigDict, name: str) -> None:
  """Sets the width fields of model `name`'s family (`SMOKE_WIDTHS`) in its `overrides`."""
  for field, value in SMOKE_WIDTHS.get(name.partition("-")[0], {}).items():
    if field in overrides:
      overrides[field] = value
