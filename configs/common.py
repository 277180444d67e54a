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
  """The spec of public checkpoint `key` of `PUBLIC_CHECKPOINTS`."""
  name, checkpoint = PUBLIC_CHECKPOINTS[key]
  return model_spec(name, checkpoint, layers)


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


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  """'<setting>,key=value,flag' -> ('<setting>', {'key': 'value', 'flag': ''})."""
  setting, *options = [part.strip() for part in arg.split(",") if part.strip()] or [""]
  return setting, dict(option.partition("=")[::2] for option in options)
