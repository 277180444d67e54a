"""Linear CKA, angular CKA and the Procrustes shape distance: measures of centred Grams.

* Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML
  2019) with the biased HSIC: CKA = <K̄, L̄>_F / (||K̄||_F ||L̄||_F), K̄ = H X Xᵀ H the centred
  linear Gram. Summary: K̄ / ||K̄||_F, an n x n matrix.
* Angular CKA (Williams et al., "Generalized Shape Metrics on Neural Representations", NeurIPS
  2021): arccos(CKA) in radians, the angle between the normalised centred Grams: a metric.
* Procrustes distance (Williams et al. 2021, Euclidean shape distance on normalised shapes):
  centre each side, scale to unit Frobenius norm, d = min_Q ||X Q - Y||_F over orthogonal Q
  (zero-padding the narrower side) = sqrt(max(0, 2 - 2 ||Xᵀ Y||_*)). Ding et al. ("Grounding
  Representation Similarity with Statistical Testing", NeurIPS 2021) report d². Summary: Z
  `[n, min(n, p)]` with Z Zᵀ = X Xᵀ (X itself when p <= n), so ||Xᵀ Y||_* = ||Zₓᵀ Z_y||_*.
"""

import numpy as np

from vit_repr.similarity import inputs, spectral
from vit_repr.similarity.inputs import Prepared


def prepare_cka(x: np.ndarray, name: str = "x", *, measure: str = "cka") -> Prepared:
  x = inputs.as_features(x, name)
  n = x.shape[0]
  inputs.check_examples(n, 2, name, measure)
  xc, constant = inputs.centre(x)
  if constant:
    return inputs.undefined(measure, name, n, inputs.CONSTANT)
  gram = xc @ xc.T
  return Prepared(name, n, gram / np.linalg.norm(gram))


def compare_cka(a: Prepared, b: Prepared) -> float:
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return float("nan")
  return float(np.vdot(a.data, b.data))


def compare_angular_cka(a: Prepared, b: Prepared) -> float:
  return float(np.arccos(np.clip(compare_cka(a, b), -1.0, 1.0)))


def prepare_procrustes(x: np.ndarray, name: str = "x") -> Prepared:
  x = inputs.as_features(x, name)
  n, p = x.shape
  inputs.check_examples(n, 2, name, "procrustes")
  xc, constant = inputs.centre(x)
  if constant:
    return inputs.undefined("procrustes", name, n, inputs.CONSTANT)
  if p > n:
    lam, u = spectral.left_spectrum(xc)
    xc = u * np.sqrt(lam)
  return Prepared(name, n, xc / np.linalg.norm(xc))


def compare_procrustes(a: Prepared, b: Prepared) -> float:
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return float("nan")
  nuclear = np.linalg.svd(a.data.T @ b.data, compute_uv=False).sum()
  return float(np.sqrt(max(0.0, 2.0 - 2.0 * nuclear)))
