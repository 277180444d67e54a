"""Tests for vit_repr/models/resnet.py: BiT ResNet-v2 against a NumPy float64 forward pass.

The reference below is written directly from big_transfer's definition and reads a flat dict in
the .npz layout (keys prefixed `resnet/`), so it shares no code with the Flax module.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr import checkpoints
from vit_repr.models import resnet
from vit_repr.models.intermediates import flatten_intermediates

# A tiny valid variant: 32 stem channels (GroupNorm needs multiples of 32), two units in the
# first stage so that an identity-shortcut unit is covered, 32x32 inputs.
TINY = dict(units_per_stage=(2, 1, 1, 1), width_factor=0.5, image_size=32, num_classes=10)
GROUPS, GN_EPS, WS_EPS = 32, 1e-5, 1e-10


def _npz_params(units_per_stage, width_factor, num_classes, seed=0):
  """Random float64 parameters in the big_transfer .npz layout, keyed exactly as the file."""
  rng = np.random.default_rng(seed)
  params = {}

  def conv(key, k, cin, cout):
    params[f"resnet/{key}/standardized_conv2d/kernel"] = rng.normal(size=(k, k, cin, cout))

  def norm(prefix, c):
    params[f"{prefix}group_norm/gamma"] = 1 + 0.3 * rng.normal(size=c)
    params[f"{prefix}group_norm/beta"] = 0.3 * rng.normal(size=c)

  width = int(64 * width_factor)
  conv("root_block", 7, 3, width)
  cin = width
  for s, num_units in enumerate(units_per_stage):
    cmid = width * 2**s
    for u in range(num_units):
      unit = f"block{s + 1}/unit{u + 1:02d}"
      norm(f"resnet/{unit}/a/", cin)
      conv(f"{unit}/a", 1, cin, cmid)
      if u == 0:
        conv(f"{unit}/a/proj", 1, cin, 4 * cmid)
      norm(f"resnet/{unit}/b/", cmid)
      conv(f"{unit}/b", 3, cmid, cmid)
      norm(f"resnet/{unit}/c/", cmid)
      conv(f"{unit}/c", 1, cmid, 4 * cmid)
      cin = 4 * cmid
  norm("resnet/", cin)
  params["resnet/head/conv2d/kernel"] = 0.1 * rng.normal(size=(1, 1, cin, num_classes))
  params["resnet/head/conv2d/bias"] = rng.normal(size=num_classes)
  return params


def _to_flax(npz_params):
  tree = {k[len("resnet/"):]: jnp.asarray(v, jnp.float32) for k, v in npz_params.items()}
  return {"params": flax.traverse_util.unflatten_dict(tree, sep="/")}


def _np_standardize(w):
  mean = w.mean(axis=(0, 1, 2))
  var = ((w - mean) ** 2).mean(axis=(0, 1, 2))
  return (w - mean) / np.sqrt(var + WS_EPS)


def _np_conv(x, w, stride):
  """Standardised conv with big_transfer's fixed padding ((k-1)//2 before, rest after), VALID."""
  w = _np_standardize(w)
  k = w.shape[0]
  before = (k - 1) // 2
  x = np.pad(x, ((0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
  for i in range(k):
    for j in range(k):
      window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += window @ w[i, j]
  return out


def _np_gn_relu(x, gamma, beta):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, GROUPS, c // GROUPS)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      g.var(axis=(1, 2, 4), keepdims=True) + GN_EPS)
  return np.maximum(g.reshape(x.shape) * gamma + beta, 0)


def _np_forward(p, images, units_per_stage, remove_skips=()):
  """Returns (logits, {intermediate name: array}) in float64."""
  feats = {}
  x = _np_conv(images.astype(np.float64), p["resnet/root_block/standardized_conv2d/kernel"], 2)
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Zero padding, as in big_transfer.
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  x = np.max([x[:, i:i + 2 * out_h - 1:2, j:j + 2 * out_w - 1:2]
              for i in range(3) for j in range(3)], axis=0)
  feats["root_block/out"] = x
  flat_index = 0
  for s, num_units in enumerate(units_per_stage):
    for u in range(num_units):
      name = f"block{s + 1}/unit{u + 1:02d}"

      def pre(key, z, unit=name):
        return _np_gn_relu(z, p[f"resnet/{unit}/{key}/group_norm/gamma"],
                           p[f"resnet/{unit}/{key}/group_norm/beta"])

      stride = 2 if (s > 0 and u == 0) else 1
      z = pre("a", x)
      y = _np_conv(z, p[f"resnet/{name}/a/standardized_conv2d/kernel"], 1)
      y = _np_conv(pre("b", y), p[f"resnet/{name}/b/standardized_conv2d/kernel"], stride)
      y = _np_conv(pre("c", y), p[f"resnet/{name}/c/standardized_conv2d/kernel"], 1)
      feats[f"{name}/branch"] = y
      if flat_index not in remove_skips:
        proj_key = f"resnet/{name}/a/proj/standardized_conv2d/kernel"
        y = y + (_np_conv(z, p[proj_key], stride) if u == 0 else x)
      feats[f"{name}/out"] = x = y
      flat_index += 1
    feats[f"block{s + 1}/out"] = x
  x = _np_gn_relu(x, p["resnet/group_norm/gamma"], p["resnet/group_norm/beta"]).mean(axis=(1, 2))
  feats["pre_logits"] = x
  logits = x @ p["resnet/head/conv2d/kernel"][0, 0] + p["resnet/head/conv2d/bias"]
  feats["logits"] = logits
  return logits, feats


def _images(batch=2, size=32, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, size=(batch, size, size, 3))


def _apply(model, variables, images):
  logits, state = model.apply(variables, jnp.asarray(images, jnp.float32),
                              mutable=["intermediates"])
  return np.asarray(logits, np.float64), {
      k: np.asarray(v, np.float64) for k, v in flatten_intermediates(state).items()}


def _assert_close(actual, expected, rtol=2e-4):
  scale = np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("remove_skips", [(), (1,), (1, 2)],
                         ids=["all_skips", "no_skip_identity_unit", "no_skip_proj_unit_too"])
def test_matches_numpy_float64_reference(remove_skips):
  model = resnet.from_variant("R50x1", remove_skips=remove_skips, **TINY)
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  if 2 in remove_skips:  # Unit 2 (block2/unit01) then has no shortcut, hence no projection.
    del npz["resnet/block2/unit01/a/proj/standardized_conv2d/kernel"]
  images = _images()
  logits, feats = _apply(model, _to_flax(npz), images)
  ref_logits, ref_feats = _np_forward(npz, images, TINY["units_per_stage"], remove_skips)
  _assert_close(logits, ref_logits)
  assert feats.keys() == ref_feats.keys()
  for name, ref in ref_feats.items():
    _assert_close(feats[name], ref)


def test_parameter_tree_is_big_transfer_layout():
  model = resnet.from_variant("R50x1", **TINY)
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  flat = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
  assert {f"resnet/{k}": v.shape for k, v in flat.items()} == {
      k: v.shape for k, v in npz.items()}
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_load_big_transfer_npz_gives_reference_logits(tmp_path):
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  path = tmp_path / "BiT-tiny.npz"
  np.savez(path, **{k: v.astype(np.float32) for k, v in npz.items()})
  model = resnet.from_variant("R50x1", **TINY)
  params = checkpoints.load(str(path), model)
  images = _images()
  logits, _ = _apply(model, {"params": params}, images)
  _assert_close(logits, _np_forward(npz, images, TINY["units_per_stage"])[0])


def test_intermediate_names_and_shapes():
  model = resnet.from_variant("R50x1", **TINY)
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  _, feats = _apply(model, _to_flax(npz), _images())
  # Stem 32 channels at 32/4 = 8; stages at 8, 4, 2, 1 with 4 * cmid = 128, 256, 512, 1024.
  expected = {"root_block/out": (2, 8, 8, 32)}
  for s, (units, side, ch) in enumerate(zip((2, 1, 1, 1), (8, 4, 2, 1), (128, 256, 512, 1024))):
    for u in range(units):
      expected[f"block{s + 1}/unit{u + 1:02d}/branch"] = (2, side, side, ch)
      expected[f"block{s + 1}/unit{u + 1:02d}/out"] = (2, side, side, ch)
    expected[f"block{s + 1}/out"] = (2, side, side, ch)
  expected["pre_logits"] = (2, 1024)
  expected["logits"] = (2, 10)
  assert {k: v.shape for k, v in feats.items()} == expected


def test_remove_skips_changes_only_the_chosen_unit():
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  variables = _to_flax(npz)
  images = _images()
  _, base = _apply(resnet.from_variant("R50x1", **TINY), variables, images)
  _, cut = _apply(resnet.from_variant("R50x1", remove_skips=(1,), **TINY), variables, images)
  # Units before the cut are untouched; the cut unit returns its branch f(z) alone.
  for name in ("root_block/out", "block1/unit01/out", "block1/unit02/branch"):
    np.testing.assert_array_equal(cut[name], base[name])
  np.testing.assert_array_equal(cut["block1/unit02/out"], cut["block1/unit02/branch"])
  _assert_close(base["block1/unit02/out"],
                base["block1/unit01/out"] + base["block1/unit02/branch"])
  assert not np.allclose(cut["logits"], base["logits"])


def test_weight_standardization_formula():
  kernel = np.random.default_rng(3).normal(2.0, 3.0, size=(3, 3, 5, 7))
  got = np.asarray(resnet.standardize_weight(jnp.asarray(kernel, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, _np_standardize(kernel), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.mean(axis=(0, 1, 2)), 0, atol=1e-6)
  np.testing.assert_allclose(got.var(axis=(0, 1, 2)), 1, rtol=1e-5)


def test_conv_output_invariant_to_kernel_scale_and_shift():
  conv = resnet.StandardizedConv(features=4, kernel_size=3, strides=2)
  x = _images(size=9)
  kernel = np.random.default_rng(4).normal(size=(3, 3, 3, 4))
  out = np.asarray(conv.apply({"params": {"kernel": jnp.asarray(kernel, jnp.float32)}},
                              jnp.asarray(x, jnp.float32)), np.float64)
  assert out.shape == (2, 5, 5, 4)
  _assert_close(out, _np_conv(x, kernel, 2))
  shifted = jnp.asarray(5.0 * kernel + np.arange(4.0), jnp.float32)
  _assert_close(np.asarray(conv.apply({"params": {"kernel": shifted}},
                                      jnp.asarray(x, jnp.float32)), np.float64), out)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  npz = _npz_params(TINY["units_per_stage"], TINY["width_factor"], TINY["num_classes"])
  images = _images()
  model = resnet.from_variant("R50x1", dtype=jnp.bfloat16, **TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  logits = jax.jit(model.apply)(_to_flax(npz), jnp.asarray(images, jnp.float32))
  assert logits.dtype == jnp.float32
  ref_logits, _ = _np_forward(npz, images, TINY["units_per_stage"])
  np.testing.assert_allclose(logits, ref_logits, atol=0.1 * np.abs(ref_logits).max())


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (2, 32, 32, 1), (32, 32, 3)],
                         ids=["wrong_size", "wrong_channels", "missing_batch"])
def test_wrong_input_shape_raises(shape):
  model = resnet.from_variant("R50x1", **TINY)
  with pytest.raises(ValueError, match=r"expects images \[batch, 32, 32, 3\].*got shape"):
    model.init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("variant,overrides,match", [
    ("R50x1", {"depth": 3}, r"Unknown override.*'depth'.*accepted fields: num_classes"),
    ("R42x1", {}, r"Unknown BiT variant 'R42x1'.*R50x1"),
    ("R50x1", {"width_factor": 0.25}, r"width_factor=0.25.*multiple of 0.5"),
    ("R50x1", {"remove_skips": (16,)}, r"remove_skips.*\[0, 16\).*\[16\]"),
    ("R50x1", {"units_per_stage": (3, 0)}, r"units_per_stage"),
    ("R50x1", {"dtype": jnp.int32}, r"dtype must be a floating dtype"),
], ids=["unknown_override", "unknown_variant", "bad_width", "bad_skip_index", "bad_units",
        "int_dtype"])
def test_bad_configuration_raises(variant, overrides, match):
  with pytest.raises(ValueError, match=match):
    resnet.from_variant(variant, **overrides)


# Exact parameter counts at 1000 classes; equal to timm's resnetv2_{50x1,...}_bit models.
PARAM_COUNTS = {
    "R50x1": 25_549_352,
    "R50x3": 217_319_080,
    "R101x1": 44_541_480,
    "R101x3": 387_934_888,
    "R152x2": 236_335_208,
    "R152x4": 936_533_224,
}


def test_every_variant_has_a_pinned_count():
  assert PARAM_COUNTS.keys() == resnet.VARIANTS.keys()


@pytest.mark.parametrize("variant", list(PARAM_COUNTS))
def test_parameter_count(variant):
  model = resnet.from_variant(variant, num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(shapes)) == PARAM_COUNTS[variant]
