"""Mutual k-nearest-neighbour alignment and CKNNA (Huh, Cheung, Wang & Isola, "The Platonic
Representation Hypothesis", ICML 2024), as defined in minyoungg/platonic-rep (metrics.py, and
measure_alignment.py for the feature normalisation).

Shared steps, per layer:
* each example's feature vector is scaled to unit L2 norm (x / max(||x||, 1e-12), as
  `F.normalize`; no centring, so these measures are NOT translation invariant). The repository
  also clips features at their 0.95 quantile of |x| before this (`prepare_features`); we do not;
* K = X Xᵀ, the cosine similarities between examples;
* each example's k nearest neighbours: the k largest K[i, j] over j != i (self excluded); ties
  go to the lower example index (torch's `topk`/`argsort` leave them unspecified).

* mutual_knn: the mean over examples i of |N_A(i) ∩ N_B(i)| / k.
* cknna (unbiased variant, the repository's default): M = M_A ∘ M_B, the neighbour indicator
  matrices multiplied entrywise (M[i, j] = 1 when j is among the k nearest neighbours of i in
  both layers; not symmetrised), and
    CKNNA = HSIC1(M ∘ K, M ∘ L) / sqrt(HSIC1(M_A ∘ K, M_A ∘ K) · HSIC1(M_B ∘ L, M_B ∘ L)),
  HSIC1 the unbiased estimator of Song et al. (2012, eq. 5) written as in the repository for
  these non-symmetric matrices: with K̃, L̃ zero-diagonal,
    [tr(K̃ L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2 · 1ᵀK̃L̃1 / (n-2)] / (n (n-3)).
  The repository adds 1e-6 to the denominator; we do not (NaN, with a warning, where the
  self-terms' product is not positive). It requires k >= 2. Not exactly symmetric: M is not
  symmetric, so 1ᵀK̃L̃1 != 1ᵀL̃K̃1 and swapping the layers moves the value slightly (by ~1e-3).
Summaries: the n x n neighbour mask (mutual_knn); K, the mask and the self-term (cknna).
"""

from absl import logging
import numpy as np

from vit_repr.similarity import inputs
from vit_repr.similarity.inputs import Prepared


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
  """Unbiased HSIC (Song et al. 2012, eq. 5) of two zero-diagonal, possibly non-symmetric n x n
  matrices, with tr(K̃ L̃) = Σ K̃ ∘ L̃ᵀ as in platonic-rep."""
  n = k.shape[0]
  value = (np.sum(k * l.T) + k.sum() * l.sum() / ((n - 1) * (n - 2))
           - 2.0 * (k.sum(0) @ l.sum(1)) / (n - 2))
  return float(value / (n * (n - 3)))


def prepare(x: np.ndarray, name: str = "x", *, k: int, measure: str) -> Prepared:
  """One layer's neighbour mask (and cosine similarities and self-term for cknna)."""
  x = inputs.as_features(x, name)
  n = x.shape[0]
  minimum = max(k + 1, 4) if measure == "cknna" else k + 1
  inputs.check_examples(n, minimum, name, measure,
                        f" (k = {k} neighbours besides the example itself"
                        + (", and HSIC1 needs 4" if measure == "cknna" else "") + ")")
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if inputs.centre(x)[1]:
    return inputs.undefined(measure, name, n, "after scaling each example to unit norm, every "
                            "example has the same features, so neighbours are undefined")
  gram = x @ x.T
  ranked = np.where(np.eye(n, dtype=bool), -np.inf, gram)
  neighbours = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
  mask = np.zeros((n, n), bool)
  mask[np.arange(n)[:, None], neighbours] = True
  if measure == "mutual_knn":
    return Prepared(name, n, (mask, k))
  masked = np.where(mask, gram, 0.0)
  return Prepared(name, n, (gram, mask, hsic1(masked, masked)))


def compare_mutual_knn(a: Prepared, b: Prepared) -> float:
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return float("nan")
  (mask_a, k), (mask_b, _) = a.data, b.data
  return float(np.mean(np.sum(mask_a & mask_b, 1) / k))


def compare_cknna(a: Prepared, b: Prepared) -> float:
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return float("nan")
  (gram_a, mask_a, self_a), (gram_b, mask_b, self_b) = a.data, b.data
  both = mask_a & mask_b
  cross = hsic1(np.where(both, gram_a, 0.0), np.where(both, gram_b, 0.0))
  if not self_a * self_b > 0:
    logging.warning("cknna is undefined (NaN) for %r vs %r: the product of their masked "
                    "self-HSICs is %g, not positive.", a.name, b.name, self_a * self_b)
    return float("nan")
  return float(cross / np.sqrt(self_a * self_b))
