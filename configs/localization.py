r"""Spatial localization: token-vs-input-patch CKA maps (Raghu et al. 2021, Figs 9-10).

    python -m experiments.localization --config=configs/localization.py:vit_b16+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/loc_b16_r50
    python -m experiments.localization \
        --config=configs/localization.py:vit_b16+r50,gap=/runs/vit_b16_gap/params --workdir=/tmp/loc
    python -m experiments.localization --config=configs/localization.py:runlocal --workdir=/tmp/loc

The arg names the models (one row of maps each) joined by '+': `vit_b32`, `vit_b16`, `vit_l16`
(ViT with a CLS head, public ImageNet-21k checkpoints of vision_transformer; the paper's
JFT-300M ones are not public), `r50`, `r152` (BiT-M ResNets; their final 7x7 feature map
compared with the 32x32-pixel input patches at 224 px), and beyond the paper `siglip_b16`
(MAP head, no CLS), `dinov2_b14` (16x16 grid, registers), `deit3_b16`, `clip_b16`, `mae_b16`
(configs/common.py `PUBLIC_CHECKPOINTS`). Those vision_transformer checkpoints all have
CLS-token heads; for the paper's GAP comparison, option `gap=<params dir>` adds a row
'vit_gap' for a ViT-B/16 with classifier='gap' trained with
`configs/train.py:imagenet_vit_b16 --config.model.overrides.classifier=gap` (its
`<workdir>/params`; the row's overrides are that recipe's `classifier='gap',
representation_size=768`). Option `cheap`: the public minibatch-CKA code's estimator settings
(see configs/cka_heatmap.py). `runlocal`: alone, tiny randomly initialised ViT-CLS, ViT-GAP and
BiT on the embedded 'digits' data at 32 px (seconds); after a paper setting (e.g.
'vit_b16+r50,runlocal'), that setting with random narrow weights at the paper's depth, grid and
resolution on a few embedded images (`configs/common.smoke_test`).

`models` maps a row name to a model spec (`vit_repr.studies.loading`); rows are drawn in
sorted name order. Each spec's `layers` are the layers whose maps are computed; the figure
shows `analysis.positions` of each. Estimator: the paper's minibatch-CKA settings (Appendix A:
minibatch 1024, 10,240 validation images sampled without replacement, 20 reshuffled passes,
unbiased HSIC). Paper-unknown settings, with defaults: patches are the raw [-1, 1] pixels of
the model's input; the layers are block (unit) outputs after the residual addition; for
ViT-B/16 a cost of ~40 GFLOP of Grams per block per minibatch of 256, negligible against the
forward pass (see `vit_repr.localization`).
"""

import ml_collections
from ml_collections import config_dict

from configs import cka_heatmap
from configs import common

# ViT blocks: first, middle, last (paper Fig. 9 shows the last, Fig. 10 lower and higher ones).
_VIT_B_LAYERS = (r"Transformer/encoderblock_(0|5|11)/out",)
_VIT_L_LAYERS = (r"Transformer/encoderblock_(0|11|23)/out",)
_RESNET_LAYERS = ("block3/out", "block4/out")
MODELS = {"vit_b32": _VIT_B_LAYERS, "vit_b16": _VIT_B_LAYERS, "vit_l16": _VIT_L_LAYERS,
          "r50": _RESNET_LAYERS, "r152": _RESNET_LAYERS,
          # Beyond the paper: today's ViT families (configs/common.py PUBLIC_CHECKPOINTS).
          **dict.fromkeys(common.FAMILY_OVERRIDES, _VIT_B_LAYERS)}


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.models = ml_collections.ConfigDict()  # Row name -> model spec.
  config.data = common.eval_data(num_examples=common.PAPER_CKA["num_examples"], sample_seed=0)
  config.analysis = ml_collections.ConfigDict(dict(
      minibatch_size=common.PAPER_CKA["minibatch_size"],  # Examples per minibatch (= device).
      num_passes=common.PAPER_CKA["num_passes"],  # Passes over the examples; p > 0 reshuffled.
      shuffle_seed=0,
      grams='auto',         # Where Grams run: 'auto' | 'host' (CPU BLAS) | 'device'.
      gram_blocks=1,        # SYRK-like row blocks of each device Gram (see vit_repr.cka).
      # Token positions drawn in the figure: 'corner', 'edge', 'centre' or (row, column).
      positions=("corner", "edge", "centre"),
  ))
  config.checkpoint_every = 20  # Batches between saves of the accumulator state.
  config.log_every = 10
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption.
  return config


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[<model>[+<model>...]][,gap=<dir>][,cheap][,runlocal]'."""
  parsed = common.parse_arg(arg, models="", gap=str, cheap=False, runlocal=False)
  config = _base()
  if not parsed.models and parsed.runlocal:
    vit = dict(patch_size=8, depth=4)
    config.models.vit_cls = common.model_spec(
        "ViT-Ti/16", layers=(r"Transformer/encoderblock_(0|3)/out",), overrides=vit)
    config.models.vit_gap = common.model_spec(
        "ViT-Ti/16", layers=(r"Transformer/encoderblock_(0|3)/out",),
        overrides=dict(vit, classifier="gap"))
    config.models.bit = common.model_spec(
        "BiT-R50x1", layers=("block2/out", "block3/out"),
        overrides=dict(units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data = common.eval_data(name="digits", split="test", image_size=32, num_examples=240)
    config.analysis.update(minibatch_size=40, num_passes=1)
    config.checkpoint_every = 3
    config.log_every = 3
    return config
  names = parsed.models.split("+")
  unknown = [n for n in names if n not in MODELS]
  if unknown or len(set(names)) != len(names) or parsed.gap == "":
    raise ValueError(f"Bad localization config arg {arg!r}: use 'runlocal' or distinct models "
                     f"of {sorted(MODELS)} joined by '+', optionally followed by "
                     "',gap=<params dir of a ViT-B/16 GAP model>' and ',cheap'.")
  for name in names:
    config.models[name] = common.public_model(name, MODELS[name])
  if parsed.gap is not None:
    # The imagenet_vit_b16 recipe's architecture (tanh pre-logits of width 768), GAP head.
    config.models.vit_gap = common.model_spec(
        "ViT-B/16", parsed.gap, _VIT_B_LAYERS,
        overrides=dict(classifier="gap", representation_size=768))
  if parsed.cheap:
    cka_heatmap.use_cheap_estimator(config)
  return common.smoke_test(config) if parsed.runlocal else config
