"""Tests of vit_repr.localization (token-vs-patch CKA maps) and its study, on tiny inputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import localization as localization_config
from tests.conftest import run_python
from vit_repr import features, localization, models, results
from vit_repr.studies import localization as study


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """Images with spatially correlated pixels: upsampled 4x4 noise plus pixel noise."""
  rng = np.random.default_rng(seed)
  low = rng.normal(size=(n, 4, 4, 3))
  up = np.repeat(np.repeat(low, size // 4, axis=1), size // 4, axis=2)
  return (up + 0.5 * rng.normal(size=(n, size, size, 3))).astype(np.float32)


def numpy_hsic1(k: np.ndarray, l: np.ndarray) -> float:
  """Song et al. (2012) unbiased HSIC, written out with the diagonal-free Grams."""
  n = k.shape[0]
  k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  ones = np.ones(n)
  return float((np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3)))


def numpy_minibatch_cka(x: np.ndarray, y: np.ndarray, batch: int) -> float:
  """Minibatch CKA over consecutive minibatches, float64."""
  terms = []
  for s in range(x.shape[0] // batch):
    xb = x[s * batch:(s + 1) * batch].astype(np.float64)
    yb = y[s * batch:(s + 1) * batch].astype(np.float64)
    k, l = xb @ xb.T, yb @ yb.T
    terms.append((numpy_hsic1(k, l), numpy_hsic1(k, k), numpy_hsic1(l, l)))
  xy, xx, yy = np.mean(terms, axis=0)
  return xy / np.sqrt(xx * yy)


@pytest.mark.parametrize("grid", [1, 2, 4], ids=lambda g: f"grid{g}")
def test_image_patches_match_a_loop(grid):
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  patches = np.asarray(localization.image_patches(images, grid))
  side = 8 // grid
  assert patches.shape == (2, grid * grid, side * side * 3)
  for row in range(grid):
    for col in range(grid):
      expected = images[:, row * side:(row + 1) * side, col * side:(col + 1) * side]
      np.testing.assert_array_equal(patches[:, row * grid + col], expected.reshape(2, -1))


@pytest.mark.parametrize("shape,prefix,grid", [
    ((17, 8), 1, 4), ((16, 8), 0, 4), ((18, 8), 2, 4), ((2, 2, 5), 0, 2), ((1, 1, 5), 1, 1),
], ids=["tokens_cls", "tokens_gap", "tokens_two_prefix", "feature_map", "feature_map_1x1"])
def test_layer_grid(shape, prefix, grid):
  assert localization.layer_grid(shape, num_prefix_tokens=prefix, token_grid=(grid, grid),
                                 image_size=32) == grid
  x = np.arange(np.prod(shape) * 2, dtype=np.float32).reshape(2, *shape)
  tokens = np.asarray(localization.spatial_tokens(x, num_prefix_tokens=prefix))
  assert tokens.shape == (2, grid * grid, shape[-1])
  if len(shape) == 2:
    np.testing.assert_array_equal(tokens, x[:, prefix:])
  else:  # Row-major: position q = row * grid + column.
    for q in range(grid * grid):
      np.testing.assert_array_equal(tokens[:, q], x[:, q // grid, q % grid])


@pytest.mark.parametrize("shape,prefix,token_grid,match", [
    ((64,), 0, None, "no spatial positions"),
    ((4, 4, 3, 2), 0, None, "no spatial positions"),
    ((16, 8), 1, (4, 4), r"16 tokens; expected num_prefix_tokens \(1\) \+ the patches"),
    ((16, 8), 0, None, "token_grid"),
    ((13, 8), 1, (3, 4), "square one"),
    ((3, 2, 8), 0, None, "square one"),
    ((3, 3, 8), 0, None, "multiple of 3"),
], ids=["pooled", "attention_probs", "cls_miscount", "tokens_without_grid", "non_square_tokens",
        "non_square_map", "grid_not_dividing"])
def test_layer_without_a_usable_grid_is_refused(shape, prefix, token_grid, match):
  with pytest.raises(ValueError, match=match):
    localization.LocalizationCKA({"layer": shape}, image_size=32, num_prefix_tokens=prefix,
                                 token_grid=token_grid)


def test_positions():
  assert [localization.position_index(p, 4) for p in ("corner", "edge", "centre")] == [
      (0, 0), (0, 2), (2, 2)]
  assert localization.position_index((3, 1), 4) == (3, 1)
  with pytest.raises(ValueError, match="outside the 4x4 grid"):
    localization.position_index((4, 0), 4)
  with pytest.raises(ValueError, match="Unknown position 'middle'"):
    localization.position_index("middle", 4)


def test_own_patch_summaries():
  maps = np.zeros((2, 2, 2, 2))
  for q in range(4):
    maps.reshape(4, 4)[q, q] = 0.5 + 0.1 * q
  maps.reshape(4, 4)[3, 0] = 0.9  # Token (1, 1) peaks at patch (0, 0).
  np.testing.assert_allclose(localization.own_patch_similarity(maps), [[0.5, 0.6], [0.7, 0.8]])
  np.testing.assert_array_equal(localization.peaks_at_own_patch(maps),
                                [[True, True], [True, False]])


def test_maps_match_numpy_float64():
  """Token layers (with CLS) and a feature map against direct float64 minibatch CKA."""
  rng = np.random.default_rng(1)
  n, batch = 36, 12
  images = smooth_images(n, size=8)
  patches4 = np.asarray(localization.image_patches(images, 4))  # [n, 16, 12]
  tokens = np.concatenate([
      rng.normal(size=(n, 1, 6)),
      patches4 @ rng.normal(size=(12, 6)) + rng.normal(size=(n, 16, 6))], axis=1)
  fmap = rng.normal(size=(n, 2, 2, 5)).astype(np.float32)
  maps = localization.localization_maps({"tokens": tokens.astype(np.float32), "fmap": fmap},
                                        images, num_prefix_tokens=1, token_grid=(4, 4),
                                        batch_size=batch)
  assert maps["tokens"].shape == (4, 4, 4, 4) and maps["fmap"].shape == (2, 2, 2, 2)
  patches2 = np.asarray(localization.image_patches(images, 2))
  for q in range(16):
    for p in range(16):
      expected = numpy_minibatch_cka(tokens[:, 1 + q], patches4[:, p], batch)
      np.testing.assert_allclose(maps["tokens"].reshape(16, 16)[q, p], expected, atol=2e-5)
  for q in range(4):
    for p in range(4):
      expected = numpy_minibatch_cka(fmap.reshape(n, 4, 5)[:, q], patches2[:, p], batch)
      np.testing.assert_allclose(maps["fmap"].reshape(4, 4)[q, p], expected, atol=2e-5)
  assert np.all(localization.peaks_at_own_patch(maps["tokens"]))


def test_full_grid_matches_numpy_float64():
  """ViT-B/16's layout at 224 px (CLS + 14x14 tokens, 16x16x3 patches), narrow width: two
  layers, given in computation order (not sorted: block 2 before block 10)."""
  rng = np.random.default_rng(4)
  n, batch, width = 48, 16, 16
  # Independent patches [n, 196, 768] of low rank, assembled into images [n, 224, 224, 3].
  patches = (rng.normal(size=(n, 196, 4)) @ rng.normal(size=(4, 768))
             + 0.1 * rng.normal(size=(n, 196, 768))).astype(np.float32)
  images = patches.reshape(n, 14, 14, 16, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, 224, 224, 3)
  np.testing.assert_array_equal(localization.image_patches(images, 14), patches)
  names = ("Transformer/encoderblock_2/out", "Transformer/encoderblock_10/out")
  layers = {name: np.concatenate([
      rng.normal(size=(n, 1, width)),
      patches @ rng.normal(size=(768, width)) * scale + rng.normal(size=(n, 196, width))],
      axis=1).astype(np.float32) for name, scale in zip(names, (0.2, 0.05))}
  loc = localization.LocalizationCKA({name: (197, width) for name in names}, image_size=224,
                                     num_prefix_tokens=1, token_grid=(14, 14))
  state = loc.init()
  assert state.per_grid["14"].names_x == tuple(f"{name}@{q}" for name in names
                                               for q in range(196))
  for s in range(n // batch):
    rows = slice(s * batch, (s + 1) * batch)
    state = loc.update(state, {name: x[rows] for name, x in layers.items()}, images[rows])
  state = localization.LocalizationState.from_numpy(state.to_numpy())  # A saved run loads.
  result = loc.result(state)
  assert list(result.maps) == list(names) and result.num_examples == n
  # Every token against its own patch and another one; the named positions against all.
  named = [r * 14 + c for r, c in (localization.position_index(p, 14)
                                   for p in localization.NAMED_POSITIONS)]
  pairs = ({(q, q) for q in range(196)} | {(q, (37 * q + 5) % 196) for q in range(196)}
           | {(q, p) for q in named for p in range(196)}
           | {(q, p) for p in named for q in range(196)})
  for name, x in layers.items():
    maps = result.maps[name].reshape(196, 196)
    for q, p in sorted(pairs):
      expected = numpy_minibatch_cka(x[:, 1 + q], patches[:, p], batch)
      np.testing.assert_allclose(maps[q, p], expected, atol=2e-5, err_msg=f"{name} {(q, p)}")
    assert np.all(localization.peaks_at_own_patch(result.maps[name]))


@pytest.fixture(scope="module")
def zeroed_vit():
  """A 2-block ViT-Ti (patch 8, 4x4 grid, width 192 = 8 * 8 * 3) with all-zero parameters,
  and the feature extractor of its last block's output (compiled once for the module)."""
  model = models.create("ViT-Ti/16", patch_size=8, depth=2, image_size=32, num_classes=3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  extractor = features.FeatureExtractor(model, "Transformer/encoderblock_1/out", image_size=32)
  return extractor, shapes


@pytest.mark.parametrize("embedding", ["orthogonal", "gaussian"])
def test_vit_with_zeroed_blocks_peaks_at_own_patch(zeroed_vit, embedding):
  """Zeroed blocks pass the patch embeddings through: each token is an affine map of its own
  patch (a rotation for an orthogonal embedding kernel, so CKA with it is exactly 1)."""
  extractor, shapes = zeroed_vit
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(8 * 8 * 3, 192))
  if embedding == "orthogonal":
    kernel = np.linalg.qr(kernel)[0]
  params["embedding"]["kernel"] = kernel.reshape(8, 8, 3, 192).astype(np.float32)
  params["embedding"]["bias"] = rng.normal(size=192).astype(np.float32)
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  params["Transformer"]["posembed_input"]["pos_embedding"] = rng.normal(
      size=posemb.shape).astype(np.float32)
  images = smooth_images(60)
  tokens = np.asarray(extractor(params, images)["Transformer/encoderblock_1/out"])
  maps = localization.localization_maps(
      {"out": tokens.reshape(60, 17, 192)}, images, num_prefix_tokens=1, token_grid=(4, 4),
      batch_size=20)["out"]
  own = localization.own_patch_similarity(maps)
  assert np.all(localization.peaks_at_own_patch(maps))
  others = maps.reshape(16, 16)[~np.eye(16, dtype=bool)]
  if embedding == "orthogonal":
    np.testing.assert_allclose(own, 1.0, atol=1e-4)
  assert np.max(others) < np.min(own) - 0.1


def test_update_checks_its_inputs():
  loc = localization.LocalizationCKA({"t": (5, 3)}, image_size=4, num_prefix_tokens=1,
                                     token_grid=(2, 2))
  state = loc.init()
  other = localization.LocalizationCKA({"u": (5, 3)}, image_size=4, num_prefix_tokens=1,
                                       token_grid=(2, 2))
  with pytest.raises(ValueError, match=r"other layers than \['u'\]"):
    other.update(state, {"u": np.zeros((8, 5, 3))}, np.zeros((8, 4, 4, 3)))
  with pytest.raises(ValueError, match="lack layers"):
    loc.update(state, {}, np.zeros((8, 4, 4, 3)))
  with pytest.raises(ValueError, match="15 features per example"):
    loc.update(state, {"t": np.zeros((8, 4, 3))}, np.zeros((8, 4, 4, 3)))
  with pytest.raises(ValueError, match=r"images must be \[b, 4, 4, C\]"):
    loc.update(state, {"t": np.zeros((8, 5, 3))}, np.zeros((8, 8, 8, 3)))


def test_config_args():
  config = localization_config.get_config("vit_b16+r50,gap=/runs/gap/params")
  assert sorted(config.models) == ["r50", "vit_b16", "vit_gap"]
  assert config.models.vit_gap.overrides.classifier == "gap"
  assert config.models.vit_gap.checkpoint == "/runs/gap/params"
  assert config.models.r50.checkpoint.endswith("BiT-M-R50x1.npz")
  for bad in ("vit_b99", "vit_b16,gap=", "vit_b16,colour=red", "r50+r50"):
    with pytest.raises(ValueError, match="vit_b16"):
      localization_config.get_config(bad)


def test_study_needs_models(tmp_path):
  config = localization_config.get_config("runlocal")
  config.models = {}
  with pytest.raises(ValueError, match="config.models is empty"):
    study.run(config, str(tmp_path))


def tiny_config():
  """One 1-block ViT-CLS on 120 digits, minibatches of 20 (6 batches)."""
  config = localization_config.get_config("runlocal")
  vit = config.models.vit_cls
  vit.overrides.depth = 1
  vit.layers = ("Transformer/encoderblock_0/out",)
  config.models = {"vit_cls": vit}
  config.data.num_examples = 120
  config.analysis.minibatch_size = 20
  config.checkpoint_every = 2
  return config


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
  summary = study.run(localization_config.get_config("runlocal"), str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "localization")
  assert summary["num_examples"] == 240 and metadata["num_minibatches"] == 6
  for model in ("vit_cls", "vit_gap"):
    for block in (0, 3):
      maps = arrays[f"maps/{model}/Transformer/encoderblock_{block}/out"]
      assert maps.shape == (4, 4, 4, 4)
      assert np.all(np.isfinite(maps)) and np.all((maps > -0.2) & (maps <= 1.0))
      # Random-init ViTs keep each token closest to its own patch (skip connections).
      assert np.all(localization.peaks_at_own_patch(maps))
      np.testing.assert_array_equal(arrays[f"own_patch/{model}/Transformer/encoderblock_"
                                           f"{block}/out"],
                                    localization.own_patch_similarity(maps))
    layers = metadata["layers"][model]
    assert layers["Transformer/encoderblock_0/out"]["own_patch_cka"] > 0.8
    assert (layers["Transformer/encoderblock_0/out"]["own_patch_cka"]
            > layers["Transformer/encoderblock_3/out"]["own_patch_cka"])
  assert arrays["maps/bit/block2/out"].shape == (4, 4, 4, 4)
  assert arrays["maps/bit/block3/out"].shape == (2, 2, 2, 2)
  stderr = arrays["stderr/bit/block2/out"]
  assert np.all(np.isfinite(stderr)) and np.all(stderr > 0) and np.all(stderr < 0.2)
  for ext in ("png", "pdf"):
    assert os.path.getsize(tmp_path / "figures" / f"localization.{ext}") > 1000


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
  study.run(tiny_config(), str(tmp_path / "straight"))
  interrupted = tiny_config()
  interrupted.stop_after_batches = 3
  assert study.run(interrupted, str(tmp_path / "resumed")).summary == {"batches_done": 3,
                                                                        "batches_total": 6}
  study.run(tiny_config(), str(tmp_path / "resumed"))
  straight, _ = results.read_results(str(tmp_path / "straight"), "localization")
  resumed, _ = results.read_results(str(tmp_path / "resumed"), "localization")
  assert sorted(straight) == sorted(resumed)
  for name in straight:
    np.testing.assert_array_equal(resumed[name], straight[name])
  other = tiny_config()
  other.analysis.num_passes = 2
  with pytest.raises(ValueError, match="different config"):
    study.run(other, str(tmp_path / "resumed"))


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  """Each device's shard is a minibatch: 8 devices x 6 examples == 1 device x 6 examples."""
  code = f"""
import numpy as np
from tests.test_localization import smooth_images
from vit_repr import localization, parallel
images = smooth_images(96, size=8)
rng = np.random.default_rng(3)
tokens = rng.normal(size=(96, 4, 5)).astype(np.float32) + np.asarray(
    localization.image_patches(images, 2))[..., :5]
maps = localization.localization_maps({{"t": tokens}}, images, token_grid=(2, 2), batch_size=6,
                                      mesh=parallel.make_mesh())
np.save({str(tmp_path)!r} + "/maps.npy", maps["t"])
"""
  run_python(code, num_devices=8)
  eight = np.load(tmp_path / "maps.npy")
  run_python(code, num_devices=1)
  one = np.load(tmp_path / "maps.npy")
  np.testing.assert_allclose(eight, one, atol=1e-6)
  assert np.all(localization.peaks_at_own_patch(one))


@pytest.mark.slow
def test_todays_vit_families_map_their_own_grids(tmp_path):
  """`dinov2_b14+siglip_b16,runlocal`: DINOv2's 16 x 16 grid behind CLS and 4 registers and
  SigLIP's 14 x 14 grid without any prefix token, at 12 blocks: one map per grid position.
  The upsampled digits leave some input patches constant (background), and in the first block
  the tokens at those positions too: their CKA is undefined (NaN), so a map entry is NaN exactly
  where its patch or its token is constant."""
  study.run(localization_config.get_config("dinov2_b14+siglip_b16,runlocal"), str(tmp_path))
  arrays, metadata = results.read_results(str(tmp_path), "localization")
  for model, grid in (("dinov2_b14", 16), ("siglip_b16", 14)):
    layers = list(arrays[f"layers/{model}"])
    assert layers == [f"Transformer/encoderblock_{i}/out" for i in (0, 5, 11)]
    for layer in layers:
      maps = arrays[f"maps/{model}/{layer}"]
      assert maps.shape == (grid,) * 4
      undefined = np.isnan(maps)  # [token row, token column, patch row, patch column]
      constant_patches = undefined.all(axis=(0, 1))
      constant_tokens = undefined.all(axis=(2, 3))
      np.testing.assert_array_equal(
          undefined, constant_tokens[:, :, None, None] | constant_patches[None, None])
      assert constant_patches.sum() < grid * grid and np.isfinite(maps).any()
      assert metadata["layers"][model][layer]["grid"] == grid
