"""Skip-connection norm ratios (vit_repr.residual) against direct NumPy float64 formulas."""

import numpy as np
import pytest

from tests.conftest import run_python
from vit_repr import models, residual
from vit_repr.models import layout


REGISTERS = ("cls", "register", "register", "register", "register")  # DINOv2's prefix.


def reference_ratios(zs, fs, prefix):
  """(ratio_of_means, mean_of_ratios) `[3]` over all batches, float64, for the groups (cls:
  the tokens of kind 'cls' or 'distillation' in `prefix`, spatial: the tokens after the
  prefix, register: the tokens of kind 'register')."""
  z = np.concatenate([np.asarray(a, np.float64) for a in zs])
  f = np.concatenate([np.asarray(a, np.float64) for a in fs])
  if z.ndim == 4:
    z, f = z.reshape(z.shape[0], -1, z.shape[-1]), f.reshape(f.shape[0], -1, f.shape[-1])
  nz, nf = np.sqrt((z**2).sum(-1)), np.sqrt((f**2).sum(-1))
  groups = ([t for t, kind in enumerate(prefix) if kind in ("cls", "distillation")],
            list(range(len(prefix), z.shape[1])),
            [t for t, kind in enumerate(prefix) if kind == "register"])
  of_means, of_ratios = [], []
  for tokens in groups:
    if not tokens:
      of_means.append(np.nan)
      of_ratios.append(np.nan)
    else:
      of_means.append(nz[:, tokens].mean() / nf[:, tokens].mean())
      of_ratios.append((nz[:, tokens] / nf[:, tokens]).mean())
  return np.array(of_means), np.array(of_ratios)


LAYOUTS = {  # (shape, prefix token kinds)
    "vit_cls_tokens": ((6, 5, 8), ("cls",)),
    "gap_tokens": ((6, 5, 8), ()),
    "cls_and_distillation": ((6, 5, 8), ("cls", "distillation")),  # DeiT distilled.
    "cls_and_registers": ((6, 8, 8), REGISTERS),                   # DINOv2.
    "registers_without_cls": ((6, 5, 8), ("register", "register")),
    "feature_map": ((6, 3, 3, 4), ()),
}


@pytest.mark.parametrize("shape,prefix", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_known_branch_gives_known_ratio(shape, prefix):
  """f(z) = z / 4 on the CLS (and distillation) tokens, z / 8 on the registers and z / 2 on the
  patches: the ratios are 4, 2 and 8 (NaN for a group without tokens)."""
  z = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  f = z / 2
  kinds = np.asarray(prefix + ("patch",) * (shape[1] - len(prefix)))
  if len(shape) == 3:
    f[:, np.isin(kinds, ("cls", "distillation"))] /= 2
    f[:, kinds == "register"] /= 4
  estimator = residual.NormRatio()
  state = estimator.init({"layer": z}, prefix=prefix)
  result = estimator.result(estimator.update(state, {"layer": z}, {"layer": f}))
  expected = np.array([4.0 if {"cls", "distillation"} & set(prefix) else np.nan, 2.0,
                       8.0 if "register" in prefix else np.nan])
  for values in (result.ratio_of_means[0], result.mean_of_ratios[0]):
    np.testing.assert_allclose(values, expected, rtol=1e-6)
  assert result.num_examples == shape[0]


@pytest.mark.parametrize("shape,prefix", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_streamed_batches_match_numpy_float64(shape, prefix):
  rng = np.random.default_rng(1)
  batches = [(rng.normal(size=shape).astype(np.float32) * 3,
              rng.normal(size=shape).astype(np.float32)) for _ in range(3)]
  estimator = residual.NormRatio()
  state = estimator.init({"a": batches[0][0], "b": batches[0][0]}, prefix=prefix)
  for z, f in batches:
    state = estimator.update(state, {"a": z, "b": f}, {"a": f, "b": z})
  result = estimator.result(state)
  zs, fs = [z for z, _ in batches], [f for _, f in batches]
  for row, (stream, branch) in enumerate(((zs, fs), (fs, zs))):
    of_means, of_ratios = reference_ratios(stream, branch, prefix)
    np.testing.assert_allclose(result.ratio_of_means[row], of_means, rtol=1e-5)
    np.testing.assert_allclose(result.mean_of_ratios[row], of_ratios, rtol=1e-5)
  tokens = shape[1] if len(shape) == 3 else shape[1] * shape[2]
  assert result.num_tokens[0].tolist() == [
      sum(k in ("cls", "distillation") for k in prefix), tokens - len(prefix),
      prefix.count("register")]
  assert result.num_examples == 3 * shape[0]


@pytest.mark.parametrize("shape,prefix", [LAYOUTS["vit_cls_tokens"], LAYOUTS["feature_map"]],
                         ids=["vit_cls_tokens", "feature_map"])
def test_ratio_of_means_stderr_is_the_delta_method_and_close_to_the_jackknife(shape, prefix):
  """Standard error of ratio_of_means over examples: the ratio estimator's delta method
  sqrt(n / (n - 1) * sum_e (a_e - R b_e)^2) / sum_e b_e, from the residuals in float64, and
  within 10% of the jackknife's, which shares no algebra with it."""
  rng = np.random.default_rng(4)
  scales = rng.uniform(0.5, 2.0, size=(20 * shape[0],) + (1,) * (len(shape) - 1))
  z = (rng.normal(size=(20 * shape[0],) + shape[1:]) * 3 * scales).astype(np.float32)
  f = (rng.normal(size=z.shape) * (1 + scales ** 2)).astype(np.float32)
  estimator = residual.NormRatio()
  state = estimator.init({"a": z[:shape[0]]}, prefix=prefix)
  for start in range(0, len(z), shape[0]):
    state = estimator.update(state, {"a": z[start:start + shape[0]]},
                             {"a": f[start:start + shape[0]]})
  result = estimator.result(state)
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1, x.shape[-1])
  nz, nf = np.linalg.norm(flat(z), axis=-1), np.linalg.norm(flat(f), axis=-1)
  groups = {1: slice(len(prefix), None)} | ({0: slice(0, 1)} if prefix else {})
  n = len(z)
  for column, tokens in groups.items():
    a, b = nz[:, tokens].sum(1), nf[:, tokens].sum(1)
    ratio = a.sum() / b.sum()
    delta = np.sqrt(n / (n - 1) * ((a - ratio * b) ** 2).sum()) / b.sum()
    np.testing.assert_allclose(result.ratio_of_means_stderr[0, column], delta, rtol=1e-4)
    leave_one_out = (a.sum() - a) / (b.sum() - b)
    jackknife = np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    np.testing.assert_allclose(result.ratio_of_means_stderr[0, column], jackknife, rtol=0.1)
  assert np.isnan(result.ratio_of_means_stderr[0, 2])  # No registers.
  if not prefix:
    assert np.isnan(result.ratio_of_means_stderr[0, 0])


def test_every_prefix_kind_of_the_models_has_one_group():
  """A prefix kind added to the models (`layout.PREFIX_KINDS`) must be given a group here."""
  kinds = [kind for group in residual.PREFIX_GROUPS.values() for kind in group]
  assert sorted(kinds) == sorted(layout.PREFIX_KINDS)
  assert set(residual.PREFIX_GROUPS) | {"spatial"} == set(residual.GROUPS)
  assert residual.GROUPS[:2] == ("cls", "spatial")  # Columns 0 and 1 keep their meaning.
  tokens = models.create("ViT-B/16", num_registers=4).token_layout()
  assert layout.prefix_kinds(tokens) == REGISTERS and layout.prefix_kinds(None) == ()


def test_saved_state_keeps_the_token_kinds():
  """A state saved and restored (how a study resumes) still tells registers from CLS."""
  z = np.random.default_rng(4).normal(size=(4, 8, 8)).astype(np.float32)
  estimator = residual.NormRatio()
  state = estimator.init({"a": z}, prefix=REGISTERS)
  restored = residual.NormRatioState.from_numpy(state.to_numpy())
  assert restored.prefix == REGISTERS
  result = estimator.result(estimator.update(restored, {"a": z}, {"a": z / 2}))
  assert result.num_tokens.tolist() == [[1, 3, 4]]


def test_vit_sublayers_pair_stream_and_branch_and_skip_removed_blocks():
  model = models.create("ViT-Ti/16", image_size=16, patch_size=8, depth=3, hidden_size=8,
                        num_heads=2, mlp_dim=8, num_classes=3, remove_skips=(1,))
  layers = model.residual_sublayers()
  block = "Transformer/encoderblock_{}/"
  assert [(layer.name, layer.stream, layer.branch, layer.block) for layer in layers] == [
      (block.format(i) + kind, block.format(i) + stream, block.format(i) + branch, i)
      for i in (0, 2) for kind, stream, branch in (("attn", "in", "attn_branch"),
                                                   ("mlp", "mid", "mlp_branch"))]
  assert all(layer.identity_shortcut for layer in layers)


def test_mixer_sublayers():
  model = models.create("Mixer-S/32", image_size=16, patch_size=8, depth=2, hidden_size=8,
                        tokens_mlp_dim=4, channels_mlp_dim=8, num_classes=3)
  layers = model.residual_sublayers()
  assert [(layer.name, layer.stream, layer.branch) for layer in layers[:2]] == [
      ("MixerBlock_0/token_mixing", "MixerBlock_0/in", "MixerBlock_0/token_mixing_branch"),
      ("MixerBlock_0/channel_mixing", "MixerBlock_0/mid",
       "MixerBlock_0/channel_mixing_branch")]
  assert len(layers) == 4


def test_resnet_identity_and_projection_shortcuts():
  model = models.create("BiT-R50x1", image_size=32, units_per_stage=(2, 1, 1, 1),
                        width_factor=0.5, num_classes=3, remove_skips=(3,))
  layers = model.residual_sublayers()
  assert [(layer.name, layer.stream, layer.identity_shortcut) for layer in layers] == [
      ("block1/unit01", "block1/unit01/out", False),
      ("block1/unit02", "block1/unit01/out", True),
      ("block2/unit01", "block2/unit01/out", False),
      ("block4/unit01", "block4/unit01/out", False)]
  # The projected shortcut is out - branch; an identity shortcut is the unit input.
  rng = np.random.default_rng(2)
  inter = {n: rng.normal(size=(2, 2, 2, 4)) for n in
           ("block1/unit01/out", "block1/unit01/branch", "block1/unit02/branch")}
  streams, branches = models.streams_and_branches(layers[:2], inter)
  np.testing.assert_array_equal(
      streams["block1/unit01"], inter["block1/unit01/out"] - inter["block1/unit01/branch"])
  np.testing.assert_array_equal(streams["block1/unit02"], inter["block1/unit01/out"])
  np.testing.assert_array_equal(branches["block1/unit02"], inter["block1/unit02/branch"])


def test_a_model_without_skip_connections_has_nothing_to_measure():
  model = models.create("Mixer-S/32", image_size=16, patch_size=8, depth=2, hidden_size=8,
                        tokens_mlp_dim=4, channels_mlp_dim=8, num_classes=3, remove_skips=(0, 1))
  assert model.residual_sublayers() == ()
  with pytest.raises(ValueError, match="at least one sub-layer"):
    residual.NormRatio().init({})


def test_nonfinite_values_name_the_layer():
  z = np.ones((4, 3, 2), np.float32)
  f = z.copy()
  f[1, 2, 0] = np.nan
  estimator = residual.NormRatio()
  state = estimator.init({"good": z, "bad": z})
  state = estimator.update(state, {"good": z, "bad": z}, {"good": z, "bad": f})
  with pytest.raises(ValueError, match=r"\['bad'\]"):
    estimator.result(state)


@pytest.mark.parametrize("streams,branches,match", [
    ({"a": np.ones((4, 3, 2))}, {"a": np.ones((4, 3, 3))}, "same shape"),
    ({"a": np.ones((4, 3, 2))}, {"b": np.ones((4, 3, 2))}, "same sub-layers"),
    ({"a": np.ones((4, 4, 2))}, {"a": np.ones((4, 4, 2))},
     r"tokens \(0, 4, 0\), init saw \(0, 3, 0\)"),
], ids=["shape_mismatch", "unknown_layer", "other_token_count"])
def test_bad_updates_are_refused(streams, branches, match):
  estimator = residual.NormRatio()
  state = estimator.init({"a": np.ones((4, 3, 2))})
  with pytest.raises(ValueError, match=match):
    estimator.update(state, streams, branches)


def test_bad_shapes_and_empty_results_are_refused():
  estimator = residual.NormRatio()
  with pytest.raises(ValueError, match="tokens"):
    estimator.init({"a": np.ones((4, 3))})
  with pytest.raises(ValueError, match=r"more than the 3 prefix tokens"):
    estimator.init({"a": np.ones((4, 3, 2))}, prefix=("cls", "register", "register"))
  with pytest.raises(ValueError, match="token kinds of"):
    estimator.init({"a": np.ones((4, 3, 2))}, prefix=("cls", "patch"))
  with pytest.raises(ValueError, match="No batch"):
    estimator.result(estimator.init({"a": np.ones((4, 3, 2))}))


_SHARDED = """
import numpy as np
from vit_repr import parallel, residual
rng = np.random.default_rng(3)
batches = [(rng.normal(size=(16, 5, 8)).astype(np.float32) * 2,
             rng.normal(size=(16, 5, 8)).astype(np.float32)) for _ in range(3)]
mesh = parallel.make_mesh()
estimator = residual.NormRatio(mesh)
state = estimator.init({"x": batches[0][0]}, prefix=("cls",))
for z, f in batches:
  batch = parallel.global_batch({"z": z, "f": f}, mesh)
  state = estimator.update(state, {"x": batch["z"]}, {"x": batch["f"]})
r = estimator.result(state)
np.save(OUT, np.stack([r.ratio_of_means, r.mean_of_ratios, r.norm_stream, r.norm_branch]))
"""


@pytest.mark.parametrize("num_devices", [1, 8], ids=["1_device", "8_devices"])
def test_result_does_not_depend_on_device_count(tmp_path, num_devices):
  out = str(tmp_path / "result.npy")
  run_python(f"OUT = {out!r}\n" + _SHARDED, num_devices=num_devices)
  rng = np.random.default_rng(3)
  batches = [(rng.normal(size=(16, 5, 8)).astype(np.float32) * 2,
              rng.normal(size=(16, 5, 8)).astype(np.float32)) for _ in range(3)]
  of_means, of_ratios = reference_ratios([z for z, _ in batches], [f for _, f in batches],
                                          ("cls",))
  got = np.load(out)
  np.testing.assert_allclose(got[0, 0], of_means, rtol=1e-5)
  np.testing.assert_allclose(got[1, 0], of_ratios, rtol=1e-5)
