r"""Study 2a: mean attention distance and per-head CKA to a ResNet (Raghu et al. 2021, Figs 3-5).

    python -m experiments.attention_distance --config=configs/attention_distance.py:vit_b16+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/attn_b16
    python -m experiments.attention_distance --config=configs/attention_distance.py:runlocal \
        --workdir=/tmp/attn

The arg names a ViT, optionally followed by '+r50' to also compute the per-head CKA against the
lower layers of BiT-M R50x1 (Fig 5). ViTs with their public checkpoints on ImageNet validation
images at 224 px (the paper's JFT-300M checkpoints are not public):
  vit_b16, vit_l16, vit_h14    ImageNet-21k pre-trained (vision_transformer 'imagenet21k').
  vit_b16_i1k, vit_l16_i1k     ImageNet-1k only (AugReg, Steiner et al. 2021, fine-tuned at
                               224 px on ImageNet-1k): the data-scale contrast of Fig 4, few local
                               heads in the lower blocks.
  vit_b16_i21k_augreg          The ImageNet-21k AugReg counterpart of vit_b16_i1k (same recipe
                               family, more data).
  siglip_b16, dinov2_b14, deit3_b16, clip_b16, mae_b16
                               Beyond the paper: today's ViT families (configs/common.py
                               `PUBLIC_CHECKPOINTS`); register and distillation tokens are left
                               out like CLS.
The paper's setting: 5,000 ImageNet validation images (drawn at random, `data.sample_seed`).
Compute: one forward pass per image (ViT-B/16 ~17.6 GFLOPs, L/16 ~61.6, H/14 ~167); with '+r50'
add R50 forwards and the per-head Grams (2 b^2 p FLOPs per head per minibatch, p = 196 x 64).
Each device's batch of `analysis.minibatch_size` images is one CKA minibatch (250: 5,000 images
are 20 minibatches; the paper found minibatch 128 as good as 1024).
`runlocal`: alone, tiny randomly initialised ViT and BiT on the embedded 'digits' data
(seconds); after a paper setting (e.g. 'vit_b16+r50,runlocal'), that setting with random narrow
weights at the paper's depth, grid and resolution on a few embedded images
(`configs/common.smoke_test`).

Settings the paper does not state (recorded in the metadata): `analysis.renormalize` (True:
each patch query's patch-to-patch weights are renormalised after dropping CLS; public
implementations differ), the ViT blocks whose heads are compared (`head_blocks`, () = the lowest
quarter), the head representation (`head_token_mode` 'spatial': patch tokens only; 'all' adds
CLS) and the ResNet layers (stage 1 units and stage 2 units).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

_ATTENTION = (r"Transformer/encoderblock_\d+/attn_probs",)
_RESNET_LOWER = (r"block1/unit\d+/out", r"block2/unit\d+/out")
_AUGREG = "gs://vit_models/augreg/"
VITS = {
    **{key: common.PUBLIC_CHECKPOINTS[key]
       for key in ("vit_b16", "vit_l16", "vit_h14", *common.FAMILY_OVERRIDES)},
    "vit_b16_i1k": ("ViT-B/16", _AUGREG + "B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-"
                                          "sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
    "vit_l16_i1k": ("ViT-L/16", _AUGREG + "L_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-"
                                          "sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
    "vit_b16_i21k_augreg": ("ViT-B/16", _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-"
                                                  "do_0.0-sd_0.0.npz"),
}
RESNETS = ("r50",)


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[<vit>[+r50]][,runlocal]' (see the module docstring)."""
  parsed = common.parse_arg(arg, models="", runlocal=False)
  config = ml_collections.ConfigDict()
  config.model = common.model_spec()        # The ViT (any model sowing attn_probs).
  config.resnet = common.model_spec()       # name '' = no per-head CKA.
  config.data = common.eval_data(num_examples=5_000, sample_seed=0)
  config.analysis = ml_collections.ConfigDict(dict(
      renormalize=True,          # Renormalise patch-to-patch weights after dropping CLS.
      minibatch_size=250,        # Examples per device per step (= the CKA minibatch).
      head_blocks=(),            # ViT blocks whose heads meet the ResNet; (): lowest quarter.
      head_token_mode="spatial", # 'spatial' (patch tokens) or 'all' (with CLS).
      grams='auto',              # vit_repr.cka.MinibatchCKA: 'auto' | 'host' | 'device'.
      gram_blocks=1,             # vit_repr.cka.MinibatchCKA option.
  ))
  config.checkpoint_every = 20   # Batches between saves of the accumulated state.
  config.log_every = 10
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption.
  if not parsed.models and parsed.runlocal:
    config.model = common.model_spec("ViT-Ti/16", layers=_ATTENTION, overrides=dict(
        patch_size=8, depth=4))
    config.resnet = common.model_spec("BiT-R50x1", layers=_RESNET_LOWER, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data = common.eval_data(name="digits", split="test", image_size=32, num_examples=360)
    config.analysis.update(minibatch_size=40, head_blocks=(0, 1))
    config.checkpoint_every = 3
    config.log_every = 3
    return config
  vit, _, resnet = parsed.models.partition("+")
  if vit not in VITS or (resnet and resnet not in RESNETS):
    raise ValueError(f"Bad attention_distance config arg {arg!r}: use 'runlocal' or one of "
                     f"{sorted(VITS)}, optionally followed by '+r50'.")
  config.model = common.model_spec(*VITS[vit], layers=_ATTENTION,
                                   overrides=common.FAMILY_OVERRIDES.get(vit))
  if resnet:
    config.resnet = common.public_model(resnet, _RESNET_LOWER)
  return common.smoke_test(config) if parsed.runlocal else config
