"""The shared accumulator pieces (vit_repr.streaming) and every analysis state's save/restore."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr import (attention, cka, localization, parallel, receptive_field, residual,
                      streaming)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Toy(streaming.State):
  sums: jax.Array
  count: jax.Array
  names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  tokens: tuple[tuple[int, int], ...] = dataclasses.field(metadata=dict(static=True))
  prefix: int = dataclasses.field(metadata=dict(static=True))


def _toy() -> _Toy:
  return _Toy(sums=np.arange(6, dtype=np.float32).reshape(2, 3), count=np.int32(4),
              names=("a", "block_10/out"), tokens=((1, 196), (0, 49)), prefix=1)


def test_kahan_add_matches_an_exact_sum_where_float32_drifts():
  """100,000 float32 terms: the naive float32 running sum is off by ~8e-6 (relative, ~100 ulps
  of the total), the compensated total (sums - compensation) by ~1e-11."""
  values = np.random.default_rng(0).uniform(0.5, 1.5, 100_000).astype(np.float32)
  exact = math.fsum(values.astype(np.float64))

  @jax.jit
  def sums(values):
    def step(carry, value):
      naive, kahan, compensation = carry
      return (naive + value, *streaming.kahan_add(kahan, compensation, value)), None
    return jax.lax.scan(step, (jnp.float32(0),) * 3, values)[0]

  naive, kahan, compensation = sums(values)
  naive_error = abs(float(naive) - exact) / exact
  kahan_error = abs(float(streaming.kahan_total(kahan, compensation)) - exact) / exact
  assert naive_error > 1e-6, naive_error  # The drift the compensation exists for.
  assert kahan_error < 1e-10, kahan_error


def test_state_is_a_registered_frozen_dataclass():
  state = _toy()
  assert [jnp.shape(a) for a in jax.tree.leaves(state)] == [(2, 3), ()]  # Static: not leaves.
  doubled = jax.jit(lambda s: dataclasses.replace(s, sums=s.sums * 2))(state)
  assert doubled.names == state.names and doubled.prefix == 1
  np.testing.assert_array_equal(doubled.sums, 2 * state.sums)
  with pytest.raises(dataclasses.FrozenInstanceError):
    state.count = 5


def test_to_numpy_from_numpy_round_trip_through_an_npz(tmp_path):
  state = _toy()
  arrays = state.to_numpy()
  assert sorted(arrays) == ["count", "names", "prefix", "sums", "tokens"]
  np.savez(tmp_path / "state.npz", **arrays)
  with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
    restored = _Toy.from_numpy(saved)
  assert (restored.names, restored.tokens, restored.prefix) == (state.names, state.tokens, 1)
  assert isinstance(restored.prefix, int) and isinstance(restored.names[0], str)
  np.testing.assert_array_equal(restored.sums, state.sums)
  assert restored.count == 4 and restored.count.dtype == np.int32


def test_from_numpy_names_missing_and_unexpected_fields():
  arrays = _toy().to_numpy()
  del arrays["count"], arrays["names"]
  arrays["shift"] = np.zeros(3)
  with pytest.raises(ValueError, match=r"Not a saved _Toy: missing fields \['count', 'names'\], "
                                       r"unexpected fields \['shift'\]"):
    _Toy.from_numpy(arrays)


def test_prefixed_arrays_split_back_and_name_mismatched_keys():
  parts = {"vit": {"sums": np.ones(2), "14/x": np.zeros(1)}, "bit": {"sums": np.zeros(2)}}
  flat = streaming.prefixed(parts)
  assert sorted(flat) == ["bit/sums", "vit/14/x", "vit/sums"]
  assert streaming.unprefixed(flat, ["vit", "bit"]).keys() == parts.keys()
  assert streaming.unprefixed(flat)["vit"]["14/x"].shape == (1,)
  with pytest.raises(ValueError, match=r"missing \['mixer'\], unexpected \['bit'\]"):
    streaming.unprefixed(flat, ["vit", "mixer"])
  with pytest.raises(ValueError, match="not '<key>/<name>'"):
    streaming.unprefixed({"sums": np.ones(2)})


def test_nothing_accumulated_is_refused():
  with pytest.raises(ValueError, match="No batch was accumulated; call update before result."):
    streaming.check_accumulated(np.zeros((), np.int32), "batch")
  assert streaming.check_accumulated(jnp.int32(7), "batch") == 7


def test_data_mesh_and_replicated_placement():
  mesh = streaming.data_mesh(None, "X")
  assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.devices.size == 1
  with pytest.raises(ValueError, match="X needs a one-axis mesh named 'data'"):
    streaming.data_mesh(jax.make_mesh((1,), ("batch",)), "X")
  placed = streaming.replicated(_toy(), mesh)
  assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(placed))
  again = streaming.replicated(placed, mesh)
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed)))
  traced = jax.jit(lambda s: streaming.replicated(s, mesh).sums + 1)(placed)  # No placement.
  np.testing.assert_array_equal(traced, placed.sums + 1)


# Every analysis: (accumulator, its initial state, `update(state, step) -> state`), small inputs.
def _cka_case():
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=(24, 3)).astype(np.float32), rng.normal(size=(24, 2, 2)).astype(np.float32)]
  ys = [rng.normal(size=(24, 4)).astype(np.float32)]
  est = cka.MinibatchCKA()
  rows = lambda i: slice(8 * i, 8 * (i + 1))
  return est, est.init(xs, ys), lambda s, i: est.update(s, [x[rows(i)] for x in xs],
                                                         [y[rows(i)] for y in ys])


def _cka_within_case():
  est, _, _ = _cka_case()
  xs = [np.random.default_rng(2).normal(size=(24, 5)).astype(np.float32)] * 2
  return est, est.init(xs), lambda s, i: est.update(s, [x[8 * i:8 * (i + 1)] for x in xs])


def _attention_case():
  probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).normal(size=(12, 2, 5, 5)),
                                     jnp.float32))
  mad = attention.MeanAttentionDistance(["a"], num_heads=2, grid=(2, 2), patch_size=4,
                                        num_prefix_tokens=1)
  return mad, mad.init(), lambda s, i: mad.update(s, {"a": probs[4 * i:4 * (i + 1)]})


def _receptive_field_case():
  kernel = jnp.asarray(np.random.default_rng(4).normal(size=(3, 3, 3, 2)), jnp.float32)
  fn = lambda w, x: {"map": jnp.tanh(jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))}
  erf = receptive_field.ReceptiveField(fn, {"map": (4, 4, 2)}, image_size=8)
  images = np.random.default_rng(5).normal(size=(6, 8, 8, 3)).astype(np.float32)
  return erf, erf.init(), lambda s, i: erf.update(s, kernel, images[2 * i:2 * (i + 1)])


def _residual_case():
  rng = np.random.default_rng(6)
  z, f = rng.normal(size=(2, 9, 5, 4)).astype(np.float32)
  est = residual.NormRatio()
  return est, est.init({"t": z}, prefix=("cls", "register")), lambda s, i: est.update(
      s, {"t": z[3 * i:3 * (i + 1)]}, {"t": f[3 * i:3 * (i + 1)]})


def _localization_case():
  rng = np.random.default_rng(7)
  tokens, fmap = rng.normal(size=(24, 5, 3)), rng.normal(size=(24, 1, 1, 2))
  images = rng.normal(size=(24, 4, 4, 3)).astype(np.float32)
  loc = localization.LocalizationCKA({"t": (5, 3), "m": (1, 1, 2)}, image_size=4,
                                     num_prefix_tokens=1, token_grid=(2, 2))
  rows = lambda i: slice(8 * i, 8 * (i + 1))
  return loc, loc.init(), lambda s, i: loc.update(
      s, {"t": tokens[rows(i)], "m": fmap[rows(i)]}, images[rows(i)])


CASES = {"cka": _cka_case, "cka_within": _cka_within_case, "attention": _attention_case,
         "receptive_field": _receptive_field_case, "residual": _residual_case,
         "localization": _localization_case}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_state_round_trips_and_continues(case, tmp_path):
  """After real updates, a state saved to an .npz and restored gives the same result, and an
  update of the restored (host) state equals one of the original."""
  accumulator, state, update = case()
  assert isinstance(accumulator, streaming.Accumulator)
  assert isinstance(state, streaming.State)
  state = update(update(state, 0), 1)
  np.savez(tmp_path / "state.npz", **state.to_numpy())
  with np.load(tmp_path / "state.npz", allow_pickle=False) as saved:
    restored = type(state).from_numpy(saved)
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(accumulator.result(restored), accumulator.result(state))
  same(accumulator.result(update(restored, 2)), accumulator.result(update(state, 2)))
