r"""Study 1: CKA heatmaps within and across models (Raghu et al. 2021, Figs 1-2).

    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:vit_b16+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/cka_b16_r50
    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:runlocal --workdir=/tmp/cka

The arg names model A and optionally model B joined by '+': `vit_b32`, `vit_b16`, `vit_l16`,
`vit_h14`, `r50` (BiT-M R50x1), `r152` (BiT-M R152x2), `mixer_b16`; e.g. `vit_l16` (within
ViT-L/16, Fig 1), `vit_b16+r50` (Fig 2). Paper variants read ImageNet validation images with
the public ImageNet-21k checkpoints (the paper's JFT-300M checkpoints are not public) from the
vision_transformer and big_transfer buckets; point `checkpoint` at a local copy if you have
one. `runlocal`: tiny randomly initialised ViT and BiT on the embedded 'digits' data (seconds).

Layers: ViT, the representation after each sub-layer's residual addition ('mid' after
attention, 'out' after the MLP) of every block; Mixer likewise; ResNet, every unit's output.
Estimator: the reference minibatch-CKA code's defaults (the paper's own counts are unknown):
minibatch 256 per device, 10 passes over 10,000 validation images; each example's
representation flattened (token_mode 'all').
"""

import ml_collections

_VIT_LAYERS = (r"Transformer/encoderblock_\d+/(mid|out)",)
_MIXER_LAYERS = (r"MixerBlock_\d+/(mid|out)",)
_RESNET_LAYERS = (r"block\d/unit\d+/out",)

# name -> (registered model, public checkpoint, layer patterns).
PAPER_MODELS = {
    "vit_b32": ("ViT-B/32", "gs://vit_models/imagenet21k/ViT-B_32.npz", _VIT_LAYERS),
    "vit_b16": ("ViT-B/16", "gs://vit_models/imagenet21k/ViT-B_16.npz", _VIT_LAYERS),
    "vit_l16": ("ViT-L/16", "gs://vit_models/imagenet21k/ViT-L_16.npz", _VIT_LAYERS),
    "vit_h14": ("ViT-H/14", "gs://vit_models/imagenet21k/ViT-H_14.npz", _VIT_LAYERS),
    "r50": ("BiT-R50x1", "gs://bit_models/BiT-M-R50x1.npz", _RESNET_LAYERS),
    "r152": ("BiT-R152x2", "gs://bit_models/BiT-M-R152x2.npz", _RESNET_LAYERS),
    "mixer_b16": ("Mixer-B/16", "gs://mixer_models/imagenet21k/Mixer-B_16.npz", _MIXER_LAYERS),
}


def model_spec(name: str = "", checkpoint: str = "", layers=(), overrides=None,
               seed: int = 0) -> ml_collections.ConfigDict:
  """A model spec: registered name, checkpoint ('' = random init from seed), layer patterns."""
  return ml_collections.ConfigDict(dict(
      name=name, checkpoint=checkpoint, layers=tuple(layers),
      overrides=ml_collections.ConfigDict(overrides or {}), seed=seed))


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_a = model_spec()
  config.model_b = model_spec()  # name '' = within model A only.
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", split="validation", data_dir=None, image_size=224,
      num_examples=10_000, crop_fraction=None))
  config.analysis = ml_collections.ConfigDict(dict(
      minibatch_size=256,   # Examples per minibatch (= per device).
      num_passes=10,        # Passes over the examples; pass p > 0 reshuffled.
      shuffle_seed=0,
      token_mode="all",     # 'all' | 'cls' | 'spatial' | 'mean' (vit_repr.features).
      gram_blocks=1,        # SYRK-like row blocks of each Gram (see vit_repr.cka).
  ))
  config.checkpoint_every = 20  # Batches between saves of the accumulator state.
  config.log_every = 10
  config.stop_after_batches = None  # Stop early (simulated preemption); rerun to resume.
  return config


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: 'runlocal' or '<model>[+<model>]' (see module docstring)."""
  config = _base()
  if arg == "runlocal":
    config.model_a = model_spec("ViT-Ti/16", layers=_VIT_LAYERS, overrides=dict(
        patch_size=8, depth=4))
    config.model_b = model_spec("BiT-R50x1", layers=_RESNET_LAYERS, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data.update(name="digits", split="test", image_size=32, num_examples=360)
    config.analysis.update(minibatch_size=40, num_passes=2)
    config.checkpoint_every = 5
    config.log_every = 3
    return config
  names = arg.split("+")
  unknown = [n for n in names if n not in PAPER_MODELS]
  if unknown or not 1 <= len(names) <= 2:
    raise ValueError(f"Bad cka_heatmap config arg {arg!r}: use 'runlocal' or one or two of "
                     f"{sorted(PAPER_MODELS)} joined by '+'.")
  for key, name in zip(("model_a", "model_b"), names):
    model, checkpoint, layers = PAPER_MODELS[name]
    config[key] = model_spec(model, checkpoint, layers)
  return config
