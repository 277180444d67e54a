"""Tests for vit_repr.cka against direct NumPy float64 formulas (Kornblith 2019, Song 2012)."""

import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO_ROOT, run_python
from vit_repr import cka
from vit_repr.cka import host_grams, minibatch, sharded_update

# ---------------------------------------------------------------------------------------------
# Independent float64 references, written from the published formulas.


def ref_gram_linear(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x @ x.T


def ref_gram_rbf(x, sigma_frac):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  sq_dist = ((x[:, None, :] - x[None, :, :])**2).sum(-1)
  return np.exp(-sq_dist / (2 * sigma_frac**2 * np.median(sq_dist)))


def ref_hsic_biased(k, l):
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1)**2


def ref_hsic1(k, l):
  """Song et al. (2012), eq. 5: the three explicit sums over K̃, L̃ (zero diagonals)."""
  n = len(k)
  kt, lt = k * (1 - np.eye(n)), l * (1 - np.eye(n))
  one = np.ones(n)
  return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka(k, l, hsic):
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_batch_terms(x, y):
  """Per-minibatch (HSIC1(K,L), HSIC1(K,K), HSIC1(L,L)) for stacked batches [B, b, ...]."""
  def grams(a):
    a = np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1)
    g = np.einsum("bip,bjp->bij", a, a)
    return g * (1 - np.eye(a.shape[1]))

  def hsic1(kt, lt):
    n = kt.shape[-1]
    trace = np.einsum("bij,bij->b", kt, lt)
    total = kt.sum((1, 2)) * lt.sum((1, 2)) / ((n - 1) * (n - 2))
    cross = np.einsum("bi,bi->b", kt.sum(2), lt.sum(2)) * 2 / (n - 2)
    return (trace + total - cross) / (n * (n - 3))

  k, l = grams(x), grams(y)
  return hsic1(k, l), hsic1(k, k), hsic1(l, l)


def ref_minibatch_cka(x, y, b):
  """Minibatch CKA over consecutive batches of b (remainder dropped)."""
  nb = len(x) // b
  batches = lambda a: np.asarray(a)[:nb * b].reshape(nb, b, *np.shape(a)[1:])
  xy, xx, yy = ref_batch_terms(batches(x), batches(y))
  return xy.mean() / np.sqrt(xx.mean() * yy.mean())


def ref_delta_stderr(xy, xx, yy):
  t = np.stack([xy, xx, yy])
  m = t.mean(1)
  c = m[0] / np.sqrt(m[1] * m[2])
  g = np.array([1 / np.sqrt(m[1] * m[2]), -c / (2 * m[1]), -c / (2 * m[2])])
  return np.sqrt(g @ np.cov(t) @ g / t.shape[1])


def ref_jackknife_stderr(xy, xx, yy):
  num = len(xy)
  loo = lambda a: (a.sum() - a) / (num - 1)
  theta = loo(xy) / np.sqrt(loo(xx) * loo(yy))
  return np.sqrt((num - 1) / num * np.sum((theta - theta.mean())**2))


def features(seed, n=64, p=12, q=9, offset=3.0):
  """Two related representations with non-zero means: x [n, p], y [n, q]."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, p)) + offset
  y = np.tanh(x @ rng.normal(size=(p, q))) + 0.3 * rng.normal(size=(n, q)) - offset
  return x.astype(np.float32), y.astype(np.float32)


def minibatch_one(x, y):
  return cka.minibatch_cka([x], [y], batch_size=16)[0, 0]


ESTIMATORS = {
    "linear-gram": (lambda x, y: cka.linear_cka(x, y, path="gram"),
                    lambda x, y: ref_cka(ref_gram_linear(x), ref_gram_linear(y),
                                         ref_hsic_biased)),
    "linear-features": (lambda x, y: cka.linear_cka(x, y, path="features"),
                        lambda x, y: ref_cka(ref_gram_linear(x), ref_gram_linear(y),
                                             ref_hsic_biased)),
    "debiased-gram": (lambda x, y: cka.debiased_cka(x, y, path="gram"),
                      lambda x, y: ref_cka(ref_gram_linear(x), ref_gram_linear(y), ref_hsic1)),
    "debiased-features": (lambda x, y: cka.debiased_cka(x, y, path="features"),
                          lambda x, y: ref_cka(ref_gram_linear(x), ref_gram_linear(y),
                                               ref_hsic1)),
    "rbf": (lambda x, y: cka.rbf_cka(x, y, 0.8),
            lambda x, y: ref_cka(ref_gram_rbf(x, 0.8), ref_gram_rbf(y, 0.8), ref_hsic_biased)),
    "rbf-debiased": (lambda x, y: cka.rbf_cka(x, y, 0.8, debiased=True),
                     lambda x, y: ref_cka(ref_gram_rbf(x, 0.8), ref_gram_rbf(y, 0.8),
                                          ref_hsic1)),
    "minibatch": (minibatch_one, lambda x, y: ref_minibatch_cka(x, y, 16)),
}


# ---------------------------------------------------------------------------------------------
# Kernels, HSIC and full-batch CKA.


def test_grams_match_reference():
  x, _ = features(0, n=20)
  np.testing.assert_allclose(cka.gram_linear(x), ref_gram_linear(x), rtol=1e-5)
  np.testing.assert_allclose(cka.gram_rbf(x, 0.6), ref_gram_rbf(x, 0.6), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [4, 5, 30], ids=lambda n: f"n{n}")
def test_hsic_estimators_match_reference(n):
  x, y = features(1, n=n)
  k, l = ref_gram_linear(x), ref_gram_rbf(y, 0.5)
  np.testing.assert_allclose(cka.hsic_biased(k, l), ref_hsic_biased(k, l), rtol=2e-4)
  np.testing.assert_allclose(cka.hsic_unbiased(k, l), ref_hsic1(k, l), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_cka_matches_float64_reference(name):
  fn, ref = ESTIMATORS[name]
  x, y = features(2)
  expected = ref(x, y)
  assert 0.1 < expected < 0.95  # a non-trivial value
  np.testing.assert_allclose(fn(x, y), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_cka_self_is_one_and_symmetric(name):
  fn, _ = ESTIMATORS[name]
  x, y = features(3)
  np.testing.assert_allclose(fn(x, x), 1.0, atol=1e-5)
  np.testing.assert_allclose(fn(x, y), fn(y, x), atol=1e-6)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(name):
  fn, _ = ESTIMATORS[name]
  x, y = features(4)
  q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(x.shape[1], x.shape[1])))
  np.testing.assert_allclose(fn(x @ q.astype(np.float32) * 7.5, y), fn(x, y), atol=2e-5)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if not n.startswith("rbf")])
def test_not_invariant_to_invertible_linear_maps(name):
  fn, _ = ESTIMATORS[name]
  x, _ = features(5, n=128)
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
  a = (q * np.logspace(0, 2, x.shape[1])).astype(np.float32)  # invertible, anisotropic
  assert fn(x, x @ a) < 0.9


def test_feature_path_auto_choice_agrees_with_gram_path():
  x, y = features(6, n=300, p=8, q=5)  # n > p: 'auto' takes the feature path
  np.testing.assert_allclose(cka.linear_cka(x, y), cka.linear_cka(x, y, path="gram"),
                             atol=1e-5)
  np.testing.assert_allclose(cka.debiased_cka(x, y), cka.debiased_cka(x, y, path="gram"),
                             atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Minibatch CKA.


def layered(seed, n, b_shapes=((3, 4), (10,)), a_shapes=((6,), (2, 2, 2), (5,))):
  """Model A and model B layers of related features with large means, `[n, ...]` each."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, 6))
  make = lambda shape, i: (np.tanh(z @ rng.normal(size=(6, int(np.prod(shape)))) * (i + 1))
                           + 0.5 * rng.normal(size=(n, int(np.prod(shape)))) + 10 * i
                           ).reshape(n, *shape).astype(np.float32)
  return ([make(s, i) for i, s in enumerate(a_shapes)],
          [make(s, i) for i, s in enumerate(b_shapes)])


def ref_heatmap(xs, ys, b):
  return np.array([[ref_minibatch_cka(x, y, b) for y in ys] for x in xs])


def test_one_minibatch_equals_full_batch_debiased_cka():
  x, y = features(7, n=40)
  np.testing.assert_allclose(cka.minibatch_cka([x], [y], batch_size=40)[0, 0],
                             ref_cka(ref_gram_linear(x), ref_gram_linear(y), ref_hsic1),
                             atol=1e-6)


@pytest.mark.parametrize("grams,gram_blocks,feature_chunk", [
    ("host", 1, None), ("device", 1, None), ("device", 2, 0), ("device", 3, 4),
    ("device", 1, 3)],
    ids=["host", "device", "device-blocks2-unchunked", "device-blocks3-chunk4", "device-chunk3"])
def test_heatmap_matches_reference(grams, gram_blocks, feature_chunk):
  xs, ys = layered(8, n=100)  # 6, 8, 5 and 12, 10 features: chunks with and without a rest
  estimator = cka.MinibatchCKA(grams=grams, gram_blocks=gram_blocks,
                               feature_chunk=feature_chunk)
  state = estimator.init(xs, ys)
  for i in range(6):  # 6 batches of 16; the last 4 examples are not used
    state = estimator.update(state, [x[16 * i:16 * (i + 1)] for x in xs],
                             [y[16 * i:16 * (i + 1)] for y in ys])
  result = estimator.result(state)
  np.testing.assert_allclose(result.cka, ref_heatmap(xs, ys, 16), atol=2e-6)
  assert (result.num_batches, result.num_examples) == (6, 96)
  assert result.names_x == ("0", "1", "2") and result.names_y == ("0", "1")


@pytest.mark.parametrize("grams", ["host", "device"])
@pytest.mark.parametrize("offset", [0.0, 30.0, 1e3])
def test_float32_accuracy_whatever_the_feature_means(offset, grams):
  # Float32 Grams of features whose means dwarf their spread lose CKA to cancellation (~1e-2
  # at 1e3 x the spread): host Grams multiply features as they are only when their means are
  # small, and otherwise the features minus their first example, as device Grams centre.
  rng = np.random.default_rng(31)
  z = rng.normal(size=(64, 8))
  make = lambda: (z @ rng.normal(size=(8, 300)) + rng.normal(size=(64, 300))
                  + offset * rng.normal(size=300)).astype(np.float32)
  xs, ys = [make(), make()], [make()]
  got = cka.minibatch_cka(xs, ys, batch_size=16, mesh=None) if grams == "host" else (
      _device_minibatch_cka(xs, ys, 16))
  # The float64 reference of features centred first (exact: HSIC1 is translation invariant);
  # the uncentred float64 formula itself loses 2e-5 to cancellation at offset 1e3.
  centred = lambda layers: [a.astype(np.float64) - a.astype(np.float64).mean(0) for a in layers]
  np.testing.assert_allclose(got, ref_heatmap(centred(xs), centred(ys), 16), atol=1e-6)


def _device_minibatch_cka(xs, ys, b):
  estimator = cka.MinibatchCKA(grams="device")
  state = estimator.init(xs, ys)
  for i in range(len(xs[0]) // b):
    state = estimator.update(state, [x[b * i:b * (i + 1)] for x in xs],
                             [y[b * i:b * (i + 1)] for y in ys])
  return estimator.result(state).cka


def test_host_grams_give_the_centred_sums_of_squares():
  # The centred sum of squares (which flags constant layers) from either kind of host Gram.
  rng = np.random.default_rng(32)
  for offset in (0.0, 1e3):
    x = (rng.normal(size=(16, 40)) + offset * rng.normal(size=40)).astype(np.float32)
    gram, centred, rest = host_grams._host_gram(x, {})
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(centred, np.sum((x64 - x64.mean(0))**2), rtol=1e-5)
    h = np.eye(16) - 1 / 16
    np.testing.assert_allclose(h @ gram @ h, h @ x64 @ x64.T @ h, atol=1e-4 * centred / 16)
    assert rest > 0


def test_host_grams_are_refused_where_they_cannot_run():
  with pytest.raises(ValueError, match="grams must be one of .*got 'numpy'"):
    cka.MinibatchCKA(grams="numpy")
  xs, ys = layered(33, n=16)
  estimator = cka.MinibatchCKA(grams="host")
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match="grams='host' needs concrete arrays.*'auto' or 'device'"):
    jax.jit(lambda s, a, b: estimator.update(s, a, b))(state, xs, ys)


def test_within_model_heatmap_reuses_grams_and_matches_cross():
  xs, _ = layered(9, n=100)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, names_x=["stem", "mid", "top"])
  for i in range(6):
    state = estimator.update(state, [x[16 * i:16 * (i + 1)] for x in xs])
  result = estimator.result(state)
  assert result.names_x == result.names_y == ("stem", "mid", "top")
  np.testing.assert_allclose(result.cka, cka.minibatch_cka(xs, xs, batch_size=16), atol=1e-6)
  np.testing.assert_allclose(result.cka, ref_heatmap(xs, xs, 16), atol=2e-6)
  np.testing.assert_array_equal(result.cka, result.cka.T)
  np.testing.assert_array_equal(result.cka, cka.minibatch_cka(xs, batch_size=16))


def test_dict_layers_are_named_and_reordered():
  xs, ys = layered(10, n=32)
  a = {"stem": xs[0], "block1": xs[1], "top": xs[2]}
  estimator = cka.MinibatchCKA()
  state = estimator.init(a, {"out": ys[0], "head": ys[1]})
  for i in range(2):
    rows = slice(16 * i, 16 * (i + 1))
    state = estimator.update(state, {"top": xs[2][rows], "block1": xs[1][rows],
                                     "stem": xs[0][rows]},
                             {"head": ys[1][rows], "out": ys[0][rows]})
  result = estimator.result(state)
  assert result.names_x == ("stem", "block1", "top") and result.names_y == ("out", "head")
  np.testing.assert_allclose(result.cka, ref_heatmap(xs, ys, 16), atol=2e-6)


def test_several_passes_stream_through_the_accumulator():
  xs, ys = layered(11, n=48)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  key = jax.random.key(0)
  orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 48)) for e in range(3)]
  for order in orders:
    for i in range(3):
      rows = order[16 * i:16 * (i + 1)]
      state = estimator.update(state, [x[rows] for x in xs], [y[rows] for y in ys])
  result = estimator.result(state)
  concat = lambda layers: [np.concatenate([a[o] for o in orders]) for a in layers]
  np.testing.assert_allclose(result.cka, ref_heatmap(concat(xs), concat(ys), 16), atol=2e-6)
  assert result.num_batches == 9


def test_stderr_is_the_delta_method_and_agrees_with_jackknife():
  b, num = 8, 300
  xs, ys = layered(12, n=b * num, a_shapes=((5,),), b_shapes=((4,),))
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  for j in range(0, b * num, b):
    state = estimator.update(state, [xs[0][j:j + b]], [ys[0][j:j + b]])
  result = estimator.result(state)
  terms = ref_batch_terms(xs[0].reshape(num, b, -1), ys[0].reshape(num, b, -1))
  np.testing.assert_allclose(result.cka[0, 0], ref_minibatch_cka(xs[0], ys[0], b), atol=2e-6)
  np.testing.assert_allclose(result.stderr[0, 0], ref_delta_stderr(*terms), rtol=1e-3)
  np.testing.assert_allclose(result.stderr[0, 0], ref_jackknife_stderr(*terms), rtol=0.05)
  assert 1e-4 < result.stderr[0, 0] < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("grams", ["device", "host"])
def test_float32_accumulation_over_12000_batches_matches_float64(grams):
  b, num = 6, 12_000
  xs, ys = layered(13, n=b * num, a_shapes=((3,), (4,)), b_shapes=((2,),))
  estimator = cka.MinibatchCKA(grams=grams)
  state = estimator.init(xs, ys)

  @jax.jit
  def scanned(state, xs, ys):  # Device Grams, the whole stream in one program.
    step = lambda s, batch: (estimator.update(s, *batch), None)
    batched = lambda layers: [a.reshape(num, b, -1) for a in layers]
    return jax.lax.scan(step, state, (batched(xs), batched(ys)))[0]

  if grams == "device":
    state = scanned(state, xs, ys)
  else:  # Host Grams need concrete arrays: one update per minibatch (~20 s).
    for i in range(num):
      rows = slice(b * i, b * (i + 1))
      state = estimator.update(state, [x[rows] for x in xs], [y[rows] for y in ys])
  result = estimator.result(state)
  assert result.num_batches == num
  expected = np.array([[ref_minibatch_cka(x.reshape(-1, x.shape[-1]), y, b) for y in ys]
                       for x in xs])
  np.testing.assert_allclose(result.cka, expected, atol=1e-5, rtol=0)


def interrupted_stream(tmp_path, seed, estimator):
  """Six minibatches of 16 of `layered(seed, 96)`: (layers xs, ys, the batches, the result of
  all six, the state after three saved to `.npz` and read back)."""
  xs, ys = layered(seed, n=96)
  batches = [([x[16 * i:16 * (i + 1)] for x in xs], [y[16 * i:16 * (i + 1)] for y in ys])
             for i in range(6)]
  state = estimator.init(xs, ys)
  for batch in batches:
    state = estimator.update(state, *batch)
  uninterrupted = estimator.result(state)
  state = estimator.init(xs, ys)
  for batch in batches[:3]:
    state = estimator.update(state, *batch)
  np.savez(tmp_path / "state.npz", **state.to_numpy())
  with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
    restored = cka.MinibatchCKAState.from_numpy(dict(saved))
  return xs, ys, batches, uninterrupted, restored


def test_save_restore_continue_equals_uninterrupted(tmp_path):
  _, _, batches, uninterrupted, state = interrupted_stream(tmp_path, 14, cka.MinibatchCKA())
  resumed_estimator = cka.MinibatchCKA()
  for batch in batches[3:]:
    state = resumed_estimator.update(state, *batch)
  resumed = resumed_estimator.result(state)
  np.testing.assert_array_equal(resumed.cka, uninterrupted.cka)
  np.testing.assert_array_equal(resumed.stderr, uninterrupted.stderr)
  assert resumed.names_x == uninterrupted.names_x


def grouped(seed, n):
  """Model A: 4 layers [2, 3] then 2 layers [5]; model B: 3 layers [3] then 1 layer [4]. The
  layers one by one, and stacked as groups `[n, k, ...]` (a group of 1 included)."""
  xs, ys = layered(seed, n, a_shapes=((2, 3),) * 4 + ((5,),) * 2,
                   b_shapes=((3,),) * 3 + ((4,),))
  stack = lambda layers: np.stack(layers, axis=1)
  return xs, ys, [stack(xs[:4]), stack(xs[4:])], [stack(ys[:3]), stack(ys[3:])]


@pytest.mark.parametrize("within,grams,gram_blocks,feature_chunk", [
    (False, "host", 1, None), (False, "device", 3, 4), (True, "host", 1, None),
    (True, "device", 1, None)],
    ids=["cross-host", "cross-device-blocks3-chunk4", "within-host", "within-device"])
def test_stacked_groups_equal_the_layers_one_by_one(within, grams, gram_blocks, feature_chunk,
                                                    caplog):
  xs, ys, gx, gy = grouped(22, n=96)
  for a in (xs[2], gx[0][:, 2]):  # A layer constant in every minibatch, inside a group.
    a[...] = 0.1
  names_x = [f"a{i}" for i in range(6)]
  estimator = cka.MinibatchCKA(grams=grams, gram_blocks=gram_blocks,
                               feature_chunk=feature_chunk)
  one_by_one = estimator.init(xs, None if within else ys, names_x=names_x)
  stacked = estimator.init(xs, None if within else ys, names_x=names_x)
  for i in range(6):
    rows = slice(16 * i, 16 * (i + 1))
    one_by_one = estimator.update(one_by_one, [x[rows] for x in xs],
                                  None if within else [y[rows] for y in ys])
    stacked = estimator.update(stacked, [g[rows] for g in gx],
                               None if within else [g[rows] for g in gy], stacked=True)
  expected = estimator.result(one_by_one)
  with caplog.at_level(logging.WARNING):
    result = estimator.result(stacked)
  assert any("constant" in r.getMessage() and "a2" in r.getMessage() for r in caplog.records)
  assert result.names_x == tuple(names_x) and result.names_y == expected.names_y
  assert (result.num_batches, result.num_examples) == (6, 96)
  assert np.isnan(result.cka[2]).all()
  ref = ref_heatmap(xs, xs if within else ys, 16)
  ref[2] = np.nan
  if within:
    ref[:, 2] = np.nan
  np.testing.assert_allclose(result.cka, ref, atol=2e-6)
  np.testing.assert_allclose(result.cka, expected.cka, atol=1e-6)
  np.testing.assert_allclose(result.stderr, expected.stderr, rtol=1e-4, atol=1e-7)


def test_nonfinite_layer_in_a_group_is_named():
  xs, ys, gx, gy = grouped(23, n=32)
  gy[0][20, 1, 2] = np.nan
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys, names_y=["b0", "b1", "b2", "b3"])
  for i in range(2):
    rows = slice(16 * i, 16 * (i + 1))
    state = estimator.update(state, [g[rows] for g in gx], [g[rows] for g in gy], stacked=True)
  np.testing.assert_array_equal(np.asarray(state.nonfinite_y), [False, True, False, False])
  with pytest.raises(ValueError, match="NaN or Inf features in model B layer 'b1':"):
    estimator.result(state)


def test_bad_groups_raise():
  xs, ys, gx, gy = grouped(24, n=16)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match=r"\(16, 4, 2, 3\), \(16, 1, 5\)\].*6 layers"):
    estimator.update(state, [gx[0], gx[1][:, :1]], gy, stacked=True)
  with pytest.raises(ValueError, match=r"\(16,\)\].*4 layers"):
    estimator.update(state, gx, [ys[0][:, 0]], stacked=True)
  with pytest.raises(TypeError, match="sequence of groups"):
    estimator.update(state, {"a": gx[0], "b": gx[1]}, gy, stacked=True)
  with pytest.raises(ValueError, match=r"same examples.*A:group 1 \(8, 2, 5\)"):
    estimator.update(state, [gx[0], gx[1][:8]], gy, stacked=True)


# ---------------------------------------------------------------------------------------------
# Devices and processes.


@pytest.mark.parametrize("grams", ["host", "device"])
def test_eight_devices_equal_one_device_and_skip_padding_minibatches(grams, tmp_path):
  xs, ys = layered(15, n=8 * 8 * 3 + 3 * 8 + 5)
  np.savez(tmp_path / "data.npz", *xs, *ys)
  code = f"""
import numpy as np, jax
from vit_repr import cka, parallel
assert jax.device_count() == 8
data = np.load({str(tmp_path / 'data.npz')!r})
arrays = [data[f'arr_{{i}}'] for i in range(5)]
mesh = parallel.make_mesh()
est = cka.MinibatchCKA(mesh, grams={grams!r}, gram_blocks=2)
xs, ys = arrays[:3], arrays[3:]
state = est.init(xs, ys)
for s in range(3):
  # Global arrays sharded over the 8 devices (host Grams read each device's shard).
  batch = lambda layers: [parallel.global_batch(a[64 * s:64 * (s + 1)], mesh) for a in layers]
  state = est.update(state, batch(xs), batch(ys))
full = est.result(state)
# A last batch of 3 minibatches and 5 padding ones (NaN rows, valid False): they add nothing.
pad = lambda a: np.concatenate([a[192:216], np.full((40,) + a.shape[1:], np.nan, a.dtype)])
valid = np.arange(64) < 24
state = est.update(state, [pad(x) for x in xs], [pad(y) for y in ys],
                   valid=parallel.global_batch(valid, mesh))
padded = est.result(state)
np.savez({str(tmp_path / 'out.npz')!r}, cka=full.cka, stderr=full.stderr, n=full.num_batches,
         within=cka.minibatch_cka(xs, batch_size=8, mesh=mesh), padded=padded.cka,
         padded_n=(padded.num_batches, padded.num_examples))
"""
  run_python(code, num_devices=8)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  for i in range(24):
    state = estimator.update(state, [x[8 * i:8 * (i + 1)] for x in xs],
                             [y[8 * i:8 * (i + 1)] for y in ys])
  single = estimator.result(state)
  out = np.load(tmp_path / "out.npz")
  assert int(out["n"]) == single.num_batches == 24
  np.testing.assert_allclose(out["cka"], single.cka, atol=1e-6)
  np.testing.assert_allclose(out["stderr"], single.stderr, rtol=1e-4)
  np.testing.assert_allclose(out["within"], cka.minibatch_cka(xs, batch_size=8), atol=1e-6)
  # The padded run is the float64 minibatch CKA of the 27 real minibatches.
  assert tuple(out["padded_n"]) == (27, 216)
  np.testing.assert_allclose(out["padded"], ref_heatmap([x[:216] for x in xs],
                                                        [y[:216] for y in ys], 8), atol=2e-6)


_WORKER = """
import sys
import numpy as np, jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, data_path, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                           process_id=pid)
from vit_repr import cka, parallel
data = np.load(data_path)
xs, ys = [data['arr_0'], data['arr_1']], [data['arr_2']]
mesh = parallel.make_mesh()
assert mesh.devices.size == 4 and jax.process_count() == 2
out = {}
for grams in ('host', 'device'):
  est = cka.MinibatchCKA(mesh, grams=grams)
  state = est.init(xs, ys)
  step = 4 * 8
  for s in range(len(xs[0]) // step):
    rows = slice(s * step + pid * step // 2, s * step + (pid + 1) * step // 2)
    state = est.update(state, parallel.global_batch([x[rows] for x in xs], mesh),
                       parallel.global_batch([y[rows] for y in ys], mesh))
  res = est.result(state)
  out.update({f'cka_{grams}': res.cka, f'stderr_{grams}': res.stderr,
              f'n_{grams}': res.num_batches})
if pid == 0:
  np.savez(out_path, **out)
"""


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  xs, ys = layered(16, n=4 * 8 * 3, a_shapes=((6,), (3, 3)), b_shapes=((5,),))
  np.savez(tmp_path / "data.npz", *xs, *ys)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(pid),
                             str(tmp_path / "data.npz"), str(tmp_path / "out.npz")],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  out = np.load(tmp_path / "out.npz")
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  for i in range(12):
    state = estimator.update(state, [x[8 * i:8 * (i + 1)] for x in xs],
                             [y[8 * i:8 * (i + 1)] for y in ys])
  single = estimator.result(state)
  for grams in ("host", "device"):
    assert int(out[f"n_{grams}"]) == single.num_batches == 12
    np.testing.assert_allclose(out[f"cka_{grams}"], single.cka, atol=1e-6)
    np.testing.assert_allclose(out[f"stderr_{grams}"], single.stderr, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_mismatched_example_counts_raise_with_shapes():
  xs, ys = layered(17, n=32)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match=r"same examples.*\(16, 6\).*\(15, 2, 2, 2\)"):
    estimator.update(state, [xs[0][:16], xs[1][:15], xs[2][:16]], [y[:16] for y in ys])
  with pytest.raises(ValueError, match=r"B:0 \(8, 3, 4\)"):
    estimator.update(state, [x[:16] for x in xs], [ys[0][:8], ys[1][:16]])
  with pytest.raises(ValueError, match=r"\(32, 6\).*\(31, 10\)"):
    cka.minibatch_cka(xs[:1], [ys[1][:31]], batch_size=8)
  with pytest.raises(ValueError, match=r"\(32, 6\).*\(31, 10\)"):
    cka.linear_cka(xs[0], ys[1][:31])


def test_batches_smaller_than_four_raise():
  xs, ys = layered(18, n=12)
  estimator = cka.MinibatchCKA()
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match="at least 4 examples"):
    estimator.update(state, [x[:3] for x in xs], [y[:3] for y in ys])
  with pytest.raises(ValueError, match="batch_size must be >= 4"):
    cka.minibatch_cka(xs, ys, batch_size=3)
  with pytest.raises(ValueError, match="at least 4 examples"):
    cka.debiased_cka(xs[0][:3], ys[0][:3])
  with pytest.raises(ValueError, match="at least 4 examples"):
    cka.hsic_unbiased(np.eye(3), np.eye(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_features_are_reported_at_result_naming_the_layer(bad):
  xs, ys = layered(19, n=48)
  a = {"stem": xs[0], "block": xs[1].copy()}
  a["block"][20, 0, 1, 0] = bad
  estimator = cka.MinibatchCKA()
  state = estimator.init(a, ys)
  for i in range(3):  # update itself never syncs with the host, so it does not raise
    state = estimator.update(state, {k: v[16 * i:16 * (i + 1)] for k, v in a.items()},
                             [y[16 * i:16 * (i + 1)] for y in ys])
  assert bool(np.asarray(state.nonfinite_x)[1]) and not np.asarray(state.nonfinite_x)[0]
  with pytest.raises(ValueError, match="NaN or Inf features in model A layer 'block'"):
    estimator.result(state)


def test_constant_layer_gives_nan_row_and_warning(caplog):
  xs, ys = layered(20, n=32)
  xs[1] = np.full_like(xs[1], 0.1)
  with caplog.at_level(logging.WARNING):
    heatmap = cka.minibatch_cka({"a": xs[0], "const": xs[1], "c": xs[2]}, ys, batch_size=16)
  assert np.isnan(heatmap[1]).all()
  assert np.isfinite(np.delete(heatmap, 1, axis=0)).all()
  np.testing.assert_allclose(np.delete(heatmap, 1, axis=0),
                             ref_heatmap([xs[0], xs[2]], ys, 16), atol=2e-6)
  assert any("constant" in r.getMessage() and "const" in r.getMessage()
             for r in caplog.records)


def test_bad_structures_raise():
  xs, ys = layered(21, n=16)
  estimator = cka.MinibatchCKA()
  with pytest.raises(TypeError, match="sequence or dict"):
    estimator.init(xs[0])
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match="initialised with 3"):
    estimator.update(state, xs[:2], ys)
  with pytest.raises(ValueError, match="within-model|ys is missing"):
    estimator.update(state, xs)
  with pytest.raises(ValueError, match="No minibatch"):
    estimator.result(estimator.init(xs))


# ---------------------------------------------------------------------------------------------
# Matrix-product precision.


def dot_precisions(lowered_text: str) -> set[str]:
  """The precisions of every dot_general in a lowered (StableHLO) program."""
  lines = [line for line in lowered_text.splitlines() if "dot_general" in line]
  assert lines, "no matrix product in the program"
  return {line.split("precision = ")[1].split("]")[0] + "]" if "precision = " in line
          else "[DEFAULT, DEFAULT]" for line in lines}


@pytest.mark.parametrize("precision,expected", [("highest", "[HIGHEST, HIGHEST]"),
                                                ("default", "[DEFAULT, DEFAULT]")])
def test_every_matrix_product_runs_at_the_requested_precision(precision, expected):
  # GPUs and TPUs multiply float32 at reduced precision unless a product asks for HIGHEST:
  # checked on the program handed to XLA, whatever this machine's backend does with it.
  xs, ys = layered(3, n=16)
  estimator = cka.MinibatchCKA(precision=precision)
  state = estimator.init(xs, ys)
  arrays = {f: getattr(state, f) for f in minibatch._STATE_ARRAYS}
  lowered = sharded_update._update.lower(
      arrays, np.ones(16, bool), tuple(xs), tuple(ys), minibatch_size=16, host_grams=False,
      stacked=False, mesh=estimator.mesh, gram_blocks=2, feature_chunk=4,
      precision=estimator.precision)
  assert dot_precisions(lowered.as_text()) == {expected}
  x, y = xs[0].reshape(16, -1), ys[1]
  full_batch = {
      "linear_cka gram": lambda: cka.linear_cka(x, y, path="gram", precision=precision),
      "linear_cka features": lambda: cka.linear_cka(x, y, path="features", precision=precision),
      "debiased_cka gram": lambda: cka.debiased_cka(x, y, path="gram", precision=precision),
      "debiased_cka features": lambda: cka.debiased_cka(x, y, path="features",
                                                        precision=precision),
      "rbf_cka": lambda: cka.rbf_cka(x, y, debiased=True, precision=precision),
      "hsic_unbiased": lambda: cka.hsic_unbiased(x @ x.T, y @ y.T, precision=precision),
      "hsic_biased": lambda: cka.hsic_biased(x @ x.T, y @ y.T, precision=precision),
  }
  for name, fn in full_batch.items():
    # Gram inputs of the HSIC functions are built outside: only their own products count.
    text = jax.jit(fn).lower().as_text() if "hsic" not in name else jax.jit(
        lambda k, l, f=getattr(cka, name): f(k, l, precision=precision)).lower(
            x @ x.T, y @ y.T).as_text()
    assert dot_precisions(text) == {expected}, name


def test_unknown_precision_is_refused():
  with pytest.raises(ValueError, match=r"precision must be one of \('highest', 'high', "
                                       r"'default'\).*got 'fp32'"):
    cka.MinibatchCKA(precision="fp32")
  with pytest.raises(ValueError, match="precision must be one of"):
    cka.linear_cka(np.ones((8, 3)), np.ones((8, 2)), precision="float32")


# ---------------------------------------------------------------------------------------------
# Calibration: permutation nulls and bootstrap intervals (vit_repr.cka.calibration).


def test_u_centring_is_permutation_equivariant():
  # U(P K Pᵀ) = P U(K) Pᵀ: the streamed null permutes B's U-centred Grams, not its features.
  x, _ = features(40, n=12)
  gram, perm = ref_gram_linear(x), np.random.default_rng(0).permutation(12)
  u = np.asarray(cka.full_batch._u_centre(gram))
  np.testing.assert_allclose(cka.full_batch._u_centre(gram[perm][:, perm]), u[perm][:, perm],
                             atol=1e-4)  # float32 rounding: the sums in another order


def ref_calibrated(xs, ys, b, num_permutations, num_bootstrap, seed, confidence=0.95):
  """Float64 null and bootstrap of minibatch CKA over consecutive minibatches of b, with B's
  FEATURE rows explicitly permuted by the estimator's permutations and the estimator's
  Poisson weights, minibatch i drawing with index i."""
  from vit_repr.cka import calibration  # pylint: disable=g-import-not-at-top
  nb = len(xs[0]) // b
  batches = lambda a: np.asarray(a, np.float64)[:nb * b].reshape(nb, b, -1)
  perms = np.stack([np.asarray(calibration._minibatch_permutations(seed, i, num_permutations, b))
                    for i in range(nb)])  # [nb, K, b]
  weights = np.stack([np.asarray(calibration._minibatch_weights(seed, i, num_bootstrap))
                      for i in range(nb)])  # [nb, B]
  shape = (len(xs), len(ys))
  p_value, null_mean, low, high = (np.zeros(shape) for _ in range(4))
  for a, x in enumerate(xs):
    for c, y in enumerate(ys):
      xb, yb = batches(x), batches(y)
      xy, xx, yy = ref_batch_terms(xb, yb)
      observed = xy.mean() / np.sqrt(xx.mean() * yy.mean())
      null = np.array([ref_batch_terms(xb, np.stack([yb[i][perms[i, k]] for i in range(nb)]))[0]
                       .mean() for k in range(num_permutations)]) / np.sqrt(xx.mean() * yy.mean())
      p_value[a, c] = (1 + np.sum(null >= observed)) / (num_permutations + 1)
      null_mean[a, c] = null.mean()
      star = (weights.T @ xy) / np.sqrt((weights.T @ xx) * (weights.T @ yy))
      low[a, c], high[a, c] = np.nanquantile(star, [(1 - confidence) / 2, (1 + confidence) / 2])
  return p_value, null_mean, low, high


@pytest.mark.parametrize("grams,within", [("host", False), ("device", False), ("host", True)],
                         ids=["host", "device", "within-host"])
def test_streamed_null_and_bootstrap_match_float64_with_permuted_features(grams, within):
  xs, ys = layered(41, n=96, a_shapes=((6,), (2, 2, 2)), b_shapes=((5,), (3, 3)))
  ys = xs if within else ys
  estimator = cka.MinibatchCKA(grams=grams, num_permutations=6, num_bootstrap=40, seed=3,
                               confidence=0.8)
  state = estimator.init(xs, None if within else ys)
  for i in range(6):
    rows = slice(16 * i, 16 * (i + 1))
    state = estimator.update(state, [x[rows] for x in xs],
                             None if within else [y[rows] for y in ys])
  result = estimator.result(state)
  p_value, null_mean, low, high = ref_calibrated(xs, ys, 16, 6, 40, seed=3, confidence=0.8)
  np.testing.assert_allclose(result.cka, ref_heatmap(xs, ys, 16), atol=2e-6)
  np.testing.assert_array_equal(result.p_value, p_value)
  np.testing.assert_allclose(result.null_mean, null_mean, atol=2e-6)
  np.testing.assert_allclose(result.ci_low, low, atol=2e-6)
  np.testing.assert_allclose(result.ci_high, high, atol=2e-6)
  assert np.all(result.ci_low <= result.cka) and np.all(result.cka <= result.ci_high)
  # Another confidence from the same state: a narrower interval inside.
  narrower = estimator.result(state, confidence=0.5)
  assert np.all(narrower.ci_low >= result.ci_low) and np.all(narrower.ci_high <= result.ci_high)
  np.testing.assert_array_equal(narrower.cka, result.cka)


def test_null_of_independent_layers_and_of_a_rotation():
  rng = np.random.default_rng(42)
  n, k = 16 * 12, 40
  xs = [rng.normal(size=(n, 20)).astype(np.float32) for _ in range(6)]
  ys = [rng.normal(size=(n, 20)).astype(np.float32) for _ in range(6)]
  result = cka.minibatch_cka(xs, ys, batch_size=16, num_permutations=k, seed=1)
  assert np.mean(result.p_value < 0.05) <= 0.2  # 36 independent pairs: p roughly uniform
  assert 0.2 < np.mean(result.p_value) < 0.8
  assert np.max(np.abs(result.null_mean)) < 0.02 and np.max(np.abs(result.cka)) < 0.1
  q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
  rotated = cka.minibatch_cka(xs[:1], [xs[0] @ q.astype(np.float32)], batch_size=16,
                              num_permutations=k)
  np.testing.assert_allclose(rotated.cka, 1.0, atol=1e-5)
  np.testing.assert_array_equal(rotated.p_value, 1 / (k + 1))
  assert np.abs(rotated.null_mean[0, 0]) < 0.1


def test_bootstrap_interval_shrinks_with_minibatches_and_matches_the_delta_method():
  b = 8
  xs, ys = layered(43, n=b * 400, a_shapes=((5,),), b_shapes=((4,),))
  results = [cka.minibatch_cka([x[:b * m] for x in xs], [y[:b * m] for y in ys], batch_size=b,
                               num_bootstrap=400, seed=2) for m in (100, 400)]
  widths = [r.ci_high[0, 0] - r.ci_low[0, 0] for r in results]
  for r, width in zip(results, widths):
    assert r.ci_low[0, 0] < r.cka[0, 0] < r.ci_high[0, 0]
    assert 0.6 < width / (2 * 1.96 * r.stderr[0, 0]) < 1.6
  assert 0.35 < widths[1] / widths[0] < 0.7  # 4x the minibatches: about half the width


def test_calibrated_eight_devices_equal_one_device(tmp_path):
  grams = "device"  # Host Grams: the same U-centred Grams (test_streamed_null_and_bootstrap_...)
  xs, ys = layered(44, n=8 * 8 * 3 + 3 * 8, a_shapes=((6,), (5,)), b_shapes=((4,),))
  np.savez(tmp_path / "data.npz", *xs, *ys)
  options = "num_permutations=7, num_bootstrap=30, seed=5"
  code = f"""
import numpy as np, jax
from vit_repr import cka, parallel
assert jax.device_count() == 8
data = np.load({str(tmp_path / 'data.npz')!r})
xs, ys = [data['arr_0'], data['arr_1']], [data['arr_2']]
mesh = parallel.make_mesh()
est = cka.MinibatchCKA(mesh, grams={grams!r}, {options})
state = est.init(xs, ys)
for s in range(3):
  batch = lambda layers: [parallel.global_batch(a[64 * s:64 * (s + 1)], mesh) for a in layers]
  state = est.update(state, batch(xs), batch(ys))
pad = lambda a: np.concatenate([a[192:216], np.full((40,) + a.shape[1:], np.nan, a.dtype)])
state = est.update(state, [pad(x) for x in xs], [pad(y) for y in ys],
                   valid=parallel.global_batch(np.arange(64) < 24, mesh))
res = est.result(state)
whole = cka.minibatch_cka(xs, ys, batch_size=8, mesh=mesh, {options})
np.savez({str(tmp_path / 'out.npz')!r}, **{{f: getattr(res, f) for f in
         ('cka', 'p_value', 'null_mean', 'ci_low', 'ci_high')}},
         **{{'whole_' + f: getattr(whole, f) for f in ('p_value', 'null_mean', 'ci_low')}})
"""
  run_python(code, num_devices=8)
  estimator = cka.MinibatchCKA(num_permutations=7, num_bootstrap=30, seed=5)
  state = estimator.init(xs, ys)
  for i in range(27):
    state = estimator.update(state, [x[8 * i:8 * (i + 1)] for x in xs],
                             [y[8 * i:8 * (i + 1)] for y in ys])
  single = estimator.result(state)
  whole = cka.minibatch_cka(xs, ys, batch_size=8, num_permutations=7, num_bootstrap=30, seed=5)
  out = np.load(tmp_path / "out.npz")
  np.testing.assert_allclose(out["cka"], single.cka, atol=1e-6)
  np.testing.assert_array_equal(out["p_value"], single.p_value)
  assert 0 < single.p_value.min() and single.p_value.max() < 1  # not all at one end
  for field in ("null_mean", "ci_low", "ci_high"):
    np.testing.assert_allclose(out[field], getattr(single, field), atol=1e-6)
  # minibatch_cka numbers minibatch j as j whatever the device count.
  np.testing.assert_array_equal(out["whole_p_value"], whole.p_value)
  np.testing.assert_allclose(out["whole_null_mean"], whole.null_mean, atol=1e-6)
  np.testing.assert_allclose(out["whole_ci_low"], whole.ci_low, atol=1e-6)


def test_calibrated_state_saves_restores_and_refuses_other_settings(tmp_path):
  xs, ys, batches, uninterrupted, restored = interrupted_stream(
      tmp_path, 45, cka.MinibatchCKA(num_permutations=5, num_bootstrap=20, seed=7))
  assert restored.calibration == (5, 20, 7) and restored.null_sums.shape == (5, 3, 2)
  for other in (dict(num_permutations=4, num_bootstrap=20, seed=7),
                dict(num_permutations=5, num_bootstrap=20, seed=8), {}):
    with pytest.raises(ValueError, match=r"made with num_permutations=5, num_bootstrap=20, "
                                         r"seed=7.*mix two calibrations"):
      cka.MinibatchCKA(**other).update(restored, *batches[3])
  with pytest.raises(ValueError, match="mix two calibrations"):
    cka.MinibatchCKA(num_permutations=5, seed=7).result(restored)
  resumed = cka.MinibatchCKA(num_permutations=5, num_bootstrap=20, seed=7)
  for batch in batches[3:]:
    restored = resumed.update(restored, *batch)
  result = resumed.result(restored)
  for field in ("cka", "stderr", "p_value", "null_mean", "ci_low", "ci_high"):
    np.testing.assert_array_equal(getattr(result, field), getattr(uninterrupted, field))
  # A state saved before the calibrations existed restores as an uncalibrated one.
  plain = cka.MinibatchCKA()
  old = plain.update(plain.init(xs, ys), *batches[0]).to_numpy()
  for field in ("calibration", "null_sums", "null_compensation", "bootstrap_sums",
                "bootstrap_compensation"):
    del old[field]
  again = plain.result(plain.update(cka.MinibatchCKAState.from_numpy(old), *batches[1]))
  assert again.p_value is None and again.ci_low is None and again.num_batches == 2


def test_bad_calibration_inputs_raise_naming_the_fix():
  for bad in (dict(num_permutations=-1), dict(num_bootstrap=-5), dict(num_permutations=2.5)):
    with pytest.raises(ValueError, match="must be an integer >= 0"):
      cka.MinibatchCKA(**bad)
  for confidence in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), e.g. 0.95"):
      cka.MinibatchCKA(num_bootstrap=10, confidence=confidence)
  xs, ys = layered(46, n=12)
  estimator = cka.MinibatchCKA(num_permutations=10)
  state = estimator.init(xs, ys)
  with pytest.raises(ValueError, match="at least 4 examples.*use a multiple"):
    estimator.update(state, [x[:3] for x in xs], [y[:3] for y in ys])
  with pytest.raises(ValueError, match="batch_size must be >= 4"):
    cka.minibatch_cka(xs, ys, batch_size=3, num_permutations=10)
  with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
    estimator.result(estimator.update(state, [x[:8] for x in xs], [y[:8] for y in ys]),
                     confidence=2)
  x, y = features(47, n=12)
  with pytest.raises(ValueError, match="num_permutations must be an integer >= 1"):
    cka.permutation_test(x, y, num_permutations=0)
  with pytest.raises(ValueError, match="num_resamples must be an integer >= 1"):
    cka.bootstrap_interval(x, y, num_resamples=-1)
  with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
    cka.bootstrap_interval(x, y, num_resamples=10, confidence=1)
  with pytest.raises(ValueError, match="at least 4 examples"):
    cka.permutation_test(x[:3], y[:3], num_permutations=10)


def test_full_batch_permutation_test_and_bootstrap_match_float64_loops():
  from vit_repr.cka import calibration  # pylint: disable=g-import-not-at-top
  x, y = features(48, n=24)
  key = jax.random.key(9)
  observed = ref_cka(ref_gram_linear(x), ref_gram_linear(y), ref_hsic1)
  null = np.array([ref_cka(ref_gram_linear(x), ref_gram_linear(y[p]), ref_hsic1)
                   for p in np.asarray(calibration._permutations(key, 50, 24))])
  p_value, null_mean = cka.permutation_test(x, y, num_permutations=50, seed=9)
  np.testing.assert_allclose(p_value, (1 + np.sum(null >= observed)) / 51, atol=1e-7)
  np.testing.assert_allclose(null_mean, null.mean(), atol=2e-6)

  def resampled(index):  # Features centred over all n; copies' entries zeroed (diagonal).
    k, l = (ref_gram_linear((a - a.mean(0))[index]) * (index[:, None] != index[None, :])
            for a in (x, y))
    return ref_cka(k, l, ref_hsic1)

  stars = [resampled(i) for i in np.asarray(calibration._resample_indices(key, 60, 24))]
  low, high = cka.bootstrap_interval(x, y, num_resamples=60, confidence=0.9, seed=9)
  np.testing.assert_allclose([low, high], np.quantile(stars, [0.05, 0.95]), atol=2e-6)
  assert low < observed < high
