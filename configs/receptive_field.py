r"""Study 2b: effective receptive fields of ViT and ResNet layers (Raghu et al. 2021, Fig 6).

    python -m experiments.receptive_field --config=configs/receptive_field.py:vit_b32+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/erf
    python -m experiments.receptive_field --config=configs/receptive_field.py:dinov2_b14 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/erf_dinov2
    python -m experiments.receptive_field --config=configs/receptive_field.py:runlocal \
        --workdir=/tmp/erf

The arg names model A and optionally model B joined by '+': `vit_b32` (ViT-B/32, the paper's
appendix figure), `vit_l16`, `vit_b16`, `r50` (BiT-M R50x1) with the public ImageNet-21k
checkpoints, on ImageNet validation images at 224 px: the paper's 32 random images
(`data.sample_seed`). Beyond the paper: `siglip_b16`, `dinov2_b14`, `deit3_b16`, `clip_b16`,
`mae_b16` (configs/common.py `PUBLIC_CHECKPOINTS`: where each file is and how to fetch it), e.g.
`dinov2_b14+r50`; the centre location is a patch token of the family's own grid (DINOv2: 16 x 16
patches of 14 px behind CLS and 4 registers; SigLIP: 14 x 14, no CLS). Layers: ViT, every
block's 'mid' (after the attention residual addition) and 'out' (after the MLP one); ResNet,
the stem and every unit output. `runlocal`: alone,
tiny randomly initialised ViT and BiT on the embedded 'digits' data; after a paper setting
(e.g. 'vit_b32+r50,runlocal'), that setting with random narrow weights at the paper's depth,
grid and resolution on a few embedded images (`configs/common.smoke_test`).

Compute: the paper's estimator ('mean_abs', |gradient| per channel, averaged) needs one backward
pass per channel of every layer (ViT-B/32: 24 layers x 768 channels; R50: 17 layers of 64-2048
channels) per image, batched over channels (`channel_chunk` cotangents at a time);
`layer_groups` groups of consecutive layers each compile one forward and one backward graph
(fewer groups: faster compile, more wasted backward work; see `vit_repr.receptive_field`);
benchmarks/receptive_field_bench.py measures the cost. `analysis.estimator='abs_of_sum'` is
~C times cheaper but not the paper's quantity, and `analysis.max_channels=K` averages a fixed
random subset of K channels per layer (an unbiased estimate of the channel mean; `runlocal`
uses 32 so that it runs in seconds on a CPU).
Settings the paper does not state (recorded in the metadata): the centre location of an even
grid (`center`: 'single' = the cell containing the image-centre pixel, or 'mean' of the
central cells).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

_VIT_LAYERS = (r"Transformer/encoderblock_\d+/(mid|out)",)
_RESNET_LAYERS = (r"root_block/out", r"block\d/unit\d+/out")
MODELS = {"vit_b32": _VIT_LAYERS, "vit_b16": _VIT_LAYERS, "vit_l16": _VIT_LAYERS,
          "r50": _RESNET_LAYERS, **dict.fromkeys(common.FAMILY_OVERRIDES, _VIT_LAYERS)}


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[<model>[+<model>]][,runlocal]' (see module docstring)."""
  parsed = common.parse_arg(arg, models="", runlocal=False)
  config = ml_collections.ConfigDict()
  config.model_a = common.model_spec()
  config.model_b = common.model_spec()  # name '' = model A only.
  config.data = common.eval_data(num_examples=32, sample_seed=0)
  config.analysis = ml_collections.ConfigDict(dict(
      estimator="mean_abs",  # 'mean_abs' (paper: |grad| per channel, averaged) or 'abs_of_sum'.
      center="single",       # 'single' or 'mean' (of the central cells of an even grid).
      channel_chunk=32,      # Backward passes (probes) vmapped together, per image (memory).
      layer_groups=8,        # Consecutive-layer groups, each one graph: compile vs run time.
      max_channels=config_dict.placeholder(int),  # None: every channel (exact); K: K per layer.
      channel_seed=0,        # Seed of that channel subset.
      # Images per device per step. Images share only the forward pass, and memory grows with
      # channel_chunk x minibatch_size backward passes in flight (R50 at 224 px: ~0.1 GB each).
      minibatch_size=1,
  ))
  config.checkpoint_every = 1    # Batches between saves of the accumulated maps.
  config.log_every = 1
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption.
  if not parsed.models and parsed.runlocal:
    config.model_a = common.model_spec("ViT-Ti/16", layers=_VIT_LAYERS, overrides=dict(
        patch_size=8, depth=4, hidden_size=64, num_heads=4, mlp_dim=128))
    config.model_b = common.model_spec("BiT-R50x1", layers=_RESNET_LAYERS, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data = common.eval_data(name="digits", split="test", image_size=32, num_examples=20)
    config.analysis.update(minibatch_size=10, max_channels=32, channel_chunk=32)
    return config
  names = parsed.models.split("+")
  if any(n not in MODELS for n in names) or not 1 <= len(names) <= 2:
    raise ValueError(f"Bad receptive_field config arg {arg!r}: use 'runlocal' or one or two of "
                     f"{sorted(MODELS)} joined by '+'.")
  for key, name in zip(("model_a", "model_b"), names):
    config[key] = common.public_model(name, MODELS[name])
  return common.smoke_test(config) if parsed.runlocal else config
