"""Calibrated uncertainty for CKA: permutation nulls and bootstrap intervals.

Streamed, for `MinibatchCKA(num_permutations=K, num_bootstrap=B)` (the per-minibatch pieces
run inside `sharded_update`'s jitted update, the read-out in `MinibatchCKA.result`):

* Permutation null. CKA's scale has no fixed "unrelated" level (it grows with the dimension
  and shrinks with the examples), so a similarity is judged against CKA of the same layers with
  the pairing of examples broken, the usual remedy for CKA and HSIC (Gretton et al., "A Kernel
  Statistical Test of Independence", NIPS 2007; Kornblith et al., ICML 2019, discuss how
  CKA of unrelated representations is not 0). For every minibatch i and replicate k a
  permutation P_ik of the minibatch's examples of model B gives the cross term
  HSIC1(K_i, P_ik L_i P_ikᵀ); the null CKA of replicate k is
  `mean_i HSIC1(K_i, P_ik L_i P_ikᵀ) / sqrt(mean_i HSIC1(K_i, K_i) mean_i HSIC1(L_i, L_i))`
  (the denominators do not change under a permutation). U-centring is permutation-equivariant,
  U(P L Pᵀ) = P U(L) Pᵀ (it is built from row sums and the total), so the permuted term is a
  gather of B's U-centred Gram `[Lb, b²]` at the permuted indices, no new Gram. Permuting
  B's feature rows instead would cost K new Grams (2 b² p FLOPs per layer each); the gather
  moves K Lb b² floats. Each replicate then costs one `[La, b²] x [b², Lb]` product
  (2 La Lb b² FLOPs) per minibatch, the cost of the observed cross terms. The state keeps
  the sums `[K, La, Lb]`. The one-sided p-value is (1 + #{k: null_k >= observed}) / (K + 1)
  (Phipson & Smyth, "Permutation P-values Should Never Be Zero", 2010).
* Poisson bootstrap over minibatches (Hanley & MacGibbon, "Creating non-parametric bootstrap
  samples using Poisson frequencies", 2006; Chamandy et al., "Estimating uncertainty for
  massive data streams", Google 2012): replicate r weights minibatch i's terms (xy, xx, yy)
  by w_ir ~ Poisson(1), drawn as the minibatch arrives, and
  CKA*_r = sum_i w_ir xy_i / sqrt(sum_i w_ir xx_i sum_i w_ir yy_i); the interval is the
  percentile interval of the CKA*_r. Minibatches are the estimator's independent units, so
  this is the bootstrap over examples in blocks of the minibatch size; several passes over
  one example set make it an interval for the minibatch sampling only (as the standard
  error). It costs B·3·La·Lb multiply-adds per minibatch and a `[B, 3, La, Lb]` state.

Randomness comes from `jax.random.key(seed)`, folded with the minibatch's global index (see
`_minibatch_index`), so the numbers do not depend on the device or host count, nor on saving
and restoring the state mid-stream.

Full batch, over examples, for debiased linear CKA (`full_batch.debiased_cka`):
`permutation_test` and `bootstrap_interval`. Both take U-centred Grams once (O(n² p)) and
cost O(n²) per replicate.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_repr.cka.full_batch import _check_pair, _check_precision, _features, _u_centre

# Streams of `jax.random.key(seed)` for the two calibrations.
_NULL_STREAM, _BOOTSTRAP_STREAM = 0, 1
# P(Poisson(1) <= k) for k = 0 .. 19, in float32 (1 from k = 10 on).
_POISSON1_CDF = np.cumsum(np.exp(-1) / np.cumprod([1.0, *range(1, 20)])).astype(np.float32)
# Floats of permuted Grams built at once (bounds the memory of the null's products).
_GATHER_FLOATS = 1 << 24


def check_options(num_permutations: int, num_bootstrap: int, confidence: float,
                  seed: int) -> tuple[int, int, int]:
  """The state's calibration settings `(num_permutations, num_bootstrap, seed)`, checked
  (seed 0 when both are off, as it then changes nothing).

  Raises:
    ValueError: negative counts, a non-integer seed or a confidence outside (0, 1).
  """
  for name, value in (("num_permutations", num_permutations), ("num_bootstrap", num_bootstrap)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be an integer >= 0 (0 = off, e.g. 1000); got {value!r}.")
  check_confidence(confidence)
  if not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer (as for jax.random.key); got {seed!r}.")
  return int(num_permutations), int(num_bootstrap), int(seed) if (
      num_permutations or num_bootstrap) else 0


def check_confidence(confidence: float) -> float:
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), e.g. 0.95 for a 95% interval; got "
                     f"{confidence!r}.")
  return float(confidence)


def empty_sums(calibration: tuple[int, int, int], la: int, lb: int) -> dict[str, np.ndarray]:
  """The zero calibration sums of a state (arrays of size 0 for an option that is off)."""
  num_permutations, num_bootstrap, _ = calibration
  null = np.zeros((num_permutations, la, lb), np.float32)
  boot = np.zeros((num_bootstrap, 3, la, lb), np.float32)
  return dict(null_sums=null, null_compensation=null, bootstrap_sums=boot,
              bootstrap_compensation=boot)


def _permutations(key: jax.Array, count: int, n: int) -> jax.Array:
  """`[count, n]` permutations of n, one per key of `jax.random.split(key, count)`."""
  return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, count))


def _minibatch_permutations(seed: int, minibatch_index: jax.typing.ArrayLike,
                            num_permutations: int, b: int) -> jax.Array:
  """The `[K, b]` permutations P_ik of minibatch i (its global index) for the null: row k
  sends B's example `perm[j]` to position j (B's Gram becomes `L[perm][:, perm]`)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NULL_STREAM),
                           minibatch_index)
  return _permutations(key, num_permutations, b)


def _minibatch_weights(seed: int, minibatch_index: jax.typing.ArrayLike,
                       num_bootstrap: int) -> jax.Array:
  """The `[B]` Poisson(1) weights w_ir of minibatch i (its global index), float32: float32
  uniforms through the inverse Poisson(1) CDF (`jax.random.poisson`'s loop does not trace
  inside shard_map; counts above 9, of probability 1e-7, are not drawn)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _BOOTSTRAP_STREAM),
                           minibatch_index)
  uniform = jax.random.uniform(key, (num_bootstrap,))
  return jnp.sum(uniform[:, None] >= _POISSON1_CDF, axis=1).astype(jnp.float32)


def _minibatch_index(num_batches: jax.Array, counts: jax.Array, axis: str) -> jax.Array:
  """This device's minibatch's global index in the stream (inside shard_map): the minibatches
  accumulated before (`num_batches`), plus those counted at lower positions of the mesh's
  data axis in this step. Device d of the axis holds rows block d of the global batch (as
  `host_grams._device_rows` and the batch sharding number them), and `axis_index` is that
  position in the whole mesh, across hosts, so the index is the same for any split of the
  devices over hosts, and for any device count when the stream holds the same minibatches in
  the same order."""
  counted = jax.lax.all_gather(counts.astype(jnp.int32), axis)
  before = jnp.arange(counted.shape[0]) < jax.lax.axis_index(axis)
  return num_batches + jnp.sum(jnp.where(before, counted, 0))


def _device_calibration(ux: jax.Array, uy: jax.Array, terms: jax.Array, counts: jax.Array,
                        index: jax.Array, calibration: tuple[int, int, int],
                        axis: str) -> tuple[jax.Array, jax.Array]:
  """One device's minibatch null terms `[K, La, Lb]` and weighted terms `[B, 3, La, Lb]`,
  summed over the mesh (inside shard_map); zero for a minibatch that does not count.

  Args:
    ux: `[La, b²]` U-centred Grams of model A.
    uy: `[Lb, b²]` U-centred Grams of model B (ux within a model).
    terms: `[3, La, Lb]` this minibatch's (xy, xx, yy) HSIC1 terms.
    counts: whether the minibatch counts (all rows valid).
    index: its global index (`_minibatch_index`, or given to `update`).
    calibration: `(num_permutations, num_bootstrap, seed)`.
    axis: the mesh's data axis.
  """
  num_permutations, num_bootstrap, seed = calibration
  la, lb = terms.shape[1:]
  null = jnp.zeros((0, la, lb), terms.dtype)
  boot = jnp.zeros((0, 3, la, lb), terms.dtype)
  b = int(round(ux.shape[1]**0.5))
  if num_permutations:
    perms = _minibatch_permutations(seed, index, num_permutations, b)
    chunk = max(1, min(num_permutations, _GATHER_FLOATS // uy.size))
    num_chunks = -(-num_permutations // chunk)
    perms = jnp.concatenate([perms, jnp.zeros((num_chunks * chunk - num_permutations, b),
                                              perms.dtype)]).reshape(num_chunks, chunk, b)

    def null_terms(p):  # P U Pᵀ of `chunk` permutations as one gather, then one product.
      permuted = uy[:, (p[:, :, None] * b + p[:, None, :]).reshape(chunk, b * b)]
      products = ux @ permuted.reshape(lb * chunk, b * b).T / (b * (b - 3))
      return jnp.moveaxis(products.reshape(la, lb, chunk), 2, 0)

    null = jax.lax.map(null_terms, perms).reshape(-1, la, lb)[:num_permutations]
    null = jax.lax.psum(jnp.where(counts, null, 0), axis)
  if num_bootstrap:
    weights = _minibatch_weights(seed, index, num_bootstrap)
    boot = jax.lax.psum(jnp.where(counts, weights[:, None, None, None] * terms, 0), axis)
  return null, boot


def calibrated_result(host: dict[str, np.ndarray], cka: np.ndarray, m_xx: np.ndarray,
                      m_yy: np.ndarray, num_batches: int, calibration: tuple[int, int, int],
                      confidence: float) -> dict[str, np.ndarray | None]:
  """`null_mean`, `p_value`, `ci_low`, `ci_high` `[La, Lb]` (None for an option that is off)
  from a state's host arrays, its CKA and mean self terms."""
  num_permutations, num_bootstrap, _ = calibration
  out = dict(null_mean=None, p_value=None, ci_low=None, ci_high=None)
  with np.errstate(divide="ignore", invalid="ignore"):
    if num_permutations:
      null = _kahan_total(host, "null") / num_batches / np.sqrt(m_xx * m_yy)
      out["null_mean"] = null.mean(0)
      out["p_value"] = (1 + np.sum(null >= cka, axis=0)) / (num_permutations + 1)
    if num_bootstrap:
      if num_batches < 2:
        logging.info("One minibatch accumulated: bootstrap intervals are undefined (NaN).")
        out["ci_low"], out["ci_high"] = np.full_like(cka, np.nan), np.full_like(cka, np.nan)
      else:
        xy, xx, yy = np.moveaxis(_kahan_total(host, "bootstrap"), 1, 0)
        star = xy / np.sqrt(xx * yy)  # NaN for a replicate of zero weight: left out.
        star[:, ~np.isfinite(cka)] = 0  # Undefined cells (NaN later): no all-NaN warning.
        out["ci_low"], out["ci_high"] = np.nanquantile(
            star, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
  return out


def _kahan_total(host: dict[str, np.ndarray], name: str) -> np.ndarray:
  return (np.asarray(host[f"{name}_sums"], np.float64)
          - np.asarray(host[f"{name}_compensation"], np.float64))


# ---------------------------------------------------------------------------------------------
# Full batch, over examples.


def _u_grams(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """U-centred linear Grams `[n, n]` of the (column-centred) features."""
  return tuple(_u_centre((a - a.mean(0)) @ (a - a.mean(0)).T) for a in (x, y))


def _resample_indices(key: jax.Array, count: int, n: int) -> jax.Array:
  """`[count, n]` draws with replacement of n examples, one row per resample."""
  return jax.vmap(lambda k: jax.random.randint(k, (n,), 0, n))(jax.random.split(key, count))


def _batch_size(count: int, n: int) -> int:
  return max(1, min(count, _GATHER_FLOATS // (2 * n * n)))


def permutation_test(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *,
                     num_permutations: int, seed: int = 0,
                     precision: str = "highest") -> tuple[jax.Array, jax.Array]:
  """Permutation test of full-batch debiased linear CKA (`debiased_cka`), over examples.

  Null replicate k pairs x with y's examples permuted (`_permutations(jax.random.key(seed),
  num_permutations, n)[k]`): its CKA is HSIC1(K, P L Pᵀ) / sqrt(HSIC1(K, K) HSIC1(L, L)),
  computed as a gather of the U-centred Gram of y (U(P L Pᵀ) = P U(L) Pᵀ). Costs the two
  Grams (O(n² p)) once, then O(n²) per permutation; memory O(n²).

  Args:
    x: features `[n, ...]` of the first representation.
    y: features `[n, ...]` of the second representation, same examples in the same order.
    num_permutations: K >= 1 permutations (the p-value is at least 1 / (K + 1)).
    seed: seed of `jax.random.key`.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    (p_value, null_mean): the one-sided p-value (1 + #{k: null_k >= observed}) / (K + 1) and
    the mean null CKA (about 0: HSIC1 averages to 0 over permutations).

  Raises:
    ValueError: on mismatched example counts, fewer than 4 examples or K < 1.
  """
  x, y = _features(x, "x"), _features(y, "y")
  _check_pair(x, y, 4)
  if not isinstance(num_permutations, (int, np.integer)) or num_permutations < 1:
    raise ValueError(f"num_permutations must be an integer >= 1 (e.g. 1000); got "
                     f"{num_permutations!r}.")
  return _permutation_test(x, y, jnp.asarray(seed, jnp.uint32), int(num_permutations),
                           _check_precision(precision))


@functools.partial(jax.jit, static_argnames=("num_permutations", "precision"))
def _permutation_test(x, y, seed, num_permutations, precision):
  n = x.shape[0]
  with jax.default_matmul_precision(precision):
    ux, uy = _u_grams(x, y)
    scale = jnp.sqrt(jnp.vdot(ux, ux) * jnp.vdot(uy, uy))
    observed = jnp.vdot(ux, uy) / scale
    perms = _permutations(jax.random.key(seed), num_permutations, n)
    null = jax.lax.map(lambda p: jnp.vdot(ux, uy[p][:, p]), perms,
                       batch_size=_batch_size(num_permutations, n)) / scale
  return (1 + jnp.sum(null >= observed)) / (num_permutations + 1), null.mean()


def bootstrap_interval(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike, *,
                       num_resamples: int, confidence: float = 0.95, seed: int = 0,
                       precision: str = "highest") -> tuple[jax.Array, jax.Array]:
  """Percentile bootstrap interval of full-batch debiased linear CKA, over examples.

  Resample r draws n examples with replacement (`_resample_indices(jax.random.key(seed),
  num_resamples, n)[r]`) and takes the debiased CKA of the resampled Grams of the features
  centred by their means over all n examples, with the entries between two copies of one
  example zeroed like the diagonal: HSIC1 leaves out each example's similarity to itself, and
  a copy pair would bring it back (in high dimension the debiased CKA of unrelated layers
  would then bootstrap far above 0; zeroed, it does not, and the interval's width matched the
  spread of CKA over fresh samples within ~20% in a check). Zeroing is not exactly
  translation invariant, hence the fixed centring. Costs the two Grams once, then O(n²) per
  resample; memory O(n²).

  Args:
    x: features `[n, ...]` of the first representation.
    y: features `[n, ...]` of the second representation, same examples in the same order.
    num_resamples: resamples >= 1 (a few thousand for a 95% interval).
    confidence: level of the interval, in (0, 1).
    seed: seed of `jax.random.key`.
    precision: matrix-product precision, one of `PRECISIONS`.

  Returns:
    (low, high): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the
    resampled CKA (linear interpolation, as `np.quantile`).

  Raises:
    ValueError: on mismatched example counts, fewer than 4 examples, num_resamples < 1 or a
      confidence outside (0, 1).
  """
  x, y = _features(x, "x"), _features(y, "y")
  _check_pair(x, y, 4)
  if not isinstance(num_resamples, (int, np.integer)) or num_resamples < 1:
    raise ValueError(f"num_resamples must be an integer >= 1 (e.g. 2000); got "
                     f"{num_resamples!r}.")
  confidence = check_confidence(confidence)
  return _bootstrap_interval(x, y, jnp.asarray(seed, jnp.uint32), int(num_resamples),
                             confidence, _check_precision(precision))


@functools.partial(jax.jit, static_argnames=("num_resamples", "confidence", "precision"))
def _bootstrap_interval(x, y, seed, num_resamples, confidence, precision):
  n = x.shape[0]
  with jax.default_matmul_precision(precision):
    kx, ly = ((a - a.mean(0)) @ (a - a.mean(0)).T for a in (x, y))

    def resampled(index):
      copies = index[:, None] == index[None, :]
      k, l = (_u_centre(jnp.where(copies, 0, g[index][:, index])) for g in (kx, ly))
      return jnp.vdot(k, l) / jnp.sqrt(jnp.vdot(k, k) * jnp.vdot(l, l))

    indices = _resample_indices(jax.random.key(seed), num_resamples, n)
    stars = jax.lax.map(resampled, indices, batch_size=_batch_size(num_resamples, n))
  low, high = jnp.quantile(stars, jnp.array([(1 - confidence) / 2, (1 + confidence) / 2]))
  return low, high
