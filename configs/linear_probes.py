r"""Linear probes per layer and per token (Raghu et al. 2021, Fig 11 and the Figs 12-13 curves).

    python -m experiments.linear_probes --config=configs/linear_probes.py:vit_b16 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/probes_b16
    python -m experiments.linear_probes \
        --config=configs/linear_probes.py:vit_b16_i1k+vit_b16_i21k --workdir=/tmp/probes_i1k_i21k
    python -m experiments.linear_probes --config=configs/linear_probes.py:dinov2_b14 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/probes_dinov2
    python -m experiments.linear_probes --config=configs/linear_probes.py:runlocal --workdir=/tmp/p

The arg names the probed models joined by '+': `vit_b32`, `vit_b16`, `vit_l16` (ImageNet-21k
checkpoints of vision_transformer), `vit_b16_i1k` / `vit_b16_i21k` (the AugReg ViT-B/16
pre-trained on ImageNet-1k only / on ImageNet-21k, same recipe: the public pair closest to the
paper's data-scale comparison), `r50` (BiT-M R50x1), and beyond the paper `siglip_b16`,
`dinov2_b14`, `deit3_b16`, `clip_b16`, `mae_b16` (configs/common.py `PUBLIC_CHECKPOINTS`: where
each file is and how to fetch it; e.g. `dinov2_b14+siglip_b16`), then options: `full`
(big_vision's 1, 5, 10 and 25 shots and full softmax-regression probes besides the paper's
10-shot ones). Token kinds follow each model's `token_layout()`: 'cls' probes the CLS token
(skipped for SigLIP's MAP head, which has none), 'mean' averages the patch tokens only (CLS,
distillation and register tokens left out), and the per-token figure compares the CLS token with
the mean of the patch tokens' probes (DINOv2: 16 x 16 patches behind CLS and 4 registers).

The paper's setting: 10-shot closed-form probes (big_vision's few-shot linear regression,
averaged over 3 shot samplings) of the 12 (24) block outputs on ImageNet: shots drawn from the
first 50,000 'train' images, accuracy on 10,000 'validation' images, 224 px with the 0.875
centre crop; modes 'cls' and 'mean'. With `full`, the full probes train on the same 50,000
(1,000 classes x ~50 examples each: full-probe accuracies on a pool this small are a lower bound
of a probe trained on all 1.28M images).

Cost for ViT-B/16. Host memory for the feature matrices: 4 bytes x 60,000 examples x
(768 + 768) x 12 layers = 4.4 GB. Compute: one forward pass over 60,000 images (~35 GFLOP per
image, ~2 PFLOP in all: minutes on a TPU v3-8), 12 layers x 2 modes x 3 seeds ridge solves of
769 x 769 (seconds); with `full`, 24 full probes of 40,000 x 768 x 1,000 (minutes on one
accelerator). Per-token probes (`probes.per_token=True`) keep [examples, tokens, width] per
layer (605 kB per example per layer for B/16): lower `data.train_num_examples` or select fewer
layers for them. The extracted features are saved in the workdir as they stream
(`checkpoint_every` batches), so a killed run resumes where it stopped.

`runlocal`: alone, a tiny randomly initialised CLS-token ViT and a GAP ViT on the embedded
'digits' data (~75 s of CPU time on 2 cores, mostly compiling one probe per feature shape);
after a paper setting (e.g. 'vit_b16,runlocal'), that setting with random narrow
weights at the paper's depth, grid and resolution on a few embedded images
(`configs/common.smoke_test`). Settings
the paper does not state are fields below, recorded in the metadata: the probed pool and test
sizes, the token modes, the few-shot seeds (big_vision averages 3), and every setting of the
full probes (held-out fraction, optimiser, early stopping).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

_VIT_LAYERS = (r"Transformer/encoderblock_\d+/out",)
_RESNET_LAYERS = (r"block\d/unit\d+/out",)
_AUGREG = "gs://vit_models/augreg/"

# name -> (registered model, public checkpoint, layer patterns); a name of
# `common.FAMILY_OVERRIDES` also takes its family's overrides (`paper_model`).
PAPER_MODELS = {
    "vit_b32": (*common.PUBLIC_CHECKPOINTS["vit_b32"], _VIT_LAYERS),
    "vit_b16": (*common.PUBLIC_CHECKPOINTS["vit_b16"], _VIT_LAYERS),
    "vit_l16": (*common.PUBLIC_CHECKPOINTS["vit_l16"], _VIT_LAYERS),
    "vit_b16_i1k": ("ViT-B/16", _AUGREG + "B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-"
                    "sd_0.1.npz", _VIT_LAYERS),
    "vit_b16_i21k": ("ViT-B/16", _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-"
                     "sd_0.0.npz", _VIT_LAYERS),
    "r50": (*common.PUBLIC_CHECKPOINTS["r50"], _RESNET_LAYERS),
    **{key: (*common.PUBLIC_CHECKPOINTS[key], _VIT_LAYERS) for key in common.FAMILY_OVERRIDES},
}


def paper_model(name: str) -> ml_collections.ConfigDict:
  """The spec of `PAPER_MODELS[name]`, with its family's `common.FAMILY_OVERRIDES` if any."""
  model, checkpoint, layers = PAPER_MODELS[name]
  return common.model_spec(model, checkpoint, layers,
                           overrides=common.FAMILY_OVERRIDES.get(name))


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.specs = ml_collections.ConfigDict()  # name -> model spec, probed in this order.
  config.data = ml_collections.ConfigDict(dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str), image_size=224,
      crop_fraction=0.875,          # None: plain resize; c: resize to size / c, centre crop.
      train_split="train",          # Pool the shots are drawn from (and the full probes train on).
      train_num_examples=50_000,    # First n of the pool split (None: all of it).
      test_split="validation",
      test_num_examples=10_000,     # None: all of the test split.
      global_batch_size=1024,       # Divisible by the device count; the last partial batch of
                                    # each split is dropped (logged).
  ))
  config.probes = ml_collections.ConfigDict(dict(
      modes=("cls", "mean"),        # Per-layer token modes: 'cls', 'mean', 'all' (flattened).
      per_token=False,              # One probe per token position as well.
      shots=(10,),                  # The paper's 10-shot probes.
      seeds=(0, 1, 2),              # Shot samplings averaged (big_vision: 3).
      l2_reg=2.0 ** 10,             # big_vision's ridge regulariser.
  ))
  config.linear = ml_collections.ConfigDict(dict(
      enabled=False,                # Full softmax-regression probes besides the few-shot ones.
      holdout_fraction=0.2,         # Of the pool, for early stopping.
      seed=0,                       # Held-out split.
      learning_rate=1e-2,           # Full-batch Adam on standardised features.
      weight_decay=0.0,
      max_steps=2000,
      eval_every=20,                # Steps between held-out evaluations.
      patience=10,                  # Evaluations without improvement before stopping.
      min_delta=1e-4,               # Held-out loss decrease that counts as improvement.
  ))
  config.checkpoint_every = 10      # Batches between saves of the features extracted so far.
  config.log_every = 10
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption.
  return config


def use_full_probes(config: ml_collections.ConfigDict) -> None:
  """Option 'full': big_vision's four shot counts and full softmax-regression probes."""
  config.probes.shots = (1, 5, 10, 25)
  config.linear.enabled = True


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[<model>[+<model>...]][,full][,runlocal]' (docstring)."""
  parsed = common.parse_arg(arg, models="", full=False, runlocal=False)
  config = _base()
  if not parsed.models and parsed.runlocal:
    tiny = dict(patch_size=8, hidden_size=32, depth=3, num_heads=2, mlp_dim=64)
    config.specs = ml_collections.ConfigDict(dict(
        vit_cls=common.model_spec("ViT-Ti/16", layers=_VIT_LAYERS, overrides=dict(tiny)),
        vit_gap=common.model_spec("ViT-Ti/16", layers=_VIT_LAYERS,
                                  overrides=dict(tiny, classifier="gap"))))
    config.data.update(name="digits", image_size=32, train_split="train", test_split="test",
                       global_batch_size=120)
    config.data.crop_fraction = config_dict.placeholder(float)
    config.data.train_num_examples = config_dict.placeholder(int)
    config.data.test_num_examples = config_dict.placeholder(int)
    config.probes.update(modes=("cls", "mean", "all"), per_token=True, shots=(1, 5, 10),
                         seeds=(0, 1))
    config.linear.update(enabled=True, max_steps=300, eval_every=20, patience=3)
    config.checkpoint_every = 3
    config.log_every = 3
    return config
  names = parsed.models.split("+")
  if any(n not in PAPER_MODELS for n in names):
    raise ValueError(f"Bad linear_probes config arg {arg!r}: use 'runlocal' or models of "
                     f"{sorted(PAPER_MODELS)} joined by '+', optionally followed by ',full'.")
  for name in names:
    config.specs[name] = paper_model(name)
  if parsed.full:
    use_full_probes(config)
  return common.smoke_test(config) if parsed.runlocal else config
