"""Centered kernel alignment (CKA): kernels, HSIC estimators and streaming minibatch CKA.

Implements the representation-similarity measures used by Raghu et al., "Do Vision
Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021):

* Full-batch CKA (Kornblith et al., "Similarity of Neural Network Representations
  Revisited", ICML 2019): `linear_cka` and `rbf_cka` with the biased HSIC estimator
  (Gretton et al., 2005), and `debiased_cka` with the unbiased estimator HSIC1 of Song et al.,
  "Feature Selection via Dependence Maximization" (JMLR 2012).
* Minibatch CKA (Nguyen, Raghu & Kornblith, "Do Wide and Deep Networks Learn the Same
  Things?", ICLR 2021), the paper's estimator:
  `CKA = mean_i HSIC1(K_i, L_i) / sqrt(mean_i HSIC1(K_i, K_i) * mean_i HSIC1(L_i, L_i))`
  over minibatches i, with K_i = X_i X_iᵀ the linear Gram of minibatch i (each example's
  features flattened). `MinibatchCKA` streams it (a `vit_repr.streaming.Accumulator`: jitted,
  sharded over a device mesh, with error bars); `minibatch_cka` runs it over whole arrays.

HSIC1 is computed through U-centring (Székely & Rizzo, "Partial distance correlation", Ann.
Stat. 2014): with K̃ the Gram with its diagonal zeroed, U(K)_ij = K̃_ij - r_i - r_j + s for
i != j and 0 on the diagonal (r = K̃ row sums / (n - 2), s = sum(K̃) / ((n - 1)(n - 2))), and
HSIC1(K, L) = <U(K), U(L)>_F / (n (n - 3)). So one Gram per layer per minibatch and a single
`[La, b²] x [b², Lb]` product give HSIC1 for every pair of layers. Many layers of one shape (every
token of a ViT layer, as in `vit_repr.localization`) can be passed stacked, as one group
`[batch, k, ...]` of k layers (`MinibatchCKA.update(..., stacked=True)`): the k Grams are then one
batched product, and the compiled program grows with the number of groups, not of layers.

Inputs may be NumPy, JAX or any array convertible by `np.asarray` (e.g. PyTorch CPU tensors);
computation is float32 unless float64 is enabled in JAX and the input is float64.

Precision: every matrix product (Grams, HSIC products, means) runs at `precision='highest'` by
default, float32-accurate on every backend. GPUs (TF32) and TPUs (bfloat16 passes) otherwise
multiply float32 at reduced precision by default, which can move CKA by more than the
minibatch estimator's own error. `precision='default'` trades that accuracy for speed there
('high' is in between); on CPUs all three are the same.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from vit_repr import parallel, streaming

Layers = Sequence[jax.typing.ArrayLike] | Mapping[str, jax.typing.ArrayLike]

# Channels of `MinibatchCKAState.sums`: three shifted per-batch terms, then their products.
_TERMS = ("xy", "xx", "yy")
_PRODUCTS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
# Matrix-product precisions (names of `jax.default_matmul_precision`), most accurate first.
PRECISIONS = ("highest", "high", "default")
# Where `MinibatchCKA` computes Grams.
GRAMS = ("auto", "host", "device")


# ---------------------------------------------------------------------------------------------
# Kernels and full-batch estimators.


def _features(x: jax.typing.ArrayLike, what: str) -> jax.Array:
  """`x` as a floating `[n, features]` array (each example's features flattened)."""
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"{what} must have a leading example axis [n, ...]; got shape {x.shape}.")
  x = x.reshape(x.shape[0], -1)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_precision(precision: str) -> str:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS} ('highest': float32-accurate "
                     f"products on every backend); got {precision!r}.")
  return precision


def _check_pair(x: jax.Array, y: jax.Array, min_examples: int) -> None:
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"x and y must hold the same examples: x has shape {x.shape}, y has shape {y.shape} "
        "(leading axis = examples). Pass features of the same inputs, in the same order.")
  if x.shape[0] < min_examples:
    raise ValueError(
        f"This estimator needs at least {min_examples} examples; got {x.shape[0]}. "
        "Use more examples.")


def gram_linear(x: jax.typing.ArrayLike, *, precision: str = "highest") -> jax.Array:
  """Linear-kernel Gram matrix K = X Xᵀ.

  Args:
    x: features `[n, ...]`; each example's features are flattened.
    precision: matrix-product precision, one of `PRECISIONS` (see the module docstring).

  Returns:
    `[n, n]` Gram matrix.
  """
  x = _features(x, "x")
  with jax.default_matmul_precision(_check_precision(precision)):
    return x @ x.T


def gram_rbf(x: jax.typing.ArrayLike, sigma_frac: float = 0.5, *,
             precision: str = "highest") -> jax.Array:
  """RBF-kernel Gram matrix K_ij = exp(-||x_i - x_j||² / (2 σ²)).

  As in Kornblith et al. (2019), the bandwidth σ is `sigma_frac` times the median distance
  between examples, the median taken over all n² entries of the distance matrix (that is,
  σ² = sigma_frac² · median_ij ||x_i - x_j||²).

  Args:
    x: features `[n, ...]`; each example's features are flattened.
    sigma_frac: bandwidth as a fraction of the median distance; must be positive.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    `[n, n]` Gram matrix.

  Raises:
    ValueError: if `sigma_frac` is not positive.
  """
  if not sigma_frac > 0:
    raise ValueError(f"sigma_frac must be positive (e.g. 0.5); got {sigma_frac}.")
  x = _features(x, "x")
  return _gram_rbf(x, sigma_frac, _check_precision(precision))


@functools.partial(jax.jit, static_argnames="precision")
def _gram_rbf(x: jax.Array, sigma_frac: float, precision: str) -> jax.Array:
  x = x - x.mean(0)
  sq_norms = jnp.sum(x * x, axis=1)
  with jax.default_matmul_precision(precision):
    gram = x @ x.T
  sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2 * gram, 0)
  sq_sigma = sigma_frac**2 * jnp.median(sq_dist)
  return jnp.exp(-sq_dist / (2 * sq_sigma))


def _centre_gram(k: jax.Array) -> jax.Array:
  """H K H with H = I - 11ᵀ/n."""
  k = k - k.mean(0, keepdims=True)
  return k - k.mean(1, keepdims=True)


def _u_centre(k: jax.Array) -> jax.Array:
  """U-centring (Székely & Rizzo, 2014) of `[..., n, n]` Grams; zero diagonal."""
  n = k.shape[-1]
  off_diagonal = ~jnp.eye(n, dtype=bool)
  k = jnp.where(off_diagonal, k, 0)
  row = k.sum(-1) / (n - 2)
  row = row - row.sum(-1, keepdims=True) / (2 * (n - 1))
  return jnp.where(off_diagonal, k - row[..., :, None] - row[..., None, :], 0)


def _square_grams(k: jax.typing.ArrayLike, l: jax.typing.ArrayLike) -> tuple[jax.Array, ...]:
  k, l = jnp.asarray(k), jnp.asarray(l)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
    raise ValueError(
        f"Expected two square Gram matrices [n, n] of the same size; got {k.shape} and "
        f"{l.shape}. Build them with gram_linear or gram_rbf on the same examples.")
  dtype = jnp.promote_types(jnp.promote_types(k.dtype, l.dtype), jnp.float32)
  return k.astype(dtype), l.astype(dtype)


def hsic_biased(k: jax.typing.ArrayLike, l: jax.typing.ArrayLike, *,
                precision: str = "highest") -> jax.Array:
  """Biased HSIC estimator tr(K H L H) / (n - 1)² (Gretton et al., 2005).

  Args:
    k: `[n, n]` Gram matrix of the first representation.
    l: `[n, n]` Gram matrix of the second representation, same examples.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    Scalar HSIC estimate.

  Raises:
    ValueError: if the Grams are not square or differ in size.
  """
  k, l = _square_grams(k, l)
  n = k.shape[0]
  with jax.default_matmul_precision(_check_precision(precision)):
    return jnp.vdot(_centre_gram(k), _centre_gram(l)) / (n - 1)**2


def hsic_unbiased(k: jax.typing.ArrayLike, l: jax.typing.ArrayLike, *,
                  precision: str = "highest") -> jax.Array:
  """Unbiased HSIC estimator HSIC1 (Song et al., 2012), as <U(K), U(L)> / (n (n - 3)).

  Args:
    k: `[n, n]` Gram matrix of the first representation.
    l: `[n, n]` Gram matrix of the second representation, same examples.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    Scalar HSIC1 estimate.

  Raises:
    ValueError: if the Grams are not square, differ in size, or n < 4.
  """
  k, l = _square_grams(k, l)
  n = k.shape[0]
  if n < 4:
    raise ValueError(f"HSIC1 needs at least 4 examples (it divides by n - 3); got n = {n}.")
  with jax.default_matmul_precision(_check_precision(precision)):
    return jnp.vdot(_u_centre(k), _u_centre(l)) / (n * (n - 3))


@functools.partial(jax.jit, static_argnames=("unbiased", "precision"))
def _cka_from_grams(k: jax.Array, l: jax.Array, unbiased: bool, precision: str) -> jax.Array:
  centre = _u_centre if unbiased else _centre_gram
  k, l = centre(k), centre(l)
  with jax.default_matmul_precision(precision):
    return jnp.vdot(k, l) / jnp.sqrt(jnp.vdot(k, k) * jnp.vdot(l, l))


@functools.partial(jax.jit, static_argnames=("unbiased", "precision"))
def _linear_cka_features(x: jax.Array, y: jax.Array, unbiased: bool,
                         precision: str) -> jax.Array:
  """Linear CKA in feature space: O(n p²) instead of O(n² p), for n >> p."""
  with jax.default_matmul_precision(precision):
    return _linear_cka_features_body(x, y, unbiased)


def _linear_cka_features_body(x: jax.Array, y: jax.Array, unbiased: bool) -> jax.Array:
  x, y = x - x.mean(0), y - y.mean(0)
  if not unbiased:
    xy, xx, yy = (jnp.sum(jnp.square(a.T @ c)) for a, c in ((x, y), (x, x), (y, y)))
    return xy / jnp.sqrt(xx * yy)
  n = x.shape[0]

  def hsic1(a, c):
    # Song et al.'s three sums written with features: K̃ = A Aᵀ - diag, L̃ = C Cᵀ - diag.
    na, nc = jnp.sum(a * a, 1), jnp.sum(c * c, 1)
    trace = jnp.sum(jnp.square(a.T @ c)) - na @ nc
    k1, l1 = a @ a.sum(0) - na, c @ c.sum(0) - nc
    total = k1.sum() * l1.sum() / ((n - 1) * (n - 2))
    return (trace + total - 2 * (k1 @ l1) / (n - 2)) / (n * (n - 3))

  return hsic1(x, y) / jnp.sqrt(hsic1(x, x) * hsic1(y, y))


def _linear_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, unbiased: bool,
                path: str, precision: str) -> jax.Array:
  x, y = _features(x, "x"), _features(y, "y")
  _check_pair(x, y, 4 if unbiased else 2)
  _check_precision(precision)
  if path not in ("auto", "features", "gram"):
    raise ValueError(f"path must be 'auto', 'features' or 'gram'; got {path!r}.")
  if path == "features" or (path == "auto" and max(x.shape[1], y.shape[1]) < x.shape[0]):
    return _linear_cka_features(x, y, unbiased, precision)
  grams = (gram_linear(a - a.mean(0), precision=precision) for a in (x, y))
  return _cka_from_grams(*grams, unbiased, precision)


def linear_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *,
               path: str = "auto", precision: str = "highest") -> jax.Array:
  """Full-batch linear CKA with the biased HSIC estimator (Kornblith et al., 2019).

  CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F) on column-centred features, which equals
  HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear Grams.

  Args:
    x: features `[n, ...]` of the first representation.
    y: features `[n, ...]` of the second representation, same examples in the same order.
    path: 'features' (O(n p²), for n >> p), 'gram' (O(n² p)) or 'auto' (features when both
      feature counts are below n).
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    Scalar CKA in [0, 1]; NaN if either representation is constant.

  Raises:
    ValueError: on mismatched example counts, fewer than 2 examples or an unknown path.
  """
  return _linear_cka(x, y, unbiased=False, path=path, precision=precision)


def debiased_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *,
                 path: str = "auto", precision: str = "highest") -> jax.Array:
  """Full-batch linear CKA with the unbiased estimator HSIC1 (Song et al., 2012).

  CKA = HSIC1(K, L) / sqrt(HSIC1(K, K) HSIC1(L, L)) with linear Grams K = X Xᵀ, L = Y Yᵀ;
  equal to `minibatch_cka` with one batch holding all examples.

  Args:
    x: features `[n, ...]` of the first representation.
    y: features `[n, ...]` of the second representation, same examples in the same order.
    path: 'features', 'gram' or 'auto', as in `linear_cka`.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    Scalar debiased CKA (may be slightly negative for unrelated representations).

  Raises:
    ValueError: on mismatched example counts, fewer than 4 examples or an unknown path.
  """
  return _linear_cka(x, y, unbiased=True, path=path, precision=precision)


def rbf_cka(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, sigma_frac: float = 0.5, *,
            debiased: bool = False, precision: str = "highest") -> jax.Array:
  """Full-batch CKA with RBF kernels (Kornblith et al., 2019).

  Args:
    x: features `[n, ...]` of the first representation.
    y: features `[n, ...]` of the second representation, same examples in the same order.
    sigma_frac: each kernel's bandwidth as a fraction of its median distance (`gram_rbf`).
    debiased: use HSIC1 (Song et al., 2012) instead of the biased HSIC.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    Scalar CKA.

  Raises:
    ValueError: on mismatched example counts, too few examples or a non-positive sigma_frac.
  """
  fx, fy = _features(x, "x"), _features(y, "y")
  _check_pair(fx, fy, 4 if debiased else 2)
  grams = (gram_rbf(f, sigma_frac, precision=precision) for f in (fx, fy))
  return _cka_from_grams(*grams, debiased, precision)


# ---------------------------------------------------------------------------------------------
# Minibatch CKA.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinibatchCKAState(streaming.State):
  """Running sums of minibatch CKA; a small pytree whose size does not grow with the data.

  For every minibatch and every pair of layers (a of model A, c of model B) the terms
  t = (HSIC1(K_a, L_c), HSIC1(K_a, K_a), HSIC1(L_c, L_c)) are shifted by the terms of the
  first update (`shift`: it keeps the sums small, so float32 sums and the variances computed
  from them stay accurate) and summed with Kahan compensation, together with their pairwise
  products (for the error bars).

  Attributes:
    shift: `[3, La, Lb]` float32 shift of the (xy, xx, yy) terms.
    sums: `[9, La, Lb]` float32 sums over minibatches of the shifted terms d = t - shift
      (channels xy, xx, yy) then of the products d_xy², d_xx², d_yy², d_xy d_xx, d_xy d_yy,
      d_xx d_yy.
    compensation: `[9, La, Lb]` Kahan compensation of `sums` (`streaming.kahan_add`).
    num_batches: int32 number of minibatches accumulated.
    num_examples: int32 number of examples accumulated.
    nonfinite_x: `[La]` bool, whether a layer of model A ever had NaN/Inf features.
    nonfinite_y: `[Lb]` bool, same for model B.
    varied_x: `[La]` bool, whether a layer of model A ever varied within a minibatch.
    varied_y: `[Lb]` bool, same for model B.
    names_x: layer names of model A (static).
    names_y: layer names of model B, empty for a within-model heatmap (static).
  """
  shift: jax.Array
  sums: jax.Array
  compensation: jax.Array
  num_batches: jax.Array
  num_examples: jax.Array
  nonfinite_x: jax.Array
  nonfinite_y: jax.Array
  varied_x: jax.Array
  varied_y: jax.Array
  names_x: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  names_y: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))


_STATE_ARRAYS = tuple(f.name for f in dataclasses.fields(MinibatchCKAState)
                      if not f.metadata.get("static"))


class CKAResult(NamedTuple):
  """A minibatch CKA heatmap with its standard errors (NumPy, float64).

  Attributes:
    cka: `[La, Lb]` CKA between layer i of model A and layer j of model B.
    stderr: `[La, Lb]` delta-method standard errors (see `MinibatchCKA.result`).
    names_x: layer names of model A (rows).
    names_y: layer names of model B (columns); equal to names_x within a model.
    num_batches: minibatches accumulated.
    num_examples: examples accumulated.
  """
  cka: np.ndarray
  stderr: np.ndarray
  names_x: tuple[str, ...]
  names_y: tuple[str, ...]
  num_batches: int
  num_examples: int


def _gram_blocked(x: jax.Array, blocks: int) -> jax.Array:
  """X Xᵀ computing only the lower block triangle (SYRK-like) with `blocks` row blocks.

  Costs (1 + 1/blocks) b² p FLOPs instead of 2 b² p.
  """
  n = x.shape[0]
  blocks = min(blocks, n)
  if blocks == 1:
    return x @ x.T
  edges = [round(i * n / blocks) for i in range(blocks + 1)]
  lower = jnp.concatenate([
      jnp.pad(x[start:stop] @ x[:stop].T, ((0, 0), (0, n - stop)))
      for start, stop in zip(edges[:-1], edges[1:])])
  block = np.repeat(np.arange(blocks), np.diff(edges))
  return jnp.where(block[:, None] >= block[None, :], lower, lower.T)


# A layer counts as constant within a minibatch when its centred sum of squares is below this
# fraction of its uncentred one: what float32 rounding of the mean leaves of a constant layer.
_CONSTANT_RTOL = 1e3 * float(np.finfo(np.float32).eps)**2
# Default features per chunk of the centred Gram on CPU: each chunk is centred in cache and
# multiplied at once, so centring costs no extra pass over memory. On a 2-core AVX-512 CPU
# (benchmarks/cka_bench.py, CPU time per update) 512 and 1024 tie, 2048 costs ~10% more and
# no chunking ~40% more. Accelerators take one unchunked product.
_CPU_FEATURE_CHUNK = 1024


def _centred_gram(x: jax.Array, gram_blocks: int,
                  feature_chunk: int) -> tuple[jax.Array, jax.Array]:
  """Gram `[b, b]` of the column-centred features `[b, p]`, and b·||column means||².

  Works through the features in chunks of `feature_chunk` (0: one chunk): each chunk is read
  from memory once, its column means taken (as a matrix-vector product: XLA:CPU's axis-0
  reduce is ~50x slower), subtracted and multiplied while it is in cache.
  """
  b, p = x.shape
  size = min(p, feature_chunk or p)
  num_chunks, rest = divmod(p, size)

  def chunk_terms(chunk):
    mean = jnp.ones(b, x.dtype) @ chunk / b
    return _gram_blocked(chunk - mean, gram_blocks), b * (mean @ mean)

  def add_chunk(i, terms):
    new = chunk_terms(jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1))
    return terms[0] + new[0], terms[1] + new[1]

  gram, mean_sq = jax.lax.fori_loop(1, num_chunks, add_chunk, chunk_terms(x[:, :size]))
  if rest:
    tail = chunk_terms(x[:, num_chunks * size:])
    gram, mean_sq = gram + tail[0], mean_sq + tail[1]
  return gram, mean_sq


def _group_grams(x: jax.Array, gram_blocks: int,
                 feature_chunk: int) -> tuple[jax.Array, jax.Array]:
  """`_centred_gram` of each layer of a group `[b, k, p]`, as one batched computation.

  A group of one layer takes the plain 2-D products, so a layer passed on its own gives the
  same bits as before groups existed (batched products round differently, by ~1 ulp).

  Returns:
    The centred Grams `[k, b, b]` and b·||column means||² `[k]` of the k layers.
  """
  gram = functools.partial(_centred_gram, gram_blocks=gram_blocks, feature_chunk=feature_chunk)
  if x.shape[1] == 1:
    return jax.tree.map(lambda a: a[None], gram(x[:, 0]))
  return jax.vmap(gram, in_axes=1)(x)


def _layer_grams(layers: tuple[jax.Array, ...], stacked: bool, gram_blocks: int,
                 feature_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Column-centred Grams `[L, b, b]` of one minibatch, their traces and b·||column means||²
  `[L]`, computed by XLA.

  Args:
    layers: per-layer arrays `[b, ...]`, or with `stacked` groups `[b, k, ...]` of k layers
      (L = the sum of the k's); features flattened.
    stacked: whether `layers` are groups.
    gram_blocks: see `_gram_blocked`.
    feature_chunk: see `_centred_gram`.

  Features are centred per minibatch (and per layer) first: HSIC1 is exactly translation
  invariant, and without it float32 cancellation costs ~1e-2 on activations with large means.
  """
  groups = (x.reshape(x.shape[0], x.shape[1] if stacked else 1, -1).astype(jnp.float32)
            for x in layers)
  grams, mean_sq = zip(*(_group_grams(x, gram_blocks, feature_chunk) for x in groups))
  grams = jnp.concatenate(grams)
  return grams, jnp.trace(grams, axis1=1, axis2=2), jnp.concatenate(mean_sq)


def _u_centred(grams: jax.Array, centred_sq: jax.Array,
               mean_sq: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """U-centred Grams `[L, b, b]` with non-finite and varied flags `[L]`.

  Args:
    grams: `[L, b, b]` Grams of the layers' features, each translated by any constant vector
      (U-centring removes it exactly).
    centred_sq: `[L]` sum of squares of the column-centred features (the trace of the
      centred Gram).
    mean_sq: `[L]` the rest of the uncentred sum of squares (b·||column means||², or the
      same scale), the reference for "constant up to rounding".
  """
  varied = centred_sq > _CONSTANT_RTOL * (centred_sq + mean_sq)
  return _u_centre(grams), ~jnp.isfinite(centred_sq), varied


# Host Grams (CPU meshes): a layer is multiplied uncentred when its first rows say its sum of
# squares is at most this many times its centred one (column means up to ~1.7x the spread),
# and the Gram itself confirms it (up to twice this); other layers are first shifted by their
# first example. Measured float32 CKA errors of uncentred Grams grow as (mean / spread)²:
# ~1e-7 at 3x, 1e-6 at 10x, 1.5e-5 at 30x, 5e-4 at 100x; shifted ones stay at ~1e-8.
_UNCENTRED_MAX_RATIO = 4.0
_SAMPLE_ROWS = 16


def _sums_of_squares(gram: np.ndarray) -> tuple[float, float]:
  """(uncentred, column-centred) sums of squares of the features behind a Gram `[n, n]`, in
  float64: trace(K) and trace(K) - sum(K) / n."""
  total = float(np.trace(gram, dtype=np.float64))
  return total, total - float(np.sum(gram, dtype=np.float64)) / len(gram)


@np.errstate(invalid="ignore", over="ignore")  # NaN / Inf features: flagged later.
def _host_gram(x: np.ndarray, buffers: dict) -> tuple[np.ndarray, float, float]:
  """The Gram `[b, b]` of features `[b, f]` (rows possibly strided) by the host's BLAS (a
  symmetric product, SYRK), translated when needed so float32 keeps its accuracy; with the
  centred sum of squares and the rest of the uncentred one (as `_u_centred` takes them)."""
  sample = x[:_SAMPLE_ROWS]
  sample_total, sample_centred = _sums_of_squares(sample @ sample.T)
  if sample_total <= _UNCENTRED_MAX_RATIO * sample_centred:
    gram = x @ x.T
    total, centred = _sums_of_squares(gram)
    if total <= 2 * _UNCENTRED_MAX_RATIO * centred:
      return gram, centred, total - centred
  first = x[0].astype(np.float64)
  shifted = buffers.get(x.shape)
  if shifted is None:
    shifted = buffers[x.shape] = np.empty(x.shape, x.dtype)
  np.subtract(x, x[0], out=shifted)
  gram = shifted @ shifted.T
  return gram, _sums_of_squares(gram)[1], len(x) * float(first @ first)


def _host_group_grams(rows: np.ndarray, stacked: bool, buffers: dict) -> np.ndarray:
  """`_host_gram` of each layer of one device's minibatch: `[b, ...]`, or with `stacked`
  `[b, k, ...]`, to `[k, b, b + 2]` (Gram, then the two sums of squares as columns)."""
  b = rows.shape[0]
  rows = rows.reshape(b, rows.shape[1] if stacked else 1, -1)
  dtype = np.float64 if rows.dtype == np.float64 and jax.config.jax_enable_x64 else np.float32
  rows = rows.astype(dtype, copy=False)
  out = np.empty((rows.shape[1], b, b + 2), dtype)
  for j in range(rows.shape[1]):
    gram, centred, rest = _host_gram(rows[:, j], buffers)
    out[j, :, :b], out[j, :, b], out[j, :, b + 1] = gram, centred, rest
  return out


def _device_rows(a: Any, mesh: Mesh) -> list[tuple[jax.Device, np.ndarray]]:
  """(device, its minibatch as NumPy) for this process's devices of `mesh`, in mesh order:
  device i's rows are block i of the leading axis (read from its own shard when there is
  one, without a copy on CPU)."""
  devices = list(mesh.devices.flat)
  n = np.shape(a)[0]
  size = n // len(devices)
  shards = {s.device: s for s in a.addressable_shards} if isinstance(a, jax.Array) else {}
  out = []
  for i, device in enumerate(devices):
    if device.process_index != jax.process_index():
      continue
    start, stop = i * size, (i + 1) * size
    shard = shards.get(device)
    covered = shard.index[0].indices(n)[:2] if shard is not None else None
    if covered == (start, stop):
      out.append((device, np.asarray(shard.data)))
    elif covered == (0, n):
      out.append((device, np.asarray(shard.data)[start:stop]))
    else:
      out.append((device, np.asarray(a[start:stop])))
  return out


def _host_grams(layers: tuple[Any, ...], stacked: bool, mesh: Mesh) -> jax.Array:
  """Every layer's minibatch Grams on the host (`_host_group_grams`), as one global array
  `[devices · L, b, b + 2]` sharded over the mesh's data axis (device d's L layers)."""
  buffers = {}
  per_device = {}
  for layer in layers:
    for device, rows in _device_rows(layer, mesh):
      per_device.setdefault(device, []).append(_host_group_grams(rows, stacked, buffers))
  blocks = [jax.device_put(np.concatenate(grams), device)
            for device, grams in per_device.items()]
  shape = (mesh.devices.size * blocks[0].shape[0], *blocks[0].shape[1:])
  return jax.make_array_from_single_device_arrays(shape, parallel.batch_sharding(mesh), blocks)


def _device_sums(shift: jax.Array, first: jax.Array, valid: jax.Array,
                 xs: tuple[jax.Array, ...] | jax.Array,
                 ys: tuple[jax.Array, ...] | jax.Array | None, host_grams: bool, stacked: bool,
                 gram_blocks: int, feature_chunk: int) -> tuple[jax.Array, ...]:
  """Per-device minibatch terms, summed over the mesh (runs inside shard_map); a device
  whose minibatch is not all `valid` (padding) adds nothing. With `host_grams`, xs and ys
  are this device's `_host_grams` blocks `[L, b, b + 2]`, else its layers."""
  counts = jnp.all(valid)

  def u_centred(layers):
    if host_grams:
      b = layers.shape[1]
      return _u_centred(layers[..., :b], layers[:, 0, b], layers[:, 0, b + 1])
    return _u_centred(*_layer_grams(layers, stacked, gram_blocks, feature_chunk))

  ux, bad_x, varied_x = u_centred(xs)
  b = ux.shape[-1]
  ux = ux.reshape(ux.shape[0], b * b)
  if ys is None:
    hxy = ux @ ux.T / (b * (b - 3))
    hxx = hyy = jnp.diagonal(hxy)
    bad_y, varied_y = bad_x, varied_x
  else:
    uy, bad_y, varied_y = u_centred(ys)
    uy = uy.reshape(uy.shape[0], b * b)
    hxy = ux @ uy.T / (b * (b - 3))
    hxx = jnp.sum(ux * ux, axis=1) / (b * (b - 3))
    hyy = jnp.sum(uy * uy, axis=1) / (b * (b - 3))
  terms = jnp.stack(jnp.broadcast_arrays(hxy, hxx[:, None], hyy[None, :]))
  axis = parallel.DATA_AXIS
  num_minibatches = jax.lax.psum(counts.astype(jnp.int32), axis)
  mean_terms = jax.lax.psum(jnp.where(counts, terms, 0), axis) / jnp.maximum(num_minibatches, 1)
  shift = jnp.where(first, mean_terms, shift)
  d = terms - shift
  moments = jnp.concatenate([d, jnp.stack([d[i] * d[j] for i, j in _PRODUCTS])])
  moments = jnp.where(counts, moments, 0)
  flags = [jax.lax.psum((f & counts).astype(jnp.int32), axis) > 0
           for f in (bad_x, bad_y, varied_x, varied_y)]
  return (shift, jax.lax.psum(moments, axis), num_minibatches, *flags)


@functools.partial(jax.jit,
                   static_argnames=("minibatch_size", "host_grams", "stacked", "mesh",
                                    "gram_blocks", "feature_chunk", "precision"),
                   donate_argnums=0)
def _update(state: dict[str, jax.Array], valid: jax.Array, xs: tuple[jax.Array, ...] | jax.Array,
            ys: tuple[jax.Array, ...] | jax.Array | None, *, minibatch_size: int,
            host_grams: bool, stacked: bool, mesh: Mesh, gram_blocks: int, feature_chunk: int,
            precision: str) -> dict[str, jax.Array]:
  """One jitted update of the state's arrays (names stay outside, so they never recompile);
  every matrix product at `precision`. xs / ys: layers, or with `host_grams` the
  `_host_grams` arrays."""
  with jax.default_matmul_precision(precision):
    return _update_body(state, valid, xs, ys, minibatch_size=minibatch_size,
                        host_grams=host_grams, stacked=stacked, mesh=mesh,
                        gram_blocks=gram_blocks, feature_chunk=feature_chunk)


def _update_body(state: dict[str, jax.Array], valid: jax.Array,
                 xs: tuple[jax.Array, ...] | jax.Array,
                 ys: tuple[jax.Array, ...] | jax.Array | None, *, minibatch_size: int,
                 host_grams: bool, stacked: bool, mesh: Mesh, gram_blocks: int,
                 feature_chunk: int) -> dict[str, jax.Array]:
  data = PartitionSpec(parallel.DATA_AXIS)
  in_specs = (PartitionSpec(), PartitionSpec(), data, data, None if ys is None else data)
  sums_fn = jax.shard_map(
      functools.partial(_device_sums, host_grams=host_grams, stacked=stacked,
                        gram_blocks=gram_blocks, feature_chunk=feature_chunk),
      mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())
  shift, moments, num_minibatches, bad_x, bad_y, varied_x, varied_y = sums_fn(
      state["shift"], state["num_batches"] == 0, valid, xs, ys)
  sums, compensation = streaming.kahan_add(state["sums"], state["compensation"], moments)
  return dict(
      shift=shift, sums=sums, compensation=compensation,
      num_batches=state["num_batches"] + num_minibatches,
      num_examples=state["num_examples"] + num_minibatches * minibatch_size,
      nonfinite_x=state["nonfinite_x"] | bad_x, nonfinite_y=state["nonfinite_y"] | bad_y,
      varied_x=state["varied_x"] | varied_x, varied_y=state["varied_y"] | varied_y)


def _layer_names(layers: Layers, names: Sequence[str] | None, what: str) -> tuple[str, ...]:
  if isinstance(layers, Mapping):
    found = tuple(str(k) for k in layers)
    if names is not None and tuple(names) != found:
      raise ValueError(f"{what} is a dict; its keys {found} are the layer names, but names "
                       f"{tuple(names)} were also given. Drop `names` or rename the keys.")
    names = found
  elif isinstance(layers, Sequence) and not isinstance(layers, str):
    names = tuple(str(i) for i in range(len(layers))) if names is None else tuple(
        str(n) for n in names)
    if len(names) != len(layers):
      raise ValueError(f"{what} has {len(layers)} layers but {len(names)} names were given.")
  else:
    raise TypeError(
        f"{what} must be a sequence or dict of per-layer arrays [n, ...]; got "
        f"{type(layers).__name__}. Wrap a single layer as [x] or {{'name': x}}.")
  if not names:
    raise ValueError(f"{what} holds no layers; pass at least one array [n, ...].")
  if len(set(names)) != len(names):
    raise ValueError(f"Layer names of {what} must be unique; got {names}.")
  return names


def _ordered(layers: Layers, names: tuple[str, ...], what: str) -> tuple[Any, ...]:
  """The arrays of `layers` in the order of `names`, checked against them."""
  if isinstance(layers, Mapping):
    keys = {str(k): v for k, v in layers.items()}
    if set(keys) != set(names):
      raise ValueError(
          f"{what} has layers {sorted(keys)} but the state was initialised with {list(names)}:"
          f" missing {sorted(set(names) - set(keys))}, unexpected "
          f"{sorted(set(keys) - set(names))}. Pass the same layers to init and update.")
    arrays = tuple(keys[n] for n in names)
  elif isinstance(layers, Sequence) and not isinstance(layers, str):
    if len(layers) != len(names):
      raise ValueError(f"{what} has {len(layers)} layers but the state was initialised with "
                       f"{len(names)}; pass the same layers to init and update.")
    arrays = tuple(layers)
  else:
    raise TypeError(f"{what} must be a sequence or dict of per-layer arrays [b, ...]; got "
                    f"{type(layers).__name__}.")
  return tuple(a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a) for a in arrays)


def _stacked(groups: Sequence[jax.typing.ArrayLike], names: tuple[str, ...],
             what: str) -> tuple[Any, ...]:
  """The groups `[b, k, ...]` of `groups`, checked to hold one layer per name together."""
  if not isinstance(groups, Sequence) or isinstance(groups, str):
    raise TypeError(f"With stacked=True, {what} must be a sequence of groups [b, k, ...] of k "
                    f"layers each; got {type(groups).__name__}.")
  arrays = tuple(a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a) for a in groups)
  shapes = [tuple(np.shape(a)) for a in arrays]
  if any(len(s) < 2 for s in shapes) or sum(s[1] for s in shapes) != len(names):
    raise ValueError(
        f"{what} holds groups of shapes {shapes}, but the state was initialised with "
        f"{len(names)} layers: with stacked=True pass groups [b, k, ...] (k layers on axis 1) "
        "whose k's add up to the layer count, in the order of the state's names.")
  return arrays


class MinibatchCKA:
  """Streaming minibatch CKA (Nguyen, Raghu & Kornblith, 2021), jitted and sharded.

  Optax-like: `init` builds a `MinibatchCKAState`, `update` folds in one minibatch of every
  layer of model A (and of model B), `result` returns the heatmap with standard errors. Under
  a mesh, the global batch passed to `update` is split along the `parallel.DATA_AXIS` axis
  and each device's shard is its own minibatch of `global_batch / num_devices` examples;
  the per-minibatch terms are summed across devices and hosts, so results do not depend on
  the device count (for the same minibatches). Several passes over a reshuffled example set
  are several streams of `update` calls on the same state.

  Example:
    est = cka.MinibatchCKA()
    state = est.init(feats_a, feats_b)   # dicts or sequences of [b, ...] arrays
    for epoch in range(10):
      for batch in batches(jax.random.fold_in(key, epoch)):
        state = est.update(state, model_a(batch), model_b(batch))
    res = est.result(state)              # res.cka, res.stderr: [La, Lb]

  The jitted update donates the state: do not reuse a state passed to `update`.
  """

  def __init__(self, mesh: Mesh | None = None, *, grams: str = "auto", gram_blocks: int = 1,
               feature_chunk: int | None = None, precision: str = "highest"):
    """Builds the estimator.

    Args:
      mesh: one-axis mesh named `parallel.DATA_AXIS`; default one local device.
      grams: where each minibatch's Grams are computed, one of `GRAMS`: 'host' (CPU meshes
        only) by the host's BLAS as symmetric products (SYRK) on each device's rows, then
        the rest jitted; 'device' by XLA inside the jitted update (centred feature chunks);
        'auto' (default) is 'host' on a CPU mesh, 'device' otherwise and when `update` is
        traced (inside jit or scan). On a 2-core CPU the host's SYRK is ~1.7x faster than
        XLA's product (benchmarks/cka_bench.py). Both give the same numbers to float32
        rounding; a host Gram is of the features as they are when their means are small
        next to their spread (checked on the Gram), else of the features minus their first
        example.
      gram_blocks: device Grams: row blocks of the SYRK-like Gram (1 = one plain matrix
        product); more blocks save up to half the Gram FLOPs but use smaller matrix products
        (on a 2-core CPU with XLA's dot, 1 is fastest).
      feature_chunk: device Grams: features per chunk of each Gram (0 = no chunking);
        default 1024 on CPU (centring in cache), 0 on accelerators.
      precision: matrix-product precision, one of `PRECISIONS`: 'highest' (float32-accurate
        on every backend), or 'default' for the backend's fastest (TF32 / bfloat16 passes
        on GPUs / TPUs).

    Raises:
      ValueError: on a mesh without the data axis, an unknown `grams`, 'host' Grams on a
        mesh of accelerators, gram_blocks < 1, feature_chunk < 0 or an unknown precision.
    """
    mesh = streaming.data_mesh(mesh, "MinibatchCKA")
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    if grams not in GRAMS:
      raise ValueError(f"grams must be one of {GRAMS}; got {grams!r}.")
    if grams == "host" and not on_cpu:
      raise ValueError("grams='host' computes Grams with the host's BLAS and needs a mesh of "
                       "CPU devices; use grams='device' (or 'auto') on accelerators.")
    if gram_blocks < 1:
      raise ValueError(f"gram_blocks must be >= 1; got {gram_blocks}.")
    if feature_chunk is None:
      feature_chunk = _CPU_FEATURE_CHUNK if on_cpu else 0
    if feature_chunk < 0:
      raise ValueError(f"feature_chunk must be >= 0 (0 = no chunking); got {feature_chunk}.")
    self.mesh = mesh
    self.grams = grams
    self.host_grams = grams == "host" or (grams == "auto" and on_cpu)  # When not traced.
    self.gram_blocks = gram_blocks
    self.feature_chunk = feature_chunk
    self.precision = _check_precision(precision)

  def init(self, xs: Layers, ys: Layers | None = None, *,
           names_x: Sequence[str] | None = None,
           names_y: Sequence[str] | None = None) -> MinibatchCKAState:
    """An empty state for the layers of `xs` (and `ys`).

    Args:
      xs: model A's layers: a dict (keys = layer names) or a sequence of arrays; only the
        structure is used (a first batch or `jax.ShapeDtypeStruct`s).
      ys: model B's layers, or None for a within-model heatmap of xs against itself (which
        reuses the Grams and the symmetry).
      names_x: layer names for a sequence xs (default "0", "1", ...).
      names_y: layer names for a sequence ys.

    Returns:
      The zero state, replicated over the mesh.
    """
    names_x = _layer_names(xs, names_x, "xs")
    names_y = () if ys is None else _layer_names(ys, names_y, "ys")
    la, lb = len(names_x), len(names_y or names_x)
    zeros = np.zeros((len(_TERMS) + len(_PRODUCTS), la, lb), np.float32)
    state = MinibatchCKAState(
        shift=np.zeros((len(_TERMS), la, lb), np.float32), sums=zeros, compensation=zeros,
        num_batches=np.zeros((), np.int32), num_examples=np.zeros((), np.int32),
        nonfinite_x=np.zeros(la, bool), nonfinite_y=np.zeros(lb, bool),
        varied_x=np.zeros(la, bool), varied_y=np.zeros(lb, bool),
        names_x=names_x, names_y=names_y)
    return streaming.replicated(state, self.mesh)

  def update(self, state: MinibatchCKAState, xs: Layers, ys: Layers | None = None, *,
             stacked: bool = False,
             valid: jax.typing.ArrayLike | None = None) -> MinibatchCKAState:
    """Folds one global batch into `state`. With device Grams it is jitted and does not wait
    for the host; with host Grams it waits for the features, computes their Grams, and
    returns once the jitted rest is dispatched.

    Args:
      state: from `init` or a previous `update` (donated), or restored with `from_numpy`.
      xs: model A's layers `[global_batch, ...]`, same structure as at `init`. Under a
        multi-host mesh, global arrays (`parallel.global_batch`).
      ys: model B's layers `[global_batch, ...]`; None iff the state is within-model.
      stacked: xs (and ys) are sequences of groups `[global_batch, k, ...]` of k layers
        stacked on axis 1 (layer j of a group is `group[:, j]`, features flattened), which
        cover the state's layers in the order of its names. Each group's k Grams are one
        batched computation, so the compiled update grows with the number of groups, not of
        layers (e.g. every token of a ViT layer as one group `[b, N, D]`); the state and the
        numbers (to float32 rounding) are those of the same layers passed one by one. A state
        for groups is initialised with one name per layer (`init(names, names_x=names)`).
      valid: `[global_batch]` bool, sharded like the layers (default all True): a device's
        minibatch counts only when all its rows are valid, so padding minibatches (the
        batch's `valid` of `data.eval_batches(..., minibatch_size=...)`) add nothing.

    Returns:
      The new state.

    Raises:
      ValueError: on layers that differ from `init` (with `stacked`: groups whose k's do not
        add up to the layer count), mismatched example counts, a batch that does not split
        over the devices, or fewer than 4 examples per device.
    """
    within = not state.names_y
    if within != (ys is None):
      raise ValueError(
          "The state was initialised " + ("without ys (within-model) but ys was given"
                                          if within else "with ys but ys is missing") +
          "; pass the same models to init and update.")
    checked = _stacked if stacked else _ordered
    arrays_x = checked(xs, state.names_x, "xs")
    arrays_y = () if within else checked(ys, state.names_y, "ys")
    label = lambda names, i: f"group {i}" if stacked else names[i]
    named = [("A", label(state.names_x, i), a) for i, a in enumerate(arrays_x)] + [
        ("B", label(state.names_y, i), a) for i, a in enumerate(arrays_y)]
    counts = {np.shape(a)[0] if np.ndim(a) else 0 for _, _, a in named}
    if len(counts) != 1:
      shapes = ", ".join(f"{m}:{n} {tuple(np.shape(a))}" for m, n, a in named)
      raise ValueError(f"All layers of both models must hold the same examples; got shapes "
                       f"{shapes}. Pass features of the same batch.")
    batch, devices = counts.pop(), self.mesh.devices.size
    if batch % devices or batch // devices < 4:
      raise ValueError(
          f"A global batch of {batch} examples over {devices} device(s) must split into "
          f"minibatches of at least 4 examples each (HSIC1 divides by b - 3); use a multiple "
          f"of {devices} that is >= {4 * devices}.")
    spans_hosts = any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)
    if spans_hosts and not all(isinstance(a, jax.Array) for _, _, a in named):
      raise ValueError("The mesh spans several processes: pass global arrays built with "
                       "parallel.global_batch, not host-local NumPy arrays (or use a mesh of "
                       "this process's devices, e.g. the default one).")
    if valid is None:
      valid = np.ones(batch, bool)
    if np.shape(valid) != (batch,):
      raise ValueError(f"valid must be one flag per example, shape ({batch},); got "
                       f"{np.shape(valid)}.")
    if not isinstance(valid, jax.Array):  # The same flags on every host.
      valid = np.asarray(valid, bool)
      valid = jax.make_array_from_callback((batch,), parallel.batch_sharding(self.mesh),
                                           lambda index: valid[index])
    traced = any(isinstance(a, jax.core.Tracer) for _, _, a in named)
    if traced and self.grams == "host":
      raise ValueError("grams='host' needs concrete arrays, but update is being traced (inside "
                       "jit or scan); use grams='auto' or 'device' there.")
    host_grams = self.host_grams and not traced
    if host_grams:
      arrays_x = _host_grams(arrays_x, stacked, self.mesh)
      arrays_y = arrays_y and _host_grams(arrays_y, stacked, self.mesh)
    placed = streaming.replicated(state, self.mesh)
    arrays = {f: getattr(placed, f) for f in _STATE_ARRAYS}
    arrays = _update(arrays, valid, arrays_x, None if within else arrays_y,
                     minibatch_size=batch // devices, host_grams=host_grams,
                     stacked=stacked, mesh=self.mesh, gram_blocks=self.gram_blocks,
                     feature_chunk=self.feature_chunk, precision=self.precision)
    return MinibatchCKAState(**arrays, names_x=state.names_x, names_y=state.names_y)

  def result(self, state: MinibatchCKAState) -> CKAResult:
    """The heatmap and its standard errors (one host synchronisation).

    With m = the means over B minibatches of the terms (h_xy, h_xx, h_yy), CKA =
    m_xy / sqrt(m_xx m_yy). Its standard error is the delta method on the means: with
    Σ the sample covariance (B - 1 denominator) of the per-minibatch terms and
    g = (1 / sqrt(m_xx m_yy), -CKA / (2 m_xx), -CKA / (2 m_yy)) the gradient,
    stderr = sqrt(gᵀ Σ g / B). It treats minibatches as independent (several passes over
    one example set make it an error bar for the minibatch sampling only) and is NaN for
    B = 1.

    Args:
      state: the accumulated state.

    Returns:
      A `CKAResult`. Rows (columns) of layers that never varied within a minibatch, for
      which CKA is undefined, are NaN, with a logged warning naming them.

    Raises:
      ValueError: if no minibatch was accumulated, or a layer had NaN/Inf features (named).
    """
    host = state.to_numpy()
    names_y = state.names_y or state.names_x
    num_batches = streaming.check_accumulated(host["num_batches"], "minibatch")
    bad = [f"model A layer {n!r}" for n, f in zip(state.names_x, host["nonfinite_x"]) if f]
    if state.names_y:
      bad += [f"model B layer {n!r}" for n, f in zip(names_y, host["nonfinite_y"]) if f]
    if bad:
      raise ValueError(f"NaN or Inf features in {', '.join(bad)}: CKA is undefined. Check "
                       "these activations (e.g. overflow in float16) before computing CKA.")
    sums = streaming.kahan_total(host["sums"], host["compensation"])
    mean_d = sums[:len(_TERMS)] / num_batches
    m_xy, m_xx, m_yy = host["shift"].astype(np.float64) + mean_d
    with np.errstate(divide="ignore", invalid="ignore"):
      cka = m_xy / np.sqrt(m_xx * m_yy)
      grad = (1 / np.sqrt(m_xx * m_yy), -cka / (2 * m_xx), -cka / (2 * m_yy))
      if num_batches > 1:
        var = np.zeros_like(cka)
        for channel, (i, j) in enumerate(_PRODUCTS, start=len(_TERMS)):
          cov = (sums[channel] - sums[i] * sums[j] / num_batches) / (num_batches - 1)
          var += (1 if i == j else 2) * grad[i] * grad[j] * cov
        stderr = np.sqrt(np.maximum(var, 0) / num_batches)
      else:
        logging.info("One minibatch accumulated: standard errors are undefined (NaN).")
        stderr = np.full_like(cka, np.nan)
    undefined_x = ~host["varied_x"] | ~(m_xx[:, 0] > 0)
    undefined_y = ~host["varied_y"] | ~(m_yy[0, :] > 0)
    for model, names, undefined in (("A", state.names_x, undefined_x),
                                    ("B", names_y, undefined_y)):
      if undefined.any() and (model == "A" or state.names_y):
        logging.warning(
            "CKA is undefined (NaN) for constant (zero-variance) layers of model %s: %s.",
            model, ", ".join(n for n, u in zip(names, undefined) if u))
    for a in (cka, stderr):
      a[undefined_x, :] = np.nan
      a[:, undefined_y] = np.nan
    return CKAResult(cka=cka, stderr=stderr, names_x=state.names_x, names_y=names_y,
                     num_batches=num_batches, num_examples=int(host["num_examples"]))


def minibatch_cka(xs: Layers, ys: Layers | None = None, *, batch_size: int = 256,
                  mesh: Mesh | None = None, names_x: Sequence[str] | None = None,
                  names_y: Sequence[str] | None = None,
                  precision: str = "highest") -> np.ndarray:
  """Minibatch CKA heatmap over whole arrays, in consecutive minibatches.

  Args:
    xs: model A's layers, a dict or sequence of arrays `[n, ...]` (features flattened).
    ys: model B's layers `[n, ...]`; None for the within-model heatmap of xs.
    batch_size: minibatch size b >= 4 (the reference code uses 256).
    mesh: run under this mesh (default one local device); each step then takes one
      minibatch per device (`parallel.minibatch_slots`), the same minibatches for any
      device count.
    names_x: layer names for a sequence xs.
    names_y: layer names for a sequence ys.
    precision: matrix-product precision, one of `PRECISIONS` (see `MinibatchCKA`).

  Returns:
    `[len(xs), len(ys)]` float64 CKA heatmap (`[len(xs), len(xs)]` when ys is None). The
    trailing examples that do not fill a minibatch are dropped (logged). Use `MinibatchCKA` for
    standard errors, several passes or streaming.

  Raises:
    ValueError: on mismatched example counts, batch_size < 4 or too few examples.
  """
  if batch_size < 4:
    raise ValueError(f"batch_size must be >= 4 (HSIC1 divides by b - 3); got {batch_size}.")
  estimator = MinibatchCKA(mesh, precision=precision)
  state = estimator.init(xs, ys, names_x=names_x, names_y=names_y)
  arrays = _ordered(xs, state.names_x, "xs") + (
      () if ys is None else _ordered(ys, state.names_y, "ys"))
  counts = [np.shape(a)[0] for a in arrays]
  if len(set(counts)) != 1:
    raise ValueError(f"All layers of both models must hold the same examples; got shapes "
                     f"{[tuple(np.shape(a)) for a in arrays]}.")
  num_minibatches = counts[0] // batch_size
  if num_minibatches == 0:
    raise ValueError(f"{counts[0]} examples do not fill one minibatch of {batch_size}; use "
                     "more examples or a smaller batch_size.")
  if counts[0] % batch_size:
    logging.info("minibatch_cka: dropping the last %d of %d examples (not a full minibatch "
                 "of %d).", counts[0] % batch_size, counts[0], batch_size)
  rows = np.arange(batch_size)
  for slots in parallel.minibatch_slots(num_minibatches, estimator.mesh.devices.size):
    index = (np.maximum(slots, 0)[:, None] * batch_size + rows).ravel()
    chunk = lambda layers: [a[index] for a in layers]
    state = estimator.update(
        state, chunk(arrays[:len(state.names_x)]),
        None if ys is None else chunk(arrays[len(state.names_x):]),
        valid=np.repeat(slots >= 0, batch_size))
  return estimator.result(state).cka
