"""Linear probes on frozen representations: few-shot closed-form and full softmax regression.

Raghu et al., "Do Vision Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021)
probe the block outputs of a model with linear classifiers, on the CLS token, on the mean over
tokens, and on each token position separately (Fig 11, and per layer for the data-scale
Figs 12-13). This module takes feature arrays (no models, no data access) and implements:

* Few-shot closed-form probes, as the few-shot evaluators of the ViT papers
  (google-research/big_vision `evaluators/fewshot_lsr.py`): for each seed, the training
  examples of each class are permuted with `np.random.default_rng(seed)` and the first `n` of
  each class are the n-shot set (so the 1-shot set is inside the 5-shot set for one seed).
  Features are standardised with the shot set's per-feature mean and standard deviation (plus
  `STD_EPS`), a constant feature `BIAS_CONSTANT` = 100 is appended for the bias (large, so the
  bias is all but unregularised: its effective penalty is l2 / 100^2), targets are
  `2 * onehot - 1`, and W solves the ridge normal equations `(Z^T Z + l2 I) W = Z^T Y` (Z the
  standardised, padded features; default l2 = 2^10). When the shot set has fewer examples than
  features the same W is computed in the dual form `Z^T (Z Z^T + l2 I)^{-1} Y` (big_vision makes
  the same switch; it eigendecomposes once to sweep several l2, here one l2 is solved by a
  Cholesky-based `solve`). Accuracy is the argmax of `Z_test W` on held-out examples. Two
  differences from big_vision: a class with fewer examples than the shot count raises an error
  (big_vision silently takes fewer), and each shot set is padded to the largest one with
  masked rows, which leaves W exactly unchanged, so one compiled probe serves every shot count.
* Full linear probes: multinomial logistic (softmax) regression with a bias on standardised
  features, trained full-batch with Adam (`optax.adam`). Why Adam and not L-BFGS: with early
  stopping the optimisation path is the regulariser, and a first-order path with a fixed
  learning rate makes it smooth and comparable across layers; the features fit in memory, so
  full-batch steps are deterministic; and `optax.lbfgs` with its zoom line search took ~11 s
  to compile per feature shape on a 2-core CPU against ~1 s for Adam, which mattered with one
  shape per layer width, token mode and per-token setting. A held-out fraction of the training
  examples (drawn with a seed) is used for early stopping: every `eval_every` steps the
  held-out cross-entropy is measured, the parameters with the lowest one are kept, and
  training stops after `patience` evaluations without improvement (or at `max_steps`).

Per-token probes take `[n, tokens, width]` features and fit one independent probe per token
position (`jax.vmap`), e.g. a ViT's `[b, P + N, D]` block output (its P prefix tokens first:
CLS, a distillation token, registers, as the model's `token_layout().prefix` says; P = 0 for a
GAP or MAP-head ViT) or a ResNet feature map `[b, h, w, C]` seen as `h * w` tokens
(`tokens_and_width`). Which position is which is for the caller to say
(`vit_repr.studies.linear_probes` keeps the token kinds beside the results).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Google's few-shot evaluators' defaults (big_vision configs: `l2_reg = 2.0 ** 10`,
# `shots = (1, 5, 10, 25)`).
DEFAULT_L2_REG = 2.0 ** 10
DEFAULT_SHOTS = (1, 5, 10, 25)
# The constant feature that carries the bias, and the standard-deviation floor (big_vision).
BIAS_CONSTANT = 100.0
STD_EPS = 1e-5


def tokens_and_width(shape: Sequence[int], name: str = "") -> tuple[int, int]:
  """(tokens, width) of a per-example representation shape, for per-token probes.

  Args:
    shape: per-example shape, `(T, D)` tokens or `(h, w, C)` feature map.
    name: the layer's name, for the error message.

  Returns:
    `(T, D)` or `(h * w, C)`.

  Raises:
    ValueError: the representation has no token / spatial axis (e.g. `pre_logits` `(D,)`).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) == 2:
    return shape
  if len(shape) == 3:
    return shape[0] * shape[1], shape[2]
  raise ValueError(
      f"Per-token probes need a representation with spatial tokens ([tokens, width] or "
      f"[h, w, channels] per example), but layer {name or '<unnamed>'} has per-example shape "
      f"{shape}. Probe it per layer (token modes 'cls', 'mean' or 'all') or choose a block "
      "output such as 'Transformer/encoderblock_3/out' / 'block2/unit01/out'.")


def sample_shots(labels: np.ndarray, shots: Sequence[int], *, num_classes: int,
                 seed: int) -> dict[int, np.ndarray]:
  """Indices of the n-shot training sets for one seed, as big_vision's few-shot evaluator.

  Args:
    labels: int `[n]` labels of the training pool.
    shots: shot counts, e.g. `(1, 5, 10, 25)`.
    num_classes: number of classes C (every class must be present).
    seed: seed of the per-class permutations.

  Returns:
    `{shots: int [shots * C]}` indices into `labels`, class by class; nested over shots.

  Raises:
    ValueError: a class has fewer examples than the largest shot count (the numbers are given).
  """
  labels = np.asarray(labels)
  if not shots or min(shots) < 1:
    raise ValueError(f"shots must be positive integers, got {tuple(shots)}.")
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  short = np.flatnonzero(counts < max(shots))
  if short.size:
    listed = ", ".join(f"class {c}: {counts[c]}" for c in short[:10])
    raise ValueError(
        f"{max(shots)} shots per class requested, but the {len(labels)} training examples "
        f"have fewer for {short.size} of {num_classes} classes ({listed}; the smallest class "
        f"has {counts.min()}). Use at most {counts.min()} shots, or more training examples "
        "(data.train_num_examples).")
  rng = np.random.default_rng(seed)
  permuted = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return {n: np.concatenate([p[:n] for p in permuted]) for n in shots}


class RidgeProbe(NamedTuple):
  """A fitted closed-form probe: `logits = pad((x - mean) / std, BIAS_CONSTANT) @ weights`.

  Attributes:
    mean: `[..., D]` feature means of the shot set.
    std: `[..., D]` feature standard deviations (+ `STD_EPS`).
    weights: `[..., D + 1, C]`, the last row multiplying the bias constant.
  """
  mean: jax.Array
  std: jax.Array
  weights: jax.Array


def _design(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  z = (x - mean) / std
  return jnp.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def _ridge_fit(x: jax.Array, labels: jax.Array, num_classes: int, l2_reg: jax.Array,
               mask: jax.Array | None = None) -> RidgeProbe:
  """The probe of the rows of `x` where `mask` is 1 (all rows without a mask).

  Masked rows (padding, so that every shot count shares one compiled shape) are zeroed in the
  design matrix and the targets: they add nothing to Z^T Z and Z^T Y in the primal form, and get
  a zero dual coefficient in the dual form, so W is exactly that of the unmasked rows.
  """
  m = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
  count = jnp.sum(m)
  mean = m @ x / count
  std = jnp.sqrt(m @ (x - mean) ** 2 / count) + STD_EPS
  z = _design(x, mean, std) * m[:, None]
  y = (2.0 * jax.nn.one_hot(labels, num_classes, dtype=z.dtype) - 1.0) * m[:, None]
  num, dim = z.shape
  if num >= dim:  # Primal: (Z^T Z + l2 I) W = Z^T Y.
    w = jax.scipy.linalg.solve(z.T @ z + l2_reg * jnp.eye(dim, dtype=z.dtype), z.T @ y,
                               assume_a="pos")
  else:  # Dual, the same W: Z^T (Z Z^T + l2 I)^{-1} Y.
    w = z.T @ jax.scipy.linalg.solve(z @ z.T + l2_reg * jnp.eye(num, dtype=z.dtype), y,
                                     assume_a="pos")
  return RidgeProbe(mean=mean, std=std, weights=w)


_ridge_fit_jit = jax.jit(_ridge_fit, static_argnums=2)


def _check_features(x: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, what: str,
                    ndim: tuple[int, ...] = (2,)) -> tuple[jax.Array, jax.Array]:
  x, labels = jnp.asarray(x, jnp.float32), jnp.asarray(labels, jnp.int32)
  if x.ndim not in ndim or labels.shape != x.shape[:1]:
    raise ValueError(f"{what}: expected features of rank {ndim} ([n, features] or "
                     f"[n, tokens, width]) and labels [n]; got {x.shape} and {labels.shape}.")
  return x, labels


def ridge_fit(x: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *, num_classes: int,
              l2_reg: float = DEFAULT_L2_REG) -> RidgeProbe:
  """Fits the closed-form few-shot probe (see the module docstring).

  Args:
    x: `[n, D]` features.
    labels: int `[n]` labels in `[0, num_classes)`.
    num_classes: number of classes C.
    l2_reg: ridge regulariser.

  Returns:
    The `RidgeProbe` (weights `[D + 1, C]`).
  """
  x, labels = _check_features(x, labels, "ridge_fit")
  return _ridge_fit_jit(x, labels, num_classes, jnp.float32(l2_reg))


def ridge_logits(probe: RidgeProbe, x: jax.typing.ArrayLike) -> jax.Array:
  """Probe outputs `[n, C]` for features `[n, D]`."""
  return _design(jnp.asarray(x, jnp.float32), probe.mean, probe.std) @ probe.weights


def _ridge_accuracy(x, labels, mask, x_test, labels_test, num_classes, l2_reg):
  probe = _ridge_fit(x, labels, num_classes, l2_reg, mask)
  predictions = jnp.argmax(_design(x_test, probe.mean, probe.std) @ probe.weights, axis=-1)
  return jnp.mean(predictions == labels_test)


_ridge_accuracy_jit = jax.jit(_ridge_accuracy, static_argnums=5)


@functools.partial(jax.jit, static_argnums=(5,))
def _ridge_accuracy_per_token(x, labels, mask, x_test, labels_test, num_classes, l2_reg):
  return jax.vmap(_ridge_accuracy, in_axes=(1, None, None, 1, None, None, None))(
      x, labels, mask, x_test, labels_test, num_classes, l2_reg)


def fewshot_accuracy(train_x: jax.typing.ArrayLike, train_labels: jax.typing.ArrayLike,
                     test_x: jax.typing.ArrayLike, test_labels: jax.typing.ArrayLike, *,
                     num_classes: int, shots: Sequence[int] = DEFAULT_SHOTS,
                     seeds: Sequence[int] = (0,), l2_reg: float = DEFAULT_L2_REG) -> np.ndarray:
  """Few-shot closed-form probe accuracy for every shot count and seed.

  Args:
    train_x: `[n, D]` features of the training pool, or `[n, T, D]` for one probe per token.
    train_labels: int `[n]`.
    test_x: `[m, D]` (or `[m, T, D]`) features of the held-out examples.
    test_labels: int `[m]`.
    num_classes: number of classes C.
    shots: examples per class of each probe.
    seeds: seeds of the shot sampling (big_vision averages 3).
    l2_reg: ridge regulariser.

  Returns:
    float64 `[len(shots), len(seeds)]` test accuracies, `[len(shots), len(seeds), T]` per token.

  Raises:
    ValueError: mismatched shapes, or more shots than examples of some class.
  """
  train_x, train_labels = _check_features(train_x, train_labels, "fewshot_accuracy train",
                                          (2, 3))
  test_x, test_labels = _check_features(test_x, test_labels, "fewshot_accuracy test",
                                        (train_x.ndim,))
  if test_x.shape[1:] != train_x.shape[1:]:
    raise ValueError(f"fewshot_accuracy: train features {train_x.shape[1:]} and test features "
                     f"{test_x.shape[1:]} per example differ; use the same layer and mode.")
  score = _ridge_accuracy_per_token if train_x.ndim == 3 else _ridge_accuracy_jit
  l2 = jnp.float32(l2_reg)
  host_labels = np.asarray(train_labels)
  # Every shot set is padded to the largest (mask 0): one compiled probe per feature shape.
  rows = max(shots) * num_classes
  out = []
  for seed in seeds:
    indices = sample_shots(host_labels, shots, num_classes=num_classes, seed=seed)
    out.append([])
    for n in shots:
      padded = np.zeros(rows, np.int64)
      padded[:len(indices[n])] = indices[n]
      mask = jnp.asarray(np.arange(rows) < len(indices[n]))
      out[-1].append(score(train_x[padded], train_labels[padded], mask, test_x, test_labels,
                           num_classes, l2))
  return np.asarray(jax.device_get(out), np.float64).swapaxes(0, 1)


@dataclasses.dataclass(frozen=True)
class LinearProbeResult:
  """What `linear_probe` returns (one value per probe: `[]`, or `[T]` per token).

  Attributes:
    test_accuracy: accuracy on the test examples with the early-stopped parameters.
    holdout_accuracy: accuracy on the held-out training examples at the same parameters.
    best_step: Adam step of the kept parameters.
    steps: steps run before stopping.
  """
  test_accuracy: np.ndarray
  holdout_accuracy: np.ndarray
  best_step: np.ndarray
  steps: np.ndarray


def _xent(params, x, labels):
  logits = x @ params["w"] + params["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _accuracy(params, x, labels):
  return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=-1) == labels)


def _train_probe(fit_x, fit_y, hold_x, hold_y, test_x, test_y, *, num_classes, learning_rate,
                 weight_decay, max_steps, eval_every, patience, min_delta):
  """One probe (`x` `[n, D]`): Adam chunks of `eval_every` steps in a `while_loop` that keeps
  the parameters of the lowest held-out loss; returns (test acc, held-out acc, best, steps)."""
  tx = optax.adam(learning_rate)

  def loss(p):
    return _xent(p, fit_x, fit_y) + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  def step(_, carry):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  def cond(carry):
    *_, steps, waited = carry
    return (steps < max_steps) & (waited < patience)

  def body(carry):
    params, opt_state, best, best_loss, best_step, steps, waited = carry
    params, opt_state = jax.lax.fori_loop(0, eval_every, step, (params, opt_state))
    steps = steps + eval_every
    held = _xent(params, hold_x, hold_y)
    improved = held < best_loss - min_delta
    best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), params, best)
    return (params, opt_state, best, jnp.where(improved, held, best_loss),
            jnp.where(improved, steps, best_step), steps, jnp.where(improved, 0, waited + 1))

  dim = fit_x.shape[-1]
  params = {"w": jnp.zeros((dim, num_classes)), "b": jnp.zeros((num_classes,))}
  init = (params, tx.init(params), params, jnp.float32(jnp.inf), 0, 0, 0)
  _, _, best, _, best_step, steps, _ = jax.lax.while_loop(cond, body, init)
  return (_accuracy(best, test_x, test_y), _accuracy(best, hold_x, hold_y), best_step, steps)


@functools.partial(jax.jit, static_argnames=("num_classes", "learning_rate", "weight_decay",
                                             "max_steps", "eval_every", "patience", "min_delta"))
def _train_probes(fit_x, fit_y, hold_x, hold_y, test_x, test_y, **settings):
  """`_train_probe` for each probe p of `x` `[n, P, D]`."""
  return jax.vmap(functools.partial(_train_probe, **settings),
                  in_axes=(1, None, 1, None, 1, None))(fit_x, fit_y, hold_x, hold_y, test_x,
                                                      test_y)


def linear_probe(train_x: jax.typing.ArrayLike, train_labels: jax.typing.ArrayLike,
                 test_x: jax.typing.ArrayLike, test_labels: jax.typing.ArrayLike, *,
                 num_classes: int, holdout_fraction: float = 0.2, seed: int = 0,
                 learning_rate: float = 1e-2, weight_decay: float = 0.0, max_steps: int = 2000,
                 eval_every: int = 20, patience: int = 10,
                 min_delta: float = 1e-4) -> LinearProbeResult:
  """Trains softmax-regression probes with full-batch Adam and early stopping (module docstring).

  Args:
    train_x: `[n, D]` training features, or `[n, T, D]` for one probe per token.
    train_labels: int `[n]`.
    test_x: `[m, D]` (or `[m, T, D]`) test features.
    test_labels: int `[m]`.
    num_classes: number of classes C.
    holdout_fraction: fraction of the training examples held out for early stopping (drawn
      with `seed`).
    seed: seed of the held-out split.
    learning_rate: Adam learning rate (features are standardised, so one rate fits all layers).
    weight_decay: L2 penalty `wd / 2 * ||W||^2` on the weights (not the bias).
    max_steps: maximum Adam steps.
    eval_every: steps between held-out evaluations.
    patience: evaluations without a lower held-out loss before stopping.
    min_delta: decrease of the held-out loss that counts as an improvement.

  Returns:
    A `LinearProbeResult`.

  Raises:
    ValueError: bad shapes, or a held-out split that leaves no training or held-out examples.
  """
  train_x, train_labels = _check_features(train_x, train_labels, "linear_probe train", (2, 3))
  test_x, test_labels = _check_features(test_x, test_labels, "linear_probe test",
                                        (train_x.ndim,))
  per_token = train_x.ndim == 3
  if not per_token:
    train_x, test_x = train_x[:, None], test_x[:, None]
  n = train_x.shape[0]
  num_holdout = int(round(holdout_fraction * n))
  if not 0 < num_holdout < n:
    raise ValueError(f"holdout_fraction={holdout_fraction} of {n} training examples leaves "
                     f"{num_holdout} held out and {n - num_holdout} to train on; both must be "
                     "positive: use a fraction in (0, 1) or more training examples.")
  order = np.random.default_rng(seed).permutation(n)
  fit, hold = order[num_holdout:], order[:num_holdout]
  # Standardise with the fitting examples' statistics: [n, P, D] with P probes.
  mean = jnp.mean(train_x[fit], axis=0)
  std = jnp.std(train_x[fit], axis=0) + STD_EPS
  fit_x, hold_x, te_x = ((a - mean) / std for a in (train_x[fit], train_x[hold], test_x))
  fit_y, hold_y = train_labels[fit], train_labels[hold]
  test_acc, hold_acc, best_step, steps = jax.device_get(_train_probes(
      fit_x, fit_y, hold_x, hold_y, te_x, test_labels, num_classes=num_classes,
      learning_rate=float(learning_rate), weight_decay=float(weight_decay),
      max_steps=int(max_steps), eval_every=int(eval_every), patience=int(patience),
      min_delta=float(min_delta)))
  squeeze = (lambda a: np.asarray(a)) if per_token else (lambda a: np.asarray(a)[0])
  return LinearProbeResult(test_accuracy=squeeze(test_acc).astype(np.float64),
                           holdout_accuracy=squeeze(hold_acc).astype(np.float64),
                           best_step=squeeze(best_step), steps=squeeze(steps))
