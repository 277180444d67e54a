"""SVCCA and PWCCA: canonical correlation analysis between two layers.

CCA between centred X `[n, p]` and Y `[n, q]`: the canonical correlations ρ₁ >= ρ₂ >= ... are
the singular values of Σxx^{-1/2} Σxy Σyy^{-1/2}, equivalently the cosines of the principal
angles between the column spaces of X and Y in example space, i.e. the singular values of
Uₓᵀ U_y with Uₓ, U_y orthonormal bases of those spaces. We compute them this way, from the bases
of `spectral.left_spectrum` (float64 eigh), which needs no inverse of a covariance matrix.

* SVCCA (Raghu et al., "SVCCA: Singular Vector Canonical Correlation Analysis for Deep Learning
  Dynamics and Interpretability", NeurIPS 2017): keep each side's leading singular directions
  that explain `variance_kept` (default 0.99) of its variance, run CCA between the reduced
  sides; the value is the mean of the min(kₓ, k_y) canonical correlations. (google/svcca's
  `get_cca_similarity` also reports a 'mean' trimmed to the correlations summing to 98% of
  their total; we average them all.)
* PWCCA (Morcos et al., "Insights on representational similarity in neural networks with
  canonical correlation", NeurIPS 2018): Σᵢ αᵢ ρᵢ over the c = min(kₓ, k_y) canonical pairs,
  αᵢ ∝ Σⱼ |<hᵢ, xⱼ>|, hᵢ the i-th canonical variate of X (unit norm; the variates are
  orthogonal), xⱼ the j-th feature of X over the examples; Σᵢ αᵢ = 1. The weights come from the
  FIRST argument, so pwcca(x, y) != pwcca(y, x) in general. Default `variance_kept` = 1 (no
  SVD step, every direction above the rank tolerance), as in google/svcca's pwcca.py.
  Differences from that script: it takes the weights from the side with fewer non-negligible
  features (pass that layer first to match), and it orthonormalises uᵀ(X - mean) + mean, which
  omits the Σxx^{-1/2} of the canonical variates; we use the canonical variates of the paper.

Rank: both sides are reduced to their directions with variance above `spectral.rank_rtol` of
the largest, and the rank and the number of directions kept are logged per layer. If
kₓ + k_y > n - 1, at least kₓ + k_y - (n - 1) canonical correlations are 1 whatever the data
(the spans must intersect in the (n-1)-dimensional centred space), so a layer keeping more than
(n - 1) / 2 directions is warned about: use many more examples than kept directions.

Summaries: U `[n, k]` (SVCCA), U and the projections Uᵀ X `[k, p]` (PWCCA).
"""

from absl import logging
import numpy as np

from vit_repr.similarity import inputs, spectral
from vit_repr.similarity.inputs import Prepared


def prepare(x: np.ndarray, name: str = "x", *, variance_kept: float,
            measure: str) -> Prepared:
  """One layer's CCA summary: U `[n, k]` (and Uᵀ X `[k, p]` for PWCCA)."""
  x = inputs.as_features(x, name)
  n, p = x.shape
  inputs.check_examples(n, 2, name, measure)
  xc, constant = inputs.centre(x)
  if constant:
    return inputs.undefined(measure, name, n, inputs.CONSTANT)
  lam, u = spectral.left_spectrum(xc)
  r = spectral.rank(lam, n, p)
  k = spectral.directions_kept(lam, r, variance_kept)
  logging.info("%s: layer %r: n = %d examples, p = %d features, rank %d (variances above "
               "%.1e of the largest), kept %d directions (%.6g of the variance, asked %g).",
               measure, name, n, p, r, spectral.rank_rtol(n, p), k,
               lam[:k].sum() / lam[:r].sum(), variance_kept)
  if 2 * k > n - 1:
    logging.warning(
        "%s: layer %r keeps %d directions with only n = %d examples: CCA against a layer keeping "
        "as many is degenerate (canonical correlations forced to 1 when k_x + k_y > n - 1). Use "
        "many more examples than kept directions, or a lower variance_kept.", measure, name, k, n)
  u = u[:, :k]
  return Prepared(name, n, (u, u.T @ xc) if measure == "pwcca" else (u,))


def _correlations(a: Prepared, b: Prepared):
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return None
  return np.linalg.svd(a.data[0].T @ b.data[0], full_matrices=False)


def compare_svcca(a: Prepared, b: Prepared) -> float:
  svd = _correlations(a, b)
  if svd is None:
    return float("nan")
  return float(np.mean(np.clip(svd[1], 0.0, 1.0)))


def compare_pwcca(a: Prepared, b: Prepared) -> float:
  svd = _correlations(a, b)
  if svd is None:
    return float("nan")
  rotation, rho, _ = svd                  # variates of x: hᵢ = Uₓ rotation[:, i], orthonormal
  alpha = np.abs(rotation.T @ a.data[1]).sum(1)      # Σⱼ |<hᵢ, xⱼ>|, xⱼ centred (hᵢ ⟂ 1)
  return float(np.sum(alpha * np.clip(rho, 0.0, 1.0)) / np.sum(alpha))
