r"""Training recipes: small models on the embedded data, ImageNet from scratch, fine-tuning.

    python -m experiments.train --config=configs/train.py:vit_cls --workdir=/tmp/vit_cls
    python -m experiments.train --config=configs/train.py:vit_noskip,block=2 --workdir=/tmp/ns2
    python -m experiments.train --config=configs/train.py:imagenet_vit_b16 \
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --workdir=gs://my-bucket/vitb16
    python -m experiments.train --config=configs/train.py:vit_gap,runlocal --workdir=/tmp/smoke

Args after the colon: a recipe name, then comma-separated options.

Embedded-data recipes ('digits', 1,437 train / 360 test images upsampled from 8x8 to 32x32;
small models meant for the demo and the controlled-change studies of Raghu et al., NeurIPS 2021,
on a CPU in minutes):
  vit_cls      ViT (patch 8, i.e. a 4x4 grid; width 64, 6 blocks, 4 heads, MLP 128) with a
               CLS-token head.
  vit_gap      The same ViT with a global-average-pooling head.
  vit_noskip   vit_cls without both skip connections of one block: `block=i` (0-based; default
               the middle block, depth // 2).
  bit          BiT ResNet-v2 with one bottleneck unit per stage, width factor 0.5.
  mixer        MLP-Mixer (patch 8, width 64, 6 blocks, token MLP 32, channel MLP 128).
All five: Adam (0.9, 0.999), learning rate 3e-3 with 100 warmup steps and cosine decay,
decoupled weight decay 1e-4 on kernels, gradient clipping at norm 1, softmax cross-entropy,
batch 64, 1,500 steps (67 epochs), crops of 50-100% of the image area. Measured on a shared
2-core CPU (test accuracy on the 360 'digits' test images; minutes of wall time under heavy
load from other jobs / CPU minutes): vit_cls 91.9% (9.9 / 3.5), vit_gap 92.5% (5.1 / 3.2),
vit_noskip (block 3) 90.3% (6.7 / 3.5), bit 95.8% (11.0 / 8.4), mixer 95.8% (1.6 / 2.4; the
machine was idle by then).

Real recipes (original hyper-parameters in each function's docstring):
  imagenet_vit_b16   ViT-B/16 on ImageNet-1k from scratch (ViT paper, Table 3).
  imagenet_r50       BiT ResNet-50x1 on ImageNet-1k from scratch (big_vision bit_i1k.py).
  finetune           ViT-B/16 from a public ImageNet-21k checkpoint on CIFAR-10
                     (vision_transformer's fine-tuning recipe).

Options: `runlocal` shrinks any recipe to a seconds-long smoke test (tiny model at 32x32, batch
16, 6 steps; the real recipes switch to the embedded 'digits' data and finetune starts from
scratch, so nothing is downloaded); `block=i` for vit_noskip; `fraction=f` trains on the nested
subset f of the training split (data-scale study; same as --config.data.subset_fraction=f).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

EMBEDDED = ("vit_cls", "vit_gap", "vit_noskip", "bit", "mixer")
REAL = ("imagenet_vit_b16", "imagenet_r50", "finetune")
# Training examples of ImageNet-1k (ILSVRC-2012 'train').
IMAGENET_TRAIN_EXAMPLES = 1_281_167
_SMALL_VIT = dict(patch_size=8, hidden_size=64, depth=6, num_heads=4, mlp_dim=128)
_SMALL_MIXER = dict(patch_size=8, hidden_size=64, depth=6, tokens_mlp_dim=32,
                    channels_mlp_dim=128)
_SMALL_BIT = dict(units_per_stage=(1, 1, 1, 1), width_factor=0.5)


def _base() -> ml_collections.ConfigDict:
  """Fields every recipe sets (the embedded-data defaults)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                        # Parameter init, dropout and data order.
  config.model = ml_collections.ConfigDict(dict(
      name="ViT-Ti/16",                  # Any vit_repr.models name.
      # Constructor overrides (None: the registered value; num_classes / image_size default
      # to the dataset's / data's), with the family's width fields as placeholders.
      overrides=ml_collections.ConfigDict(common.width_placeholders("ViT-Ti/16")),
  ))
  config.init = ml_collections.ConfigDict(dict(
      checkpoint=config_dict.placeholder(str),  # Original .npz (fine-tuning) or a params dir.
  ))
  config.data = ml_collections.ConfigDict(dict(
      name="digits",                     # Embedded name or any prepared TFDS name.
      data_dir=config_dict.placeholder(str),  # TFDS data directory, local or gs://.
      train_split="train",
      eval_split="test",
      image_size=32,
      subset_fraction=1.0,               # Nested subset of train_split (data-scale study).
      subset_seed=0,
      shuffle_buffer=50_000,             # Encoded examples held, summed over all hosts.
      # Reader shards (data.train_batches): None = gcd(batch, 64); a multiple of the hosts.
      num_shards=config_dict.placeholder(int),
      area_range=(0.5, 1.0),             # Random-crop area range (Inception crop).
      random_flip=True,                  # Left-right flips (False for digits: see reproduce).
      # None: the whole eval split (last partial batch dropped).
      eval_num_examples=config_dict.placeholder(int),
      eval_global_batch_size=120,
      # Eval: None resizes; c resizes to size / c, centre crop.
      crop_fraction=config_dict.placeholder(float),
  ))
  config.train = ml_collections.ConfigDict(dict(
      global_batch_size=64,
      total_steps=1500,
      accum_steps=1,                     # Micro-batches per step (gradient accumulation).
      dtype="float32",                   # Compute dtype: 'float32' or 'bfloat16'.
      loss="softmax_xent",               # Or 'sigmoid_xent'.
      label_smoothing=0.0,
      optimizer=ml_collections.ConfigDict(dict(
          name="adam",                   # 'adam' (decoupled decay) or 'sgd' (momentum, L2).
          learning_rate=3e-3,
          b1=0.9, b2=0.999, eps=1e-8,    # Adam.
          momentum=0.9, nesterov=False,  # SGD.
          weight_decay=1e-4,             # Adam: lr * wd * param; SGD: wd * param in the grad.
          weight_decay_pattern=".*/kernel",  # Regex over '/'-joined parameter paths.
          grad_clip_norm=1.0,            # None: no clipping.
          mu_dtype=config_dict.placeholder(str),  # None (param dtype) or 'bfloat16'.
      )),
      schedule=ml_collections.ConfigDict(dict(
          decay_type="cosine",           # 'cosine', 'linear' or 'constant'.
          warmup_steps=100,
          end_learning_rate=0.0,
      )),
      log_every=50,
      eval_every=500,
      checkpoint_every=500,
      keep_checkpoints=2,                # None keeps all.
      # Stop early without a checkpoint (simulated kill).
      stop_after_steps=config_dict.placeholder(int),
  ))
  config.mesh = ml_collections.ConfigDict(dict(
      num_devices=config_dict.placeholder(int),  # None: all devices of all hosts.
  ))
  return config


def _set_model(config: ml_collections.ConfigDict, name: str, **overrides) -> None:
  """Sets the registered model and its overrides (width fields unset unless given)."""
  config.model.name = name
  config.model.overrides = ml_collections.ConfigDict(
      {**common.width_placeholders(name), **overrides})


def _embedded(name: str, parsed: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = _base()
  if name in ("vit_cls", "vit_gap", "vit_noskip"):
    overrides = dict(_SMALL_VIT, classifier="gap" if name == "vit_gap" else "token")
    if name == "vit_noskip":
      block = _SMALL_VIT["depth"] // 2 if parsed.block is None else parsed.block
      overrides["remove_skips"] = (block,)
    _set_model(config, "ViT-Ti/16", **overrides)
  elif name == "bit":
    _set_model(config, "BiT-R50x1", **_SMALL_BIT)
  else:
    _set_model(config, "Mixer-S/32", **_SMALL_MIXER)
  return config


def _imagenet_vit_b16() -> ml_collections.ConfigDict:
  """ViT-B/16 on ImageNet-1k from scratch, as in the ViT paper (Dosovitskiy et al., 2021).

  Appendix B.1 and Table 3: Adam with beta1 0.9 and beta2 0.999, batch 4096, base learning
  rate 3e-3 with 10k linear warmup steps and cosine decay, weight decay 0.3 (decoupled, applied
  to all parameters, as flax.optim.Adam's `weight_decay` in the original code, which is
  optax.adamw's convention), dropout 0.1, gradient clipping at global norm 1, 300 epochs at
  224x224 (93,835 steps), a tanh pre-logits layer of width 768 at pre-training; Inception crop
  and flip for training. Not listed there, so off here: label smoothing. big_vision's later
  recipe for the same model (configs/vit_i1k.py, Steiner et al. 2021) instead uses lr 1e-3,
  weight decay 1e-4 not scaled by the learning rate (0.1 in this convention), bfloat16 Adam
  first moment, RandAugment and Mixup (not implemented here).
  """
  config = _base()
  _set_model(config, "ViT-B/16", dropout_rate=0.1, representation_size=768, classifier="token")
  config.data.update(dict(name="imagenet2012", train_split="train", eval_split="validation",
                          image_size=224, area_range=(0.05, 1.0), eval_global_batch_size=1024,
                          shuffle_buffer=250_000, crop_fraction=0.875))
  config.train.update(dict(global_batch_size=4096,
                           total_steps=300 * IMAGENET_TRAIN_EXAMPLES // 4096,
                           log_every=50, eval_every=2500, checkpoint_every=1000))
  config.train.optimizer.update(dict(name="adam", learning_rate=3e-3, weight_decay=0.3,
                                     weight_decay_pattern=".*", grad_clip_norm=1.0))
  config.train.schedule.update(dict(decay_type="cosine", warmup_steps=10_000))
  return config


def _imagenet_r50() -> ml_collections.ConfigDict:
  """BiT ResNet-50x1 on ImageNet-1k from scratch, as big_vision's configs/bit_i1k.py.

  SGD with momentum 0.9, batch 4096, learning rate 0.1 * batch / 256 = 1.6 with 1000 warmup
  steps and cosine decay, weight decay 1e-4 relative to the learning rate (big_vision:
  (1e-4 / 256) * batch, not scaled by it; here L2 1e-4 added to the gradient) on kernels,
  gradient clipping at norm 1, softmax cross-entropy, 90 epochs (28,150 steps), Inception crop
  224 and flip; eval resizes the shorter side to 256 and takes the central 224 crop. The BiT
  paper's own BiT-S upstream recipe differs in the schedule: lr 0.03 * batch / 256, 5000 warmup
  steps and step decays by 10x at epochs 30, 60 and 80.
  """
  config = _base()
  _set_model(config, "BiT-R50x1")
  config.data.update(dict(name="imagenet2012", train_split="train", eval_split="validation",
                          image_size=224, area_range=(0.05, 1.0), eval_global_batch_size=1024,
                          shuffle_buffer=250_000, crop_fraction=0.875))
  config.train.update(dict(global_batch_size=4096,
                           total_steps=90 * IMAGENET_TRAIN_EXAMPLES // 4096,
                           log_every=50, eval_every=1000, checkpoint_every=1000))
  config.train.optimizer.update(dict(name="sgd", learning_rate=0.1 * 4096 / 256, momentum=0.9,
                                     weight_decay=1e-4, grad_clip_norm=1.0))
  config.train.schedule.update(dict(decay_type="cosine", warmup_steps=1000))
  return config


def _finetune() -> ml_collections.ConfigDict:
  """ViT-B/16 fine-tuned from the public ImageNet-21k checkpoint, vision_transformer's recipe.

  vit_jax/configs/common.py and the ViT paper (Appendix B.1.1): SGD with momentum 0.9 (bfloat16
  momentum), no weight decay, gradient clipping at norm 1, batch 512 in 8 accumulation steps,
  base learning rate 0.03 (the paper sweeps 0.001, 0.003, 0.01, 0.03) with 500 warmup steps and
  cosine decay, 10k steps on CIFAR-10 / CIFAR-100 (20k on ImageNet) at 384x384, training on
  'train[:98%]'; the head is replaced by a zero-initialised one for the new classes and the
  position embedding resized to the new grid (`vit_repr.checkpoints.load`). Set
  `init.checkpoint` to another `.npz` (e.g. ViT-B_16.npz of gs://vit_models/augreg) and
  `model.name` to match it.
  """
  config = _base()
  _set_model(config, "ViT-B/16", classifier="token")
  config.init.checkpoint = "gs://vit_models/imagenet21k/ViT-B_16.npz"
  config.data.update(dict(name="cifar10", train_split="train[:98%]", eval_split="test",
                          image_size=384, area_range=(0.05, 1.0), eval_global_batch_size=512))
  config.train.update(dict(global_batch_size=512, accum_steps=8, total_steps=10_000,
                           log_every=10, eval_every=1000, checkpoint_every=1000))
  config.train.optimizer.update(dict(name="sgd", learning_rate=0.03, momentum=0.9,
                                     weight_decay=0.0, grad_clip_norm=1.0, mu_dtype="bfloat16"))
  config.train.schedule.update(dict(decay_type="cosine", warmup_steps=500))
  return config


def _runlocal(config: ml_collections.ConfigDict, name: str) -> None:
  """Shrinks `config` in place to a seconds-long smoke test."""
  if name in REAL:
    config.data.update(dict(name="digits", train_split="train", eval_split="test",
                            image_size=32))
    config.data.crop_fraction = config_dict.placeholder(float)
    config.init.checkpoint = config_dict.placeholder(str)
    if config.model.name.startswith("BiT"):
      config.model.overrides.update(_SMALL_BIT)
    else:
      config.model.overrides.update(_SMALL_VIT)
      config.model.overrides.representation_size = config_dict.placeholder(int)
  config.model.overrides.update(
      {k: v for k, v in dict(depth=2, hidden_size=32, num_heads=2, mlp_dim=64, tokens_mlp_dim=32,
                             channels_mlp_dim=64).items() if k in config.model.overrides})
  if "remove_skips" in config.model.overrides:
    config.model.overrides.remove_skips = tuple(
        min(i, 1) for i in config.model.overrides.remove_skips)
  config.data.update(dict(eval_num_examples=48, eval_global_batch_size=16, shuffle_buffer=100))
  config.train.update(dict(global_batch_size=16, accum_steps=1, total_steps=6, log_every=2,
                           eval_every=3, checkpoint_every=3))
  config.train.schedule.warmup_steps = 2


def get_config(arg: str = "vit_cls") -> ml_collections.ConfigDict:
  """Returns the training config for `arg` ('[<recipe>][,runlocal][,block=i][,fraction=f]')."""
  parsed = common.parse_arg(arg, recipe="vit_cls", runlocal=False, block=int, fraction=float)
  name = parsed.recipe
  if name not in EMBEDDED + REAL:
    raise ValueError(f"Bad train config arg {arg!r}: recipes are {EMBEDDED + REAL}, options "
                     "'runlocal', 'block=i' (vit_noskip) and 'fraction=f'.")
  if parsed.block is not None and name != "vit_noskip":
    raise ValueError(f"Option 'block' only applies to vit_noskip, not {name!r}.")
  if name in EMBEDDED:
    config = _embedded(name, parsed)
  else:
    config = {"imagenet_vit_b16": _imagenet_vit_b16, "imagenet_r50": _imagenet_r50,
              "finetune": _finetune}[name]()
  if parsed.fraction is not None:
    config.data.subset_fraction = parsed.fraction
  if parsed.runlocal:
    _runlocal(config, name)
  return config
