r"""Study 2b: effective receptive fields of ViT and ResNet layers (Raghu et al. 2021, Fig 6).

    python -m experiments.receptive_field --config=configs/receptive_field.py:vit_b32+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/erf
    python -m experiments.receptive_field --config=configs/receptive_field.py:runlocal \
        --workdir=/tmp/erf

The arg names model A and optionally model B joined by '+': `vit_b32` (ViT-B/32, the paper's
appendix figure), `vit_l16`, `vit_b16`, `r50` (BiT-M R50x1) with the public ImageNet-21k
checkpoints, on ImageNet validation images at 224 px. Layers: ViT, every block's 'mid' (after
the attention residual addition) and 'out' (after the MLP one); ResNet, the stem and every unit
output. `runlocal`: tiny randomly initialised ViT and BiT on the embedded 'digits' data.

Compute: the paper's estimator ('mean_abs') needs one backward pass per channel of every
layer (e.g. ViT-B/32: 24 layers x 768 channels; R50: ~16 layers x 256-2048 channels) per
batch, so it uses few images (default 256, minibatch 8 per device; the paper's count is
unknown); `analysis.estimator='abs_of_sum'` is ~C times cheaper but not the paper's quantity,
and `analysis.max_channels=K` averages a fixed random subset of K channels per layer (an
unbiased estimate; `runlocal` uses 32 so that it runs in seconds on a CPU).
Settings the paper does not state (recorded in the metadata): the centre location of an even
grid (`center`: 'single' = the cell containing the image-centre pixel, or 'mean' of the
central cells), the number of images.
"""

import ml_collections

from configs.cka_heatmap import model_spec

_VIT_LAYERS = (r"Transformer/encoderblock_\d+/(mid|out)",)
_RESNET_LAYERS = (r"root_block/out", r"block\d/unit\d+/out")
PAPER_MODELS = {
    "vit_b32": ("ViT-B/32", "gs://vit_models/imagenet21k/ViT-B_32.npz", _VIT_LAYERS),
    "vit_b16": ("ViT-B/16", "gs://vit_models/imagenet21k/ViT-B_16.npz", _VIT_LAYERS),
    "vit_l16": ("ViT-L/16", "gs://vit_models/imagenet21k/ViT-L_16.npz", _VIT_LAYERS),
    "r50": ("BiT-R50x1", "gs://bit_models/BiT-M-R50x1.npz", _RESNET_LAYERS),
}


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: 'runlocal' or '<model>[+<model>]' (see module docstring)."""
  config = ml_collections.ConfigDict()
  config.model_a = model_spec()
  config.model_b = model_spec()  # name '' = model A only.
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", split="validation", data_dir=None, image_size=224,
      num_examples=256, crop_fraction=None))
  config.analysis = ml_collections.ConfigDict(dict(
      estimator="mean_abs",  # 'mean_abs' (paper: |grad| per channel, averaged) or 'abs_of_sum'.
      center="single",       # 'single' or 'mean' (of the central cells of an even grid).
      channel_chunk=64,      # Channels whose backward passes run together (memory).
      max_channels=None,     # None: every channel (exact); K: a fixed random K per layer.
      channel_seed=0,        # Seed of that channel subset.
      minibatch_size=8,      # Images per device per step.
  ))
  config.log_every = 4
  if arg == "runlocal":
    config.model_a = model_spec("ViT-Ti/16", layers=_VIT_LAYERS, overrides=dict(
        patch_size=8, depth=4, hidden_size=64, num_heads=4, mlp_dim=128))
    config.model_b = model_spec("BiT-R50x1", layers=_RESNET_LAYERS, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data.update(name="digits", split="test", image_size=32, num_examples=20)
    config.analysis.update(minibatch_size=10, max_channels=32, channel_chunk=32)
    config.log_every = 1
    return config
  names = arg.split("+")
  if any(n not in PAPER_MODELS for n in names) or not 1 <= len(names) <= 2:
    raise ValueError(f"Bad receptive_field config arg {arg!r}: use 'runlocal' or one or two of "
                     f"{sorted(PAPER_MODELS)} joined by '+'.")
  for key, name in zip(("model_a", "model_b"), names):
    config[key] = model_spec(*PAPER_MODELS[name])
  return config
