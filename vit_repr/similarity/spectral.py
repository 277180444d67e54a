"""The spectral step shared by SVCCA, PWCCA and Procrustes: left singular vectors of centred
features from a symmetric eigendecomposition in float64.

`np.linalg.eigh` of the n x n Gram X Xᵀ (p >= n) or of R Rᵀ with X = Q R (p < n) gives an
orthonormal basis U of the examples' space and the variances λ = s² along it, without the
direct SVD of an n x p matrix (whose LAPACK iteration can fail to converge on large,
ill-conditioned inputs). Eigenvalues are exact to about eps64 · λ_max, so directions whose
variance is below `rank_rtol(n, p) = max(n, p) · eps64` of the largest are treated as zero: that
is the rank, which the CCA-based measures log.
"""

import numpy as np

_EPS = np.finfo(np.float64).eps


def rank_rtol(n: int, p: int) -> float:
  """Relative tolerance on variances (eigenvalues of the Gram) below which a direction is zero."""
  return max(n, p) * _EPS


def left_spectrum(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Variances λ (descending, >= 0) and orthonormal left singular vectors U `[n, min(n, p)]`
  of centred features `xc` `[n, p]`: xc xcᵀ = U diag(λ) Uᵀ."""
  n, p = xc.shape
  if p < n:
    q, r = np.linalg.qr(xc)              # q [n, p] orthonormal, xc xcᵀ = q (r rᵀ) qᵀ
    lam, w = np.linalg.eigh(r @ r.T)
    u = q @ w
  else:
    lam, u = np.linalg.eigh(xc @ xc.T)
  return np.maximum(lam[::-1], 0.0), u[:, ::-1]


def rank(lam: np.ndarray, n: int, p: int) -> int:
  """Number of variances above `rank_rtol(n, p)` of the largest (`lam` descending)."""
  if lam.size == 0 or lam[0] <= 0:
    return 0
  return int(np.count_nonzero(lam > rank_rtol(n, p) * lam[0]))


def directions_kept(lam: np.ndarray, r: int, variance_kept: float) -> int:
  """Fewest leading directions whose variance is at least `variance_kept` of the total over the
  first `r` (the rank); all `r` when `variance_kept` is 1."""
  if variance_kept >= 1 or r == 0:
    return r
  fraction = np.cumsum(lam[:r]) / np.sum(lam[:r])
  return min(r, int(np.searchsorted(fraction, variance_kept, side="left")) + 1)
