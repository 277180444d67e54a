r"""Study 1: CKA heatmaps within and across models (Raghu et al. 2021, Figs 1-2).

    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:vit_b16+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/cka_b16_r50
    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:vit_l16,cheap \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/cka_l16
    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:runlocal --workdir=/tmp/cka

The arg names model A and optionally models B and C joined by '+': `vit_b32`, `vit_b16`, `vit_l16`,
`vit_h14`, `r50` (BiT-M R50x1), `r152` (BiT-M R152x2), `mixer_b16`; e.g. `vit_l16` (within
ViT-L/16, Fig 1), `vit_b16+r50` (Fig 2). Beyond the paper: `siglip_b16`, `dinov2_b14`,
`deit3_b16`, `clip_b16`, `mae_b16` (configs/common.py `PUBLIC_CHECKPOINTS`: where each file is
and how to fetch it), e.g. `dinov2_b14+siglip_b16` or `dinov2_b14+siglip_b16+r50` (three
models: six heatmaps, every within- and cross-model pair, from one pass). Paper variants read
ImageNet validation images with the public ImageNet-21k checkpoints (the paper's JFT-300M
checkpoints are not public) from the vision_transformer and big_transfer buckets; point
`model_a.checkpoint` at a local copy if you have one. `runlocal`: alone, tiny randomly
initialised ViT and BiT on the embedded 'digits' data (seconds); after a paper setting (e.g.
'vit_b16+r50,runlocal'), that setting with random narrow weights at the paper's depth, grid and
resolution on a few embedded images (`configs/common.smoke_test`).

Layers: ViT, the representation after each sub-layer's residual addition ('mid' after
attention, 'out' after the MLP) of every block; Mixer likewise; ResNet, every unit's output.
Each example's representation is flattened (token_mode 'all').

Estimator settings, from the paper's Appendix A: minibatch CKA with the unbiased HSIC, minibatch
1024, 10,240 validation examples sampled without replacement (`data.sample_seed`), the estimate
repeated over 20 reshuffled passes. Here the HSIC terms of all 200 minibatches are averaged
before the ratio is taken (the estimator of Nguyen et al. 2021 over every minibatch), where the
paper averages 20 per-repetition CKA values; the two differ by far less than the standard error.
Memory: a minibatch holds every selected layer of 1024 examples on one device (ViT-B/16's 24
layers: 15 GB); on smaller accelerators use option `cheap`: the public minibatch-CKA code's
defaults (minibatch 256, 10 passes over 10,000 examples; the paper reports that minibatch 128
made no noticeable difference).
Options after the models: `cheap`.

Beyond CKA (`vit_repr.similarity`, README "Similarity measures"): `--config.analysis.measure=`
'angular_cka' (streams like CKA), or 'svcca', 'pwcca', 'procrustes', 'rsa', 'mutual_knn',
'cknna' (every example's features held at once: pick a pooled token_mode and a few thousand
examples), e.g.

    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:dinov2_b14+siglip_b16 \
        --config.analysis.measure=cknna --config.analysis.measure_options.k=10 \
        --config.analysis.token_mode=mean --config.data.num_examples=5000 \
        --config.analysis.num_permutations=100 --workdir=/tmp/cknna

Calibration: `analysis.num_permutations=K` (a p-value and a chance level per cell; the figure
dots cells not above chance), `analysis.num_bootstrap=B` (CKA: bootstrap intervals).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

VIT_LAYERS = (r"Transformer/encoderblock_\d+/(mid|out)",)
MIXER_LAYERS = (r"MixerBlock_\d+/(mid|out)",)
RESNET_LAYERS = (r"block\d/unit\d+/out",)
LAYERS = {"ViT": VIT_LAYERS, "BiT": RESNET_LAYERS, "Mixer": MIXER_LAYERS}
MODELS = ("vit_b32", "vit_b16", "vit_l16", "vit_h14", "r50", "r152", "mixer_b16",
          "siglip_b16", "dinov2_b14", "deit3_b16", "clip_b16", "mae_b16")


def paper_model(key: str) -> ml_collections.ConfigDict:
  """The spec of public checkpoint `key` with this study's layers."""
  name, _ = common.PUBLIC_CHECKPOINTS[key]
  return common.public_model(key, LAYERS[name.partition("-")[0]])


def get_base() -> ml_collections.ConfigDict:
  """Every field, with the paper's data and estimator settings; no models."""
  config = ml_collections.ConfigDict()
  config.model_a = common.model_spec()
  config.model_b = common.model_spec()  # name '' = within model A only.
  config.model_c = common.model_spec()  # name '' = models A and B only.
  config.data = common.eval_data(num_examples=common.PAPER_CKA["num_examples"], sample_seed=0)
  config.analysis = ml_collections.ConfigDict(dict(
      minibatch_size=common.PAPER_CKA["minibatch_size"],  # Examples per minibatch (= device).
      num_passes=common.PAPER_CKA["num_passes"],  # Passes over the examples; p > 0 reshuffled.
      shuffle_seed=0,
      token_mode="all",     # 'all' | 'cls' | 'spatial' | 'mean' (vit_repr.features).
      grams='auto',         # Where Grams run: 'auto' | 'host' (CPU BLAS) | 'device'.
      gram_blocks=1,        # SYRK-like row blocks of each device Gram (see vit_repr.cka).
      # The measure (vit_repr.similarity.MEASURES): 'cka' and 'angular_cka' stream; 'svcca',
      # 'pwcca', 'procrustes', 'rsa', 'mutual_knn', 'cknna' hold every example's features.
      measure="cka",
      measure_options=ml_collections.ConfigDict(dict(  # Unset: the measure's default.
          variance_kept=config_dict.placeholder(float),  # svcca (0.99), pwcca (1.0).
          dissimilarity=config_dict.placeholder(str),    # rsa: 'correlation' | 'euclidean'.
          comparison=config_dict.placeholder(str),       # rsa: 'spearman' | 'pearson'.
          k=config_dict.placeholder(int),                # mutual_knn, cknna (10).
      )),
      max_host_gib=16.0,    # Full-set measures: refuse features larger than this on the host.
      num_permutations=0,   # K > 0: permutation null per cell (p-values, chance levels).
      num_bootstrap=0,      # B > 0 (cka, angular_cka): Poisson-bootstrap intervals.
      confidence=0.95,      # Level of the bootstrap intervals.
      alpha=0.05,           # The figure dots cells with p >= alpha (not above chance).
      calibration_seed=0,   # Seed of the permutations and bootstrap weights.
  ))
  config.checkpoint_every = 20  # Batches between saves of the accumulator state.
  config.log_every = 10
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption: rerun resumes.
  return config


def use_cheap_estimator(config: ml_collections.ConfigDict) -> None:
  """Option 'cheap': the public minibatch-CKA code's settings instead of the paper's."""
  config.analysis.update(minibatch_size=common.CHEAP_CKA["minibatch_size"],
                         num_passes=common.CHEAP_CKA["num_passes"])
  config.data.num_examples = common.CHEAP_CKA["num_examples"]


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[<model>[+<model>[+<model>]]][,cheap][,runlocal]' (module
  docstring)."""
  parsed = common.parse_arg(arg, models="", cheap=False, runlocal=False)
  config = get_base()
  if not parsed.models:
    if not parsed.runlocal:
      raise ValueError(f"Bad cka_heatmap config arg {arg!r}: name one to three of "
                       f"{list(MODELS)} joined by '+', or use 'runlocal'.")
    config.model_a = common.model_spec("ViT-Ti/16", layers=VIT_LAYERS, overrides=dict(
        patch_size=8, depth=4))
    config.model_b = common.model_spec("BiT-R50x1", layers=RESNET_LAYERS, overrides=dict(
        units_per_stage=(1, 1, 1, 1), width_factor=0.5))
    config.data = common.eval_data(name="digits", split="test", image_size=32, num_examples=360)
    config.analysis.update(minibatch_size=40, num_passes=2)
    config.checkpoint_every = 5
    config.log_every = 3
    return config
  names = parsed.models.split("+")
  if any(n not in MODELS for n in names) or not 1 <= len(names) <= 3:
    raise ValueError(f"Bad cka_heatmap config arg {arg!r}: use 'runlocal' or one to three of "
                     f"{list(MODELS)} joined by '+', optionally followed by ',cheap'.")
  for key, name in zip(("model_a", "model_b", "model_c"), names):
    config[key] = paper_model(name)
  if parsed.cheap:
    use_cheap_estimator(config)
  return common.smoke_test(config) if parsed.runlocal else config
