"""Representational similarity analysis (Kriegeskorte, Mur & Bandettini, "Representational
similarity analysis – connecting the branches of systems neuroscience", Front. Syst. Neurosci.
2008).

Each layer's representational dissimilarity matrix (RDM) over the n examples:
* 'correlation' (default): 1 - Pearson r between two examples' feature vectors (each example
  centred over its features), as rsatoolbox's `calc_rdm_correlation`. An example whose features
  are all equal has no correlation: it is given r = 0 (dissimilarity 1) to every other example,
  with a logged warning.
* 'euclidean': the Euclidean distance between the examples' feature vectors, from direct
  differences (`scipy.spatial.distance.pdist`), so equal distances tie exactly. (rsatoolbox's
  'euclidean' is the squared distance divided by p: the same ranks, so the same Spearman RSA.)
Two RDMs are compared over their n (n - 1) / 2 off-diagonal upper-triangle entries by
'spearman' (default; Pearson correlation of the ranks, ties given their average rank, as
`scipy.stats.spearmanr`) or 'pearson'. Summary: the standardised (ranked) upper triangle,
n (n - 1) / 2 values.
"""

from absl import logging
import numpy as np
import scipy.spatial.distance
import scipy.stats

from vit_repr.similarity import inputs
from vit_repr.similarity.inputs import Prepared

DISSIMILARITIES = ("correlation", "euclidean")
COMPARISONS = ("spearman", "pearson")
_EPS = np.finfo(np.float64).eps


def _rdm(x: np.ndarray, dissimilarity: str, name: str) -> tuple[np.ndarray, float]:
  """The RDM's off-diagonal upper triangle (row-major, n (n - 1) / 2 entries) and the scale
  of its entries (for the constant-RDM check)."""
  upper = np.triu_indices(x.shape[0], 1)
  if dissimilarity == "correlation":
    xm = x - x.mean(1, keepdims=True)
    norms = np.linalg.norm(xm, axis=1)
    flat = norms <= 4 * x.shape[1] * _EPS * np.linalg.norm(x, axis=1)
    if flat.any():
      logging.warning("rsa: layer %r has %d examples whose features are all equal (first: "
                      "example %d); their correlation dissimilarity to every other example is "
                      "set to 1 (r = 0).", name, int(flat.sum()), int(np.flatnonzero(flat)[0]))
    xm = np.where(flat[:, None], 0.0, xm / np.where(flat, 1.0, norms)[:, None])
    return 1.0 - (xm @ xm.T)[upper], 1.0
  # Direct differences, not the Gram: equal distances stay exactly equal (ties for Spearman).
  spread = float(np.linalg.norm(x - x.mean(0)) / np.sqrt(x.shape[0]))
  return scipy.spatial.distance.pdist(x, "euclidean"), spread


def prepare(x: np.ndarray, name: str = "x", *, dissimilarity: str,
            comparison: str) -> Prepared:
  """One layer's standardised (ranked, for 'spearman') RDM upper triangle."""
  x = inputs.as_features(x, name)
  n = x.shape[0]
  inputs.check_examples(n, 3, name, "rsa", " (an RDM needs at least 2 off-diagonal entries)")
  if inputs.centre(x)[1]:
    return inputs.undefined("rsa", name, n, inputs.CONSTANT)
  values, scale = _rdm(x, dissimilarity, name)
  if np.ptp(values) <= 1e-12 * scale:
    return inputs.undefined("rsa", name, n, f"all its {dissimilarity} dissimilarities are equal")
  if comparison == "spearman":
    values = scipy.stats.rankdata(values, method="average")
  values = values - values.mean()
  return Prepared(name, n, values / np.linalg.norm(values))


def compare(a: Prepared, b: Prepared) -> float:
  inputs.check_pair(a, b)
  if a.data is None or b.data is None:
    return float("nan")
  return float(np.clip(np.dot(a.data, b.data), -1.0, 1.0))
