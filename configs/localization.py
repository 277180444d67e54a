r"""Spatial localization: token-vs-input-patch CKA maps (Raghu et al. 2021, Figs 9-10).

    python -m experiments.localization --config=configs/localization.py:vit_b16+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/loc_b16_r50
    python -m experiments.localization \
        --config=configs/localization.py:vit_b16+r50,gap=/runs/vit_b16_gap/params --workdir=/tmp/loc
    python -m experiments.localization --config=configs/localization.py:runlocal --workdir=/tmp/loc

The arg names the models (one row of maps each) joined by '+': `vit_b32`, `vit_b16`, `vit_l16`
(ViT with a CLS head, public ImageNet-21k checkpoints of vision_transformer; the paper's
JFT-300M ones are not public), `r50`, `r152` (BiT-M ResNets; their final 7x7 feature map
compared with the 32x32-pixel input patches at 224 px). Those ViT checkpoints all have
CLS-token heads; for the paper's GAP comparison, option `gap=<params dir>` adds a row
'vit_gap' for a ViT-B/16 with classifier='gap' trained with
`configs/train.py:imagenet_vit_b16 --config.model.overrides.classifier=gap` (its
`<workdir>/params`; the row's overrides are that recipe's `classifier='gap',
representation_size=768`). `runlocal`: tiny randomly initialised ViT-CLS, ViT-GAP and BiT on the
embedded 'digits' data at 32 px (seconds of compute after about a minute of compilation on
a 2-core CPU).

`models` maps a row name to a model spec (`vit_repr.studies.loading`); rows are drawn in
sorted name order. Each spec's `layers` are the layers whose maps are computed; the figure
shows `analysis.positions` of each. Paper-unknown settings, with defaults: the estimator is
the CKA heatmap's (minibatch 256 per device, 10 passes over 10,000 ImageNet validation
images, unbiased HSIC); patches are the raw [-1, 1] pixels of the model's input; the layers
are block (unit) outputs after the residual addition; for ViT-B/16 a cost of ~40 GFLOP of
Grams per block per minibatch, negligible against the forward pass (see
`vit_repr.localization`), but 30-60 s of compilation per ViT-B/16 block on a 2-core CPU.
"""

import ml_collections

from configs.cka_heatmap import model_spec

# ViT blocks: first, middle, last (paper Fig. 9 shows the last, Fig. 10 lower and higher ones).
_VIT_B_LAYERS = (r"Transformer/encoderblock_(0|5|11)/out",)
_VIT_L_LAYERS = (r"Transformer/encoderblock_(0|11|23)/out",)
_RESNET_LAYERS = ("block3/out", "block4/out")

# name -> (registered model, public checkpoint, layer patterns).
PAPER_MODELS = {
    "vit_b32": ("ViT-B/32", "gs://vit_models/imagenet21k/ViT-B_32.npz", _VIT_B_LAYERS),
    "vit_b16": ("ViT-B/16", "gs://vit_models/imagenet21k/ViT-B_16.npz", _VIT_B_LAYERS),
    "vit_l16": ("ViT-L/16", "gs://vit_models/imagenet21k/ViT-L_16.npz", _VIT_L_LAYERS),
    "r50": ("BiT-R50x1", "gs://bit_models/BiT-M-R50x1.npz", _RESNET_LAYERS),
    "r152": ("BiT-R152x2", "gs://bit_models/BiT-M-R152x2.npz", _RESNET_LAYERS),
}
OPTIONS = ("gap",)



def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.models = ml_collections.ConfigDict()  # Row name -> model spec.
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", split="validation", data_dir=None, image_size=224,
      num_examples=10_000, crop_fraction=None))
  config.analysis = ml_collections.ConfigDict(dict(
      minibatch_size=256,   # Examples per minibatch (= per device).
      num_passes=10,        # Passes over the examples; pass p > 0 reshuffled.
      shuffle_seed=0,
      gram_blocks=1,        # SYRK-like row blocks of each Gram (see vit_repr.cka).
      # Token positions drawn in the figure: 'corner', 'edge', 'centre' or (row, column).
      positions=("corner", "edge", "centre"),
  ))
  config.checkpoint_every = 20  # Batches between saves of the accumulator state.
  config.log_every = 10
  config.stop_after_batches = None  # Stop early (simulated preemption); rerun to resume.
  return config


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: 'runlocal' or '<model>[+<model>...][,gap=<params dir>]'."""
  config = _base()
  models, *options = arg.split(",")
  if models == "runlocal" and not options:
    vit = dict(patch_size=8, depth=4)
    config.models.vit_cls = model_spec(
        "ViT-Ti/16", layers=(r"Transformer/encoderblock_(0|3)/out",), overrides=vit)
    config.models.vit_gap = model_spec(
        "ViT-Ti/16", layers=(r"Transformer/encoderblock_(0|3)/out",),
        overrides=dict(vit, classifier="gap"))
    config.models.bit = model_spec("BiT-R50x1", layers=("block2/out", "block3/out"),
                                   overrides=dict(units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data.update(name="digits", split="test", image_size=32, num_examples=240)
    config.analysis.update(minibatch_size=40, num_passes=1)
    config.checkpoint_every = 3
    config.log_every = 3
    return config
  names = models.split("+")
  parsed = dict(option.partition("=")[::2] for option in options)
  unknown = [n for n in names if n not in PAPER_MODELS]
  if unknown or len(set(names)) != len(names) or set(parsed) - set(OPTIONS) or (
      "gap" in parsed and not parsed["gap"]):
    raise ValueError(f"Bad localization config arg {arg!r}: use 'runlocal' or distinct models "
                     f"of {sorted(PAPER_MODELS)} joined by '+', optionally followed by "
                     "',gap=<params dir of a ViT-B/16 GAP model>'.")
  for name in names:
    model, checkpoint, layers = PAPER_MODELS[name]
    config.models[name] = model_spec(model, checkpoint, layers)
  if "gap" in parsed:
    # The imagenet_vit_b16 recipe's architecture (tanh pre-logits of width 768), GAP head.
    config.models.vit_gap = model_spec("ViT-B/16", parsed["gap"], _VIT_B_LAYERS,
                                       overrides=dict(classifier="gap", representation_size=768))
  return config
