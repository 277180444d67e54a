"""Tests for vit_repr.attention and the attention-distance study (paper Figures 3-5)."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import attention_distance as attention_config
from tests.conftest import run_python
from tests.test_cka import ref_minibatch_cka
from vit_repr import attention, features, results
from vit_repr.models import create, display_name
from vit_repr.studies import attention_distance


def reference_distances(rows, cols, patch):
  """Pairwise patch-centre distances by explicit loops (float64)."""
  centres = [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(rows) for c in range(cols)]
  return np.asarray([[math.hypot(a[0] - b[0], a[1] - b[1]) for b in centres] for a in centres])


def reference_mean_distance(probs, distances, prefix, renormalize):
  """[b, heads] mean attention distance from float64 loops over queries."""
  probs = np.asarray(probs, np.float64)
  b, heads, tokens, _ = probs.shape
  out = np.zeros((b, heads))
  for i, h in itertools.product(range(b), range(heads)):
    per_query = []
    for q in range(prefix, tokens):
      w = probs[i, h, q, prefix:]
      if renormalize:
        w = w / w.sum()
      per_query.append(float(w @ distances[q - prefix]))
    out[i, h] = np.mean(per_query)
  return out


def random_probs(key, b, heads, tokens):
  return jax.nn.softmax(3.0 * jax.random.normal(key, (b, heads, tokens, tokens)), axis=-1)


@pytest.mark.parametrize("grid,patch", [((2, 2), 16), ((3, 4), 8), ((4, 4), 8)],
                         ids=["2x2_p16", "3x4_p8", "4x4_p8"])
def test_patch_distances_match_loops(grid, patch):
  np.testing.assert_allclose(attention.patch_distances(grid, patch),
                             reference_distances(*grid, patch), atol=1e-12)


@pytest.mark.parametrize("prefix", [0, 1], ids=["no_cls", "cls"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_attend_to_self_is_zero(prefix, renormalize):
  tokens = prefix + 9
  probs = jnp.broadcast_to(jnp.eye(tokens), (2, 3, tokens, tokens))
  distance, cls_mass = attention.per_example_distance(
      probs, attention.patch_distances((3, 3), 16), num_prefix_tokens=prefix,
      renormalize=renormalize)
  np.testing.assert_allclose(distance, 0.0, atol=1e-6)
  np.testing.assert_allclose(cls_mass, 0.0, atol=1e-7)


@pytest.mark.parametrize("grid,patch", [((2, 2), 16), ((3, 5), 8), ((14, 14), 16)],
                         ids=["2x2_p16", "3x5_p8", "14x14_p16"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_uniform_attention_gives_mean_pairwise_distance(grid, patch, renormalize):
  """Uniform attention over CLS + N patches: the mean pairwise centre distance (self pairs
  included), scaled by N / (N + 1) without renormalisation."""
  n = grid[0] * grid[1]
  centres = np.asarray([((r + 0.5) * patch, (c + 0.5) * patch)
                        for r in range(grid[0]) for c in range(grid[1])])
  pairwise = np.mean([math.dist(a, b) for a in centres for b in centres])
  expected = pairwise if renormalize else pairwise * n / (n + 1)
  probs = jnp.full((1, 2, n + 1, n + 1), 1.0 / (n + 1))
  distance, cls_mass = attention.per_example_distance(
      probs, attention.patch_distances(grid, patch), num_prefix_tokens=1,
      renormalize=renormalize)
  np.testing.assert_allclose(distance, expected, rtol=1e-5)
  np.testing.assert_allclose(cls_mass, 1.0 / (n + 1), rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_streaming_accumulator_matches_reference(renormalize):
  grid, patch, heads, prefix = (3, 3), 8, 2, 1
  tokens = prefix + 9
  distances = reference_distances(*grid, patch)
  batches = [random_probs(jax.random.key(i), 5, heads, tokens) for i in range(3)]
  names = ["layer0", "layer1"]
  mad = attention.MeanAttentionDistance(names, num_heads=heads, grid=grid, patch_size=patch,
                                        num_prefix_tokens=prefix, renormalize=renormalize)
  state = mad.init()
  for probs in batches:
    state = mad.update(state, {"layer0": probs, "layer1": probs[:, ::-1]})
  result = mad.result(state)
  per_example = np.concatenate([reference_mean_distance(p, distances, prefix, renormalize)
                                for p in batches])  # [15, heads]
  expected = np.stack([per_example.mean(0), per_example[:, ::-1].mean(0)])
  np.testing.assert_allclose(result.distance, expected, rtol=1e-5)
  np.testing.assert_allclose(result.distance_std[0], per_example.std(0, ddof=1), rtol=1e-3)
  cls = np.concatenate([np.asarray(p, np.float64)[:, :, 1:, 0].mean(-1) for p in batches])
  np.testing.assert_allclose(result.cls_attention[0], cls.mean(0), rtol=1e-5)
  assert result.num_examples == 15 and result.names == tuple(names)


def test_padding_rows_are_left_out():
  grid, patch, heads, prefix = (3, 3), 8, 2, 1
  probs = random_probs(jax.random.key(7), 6, heads, prefix + 9)
  mad = attention.MeanAttentionDistance(["l"], num_heads=heads, grid=grid, patch_size=patch,
                                        num_prefix_tokens=prefix)
  padded = probs.at[4:].set(jnp.nan)  # Padding rows may hold anything.
  state = mad.update(mad.init(), {"l": padded}, jnp.arange(6) < 4)
  result = mad.result(state)
  expected = reference_mean_distance(probs[:4], reference_distances(*grid, patch), prefix, True)
  np.testing.assert_allclose(result.distance[0], expected.mean(0), rtol=1e-5)
  np.testing.assert_allclose(result.distance_std[0], expected.std(0, ddof=1), rtol=1e-3)
  assert result.num_examples == 4


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="T = 1 prefix tokens \\+ 9 patches"):
    attention.per_example_distance(jnp.ones((1, 2, 9, 9)), attention.patch_distances((3, 3), 8),
                                   num_prefix_tokens=1)
  mad = attention.MeanAttentionDistance(["a"], num_heads=2, grid=(2, 2), patch_size=4)
  with pytest.raises(ValueError, match="missing"):
    mad.update(mad.init(), {"b": jnp.ones((1, 2, 4, 4))})
  with pytest.raises(ValueError, match="update before result"):
    mad.result(mad.init())


def test_resnet_has_no_attention_distance():
  resnet = create("BiT-R50x1", image_size=32, num_classes=10, units_per_stage=(1, 1, 1, 1),
                  width_factor=0.5)
  shapes = features.intermediate_shapes(resnet, 32)
  with pytest.raises(ValueError, match="not a Transformer"):
    attention_distance.attention_layers("BiT-R50x1", resnet, shapes, [".*"])


def test_unknown_layer_lists_available_names():
  vit = create("ViT-Ti/16", image_size=32, patch_size=8, depth=2, num_classes=10)
  shapes = features.intermediate_shapes(vit, 32)
  with pytest.raises(ValueError, match="Available names: .*encoderblock_1/attn_probs"):
    attention_distance.attention_layers("ViT", vit, shapes,
                                        ["Transformer/encoderblock_5/attn_probs"])
  with pytest.raises(ValueError, match="not attention maps"):
    attention_distance.attention_layers("ViT", vit, shapes, ["Transformer/encoderblock_0/out"])


def test_config_args():
  with pytest.raises(ValueError, match="vit_b16_i1k"):
    attention_config.get_config("vit_b99")
  config = attention_config.get_config("vit_l16_i1k+r50")
  assert config.model.name == "ViT-L/16" and "i1k" in config.model.checkpoint
  assert config.resnet.name == "BiT-R50x1"
  assert not attention_config.get_config("vit_h14").resnet.name


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  code = f"""
import jax, numpy as np
from vit_repr import attention, parallel
mesh = parallel.make_mesh()
mad = attention.MeanAttentionDistance(['l'], num_heads=3, grid=(4, 4), patch_size=8,
                                      num_prefix_tokens=1, mesh=mesh)
state = mad.init()
for i in range(2):
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(i), (16, 3, 17, 17)), axis=-1)
  state = mad.update(state, {{'l': jax.device_put(probs, parallel.batch_sharding(mesh))}})
np.save({str(tmp_path)!r} + f'/{{jax.device_count()}}.npy', mad.result(state).distance)
"""
  run_python(code, num_devices=8)
  run_python(code, num_devices=1)
  np.testing.assert_allclose(np.load(tmp_path / "8.npy"), np.load(tmp_path / "1.npy"),
                             rtol=1e-6)


@pytest.mark.slow
def test_runlocal_end_to_end_resumes_and_matches_references(tmp_path):
  """The study on the embedded data, killed after one batch and rerun: distances match a
  direct NumPy recomputation from the model's attention maps, and every head's CKA with every
  ResNet layer matches float64 minibatch CKA of that head's own outputs."""
  config = attention_config.get_config("runlocal")
  config.model.overrides.depth = 2
  config.data.num_examples = 120
  config.checkpoint_every = 1
  config.stop_after_batches = 1
  assert attention_distance.run(config, str(tmp_path)).summary == {"batches_done": 1,
                                                                  "batches_total": 3}
  assert not (tmp_path / "attention_distance.npz").exists()
  config.stop_after_batches = None
  summary = attention_distance.run(config, str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "attention_distance")
  assert arrays["distance"].shape == (2, 3) and summary["num_examples"] == 120
  assert metadata["renormalize"] is True and metadata["patch_grid"] == [4, 4]

  from vit_repr.studies import loading  # pylint: disable=g-import-not-at-top
  from vit_repr import data, parallel  # pylint: disable=g-import-not-at-top
  model, params = loading.load_model(config.model, image_size=32, num_classes=10)
  resnet, resnet_params = loading.load_model(config.resnet, image_size=32, num_classes=10)
  extractor = features.FeatureExtractor(model, r".*/(attn_probs|head_outputs)", image_size=32)
  resnet_extractor = features.FeatureExtractor(resnet, list(config.resnet.layers),
                                               image_size=32)
  images = next(iter(data.eval_batches("digits", "test", image_size=32, global_batch_size=120,
                                       mesh=parallel.make_mesh(), num_examples=120)))["image"]
  maps = extractor(params, images)
  distances = reference_distances(4, 4, 8)
  for row in range(2):
    probs = np.asarray(maps[f"Transformer/encoderblock_{row}/attn_probs"]).reshape(
        120, 3, 17, 17)
    expected = reference_mean_distance(probs, distances, 1, True).mean(0)
    np.testing.assert_allclose(arrays["distance"][row], expected, rtol=1e-4)

  assert arrays["head_cka"].shape == (6, 2)  # 2 blocks x 3 heads vs 2 ResNet units.
  resnet_features = resnet_extractor(resnet_params, images)
  for index, name in enumerate(arrays["head_names"]):
    block, head = (int(part) for part in re.findall(r"\d+", name))
    source = f"Transformer/encoderblock_{block}/head_outputs"
    outputs = np.asarray(maps[source]).reshape(120, *extractor.shapes[source])  # [b, T, H, d]
    spatial = outputs[:, 1:, head].reshape(120, -1)  # The head's patch tokens, CLS dropped.
    for column, layer in enumerate(arrays["resnet_names"]):
      expected = ref_minibatch_cka(spatial, np.asarray(resnet_features[layer]), 40)
      np.testing.assert_allclose(arrays["head_cka"][index, column], expected, rtol=1e-4,
                                 err_msg=f"{name} vs {layer}")
  np.testing.assert_allclose(arrays["head_distance"], arrays["distance"].ravel(), rtol=1e-6)
  assert list(arrays["head_block"]) == [0, 0, 0, 1, 1, 1]
  # The summary's correlation per ResNet layer: Pearson, over heads, of each head's mean
  # distance with its CKA to that layer, recomputed in float64 from the saved arrays.
  correlation = summary["distance_cka_correlation"]
  assert list(correlation) == [display_name(r) for r in arrays["resnet_names"]]
  x = arrays["head_distance"].astype(np.float64) - arrays["head_distance"].mean()
  for column, value in enumerate(correlation.values()):
    y = arrays["head_cka"][:, column].astype(np.float64)
    y = y - y.mean()
    assert value == pytest.approx(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)),
                                  abs=6e-4)  # Rounded to 3 decimals.
  for stem in ("attention_distance", "head_cka_vs_distance"):
    assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000


@pytest.mark.slow
def test_dinov2_registers_are_left_out_like_cls(tmp_path):
  """`dinov2_b14,runlocal`: 12 blocks, a 16 x 16 grid of 14 px patches behind CLS and 4
  registers; every head's distance is that of the patch-to-patch weights only, so it lies
  between 0 and the grid's diagonal."""
  config = attention_config.get_config("dinov2_b14,runlocal")
  summary = attention_distance.run(config, str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "attention_distance")
  assert metadata["num_prefix_tokens"] == 5 and metadata["patch_grid"] == [16, 16]
  assert arrays["distance"].shape == (12, 12)  # ViT-B: 12 blocks x 12 heads.
  assert np.all(arrays["distance"] > 0) and np.all(arrays["distance"] < 15 * 14 * np.sqrt(2))
  assert len(summary["mean_distance_per_layer"]) == 12
