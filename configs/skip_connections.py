r"""Study 3: skip connections (Raghu et al. 2021, Figs 7-8).

    python -m experiments.skip_connections --config=configs/skip_connections.py:vit_b16 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/skip_b16
    python -m experiments.skip_connections --config=configs/skip_connections.py:dinov2_b14+r50 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=/tmp/skip_dinov2
    python -m experiments.skip_connections --config=configs/skip_connections.py:local \
        --config.models_dir=/tmp/models --workdir=/tmp/skip
    python -m experiments.skip_connections --config=configs/skip_connections.py:runlocal \
        --workdir=/tmp/skip_smoke

Two parts (`vit_repr.studies.skip_connections`):
(a) norm ratios ||z|| / ||f(z)|| of every residual sub-layer (`vit_repr.residual`), the CLS
    (and distillation) token, the spatial tokens and the register tokens apart, for the models
    of `norm_ratio.models` (public checkpoints or random init) and the trained models named in
    `norm_ratio.trained`, over `data`;
(b) the ablation: the trained models of `ablation.models` (a ViT without both skip
    connections of one block each) and the unablated `ablation.reference`, trained with
    `vit_repr.training.run` into `<models_dir>/<name>` (or reused), then Study 1's CKA heatmaps
    (`ablation.cka`, a configs/cka_heatmap.py config whose model specs are filled in) of each
    ablated model against itself and against the reference, and their test accuracies.
`models` maps every trained model's name to its configs/train.py config; `models_dir` None is
`<workdir>/models`. One dataset for the whole study: the trained models' data and the ablation's
CKA data are linked to `config.data` (name, data_dir, train_split, split), so
`--config.data.name=X --config.data.data_dir=Y` reaches every part. The norm-ratio passes save
their state every `checkpoint_every` batches and resume after a kill.

Args:
  vit_b16   The paper's setting with public substitutes: (a) ViT-B/16, Mixer-B/16 and BiT-M
            R50x1 ImageNet-21k checkpoints on 10,000 ImageNet validation images (one forward
            pass each: minutes on one accelerator); (b) ViT-B/16 trained on ImageNet-1k from
            scratch (configs/train.py `imagenet_vit_b16`: 300 epochs, ~4e19 FLOPs, about 2-3
            days of a TPU v3-8 per model) unablated and without the skips of blocks 1, 6 and 10
            (0-based; the paper's exact blocks are not known here), CKA with Study 1's paper
            settings (configs/cka_heatmap.py: minibatch 1024, 20 passes over 10,240 images).
  local     The demo on the embedded 'digits' data: (a) the trained small vit_cls, bit and
            mixer; (b) vit_noskip at blocks 1 and 4 of 6 against vit_cls (1,500 steps each).
  runlocal  Alone or after `local`: `local` as a smoke test: the `runlocal` training
            recipes (6 steps, 2-block ViTs), norm ratios of vit_cls and a random-init ResNet
            with units (2, 1, 1, 1) over 120 images, ablation at block 1 (CKA: one pass over
            120 images). After `vit_b16`
            ('vit_b16,runlocal'): the paper setting with random narrow weights at full
            depth, a few embedded images and training steps (`configs/common.smoke_test`).
  <key>[+<key>...]
            Part (a) alone, no ablation: the norm ratios of the public checkpoints named (keys
            of configs/common.py `PUBLIC_CHECKPOINTS`: `vit_b32`, `vit_b16`, `vit_l16`,
            `vit_h14`, `r50`, `r152`, `mixer_b16`, and beyond the paper `siglip_b16`,
            `dinov2_b14`, `deit3_b16`, `clip_b16`, `mae_b16`: where each file is and how to
            fetch it) on the 10,000 ImageNet validation images of `vit_b16`; e.g.
            'dinov2_b14+siglip_b16' or 'vit_b16+mixer_b16+r50' (`vit_b16` alone is the paper
            setting above). DINOv2's 4 registers form the 'register' group, apart from CLS;
            SigLIP's MAP head has no CLS token (its 'cls' column is NaN). After it, `runlocal`
            ('dinov2_b14,runlocal') runs it with random narrow weights at full depth and token
            grid on a few embedded images.

Paper-unknown settings (recorded in the metadata): the averaging of the norm ratio
(`norm_ratio.statistic`, default 'ratio_of_means': mean ||z|| / mean ||f(z)|| over examples
and tokens; 'mean_of_ratios' is also stored), the examples used, the ablated blocks.
"""

import ml_collections
from ml_collections import config_dict

from configs import cka_heatmap
from configs import common
from configs import train as train_configs

_VIT_LAYERS = (r"Transformer/encoderblock_\d+/(mid|out)",)
STATISTICS = ("ratio_of_means", "mean_of_ratios")
SETTINGS = ("vit_b16", "local")
MODELS = tuple(common.PUBLIC_CHECKPOINTS)  # Norm-ratio models a setting may name.
_PAPER_NORM_RATIO_MODELS = ("vit_b16", "mixer_b16", "r50")


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.models = ml_collections.ConfigDict()  # name -> configs/train.py config.
  config.models_dir = config_dict.placeholder(str)  # None: <workdir>/models.
  # The study's dataset: images for the norm ratios (`split`), training data of its models.
  config.data = common.eval_data(train_split="train")
  config.norm_ratio = ml_collections.ConfigDict(dict(
      models=ml_collections.ConfigDict(),  # key -> model spec (configs/common.model_spec).
      trained=(),                          # Names in `models`, trained or reused.
      global_batch_size=256,               # A multiple of the device count.
      statistic="ratio_of_means",          # Plotted and summarised; both are stored.
  ))
  config.checkpoint_every = 10  # Norm-ratio batches between saves of the accumulated sums.
  config.log_every = 10
  config.stop_after_batches = config_dict.placeholder(int)  # Simulated preemption.
  config.ablation = ml_collections.ConfigDict(dict(
      reference="",       # Name in `models` of the unablated ViT ('' = no ablation).
      models=(),          # Names in `models` of ViTs with `remove_skips` set.
      layers=_VIT_LAYERS,
  ))
  config.ablation.cka = cka_heatmap.get_base()  # Model specs filled in at run time.
  return config


def _link_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Links the models' and the ablation's data to the study's (one dataset per job)."""
  common.link_data(config.ablation.cka.data, config.data)
  for train_config in config.models.values():
    common.link_data(train_config.data, config.data)
  return config


def _ablation_models(recipe: str, blocks: tuple[int, ...], suffix: str
                     ) -> dict[str, ml_collections.ConfigDict]:
  return {f"vit_noskip_block{i}": train_configs.get_config(f"{recipe},block={i}{suffix}")
          for i in blocks}


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the config for `arg`: '[vit_b16|local|<key>[+<key>...]][,runlocal]' (see the
  module docstring)."""
  parsed = common.parse_arg(arg, setting="local", runlocal=False)
  keys = parsed.setting.split("+")
  if parsed.setting not in SETTINGS and any(key not in MODELS for key in keys):
    raise ValueError(f"Bad skip_connections config arg {arg!r}; the settings are {SETTINGS} "
                     f"or norm-ratio models of {list(MODELS)} joined by '+', optionally "
                     "followed by ',runlocal'.")
  config = _base()
  if parsed.setting not in SETTINGS:  # Norm ratios of the named models only.
    config.norm_ratio.models.update({key: common.public_model(key) for key in keys})
    _link_data(config)
    return common.smoke_test(config) if parsed.runlocal else config
  if parsed.setting == "vit_b16":
    for key in _PAPER_NORM_RATIO_MODELS:
      config.norm_ratio.models[key] = common.public_model(key)
    reference = train_configs.get_config("imagenet_vit_b16")
    config.models["imagenet_vit_b16"] = reference
    for block in (1, 6, 10):
      ablated = train_configs.get_config("imagenet_vit_b16")
      ablated.model.overrides.remove_skips = (block,)
      config.models[f"imagenet_vit_b16_noskip_block{block}"] = ablated
    config.ablation.update(dict(reference="imagenet_vit_b16", models=tuple(
        f"imagenet_vit_b16_noskip_block{b}" for b in (1, 6, 10))))
    _link_data(config)
    return common.smoke_test(config) if parsed.runlocal else config

  suffix = ",runlocal" if parsed.runlocal else ""
  config.data.update(dict(name="digits", split="test", image_size=32, num_examples=360))
  config.norm_ratio.global_batch_size = 40
  config.ablation.cka = cka_heatmap.get_config("runlocal")  # 360 digits, 2 passes, batch 40.
  config.ablation.cka.model_a = common.model_spec()
  config.ablation.cka.model_b = common.model_spec()
  blocks = (1,) if parsed.runlocal else (1, 4)
  trained = ("vit_cls",) if parsed.runlocal else ("vit_cls", "bit", "mixer")
  config.models.update({name: train_configs.get_config(name + suffix) for name in trained})
  config.models.update(_ablation_models("vit_noskip", blocks, suffix))
  config.norm_ratio.trained = trained
  config.ablation.update(dict(reference="vit_cls", models=tuple(
      f"vit_noskip_block{b}" for b in blocks)))
  if parsed.runlocal:
    # Beside the trained ViT, a random-init ResNet with an identity-shortcut unit.
    config.norm_ratio.models.resnet = common.model_spec(
        "BiT-R50x1", overrides=dict(units_per_stage=(2, 1, 1, 1), width_factor=0.5))
    config.data.num_examples = 120
    config.ablation.cka.data.num_examples = 120
    config.ablation.cka.analysis.num_passes = 1
  return _link_data(config)
