"""Tests for vit_repr.similarity against direct NumPy/SciPy float64 formulas of the papers:
CKA (Kornblith 2019), SVCCA (Raghu 2017), PWCCA (Morcos 2018), Procrustes (Williams 2021), RSA
(Kriegeskorte 2008), mutual k-NN and CKNNA (Huh 2024); their invariances, metric properties,
the heatmap's layer order and the input checks."""

import logging

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from vit_repr import similarity
from vit_repr.similarity import api

# ---------------------------------------------------------------------------------------------
# Independent float64 references, written from the published formulas.


def _flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(len(x), -1)


def _centred(x):
  x = _flat(x)
  return x - x.mean(0)


def ref_cka(x, y):
  """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(K H L H), linear kernels."""
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = _flat(x) @ _flat(x).T, _flat(y) @ _flat(y).T
  hsic = lambda a, b: np.trace(a @ h @ b @ h)
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _inv_sqrt(c):
  w, v = np.linalg.eigh(c)
  return v @ np.diag(w**-0.5) @ v.T


def ref_cca(x, y):
  """Canonical correlations as the singular values of Σxx^{-1/2} Σxy Σyy^{-1/2} (full rank)."""
  x, y = _centred(x), _centred(y)
  n = len(x)
  sxx, syy, sxy = x.T @ x / (n - 1), y.T @ y / (n - 1), x.T @ y / (n - 1)
  u, rho, _ = np.linalg.svd(_inv_sqrt(sxx) @ sxy @ _inv_sqrt(syy), full_matrices=False)
  return rho, _inv_sqrt(sxx) @ u          # correlations, canonical weights of x


def ref_svd_reduce(x, variance_kept):
  """Raghu et al.: the leading singular directions explaining variance_kept of the variance."""
  u, s, _ = np.linalg.svd(_centred(x), full_matrices=False)
  k = 1
  while np.sum(s[:k]**2) / np.sum(s**2) < variance_kept:
    k += 1
  return u[:, :k] * s[:k]


def ref_svcca(x, y, variance_kept=0.99):
  return ref_cca(ref_svd_reduce(x, variance_kept), ref_svd_reduce(y, variance_kept))[0].mean()


def ref_pwcca(x, y):
  """Morcos et al. 2018: canonical variates of x, orthonormalised (QR), αᵢ = Σⱼ |<hᵢ, xⱼ>|."""
  rho, weights = ref_cca(x, y)
  q, _ = np.linalg.qr(_centred(x) @ weights)
  alpha = np.abs(q.T @ _flat(x)).sum(1)
  return np.sum(alpha / alpha.sum() * rho)


def ref_procrustes(x, y):
  """min over orthogonal R of ||X R - Y||_F on centred, unit-norm, zero-padded shapes."""
  x, y = _centred(x), _centred(y)
  x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
  p = max(x.shape[1], y.shape[1])
  x, y = (np.pad(a, ((0, 0), (0, p - a.shape[1]))) for a in (x, y))
  r, _ = scipy.linalg.orthogonal_procrustes(x, y)
  return np.linalg.norm(x @ r - y)


def ref_rsa(x, y, dissimilarity="correlation", comparison="spearman"):
  def rdm(a):
    a = _flat(a)
    if dissimilarity == "correlation":
      return scipy.spatial.distance.pdist(a, "correlation")
    return np.array([np.sqrt(np.sum((a[i] - a[j])**2))
                     for i in range(len(a)) for j in range(i + 1, len(a))])
  dx, dy = rdm(x), rdm(y)
  stat = scipy.stats.spearmanr if comparison == "spearman" else scipy.stats.pearsonr
  return stat(dx, dy)[0]


def ref_neighbours(x, k):
  """For each example, its k most cosine-similar other examples (ties: lower index)."""
  x = _flat(x)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  out = []
  for i in range(len(x)):
    others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-(x[i] @ x[j]), j))
    out.append(set(others[:k]))
  return out


def ref_mutual_knn(x, y, k):
  na, nb = ref_neighbours(x, k), ref_neighbours(y, k)
  return np.mean([len(a & b) / k for a, b in zip(na, nb)])


def ref_hsic1(kt, lt):
  """Song et al. (2012), eq. 5, on zero-diagonal matrices."""
  n = len(kt)
  one = np.ones(n)
  return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cknna(x, y, k):
  def unit_gram(a):
    a = _flat(a)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ a.T

  def mask_of(*neighbour_lists):
    n = len(neighbour_lists[0])
    m = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        m[i, j] = all(j in nl[i] for nl in neighbour_lists)
    return m

  kk, ll = unit_gram(x), unit_gram(y)
  na, nb = ref_neighbours(x, k), ref_neighbours(y, k)
  both, ma, mb = mask_of(na, nb), mask_of(na), mask_of(nb)
  return ref_hsic1(both * kk, both * ll) / np.sqrt(ref_hsic1(ma * kk, ma * kk)
                                                   * ref_hsic1(mb * ll, mb * ll))


# ---------------------------------------------------------------------------------------------
# Data.


def related(n, p, q, seed, decay=1.0):
  """Two layers sharing an 8-d latent plus noise, feature scales decaying by `decay`."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 8))
  x = np.tanh(z @ rng.normal(size=(8, p))) + 0.5 * rng.normal(size=(n, p))
  y = z @ rng.normal(size=(8, q)) + 0.5 * rng.normal(size=(n, q)) + 1.0
  return x * decay**np.arange(p), y * decay**np.arange(q)


OPTIONS = {  # measure -> options used in the generic tests
    "cka": {}, "angular_cka": {}, "svcca": {}, "pwcca": {}, "procrustes": {}, "rsa": {},
    "mutual_knn": {"k": 5}, "cknna": {"k": 5},
}
SELF = {"cka": 1, "angular_cka": 0, "svcca": 1, "pwcca": 1, "procrustes": 0, "rsa": 1,
        "mutual_knn": 1, "cknna": 1}

# ---------------------------------------------------------------------------------------------
# Values against the references.

REFERENCE_CASES = [
    # id, measure, options, reference, (n, p, q, decay)
    ("cka-tall", "cka", {}, ref_cka, (60, 12, 9, 1.0)),
    ("cka-wide", "cka", {}, ref_cka, (40, 100, 70, 1.0)),
    ("angular_cka", "angular_cka", {}, lambda x, y: np.arccos(ref_cka(x, y)), (40, 100, 70, 1.0)),
    ("svcca-0.99-truncating", "svcca", {}, ref_svcca, (80, 20, 15, 0.8)),
    ("svcca-0.9", "svcca", {"variance_kept": 0.9}, lambda x, y: ref_svcca(x, y, 0.9),
     (80, 20, 15, 0.9)),
    ("svcca-1.0-is-cca", "svcca", {"variance_kept": 1.0}, lambda x, y: ref_cca(x, y)[0].mean(),
     (80, 12, 9, 1.0)),
    ("pwcca-x-narrower", "pwcca", {}, ref_pwcca, (80, 9, 12, 1.0)),
    ("pwcca-x-wider", "pwcca", {}, ref_pwcca, (80, 12, 9, 1.0)),
    ("procrustes-tall", "procrustes", {}, ref_procrustes, (60, 12, 9, 1.0)),
    ("procrustes-wide", "procrustes", {}, ref_procrustes, (40, 100, 70, 1.0)),
    ("rsa-correlation-spearman", "rsa", {}, ref_rsa, (40, 30, 20, 1.0)),
    ("rsa-euclidean-spearman", "rsa", {"dissimilarity": "euclidean"},
     lambda x, y: ref_rsa(x, y, "euclidean"), (40, 30, 20, 1.0)),
    ("rsa-correlation-pearson", "rsa", {"comparison": "pearson"},
     lambda x, y: ref_rsa(x, y, "correlation", "pearson"), (40, 30, 20, 1.0)),
    ("rsa-euclidean-pearson", "rsa", {"dissimilarity": "euclidean", "comparison": "pearson"},
     lambda x, y: ref_rsa(x, y, "euclidean", "pearson"), (40, 30, 20, 1.0)),
    ("mutual_knn-k5", "mutual_knn", {"k": 5}, lambda x, y: ref_mutual_knn(x, y, 5),
     (40, 30, 20, 1.0)),
    ("mutual_knn-k1", "mutual_knn", {"k": 1}, lambda x, y: ref_mutual_knn(x, y, 1),
     (40, 30, 20, 1.0)),
    ("mutual_knn-default-k10", "mutual_knn", {}, lambda x, y: ref_mutual_knn(x, y, 10),
     (40, 30, 20, 1.0)),
    ("cknna-k5", "cknna", {"k": 5}, lambda x, y: ref_cknna(x, y, 5), (40, 30, 20, 1.0)),
    ("cknna-default-k10", "cknna", {}, lambda x, y: ref_cknna(x, y, 10), (40, 30, 20, 1.0)),
]


@pytest.mark.parametrize("measure,options,reference,shape",
                         [c[1:] for c in REFERENCE_CASES], ids=[c[0] for c in REFERENCE_CASES])
def test_matches_reference(measure, options, reference, shape):
  n, p, q, decay = shape
  x, y = related(n, p, q, seed=n + p, decay=decay)
  expected = reference(x, y)
  np.testing.assert_allclose(similarity.compare(x, y, measure, **options), expected,
                             rtol=1e-9, atol=1e-12)


def test_svcca_reference_case_truncates():
  """The 'svcca-0.99-truncating' case keeps fewer directions than features (else it would not
  test the selection)."""
  x, y = related(80, 20, 15, seed=100, decay=0.8)
  assert ref_svd_reduce(x, 0.99).shape[1] < 20 and ref_svd_reduce(y, 0.99).shape[1] < 15


CONVENIENCE = [
    ("linear_cka", {}, "cka"), ("angular_cka", {}, "angular_cka"),
    ("svcca", {"variance_kept": 0.9}, "svcca"), ("pwcca", {}, "pwcca"),
    ("procrustes_distance", {}, "procrustes"),
    ("rsa", {"dissimilarity": "euclidean", "comparison": "pearson"}, "rsa"),
    ("mutual_knn", {"k": 3}, "mutual_knn"), ("cknna", {"k": 3}, "cknna"),
]


@pytest.mark.parametrize("function,options,measure", CONVENIENCE, ids=[c[0] for c in CONVENIENCE])
def test_convenience_functions_are_compare(function, options, measure):
  x, y = related(50, 10, 8, seed=3)
  m = similarity.get_measure(measure, **options)
  expected = m.compare(m.prepare(x), m.prepare(y))
  assert getattr(similarity, function)(x, y, **options) == expected
  assert similarity.compare(x, y, measure, **options) == expected


def test_measure_table():
  assert similarity.MEASURES == ("cka", "angular_cka", "svcca", "pwcca", "procrustes", "rsa",
                                 "mutual_knn", "cknna")
  kinds = {name: similarity.get_measure(name).kind for name in similarity.MEASURES}
  assert {n for n, k in kinds.items() if k == "distance"} == {"angular_cka", "procrustes"}
  assert {n for n in similarity.MEASURES if similarity.get_measure(n).streaming} == {
      "cka", "angular_cka"}
  assert all(similarity.get_measure(n).reference for n in similarity.MEASURES)


def test_inputs_from_any_framework_are_flattened_in_float64():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_repr import cka  # pylint: disable=g-import-not-at-top
  x, y = related(30, 24, 12, seed=5)
  x4 = x.reshape(30, 2, 3, 4).astype(np.float32)
  expected = similarity.compare(x.astype(np.float32), y, "procrustes")
  assert similarity.compare(jnp.asarray(x4), y.tolist(), "procrustes") == expected
  np.testing.assert_allclose(similarity.linear_cka(x, y), float(cka.linear_cka(x, y)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Self-similarity, symmetry, invariances, metric properties.


@pytest.mark.parametrize("measure", similarity.MEASURES)
def test_self_comparison(measure):
  x, _ = related(50, 20, 20, seed=7)
  np.testing.assert_allclose(similarity.compare(x, x, measure, **OPTIONS[measure]),
                             SELF[measure], atol=1e-6)


@pytest.mark.parametrize("measure", [m for m in similarity.MEASURES
                                     if m not in ("pwcca", "cknna")])
def test_symmetric(measure):
  x, y = related(50, 20, 12, seed=8)
  np.testing.assert_allclose(similarity.compare(x, y, measure, **OPTIONS[measure]),
                             similarity.compare(y, x, measure, **OPTIONS[measure]), rtol=1e-10)


def test_cknna_nearly_symmetric_as_in_platonic_rep():
  """The mutual-neighbour mask is not symmetric, so neither is the HSIC1 term 1ᵀK̃L̃1."""
  x, y = related(50, 20, 12, seed=8)
  xy, yx = similarity.cknna(x, y, k=5), similarity.cknna(y, x, k=5)
  np.testing.assert_allclose((xy, yx), (ref_cknna(x, y, 5), ref_cknna(y, x, 5)), rtol=1e-9)
  assert 0 < abs(xy - yx) < 1e-2


def test_pwcca_is_asymmetric_weights_from_first_argument():
  x, y = related(80, 10, 10, seed=9)
  xy, yx = similarity.pwcca(x, y), similarity.pwcca(y, x)
  assert abs(xy - yx) > 1e-3
  np.testing.assert_allclose((xy, yx), (ref_pwcca(x, y), ref_pwcca(y, x)), rtol=1e-9)


def _random_orthogonal(p, rng):
  q, r = np.linalg.qr(rng.normal(size=(p, p)))
  return q * np.sign(np.diag(r))


TRANSFORMS = {
    "orthogonal": lambda x, rng: x @ _random_orthogonal(x.shape[1], rng),
    "scale": lambda x, rng: 3.7 * x,
    "translation": lambda x, rng: x + 3 * rng.normal(size=x.shape[1]),
    "invertible_linear": lambda x, rng: x @ (np.eye(x.shape[1])
                                             + 0.5 * rng.normal(size=(x.shape[1],) * 2)),
    "permute_and_flip": lambda x, rng: (x * rng.choice([-1, 1], x.shape[1]))[
        :, rng.permutation(x.shape[1])],
    "add_constant": lambda x, rng: x + 2.5,
}
INVARIANCE_CASES = [
    # measure, options, transform, transformed argument, invariant?
    *[(m, {}, t, 0, inv) for m in ("cka", "angular_cka", "procrustes")
      for t, inv in (("orthogonal", True), ("scale", True), ("translation", True),
                     ("invertible_linear", False))],
    *[("svcca", {"variance_kept": 1.0}, t, 0, True)
      for t in ("orthogonal", "scale", "translation", "invertible_linear")],
    *[("svcca", {}, t, 0, True) for t in ("orthogonal", "scale", "translation")],
    *[("pwcca", {}, t, 0, inv) for t, inv in (
        ("permute_and_flip", True), ("scale", True), ("translation", True),
        ("orthogonal", False), ("invertible_linear", False))],
    *[("pwcca", {}, t, 1, True) for t in ("invertible_linear", "orthogonal", "translation")],
    *[("rsa", {"dissimilarity": "euclidean"}, t, 0, inv) for t, inv in (
        ("orthogonal", True), ("scale", True), ("translation", True),
        ("invertible_linear", False))],
    ("rsa", {"dissimilarity": "euclidean", "comparison": "pearson"}, "orthogonal", 0, True),
    *[("rsa", {}, t, 0, inv) for t, inv in (
        ("scale", True), ("add_constant", True), ("permute_and_flip", False),
        ("translation", False), ("orthogonal", False))],
    *[(m, {"k": 5}, t, 0, inv) for m in ("mutual_knn", "cknna") for t, inv in (
        ("orthogonal", True), ("scale", True), ("translation", False))],
]


@pytest.mark.parametrize(
    "measure,options,transform,argument,invariant", INVARIANCE_CASES,
    ids=[f"{m}{''.join(f'-{v}' for v in o.values())}-{t}-{'xy'[a]}-"
         f"{'invariant' if inv else 'changes'}" for m, o, t, a, inv in INVARIANCE_CASES])
def test_invariances(measure, options, transform, argument, invariant):
  x, y = related(80, 12, 10, seed=11)
  if measure == "rsa" and transform == "permute_and_flip":   # a permutation alone keeps r
    transform, invariant = "permute", True
    pair = [x, y]
    pair[argument] = pair[argument][:, np.random.default_rng(0).permutation(12)]
  else:
    pair = [x, y]
    pair[argument] = TRANSFORMS[transform](pair[argument], np.random.default_rng(12))
  before = similarity.compare(x, y, measure, **options)
  after = similarity.compare(*pair, measure, **options)
  if invariant:
    np.testing.assert_allclose(after, before, rtol=1e-8, atol=1e-10)
  else:
    assert abs(after - before) > 1e-3, (before, after)


def test_rsa_correlation_changes_under_sign_flips():
  """Flipping features' signs changes the examples' Pearson correlations."""
  x, y = related(60, 12, 10, seed=13)
  flipped = x * np.where(np.arange(12) % 2, -1.0, 1.0)
  assert abs(similarity.rsa(flipped, y) - similarity.rsa(x, y)) > 1e-3


@pytest.mark.parametrize("measure", ["angular_cka", "procrustes"])
def test_triangle_inequality(measure):
  rng = np.random.default_rng(14)
  for trial in range(40):
    x, y = rng.normal(size=(2, 30, 6))
    t = trial / 40
    z = (1 - t) * x + t * y + 0.01 * rng.normal(size=x.shape)
    d = lambda a, b: similarity.compare(a, b, measure)
    assert d(x, y) <= d(x, z) + d(z, y) + 1e-12, trial


def test_pwcca_ignores_duplicated_features():
  """Rank-deficient x (each feature twice): the same CCA and the same weights."""
  x, y = related(80, 10, 8, seed=15)
  doubled = np.concatenate([x, x], axis=1)
  np.testing.assert_allclose(similarity.pwcca(doubled, y), similarity.pwcca(x, y), rtol=1e-9)
  np.testing.assert_allclose(similarity.svcca(doubled, y, variance_kept=1.0),
                             similarity.svcca(x, y, variance_kept=1.0), rtol=1e-9)


def test_rsa_spearman_averages_tied_ranks():
  rng = np.random.default_rng(16)
  x, y = rng.integers(0, 3, size=(2, 30, 3)).astype(float)   # many equal distances
  dx = scipy.spatial.distance.pdist(x)
  assert len(np.unique(dx)) < len(dx) / 10
  np.testing.assert_allclose(similarity.rsa(x, y, dissimilarity="euclidean"),
                             ref_rsa(x, y, "euclidean"), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Heatmaps.

BLOCKS = [f"block_{i}" for i in range(12)]   # computation order; sorted order differs


def _blocks(n=40, p=16, seed=17):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, p))
  layers = {}
  for i, name in enumerate(BLOCKS):
    z = np.tanh(z @ (np.eye(p) + 0.4 * rng.normal(size=(p, p)) / np.sqrt(p))) \
        + 0.2 * rng.normal(size=(n, p))
    layers[name] = z * (1 + i)
  return layers


@pytest.mark.parametrize("measure", similarity.MEASURES)
def test_heatmap_is_pairwise_compare_in_key_order(measure):
  layers = _blocks()
  other = {name: layers[name][:, :10] for name in ["block_11", "block_2", "block_10", "block_0"]}
  options = OPTIONS[measure]
  within = similarity.heatmap(layers, measure=measure, **options)
  across = similarity.heatmap(layers, other, measure, **options)
  assert within.shape == (12, 12) and across.shape == (12, 4)
  for i, a in enumerate(BLOCKS):
    for j, b in enumerate(BLOCKS):
      assert within[i, j] == similarity.compare(layers[a], layers[b], measure, **options)
    for j, b in enumerate(other):
      assert across[i, j] == similarity.compare(layers[a], other[b], measure, **options)
  assert len(np.unique(np.round(within, 12))) > 12     # distinct entries: an order bug shows


def test_heatmap_prepares_each_layer_once(monkeypatch):
  calls = []
  real = api.get_measure

  def counting(name, **options):
    m = real(name, **options)
    def prepare(x, name="x"):
      calls.append(name)
      return m.prepare(x, name)
    return api.Measure(m.name, m.kind, m.streaming, m.reference, prepare, m.compare)

  monkeypatch.setattr(api, "get_measure", counting)
  layers = _blocks()
  similarity.heatmap(layers, measure="svcca")
  assert calls == BLOCKS
  calls.clear()
  similarity.heatmap(layers, {"b": layers["block_3"], "a": layers["block_1"]}, "pwcca")
  assert calls == BLOCKS + ["b", "a"]


@pytest.mark.parametrize("measure", similarity.MEASURES)
def test_constant_layer_gives_nan_and_warning(measure, caplog):
  layers = {name: layers for name, layers in list(_blocks().items())[:4]}
  layers["block_2"] = np.full_like(layers["block_2"], 0.3)
  with caplog.at_level(logging.WARNING):
    values = similarity.heatmap(layers, measure=measure, **OPTIONS[measure])
  assert np.isnan(values[2]).all() and np.isnan(values[:, 2]).all()
  assert np.isfinite(np.delete(np.delete(values, 2, 0), 2, 1)).all()
  assert any("block_2" in r.getMessage() and "undefined" in r.getMessage()
             for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Scale and rank deficiency.


@pytest.mark.parametrize("measure", similarity.MEASURES)
def test_n256_p2048(measure):
  x, y = related(256, 2048, 1024, seed=18)
  value = similarity.compare(x, y, measure)
  low, high = (-1, 1) if measure in ("rsa", "cknna") else (0, np.sqrt(2))
  assert np.isfinite(value) and low <= value <= high
  np.testing.assert_allclose(similarity.compare(x, x, measure), SELF[measure], atol=1e-6)


def test_rank_deficient_wide(caplog):
  """p = 4096 features of rank 50: the CCA measures find rank 50 and the common span."""
  rng = np.random.default_rng(19)
  a = rng.normal(size=(256, 50))
  x_factor = rng.normal(size=(50, 4096))
  x, y = a @ x_factor, a @ rng.normal(size=(50, 3000)) + 1.0
  with caplog.at_level(logging.INFO):
    for measure in ("svcca", "pwcca"):
      np.testing.assert_allclose(similarity.compare(x, y, measure, variance_kept=1.0), 1,
                                 rtol=1e-9)
  assert sum("rank 50 " in r.getMessage() for r in caplog.records) == 4
  factors = rng.normal(size=(256, 50)), rng.normal(size=(50, 4096))
  z = factors[0] @ factors[1]
  for measure in similarity.MEASURES:
    assert np.isfinite(similarity.compare(x, z, measure)), measure
  # ||Xcᵀ Zc||_* from the rank-50 factors: X = A B, Xcᵀ Zc = Bᵀ Acᵀ Cc D, Bᵀ = Q R.
  (ac, b), (cc, d) = ((f[0] - f[0].mean(0), f[1]) for f in ((a, x_factor), factors))
  rb, rd = np.linalg.qr(b.T)[1], np.linalg.qr(d.T)[1]
  nuclear = np.linalg.svd(rb @ ac.T @ cc @ rd.T, compute_uv=False).sum()
  nuclear /= np.linalg.norm(ac @ b) * np.linalg.norm(cc @ d)
  np.testing.assert_allclose(similarity.procrustes_distance(x, z), np.sqrt(2 - 2 * nuclear),
                             rtol=1e-8)


# ---------------------------------------------------------------------------------------------
# Bad input.

_X, _Y = related(30, 6, 5, seed=20)
_NAN = _X.copy()
_NAN[4, 2] = np.nan
BAD = [
    ("mismatched-n", lambda: similarity.compare(_X[:20], _Y), r"same examples.*shape \(20, 6\)"),
    ("mismatched-n-heatmap", lambda: similarity.heatmap({"a": _X, "b": _Y[:20]}),
     r"layers_a\['b'\] has 20 examples, the first layer has 30"),
    ("mismatched-n-across", lambda: similarity.heatmap({"a": _X}, {"b": _Y[:20]}),
     r"layers_b\['b'\] has 20 examples"),
    ("one-example", lambda: similarity.compare(_X[:1], _Y[:1], "procrustes"),
     "at least 2 examples.*n = 1"),
    ("rsa-two-examples", lambda: similarity.rsa(_X[:2], _Y[:2]), "at least 3 examples"),
    ("knn-n-not-above-k", lambda: similarity.mutual_knn(_X[:10], _Y[:10], k=10),
     r"at least 11 examples \(k = 10"),
    ("cknna-n-not-above-k", lambda: similarity.cknna(_X[:5], _Y[:5], k=5), "at least 6"),
    ("nan-features", lambda: similarity.compare(_NAN, _Y), r"x has 1 non-finite.*example 4"),
    ("nan-layer-named", lambda: similarity.heatmap({"ok": _X, "block_7": _NAN}, measure="rsa"),
     r"layers_a\['block_7'\] has 1 non-finite"),
    ("inf-features", lambda: similarity.svcca(_X, _Y * np.inf), "y has 150 non-finite"),
    ("complex", lambda: similarity.compare(_X + 1j, _Y), "real numbers"),
    ("no-example-axis", lambda: similarity.compare(np.float64(3.0), _Y), "leading example axis"),
    ("unknown-measure", lambda: similarity.compare(_X, _Y, "cca"),
     r"Unknown similarity measure 'cca'; known: cka, angular_cka, svcca"),
    ("unknown-option", lambda: similarity.get_measure("svcca", k=3),
     r"Unknown option\(s\) 'k' for measure 'svcca': its options are 'variance_kept'"),
    ("option-for-plain-measure", lambda: similarity.compare(_X, _Y, "cka", k=3),
     "'cka': it takes no options"),
    ("variance-kept-zero", lambda: similarity.svcca(_X, _Y, variance_kept=0),
     r"Bad value 0 for option 'variance_kept'.*allowed: a number in \(0, 1\]"),
    ("variance-kept-above-one", lambda: similarity.get_measure("pwcca", variance_kept=1.5),
     r"Bad value 1.5.*\(0, 1\]"),
    ("variance-kept-bool", lambda: similarity.get_measure("svcca", variance_kept=True),
     "Bad value True"),
    ("dissimilarity", lambda: similarity.rsa(_X, _Y, dissimilarity="cosine"),
     r"'cosine' for option 'dissimilarity'.*allowed: 'correlation', 'euclidean'"),
    ("comparison", lambda: similarity.get_measure("rsa", comparison="kendall"),
     r"allowed: 'spearman', 'pearson'"),
    ("k-zero", lambda: similarity.mutual_knn(_X, _Y, k=0), "allowed: an integer >= 1"),
    ("k-float", lambda: similarity.get_measure("mutual_knn", k=2.5), "Bad value 2.5"),
    ("cknna-k-one", lambda: similarity.cknna(_X, _Y, k=1), "allowed: an integer >= 2"),
    ("empty-heatmap", lambda: similarity.heatmap({}), "non-empty mapping"),
    ("list-heatmap", lambda: similarity.heatmap([_X, _Y]), "non-empty mapping.*got list"),
]


@pytest.mark.parametrize("call,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_summaries_of_different_examples_refused():
  m = similarity.get_measure("svcca")
  with pytest.raises(ValueError, match="a has 30 examples, b has 20"):
    m.compare(m.prepare(_X, "a"), m.prepare(_Y[:20], "b"))


def test_constant_example_in_rsa_correlation(caplog):
  x, y = related(30, 8, 6, seed=21)
  x[3] = 1.5
  with caplog.at_level(logging.WARNING):
    value = similarity.rsa(x, y)
  assert np.isfinite(value) and any("example 3" in r.getMessage() for r in caplog.records)
  assert np.isfinite(similarity.mutual_knn(np.where(np.arange(30)[:, None] == 3, 0.0, x), y))


# --- Permutation null ------------------------------------------------------------------------


@pytest.mark.parametrize("measure,reference,larger_is_alike", [
    ("cka", ref_cka, True), ("procrustes", ref_procrustes, False)])
def test_permutation_test_matches_explicit_shuffles(measure, reference, larger_is_alike):
  """Values, p-values and null means against the reference formula applied to B's examples
  shuffled by the same generator (np.random.default_rng(seed).permutation, K times)."""
  rng = np.random.default_rng(5)
  a = {f"a{i}": rng.standard_normal((30, 6)) for i in range(3)}
  b = {"b0": a["a0"] @ rng.standard_normal((6, 5)) + 0.3 * rng.standard_normal((30, 5)),
       "b1": rng.standard_normal((30, 4))}
  test = similarity.permutation_test(a, b, measure, num_permutations=19, seed=3)
  shuffles = np.random.default_rng(3)
  orders = [shuffles.permutation(30) for _ in range(19)]
  for i, x in enumerate(a.values()):
    for j, y in enumerate(b.values()):
      value = reference(x, y)
      null = np.array([reference(x, y[order]) for order in orders])
      extreme = (null >= value) if larger_is_alike else (null <= value)
      assert test.values[i, j] == pytest.approx(value, abs=1e-10)
      assert test.p_value[i, j] == pytest.approx((1 + extreme.sum()) / 20)
      assert test.null_mean[i, j] == pytest.approx(null.mean(), abs=1e-10)
  assert test.p_value[0, 0] == pytest.approx(1 / 20)  # b0 is a noisy linear map of a0.


def test_permutation_null_is_calibrated_for_unrelated_layers():
  """Independent layers: p-values spread over (0, 1] (not piled at the minimum), and the chance
  level of CKA between random layers is well above 0 (what the null is for)."""
  rng = np.random.default_rng(8)
  a = {f"a{i}": rng.standard_normal((24, 40)) for i in range(6)}
  b = {f"b{i}": rng.standard_normal((24, 40)) for i in range(6)}
  test = similarity.permutation_test(a, b, "cka", num_permutations=39, seed=0)
  assert (test.p_value < 0.05).mean() < 0.15
  assert 0.3 < np.median(test.p_value) < 0.7
  assert np.all(test.null_mean > 0.2)
  np.testing.assert_allclose(test.null_mean, test.values, atol=0.15)


def test_permutation_test_within_a_model():
  rng = np.random.default_rng(2)
  a = {f"block_{i}": rng.standard_normal((20, 5)) for i in range(3)}
  test = similarity.permutation_test(a, measure="rsa", num_permutations=9)
  np.testing.assert_allclose(np.diag(test.p_value), 0.1)  # each layer against itself
  np.testing.assert_allclose(np.diag(test.values), 1.0)


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_permutation_count_must_be_positive(count):
  with pytest.raises(ValueError, match="num_permutations must be an integer >= 1"):
    similarity.permutation_test({"a": np.ones((5, 2))}, num_permutations=count)
