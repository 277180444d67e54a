"""Full-batch centered kernel alignment (CKA): kernels, centring and HSIC estimators.

Full-batch CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
ICML 2019), as used by Raghu et al., "Do Vision Transformers See Like Convolutional Neural
Networks?" (NeurIPS 2021): `linear_cka` and `rbf_cka` with the biased HSIC estimator (Gretton
et al., 2005), and `debiased_cka` with the unbiased estimator HSIC1 of Song et al., "Feature
Selection via Dependence Maximization" (JMLR 2012).

HSIC1 of Grams (`hsic_unbiased`, `rbf_cka(..., debiased=True)`, `debiased_cka` on its Gram
path) is computed through U-centring (Székely & Rizzo, "Partial distance correlation", Ann.
Stat. 2014): with K̃ the Gram with its diagonal zeroed, U(K)_ij = K̃_ij - r_i - r_j + s for
i != j and 0 on the diagonal (r = K̃ row sums / (n - 2), s = sum(K̃) / ((n - 1)(n - 2))), and
HSIC1(K, L) = <U(K), U(L)>_F / (n (n - 3)); `debiased_cka`'s feature path takes the same sums
from the features.

Inputs may be NumPy, JAX or any array convertible by `np.asarray` (e.g. PyTorch CPU tensors);
computation is float32 unless float64 is enabled in JAX and the input is float64.

Precision: every matrix product (Grams, HSIC products, means) runs at `precision='highest'` by
default, float32-accurate on every backend. GPUs (TF32) and TPUs (bfloat16 passes) otherwise
multiply float32 at reduced precision by default, which can move CKA by more than the
minibatch estimator's own error. `precision='default'` trades that accuracy for speed there
('high' is in between); on CPUs all three are the same. The minibatch estimator
(`vit_repr.cka.minibatch`) takes the same `precision`.
"""

import functools

import jax
import jax.numpy as jnp

# Matrix-product precisions (names of `jax.default_matmul_precision`), most accurate first.
PRECISIONS = ("highest", "high", "default")


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

