"""The training recipe: learning-rate schedule, optimizer and losses, built from optax.

The pieces are those of the original training code of ViT (Dosovitskiy et al., ICLR 2021;
google-research/vision_transformer and big_vision) and BiT (Kolesnikov et al., ECCV 2020), as
used by `vit_repr.training` for the controlled-change studies of Raghu et al., "Do Vision
Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021):

* optimizer (`make_optimizer`): gradients clipped to a global norm, then Adam with decoupled
  weight decay (the update gets `+ wd * param` before the learning rate scales it, as in
  `optax.adamw` and the original `flax.optim.Adam`) or SGD with momentum with L2 weight decay
  (`wd * param` added to the gradient before the momentum, as BiT). Decay applies to the
  parameters whose '/'-joined path matches `weight_decay_pattern` (default: kernels).
* schedule (`make_schedule`), with base rate b, warmup w, total T and end rate e:
  lr(s) = b * s / w for s < w, else e + (b - e) * d(p) with p = min(1, (s - w) / (T - w)) and
  d(p) = (1 + cos(pi p)) / 2 ('cosine'), 1 - p ('linear') or 1 ('constant'); optax's linear
  warmup joined with its cosine, linear or constant schedule.
* losses: softmax cross-entropy against label-smoothed targets (1 - a) * onehot + a / C, or
  sigmoid cross-entropy summed over the C classes (big_vision's 'sigmoid_xent'); per example
  (`LOSS_FNS`), averaged over the examples by the training step.
"""

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

LOSSES = ("softmax_xent", "sigmoid_xent")
OPTIMIZERS = ("adam", "sgd")
DECAY_TYPES = ("cosine", "linear", "constant")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_schedule(schedule: ml_collections.ConfigDict, base_learning_rate: float,
                  total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine, linear or no decay to `end_learning_rate`.

  Args:
    schedule: `decay_type` ('cosine' | 'linear' | 'constant'), `warmup_steps`,
      `end_learning_rate`.
    base_learning_rate: the rate b reached at the end of the warmup.
    total_steps: T, the step at which the decay reaches the end rate.

  Returns:
    step `[]` -> learning rate `[]` float32 (see the module docstring for the formula).

  Raises:
    ValueError: unknown decay type or warmup not shorter than the run.
  """
  if schedule.decay_type not in DECAY_TYPES:
    raise ValueError(f"Unknown schedule.decay_type {schedule.decay_type!r}; use one of "
                     f"{DECAY_TYPES}.")
  warmup, end = int(schedule.warmup_steps), float(schedule.end_learning_rate)
  if not 0 <= warmup < total_steps:
    raise ValueError(f"schedule.warmup_steps={warmup} must be in [0, total_steps="
                     f"{total_steps}); shorten the warmup or train longer.")
  base = float(base_learning_rate)
  if schedule.decay_type == "cosine":
    decay = _cosine_decay(base, end, total_steps - warmup)
  elif schedule.decay_type == "linear":
    decay = optax.linear_schedule(base, end, total_steps - warmup)
  else:
    decay = optax.constant_schedule(base)
  warmed = decay if warmup == 0 else optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), decay], [warmup])

  def learning_rate(step):
    return jnp.asarray(warmed(step), jnp.float32)

  return learning_rate


def _cosine_decay(base: float, end: float, decay_steps: int) -> optax.Schedule:
  """e + (b - e) * (1 + cos(pi p)) / 2: optax's cosine decay of b - e raised by e.

  `optax.cosine_decay_schedule(b, alpha=e / b)` has the same values but divides by b, which
  may be 0.
  """
  cosine = optax.cosine_decay_schedule(base - end, decay_steps)

  def learning_rate(step):
    return end + cosine(step)

  return learning_rate


def _decay_mask(pattern: str) -> Callable[[Any], Any]:
  regex = re.compile(pattern)

  def mask(params):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {k: bool(regex.fullmatch(k)) for k in flat}, sep="/")

  return mask


def make_optimizer(train: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optax optimizer and its learning-rate schedule.

  Args:
    train: the config's `train` section: `total_steps`, `optimizer` (`name` 'adam' | 'sgd',
      `learning_rate`, `b1`, `b2`, `eps`, `momentum`, `nesterov`, `weight_decay`,
      `weight_decay_pattern`, `grad_clip_norm` (None: no clipping), `mu_dtype` (None or
      'bfloat16' for the first moment / momentum)) and `schedule` (see `make_schedule`).

  Returns:
    (gradient transformation, schedule step -> learning rate).

  Raises:
    ValueError: unknown optimizer name or a bad schedule.
  """
  opt = train.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {opt.name!r}; use one of {OPTIMIZERS}.")
  if opt.mu_dtype not in (None, *DTYPES):
    raise ValueError(f"optimizer.mu_dtype must be None or one of {sorted(DTYPES)}; got "
                     f"{opt.mu_dtype!r}.")
  schedule = make_schedule(train.schedule, opt.learning_rate, train.total_steps)
  mu_dtype = None if opt.mu_dtype is None else DTYPES[opt.mu_dtype]
  parts = []
  if opt.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  decay = ([optax.add_decayed_weights(opt.weight_decay, _decay_mask(opt.weight_decay_pattern))]
           if opt.weight_decay else [])
  if opt.name == "adam":
    parts += [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps, mu_dtype=mu_dtype)]
    parts += decay
  else:
    parts += decay
    parts += [optax.trace(decay=opt.momentum, nesterov=opt.nesterov, accumulator_dtype=mu_dtype)]
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


def _smoothed_one_hot(labels: jax.typing.ArrayLike, num_classes: int,
                      label_smoothing: float) -> jax.Array:
  """float32 `[batch, classes]` targets (1 - a) * onehot + a / classes for int `[batch]`."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def softmax_cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against label-smoothed one-hot targets.

  Args:
    logits: `[batch, classes]`.
    labels: int `[batch]`.
    label_smoothing: a; targets are (1 - a) * onehot + a / classes.

  Returns:
    float32 `[batch]`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = _smoothed_one_hot(labels, logits.shape[-1], label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def sigmoid_cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example sigmoid (independent binary) cross-entropy summed over classes.

  Args:
    logits: `[batch, classes]`.
    labels: int `[batch]`.
    label_smoothing: a; targets are (1 - a) * onehot + a / classes.

  Returns:
    float32 `[batch]`: sum_c -(t_c log sigmoid(z_c) + (1 - t_c) log sigmoid(-z_c)).
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = _smoothed_one_hot(labels, logits.shape[-1], label_smoothing)
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


# Loss name (`LOSSES`) -> per-example loss `(logits, labels, label_smoothing) -> [batch]`.
LOSS_FNS = {"softmax_xent": softmax_cross_entropy, "sigmoid_xent": sigmoid_cross_entropy}
