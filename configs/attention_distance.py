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
Compute: one forward pass per image (ViT-B/16 ~17.6 GFLOPs, L/16 ~61.6, H/14 ~167); 10,000
images of ViT-L/16 take minutes on one TPU v3-8; with '+r50' add R50 forwards and the per-head
Grams (2 b^2 p FLOPs per head per minibatch, p = 196 x 64).
`runlocal`: tiny randomly initialised ViT and BiT on the embedded 'digits' data (seconds).

Settings the paper does not state (recorded in the metadata): `analysis.renormalize` (True:
each patch query's patch-to-patch weights are renormalised after dropping CLS; public
implementations differ), the example count (10,000 validation images), the ViT blocks whose
heads are compared (`head_blocks`, None = the lowest quarter), the head representation
(`head_token_mode` 'spatial': patch tokens only; 'all' adds CLS) and the ResNet layers
(stage 1 units and stage 2 units).
"""

import ml_collections

from configs.cka_heatmap import model_spec

_ATTENTION = (r"Transformer/encoderblock_\d+/attn_probs",)
_RESNET_LOWER = (r"block1/unit\d+/out", r"block2/unit\d+/out")
_AUGREG = "gs://vit_models/augreg/"
PAPER_VITS = {
    "vit_b16": ("ViT-B/16", "gs://vit_models/imagenet21k/ViT-B_16.npz"),
    "vit_l16": ("ViT-L/16", "gs://vit_models/imagenet21k/ViT-L_16.npz"),
    "vit_h14": ("ViT-H/14", "gs://vit_models/imagenet21k/ViT-H_14.npz"),
    "vit_b16_i1k": ("ViT-B/16", _AUGREG + "B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-"
                                          "sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
    "vit_l16_i1k": ("ViT-L/16", _AUGREG + "L_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-"
                                          "sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
    "vit_b16_i21k_augreg": ("ViT-B/16", _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-"
                                                  "do_0.0-sd_0.0.npz"),
}
RESNETS = {"r50": ("BiT-R50x1", "gs://bit_models/BiT-M-R50x1.npz")}


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: 'runlocal' or '<vit>[+r50]' (see the module docstring)."""
  config = ml_collections.ConfigDict()
  config.model = model_spec()               # The ViT (any model sowing attn_probs).
  config.resnet = model_spec()              # name '' = no per-head CKA.
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", split="validation", data_dir=None, image_size=224,
      num_examples=10_000, crop_fraction=None))
  config.analysis = ml_collections.ConfigDict(dict(
      renormalize=True,          # Renormalise patch-to-patch weights after dropping CLS.
      minibatch_size=256,        # Examples per device per step (= the CKA minibatch).
      head_blocks=None,          # ViT blocks whose heads meet the ResNet; None: lowest quarter.
      head_token_mode="spatial", # 'spatial' (patch tokens) or 'all' (with CLS).
      gram_blocks=1,             # vit_repr.cka.MinibatchCKA option.
  ))
  config.log_every = 10
  if arg == "runlocal":
    config.model = model_spec("ViT-Ti/16", layers=_ATTENTION, overrides=dict(
        patch_size=8, depth=4))
    config.resnet = model_spec("BiT-R50x1", layers=_RESNET_LOWER, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data.update(name="digits", split="test", image_size=32, num_examples=360)
    config.analysis.update(minibatch_size=40, head_blocks=(0, 1))
    config.log_every = 3
    return config
  vit, _, resnet = arg.partition("+")
  if vit not in PAPER_VITS or (resnet and resnet not in RESNETS):
    raise ValueError(f"Bad attention_distance config arg {arg!r}: use 'runlocal' or one of "
                     f"{sorted(PAPER_VITS)}, optionally followed by '+r50'.")
  config.model = model_spec(*PAPER_VITS[vit], layers=_ATTENTION)
  if resnet:
    config.resnet = model_spec(*RESNETS[resnet], layers=_RESNET_LOWER)
  return config
