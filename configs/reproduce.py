r"""The main job: every study of the paper, on the embedded dataset by default.

    python -m experiments.reproduce --workdir=outputs/reproduce
    python -m experiments.reproduce --config=configs/reproduce.py:runlocal --workdir=/tmp/r
    python -m experiments.reproduce --config=configs/reproduce.py:paper \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=gs://my-bucket/paper

Args after the colon (run from the repository root: this file imports its sibling configs):
  local     The default, what `make demo` runs: the embedded 'cluttered_digits' data (5,748
            train / 720 test images of 32 px: digits shifted on a canvas with clutter), five
            small models trained on the CPU (ViT width 64, 6 blocks, an 8x8 grid of 4-px
            patches, 8 heads, a CLS or GAP head, one without the skip connections of block 1,
            one on 3% of the data; a BiT ResNet with one unit per stage), then every study, and
            seven findings of the paper judged (`vit_repr.judgements`): a table at the end of
            the log and atop the report. Under 15 minutes on 2 CPU cores.
  runlocal  A flag. Alone or after `local`: the same steps shrunk to a smoke test (6 training
            steps, fewer examples). After `paper` ('paper,runlocal'): the paper job with random
            narrow models at full depth and grid, a few embedded images and training steps
            (`configs/common.smoke_test`): minutes on a CPU, nothing downloaded.
  paper     The paper's analyses on ImageNet (TFDS 'imagenet2012', prepared in data_dir) with
            the public ImageNet-21k checkpoints of vision_transformer and big_transfer (the
            paper's JFT-300M ones are not public): ViT-B/16 and BiT-M R50x1 for the heatmaps,
            attention distances and localization, ViT-B/32 and R50 for receptive fields,
            ViT-B/16, Mixer-B/16 and R50 for norm ratios, AugReg ViT-B/16 (ImageNet-1k vs
            ImageNet-21k) for the data-scale probes. It also trains eight ViT-B/16s on
            ImageNet-1k from scratch (configs/train.py:imagenet_vit_b16, 300 epochs): the GAP
            variant, the reference, three without one block's skip connections and three on 3%,
            10% and 30% of the data. Expected cost, estimated from FLOP counts and not measured:
            each training is 93,835 steps x 4,096 images x 3 x 17.6 GFLOP = 2e19 FLOP, about
            1.5 days of a TPU v3-8 at 40% of its bfloat16 peak, so 12 TPU v3-8 days for the
            eight (run them in parallel on a pod slice with --jax_distributed); every analysis
            on the public checkpoints is one to ten passes over 10,000 validation images,
            minutes to an hour each on the same hardware. On GPUs, scale by peak FLOP/s. Never
            run it on a CPU or in tests.
The job resumes where it stopped (finished steps are skipped, training and CKA runs continue
from their last checkpoint): rerun the same command.
"""

import ml_collections
from ml_collections import config_dict

from configs import (attention_distance, cka_heatmap, common, data_scale, linear_probes,
                     localization, receptive_field, skip_connections)
from configs import train as train_configs

# The trained models the studies use: name -> configs/train.py recipe.
_MODELS = ("vit_cls", "vit_gap", "bit")
# Training steps of the demo's models per family.
_DEMO_STEPS = {"ViT": 600, "BiT": 300}
# The demo's ViTs: an 8x8 grid of 4-px patches at 32 px; big_vision's fixed 2-D sine-cosine
# position embedding, with which they learn the shifted digits in 600 steps (vit_cls: 79% test
# accuracy against 63% with a learned embedding); 8 heads of width 8, so that each block has
# enough heads for a spread of attention distances.
_DEMO_VIT = dict(patch_size=4, posemb="sincos2d", posemb_includes_cls=False, num_heads=8)
# The config sections of the studies (each holds a `data` section).
SETTINGS = ("local", "paper")
STUDIES = ("representation", "attention", "receptive_fields", "skip_connections",
           "localization", "probes", "data_scale")


def _link_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One dataset for the whole job: every study's and every trained model's dataset name,
  TFDS directory and splits are linked to `config.data`."""
  for section in (*(config[study].data for study in STUDIES),
                  *(train_config.data for train_config in config.models.values())):
    common.link_data(section, config.data)
  return config


def _findings(cls_vit: str, gap_vit: str) -> ml_collections.ConfigDict:
  """The models the judged findings compare (`vit_repr.judgements`), by their keys in the
  studies' configs: the CLS-token ViT whose norm ratios are judged and which the localization
  judgement compares with the GAP ViT."""
  return ml_collections.ConfigDict(dict(cls_vit=cls_vit, gap_vit=gap_vit))


def _embedded(smoke_test: bool) -> ml_collections.ConfigDict:
  """'local' (and with `smoke_test`, 'runlocal'): the embedded data, small models trained here."""
  arg = "runlocal" if smoke_test else "local"
  suffix = ",runlocal" if arg == "runlocal" else ""
  config = ml_collections.ConfigDict()
  config.arg = arg                 # The config arg, shown in the report's commands.
  config.data = ml_collections.ConfigDict(dict(
      name="cluttered_digits",  # Any TFDS name (e.g. 'imagenet2012') or an embedded dataset.
      data_dir=config_dict.placeholder(str),  # TFDS data directory, local or gs://.
      train_split="train",
      eval_split="test",
      image_size=32,           # Model resolution the images are resized to.
      global_batch_size=120,   # Divisible by the device count (1, 2, 4, 8, 10, 12, ...).
  ))
  config.summary = ml_collections.ConfigDict(dict(
      examples_per_class=10,   # Montage columns.
      num_examples=config_dict.placeholder(int),  # Examples of each split summarised (None: all).
  ))
  # Training configs of the small models, trained into <workdir>/models/<name> (or reused).
  config.models = ml_collections.ConfigDict(
      {name: train_configs.get_config(name + suffix) for name in _MODELS})
  # Models trained at a time, each in its own process (a small model's training step keeps
  # one CPU core busy); 1 on accelerators and on several hosts.
  config.train_processes = 2
  # The models the judged findings compare.
  config.findings = _findings("vit_cls", "vit_gap")
  # Which model spec of which study is a model trained above: {study: {spec path: model}},
  # nested like the study's config; the main job fills those specs in from
  # `<workdir>/models/<model>` at run time.
  config.use_trained = ml_collections.ConfigDict(dict(
      representation=dict(model_a="vit_cls", model_b="bit"),
      attention=dict(model="vit_cls", resnet="bit"),
      receptive_fields=dict(model_a="vit_cls", model_b="bit"),
      probes=dict(specs=dict(vit_cls="vit_cls", vit_gap="vit_gap")),
      localization=dict(models=dict(vit_cls="vit_cls", vit_gap="vit_gap", bit="bit")),
  ))
  # Study 1: CKA heatmaps of the trained ViT (CLS) and BiT ResNet.
  config.representation = cka_heatmap.get_config("runlocal")
  # Study 2a: attention distances of the trained ViT (8x8 patches of 4 px, so distances range
  # over 0-40 px) and the CKA of the heads of its lower third with the ResNet's lower stages.
  config.attention = attention_distance.get_config("runlocal")
  config.attention.analysis.head_blocks = (0, 1)
  # Study 2b: receptive fields of every ViT sub-layer and ResNet unit, from 32 random channels
  # per layer (an unbiased estimate of the all-channel mean) on 20 images.
  config.receptive_fields = receptive_field.get_config("runlocal")
  # Study 3: norm ratios of the trained ViT and BiT; a ViT trained without the skip
  # connections of block 1 (the models are added to `config.models`) against the unablated ViT.
  config.skip_connections = skip_connections.get_config(arg)
  config.skip_connections.norm_ratio.trained = ("vit_cls", "bit")
  config.skip_connections.ablation.models = ("vit_noskip_block1",)
  for name in set(config.skip_connections.models) - {"vit_cls", "vit_noskip_block1"}:
    del config.skip_connections.models[name]  # The demo trains no Mixer, one ablated ViT.
  # Study 4b: few-shot (closed-form ridge, the paper's) probes of every block output of the
  # trained ViTs, per layer and per token; the softmax probes are left to the probes config
  # (on 65 tokens x 6 blocks x 2 models they cost a minute of the demo's budget).
  config.probes = linear_probes.get_config("runlocal")
  config.probes.probes.update(modes=("cls", "mean"), shots=(1, 5, 10, 25), seeds=(0, 1, 2))
  config.probes.linear.enabled = False
  # Study 4c: the ViT trained on 3% of the training split (172 images; a smoke test: 30%).
  config.data_scale = data_scale.get_config(
      "local,fractions=0.03" if arg == "local" else arg)
  # Models the studies train themselves join `config.models` (trained by the models step and
  # passed back to the studies from there).
  for study in (config.skip_connections, config.data_scale):
    for name, train_config in study.models.items():
      config.models[name] = train_config
  for train_config in config.models.values():
    train_config.data.random_flip = False  # A mirrored digit is another glyph.
    if "patch_size" in train_config.model.overrides:  # The ViTs.
      train_config.model.overrides.update(_DEMO_VIT)
    if arg == "local":  # The demo's budget: shorter schedules than the recipes' 1,500 steps.
      train_config.train.total_steps = _DEMO_STEPS[train_config.model.name.split("-")[0]]
  # Study 4a: token-vs-patch CKA maps of the first, middle and top ViT blocks and of the
  # ResNet stage whose map is the ViTs' 8x8 grid (stage 2 is 4x4, stage 3 2x2 at 32 px).
  config.localization = localization.get_config("runlocal")
  vit_blocks = (r"Transformer/encoderblock_(0|3|5)/out",)
  config.localization.models.vit_cls.layers = vit_blocks
  config.localization.models.vit_gap.layers = vit_blocks
  config.localization.models.bit.layers = ("block1/out",)
  config.localization.data.num_examples = 720
  if arg == "runlocal":
    config.representation.data.num_examples = 120
    config.representation.analysis.num_passes = 1
    config.localization.data.num_examples = 120
    config.attention.data.num_examples = 120
    config.probes.probes.update(shots=(1, 5), seeds=(0,))
    config.probes.linear.update(max_steps=60, patience=2)
    for name in ("vit_cls", "vit_gap"):
      config.localization.models[name].layers = (r"Transformer/encoderblock_(0|1)/out",)
  return _link_data(config)


def _paper() -> ml_collections.ConfigDict:
  """'paper': ImageNet with the public checkpoints and ViT-B/16s trained on ImageNet-1k."""
  config = ml_collections.ConfigDict()
  config.arg = "paper"
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str), train_split="train",
      eval_split="validation", image_size=224, global_batch_size=1024))
  config.summary = ml_collections.ConfigDict(dict(examples_per_class=8, num_examples=10_000))
  config.train_processes = 1
  config.models = ml_collections.ConfigDict()
  # The GAP ViT-B/16 of the localization and per-token probe comparisons (the public ViT
  # checkpoints all have CLS heads).
  gap = train_configs.get_config("imagenet_vit_b16")
  gap.model.overrides.classifier = "gap"
  config.models.imagenet_vit_b16_gap = gap
  config.findings = _findings("vit_b16", "vit_gap")
  config.use_trained = ml_collections.ConfigDict(dict(
      localization=dict(models=dict(vit_gap="imagenet_vit_b16_gap")),
      probes=dict(specs=dict(vit_gap="imagenet_vit_b16_gap")),
  ))
  config.representation = cka_heatmap.get_config("vit_b16+r50")
  config.attention = attention_distance.get_config("vit_b16+r50")
  config.receptive_fields = receptive_field.get_config("vit_b32+r50")
  config.skip_connections = skip_connections.get_config("vit_b16")
  config.localization = localization.get_config("vit_b16+r50")
  config.localization.models.vit_gap = common.model_spec(
      layers=config.localization.models.vit_b16.layers)
  config.probes = linear_probes.get_config("vit_b16+r50")
  config.probes.specs.vit_gap = common.model_spec(layers=config.probes.specs.vit_b16.layers)
  config.probes.probes.per_token = True
  config.data_scale = data_scale.get_config("imagenet_vit_b16")
  for study in (config.skip_connections, config.data_scale):
    for name, train_config in study.models.items():
      config.models[name] = train_config
  return _link_data(config)


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  """Returns the reproduction config for `arg`: '[local|paper][,runlocal]' (module docstring)."""
  parsed = common.parse_arg(arg, setting="local", runlocal=False)
  if parsed.setting not in SETTINGS:
    raise ValueError(f"Unknown reproduce config {arg!r}; the settings are {SETTINGS}, "
                     "optionally followed by ',runlocal'.")
  if parsed.setting == "paper" and parsed.runlocal:
    config = common.smoke_test(_paper())
    config.arg = "paper,runlocal"
    return config
  if parsed.setting == "paper":
    return _paper()
  return _embedded(parsed.runlocal)
