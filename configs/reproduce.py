r"""The main job: every study of the paper, on the embedded dataset by default.

    python -m experiments.reproduce --workdir=outputs/reproduce
    python -m experiments.reproduce --config=configs/reproduce.py:runlocal --workdir=/tmp/r

Args after the colon: `local` (default: the embedded 'digits' data, small models trained on
the CPU in minutes) or `runlocal` (the same steps shrunk to a smoke test: a few training steps,
fewer examples). Run from the repository root (this file imports its sibling configs).
"""

import ml_collections

from configs import (attention_distance, cka_heatmap, data_scale, linear_probes, localization,
                     receptive_field, skip_connections)
from configs import train as train_configs

# The trained models the studies use: name -> configs/train.py recipe.
_MODELS = ("vit_cls", "vit_gap", "bit")
# Training steps of the demo's models per family.
_DEMO_STEPS = {"ViT": 600, "BiT": 500}


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  """Returns the reproduction config for `arg` ('local' or 'runlocal')."""
  if arg not in ("local", "runlocal"):
    raise ValueError(f"Unknown reproduce config {arg!r}; use 'local' or 'runlocal'.")
  suffix = ",runlocal" if arg == "runlocal" else ""
  config = ml_collections.ConfigDict()
  config.arg = arg                 # The config arg, shown in the report's commands.
  config.data = ml_collections.ConfigDict(dict(
      name="digits",           # Any TFDS name (e.g. 'imagenet2012') or an embedded dataset.
      data_dir=None,           # TFDS data directory, local or gs://.
      train_split="train",
      eval_split="test",
      image_size=32,           # Model resolution the images are resized to.
      global_batch_size=120,   # Divisible by the device count (1, 2, 4, 8, 10, 12, ...).
  ))
  config.summary = ml_collections.ConfigDict(dict(
      examples_per_class=10,   # Montage columns.
  ))
  # Training configs of the small models, trained into <workdir>/models/<name> (or reused).
  config.models = ml_collections.ConfigDict(
      {name: train_configs.get_config(name + suffix) for name in _MODELS})
  # Models trained at a time, each in its own process (a small model's training step keeps
  # one CPU core busy); 1 on accelerators and on several hosts.
  config.train_processes = 2
  # Which model spec of which study is a model trained above: {study: {spec field: model}};
  # the main job fills those specs in from `<workdir>/models/<model>` at run time.
  config.use_trained = ml_collections.ConfigDict(dict(
      representation=dict(model_a="vit_cls", model_b="bit"),
      attention=dict(model="vit_cls", resnet="bit"),
      receptive_fields=dict(model_a="vit_cls", model_b="bit"),
      probes={"specs/vit_cls": "vit_cls", "specs/vit_gap": "vit_gap"},
      localization={"models/vit_cls": "vit_cls", "models/vit_gap": "vit_gap",
                    "models/bit": "bit"},
  ))
  # Study 1: CKA heatmaps of the trained ViT (CLS) and BiT ResNet.
  config.representation = cka_heatmap.get_config("runlocal")
  # Study 2a: attention distances of the trained ViT (4x4 patches of 8 px, so distances range
  # over 0-34 px) and the CKA of the heads of its lower third with the ResNet's lower stages.
  config.attention = attention_distance.get_config("runlocal")
  config.attention.analysis.head_blocks = (0, 1)
  # Study 2b: receptive fields of every ViT sub-layer and ResNet unit, from 32 random channels
  # per layer (an unbiased estimate of the all-channel mean) on 20 images.
  config.receptive_fields = receptive_field.get_config("runlocal")
  # Study 3: norm ratios of the trained ViT and BiT; ViTs trained without the skip connections
  # of one block (the models are added to `config.models`) against the unablated ViT.
  config.skip_connections = skip_connections.get_config(arg)
  config.skip_connections.norm_ratio.trained = ("vit_cls", "bit")
  if "mixer" in config.skip_connections.models:  # 'local' lists it; the demo trains no Mixer.
    del config.skip_connections.models["mixer"]
  # Study 4b: few-shot and full linear probes of every block output of the trained ViTs, per
  # layer and per token.
  config.probes = linear_probes.get_config("runlocal")
  config.probes.probes.update(modes=("cls", "mean"), shots=(1, 5, 10, 25), seeds=(0, 1, 2))
  # Study 4c: the ViT trained on nested subsets of the training split.
  config.data_scale = data_scale.get_config(arg)
  # Models the studies train themselves join `config.models` (trained by the models step and
  # passed back to the studies from there).
  for study in (config.skip_connections, config.data_scale):
    for name, train_config in study.models.items():
      config.models[name] = train_config
  if arg == "local":
    # The demo's budget (15 minutes on 2 CPU cores): shorter schedules than the recipes' 1,500
    # steps (vit_cls reaches 83.6% test accuracy at 600 steps against 91.9% at 1,500).
    for train_config in config.models.values():
      train_config.train.total_steps = _DEMO_STEPS[train_config.model.name.split("-")[0]]
  # Study 4a: token-vs-patch CKA maps of the first, middle and top ViT blocks and of the
  # ResNet stage whose map is the ViTs' 4x4 grid (stage 3 is 2x2, stage 4 1x1 at 32 px).
  config.localization = localization.get_config("runlocal")
  vit_blocks = (r"Transformer/encoderblock_(0|3|5)/out",)
  config.localization.models.vit_cls.layers = vit_blocks
  config.localization.models.vit_gap.layers = vit_blocks
  config.localization.models.bit.layers = ("block2/out",)
  config.localization.data.num_examples = 360
  if arg == "runlocal":
    config.representation.data.num_examples = 120
    config.representation.analysis.num_passes = 1
    config.localization.data.num_examples = 120
    config.attention.data.num_examples = 120
    config.probes.probes.update(shots=(1, 5), seeds=(0,))
    config.probes.linear.update(max_steps=60, patience=2)
    for name in ("vit_cls", "vit_gap"):
      config.localization.models[name].layers = (r"Transformer/encoderblock_(0|1)/out",)
  return config
