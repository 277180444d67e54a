"""Linear probes (vit_repr.probes) and the linear-probe study (vit_repr.studies.linear_probes)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_probes as probe_configs
from tests.conftest import run_python
from vit_repr import data, models, parallel, probes, results
from vit_repr.studies import linear_probes, runner

NUM_CLASSES = 5


def clusters(num_examples, dim, *, seed, spread=0.3, num_classes=NUM_CLASSES):
  """Linearly separable data: class centres 3 apart in each coordinate, small noise."""
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(num_classes, dim)) * 3.0
  labels = np.arange(num_examples) % num_classes
  return (centres[labels] + spread * rng.normal(size=(num_examples, dim))).astype(np.float32), \
      labels


def numpy_ridge(x, labels, l2_reg):
  """Direct float64 normal equations on big_vision's design matrix and targets."""
  x = np.asarray(x, np.float64)
  z = (x - x.mean(0)) / (x.std(0) + probes.STD_EPS)
  z = np.concatenate([z, np.full((len(z), 1), probes.BIAS_CONSTANT)], axis=1)
  y = 2.0 * np.eye(NUM_CLASSES)[labels] - 1.0
  return np.linalg.solve(z.T @ z + l2_reg * np.eye(z.shape[1]), z.T @ y)


@pytest.mark.parametrize("num_examples,dim", [(60, 8), (10, 40)], ids=["primal", "dual"])
@pytest.mark.parametrize("l2_reg", [1.0, 2.0 ** 10], ids=["l2=1", "l2=2^10"])
def test_ridge_equals_numpy_normal_equations(num_examples, dim, l2_reg):
  x = np.random.default_rng(0).normal(size=(num_examples, dim)) * 2 + 1
  labels = np.arange(num_examples) % NUM_CLASSES
  probe = probes.ridge_fit(x, labels, num_classes=NUM_CLASSES, l2_reg=l2_reg)
  expected = numpy_ridge(x, labels, l2_reg)
  np.testing.assert_allclose(probe.weights, expected, rtol=2e-3,
                             atol=2e-4 * np.abs(expected).max())
  x_new = np.random.default_rng(1).normal(size=(7, dim))
  z_new = (x_new - x.mean(0)) / (x.std(0) + probes.STD_EPS)
  logits = np.concatenate([z_new, np.full((7, 1), probes.BIAS_CONSTANT)], 1) @ expected
  np.testing.assert_allclose(probes.ridge_logits(probe, x_new), logits, rtol=2e-3,
                             atol=2e-3 * np.abs(logits).max())


@pytest.mark.parametrize("dim", [8, 40], ids=["primal", "dual"])
def test_masked_padding_rows_change_nothing(dim):
  """Few-shot sets are padded to the largest shot count with masked rows (one compile)."""
  rng = np.random.default_rng(0)
  x, labels = rng.normal(size=(10, dim)) + 1, np.arange(10) % NUM_CLASSES
  padded_x = np.concatenate([x, rng.normal(size=(20, dim)) * 50])  # Garbage rows, masked.
  padded_labels = np.concatenate([labels, np.zeros(20, np.int64)])
  mask = np.arange(30) < 10
  probe = probes._ridge_fit(jnp.asarray(padded_x, jnp.float32), jnp.asarray(padded_labels),
                            NUM_CLASSES, jnp.float32(2.0 ** 10), jnp.asarray(mask))
  expected = numpy_ridge(x, labels, 2.0 ** 10)
  np.testing.assert_allclose(probe.weights, expected, rtol=2e-3,
                             atol=2e-4 * np.abs(expected).max())


def test_fewshot_on_separable_features_is_perfect():
  train_x, train_y = clusters(200, 16, seed=0)
  test_x, test_y = clusters(300, 16, seed=1)
  accuracy = probes.fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES,
                                     shots=(1, 5, 10), seeds=(0, 1))
  assert accuracy.shape == (3, 2)
  assert np.all(accuracy >= 0.99)


def test_fewshot_on_random_labels_is_chance():
  rng = np.random.default_rng(0)
  train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(3000, 16))
  train_y, test_y = rng.integers(0, NUM_CLASSES, 300), rng.integers(0, NUM_CLASSES, 3000)
  accuracy = probes.fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES,
                                     shots=(5, 25), seeds=(0, 1, 2))
  # Chance 0.2; 3,000 test examples give a standard error of 0.007 per probe.
  np.testing.assert_allclose(accuracy, 1 / NUM_CLASSES, atol=0.04)


def test_linear_probe_on_separable_features_is_perfect_and_random_labels_chance():
  train_x, train_y = clusters(400, 16, seed=0)
  test_x, test_y = clusters(3000, 16, seed=1)
  settings = dict(num_classes=NUM_CLASSES, max_steps=1000, eval_every=20, patience=5)
  separable = probes.linear_probe(train_x, train_y, test_x, test_y, **settings)
  assert separable.test_accuracy >= 0.99 and separable.holdout_accuracy >= 0.99
  rng = np.random.default_rng(0)
  random = probes.linear_probe(rng.normal(size=train_x.shape), rng.integers(0, NUM_CLASSES, 400),
                               rng.normal(size=test_x.shape), rng.integers(0, NUM_CLASSES, 3000),
                               **settings)
  # Chance 0.2; 3,000 test examples give a standard error of 0.007.
  assert abs(random.test_accuracy - 1 / NUM_CLASSES) < 0.03
  # Nothing to learn: the held-out loss stops improving early and training stops `patience`
  # evaluations after its best.
  assert random.steps == random.best_step + 5 * 20 < 1000


def test_per_token_probes_are_independent_probes_of_each_token():
  """Token 1 carries the class, tokens 0 and 2 are noise; each token's probe equals a probe
  fitted on that token alone."""
  train_sep, train_y = clusters(200, 8, seed=0)
  test_sep, test_y = clusters(500, 8, seed=1)
  rng = np.random.default_rng(2)
  train_x = np.stack([rng.normal(size=(200, 8)), train_sep, rng.normal(size=(200, 8))], 1)
  test_x = np.stack([rng.normal(size=(500, 8)), test_sep, rng.normal(size=(500, 8))], 1)
  fewshot = probes.fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES,
                                    shots=(10,), seeds=(0,))
  assert fewshot.shape == (1, 1, 3)
  for token in range(3):
    alone = probes.fewshot_accuracy(train_x[:, token], train_y, test_x[:, token], test_y,
                                    num_classes=NUM_CLASSES, shots=(10,), seeds=(0,))
    np.testing.assert_allclose(fewshot[..., token], alone, atol=1e-6)
  assert fewshot[0, 0, 1] >= 0.99 and np.all(fewshot[0, 0, [0, 2]] < 0.35)
  linear = probes.linear_probe(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES,
                               max_steps=100)
  assert linear.test_accuracy.shape == (3,)
  assert linear.test_accuracy[1] >= 0.99 and np.all(linear.test_accuracy[[0, 2]] < 0.35)


def test_shots_are_nested_per_class_and_seeded():
  labels = np.repeat(np.arange(NUM_CLASSES), 30)
  one = probes.sample_shots(labels, (1, 5, 25), num_classes=NUM_CLASSES, seed=3)
  again = probes.sample_shots(labels, (1, 5, 25), num_classes=NUM_CLASSES, seed=3)
  other = probes.sample_shots(labels, (1, 5, 25), num_classes=NUM_CLASSES, seed=4)
  for shots, indices in one.items():
    np.testing.assert_array_equal(np.bincount(labels[indices]), [shots] * NUM_CLASSES)
    np.testing.assert_array_equal(indices, again[shots])
  assert set(one[1]) <= set(one[5]) <= set(one[25])
  assert not np.array_equal(one[5], other[5])


def test_more_shots_than_examples_names_the_numbers():
  labels = np.concatenate([np.repeat([0, 1, 2, 4], 30), [3] * 4])  # Class 3: 4 examples.
  x = np.zeros((len(labels), 4))
  with pytest.raises(ValueError, match=r"25 shots per class.*class 3: 4.*at most 4 shots"):
    probes.fewshot_accuracy(x, labels, x, labels, num_classes=NUM_CLASSES, shots=(1, 25))


@pytest.mark.parametrize("shape,expected", [((17, 64), (17, 64)), ((4, 4, 32), (16, 32))],
                         ids=["vit_tokens", "resnet_map"])
def test_tokens_and_width(shape, expected):
  assert probes.tokens_and_width(shape) == expected


def test_per_token_probe_on_layer_without_tokens_is_refused():
  with pytest.raises(ValueError, match=r"spatial tokens.*pre_logits.*\(64,\)"):
    probes.tokens_and_width((64,), "pre_logits")


def test_per_token_results_of_resnet_stages_are_nan_padded():
  """ResNet stages have 64, 16, 4, 1 locations: per-layer rows padded to the longest."""
  rows = [np.full((2, 1, t), 0.5) for t in (64, 16, 4, 1)]
  stacked = linear_probes._stack(rows)
  assert stacked.shape == (4, 2, 1, 64)
  np.testing.assert_array_equal(np.isnan(stacked).sum(axis=(1, 2, 3)), [0, 96, 120, 126])
  assert np.nanmean(stacked[3]) == 0.5


def small_config():
  """The runlocal config shrunk: one shot count and seed, fewer full-probe steps."""
  config = probe_configs.get_config("runlocal")
  config.probes.update(shots=(5,), seeds=(0,))
  config.linear.update(max_steps=40, patience=2)
  return config


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
  summary = linear_probes.run(small_config(), str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "linear_probes")
  depth, tokens = 3, 17  # 3 blocks; 4x4 patches + CLS.
  assert metadata["models"]["vit_cls"]["kinds"] == ["cls", "mean", "all", "token"]
  assert metadata["models"]["vit_gap"]["kinds"] == ["mean", "all", "token"]  # No CLS token.
  assert metadata["models"]["vit_cls"]["num_train_examples"] == 1320  # 11 batches of 120.
  assert arrays["vit_cls/fewshot/cls"].shape == (depth, 1, 1)
  assert arrays["vit_cls/fewshot/token"].shape == (depth, 1, 1, tokens)
  assert arrays["vit_gap/fewshot/token"].shape == (depth, 1, 1, tokens - 1)
  assert arrays["vit_cls/linear/all"].shape == (depth,)
  # The CLS token's per-token probe sees exactly the 'cls' features.
  np.testing.assert_allclose(arrays["vit_cls/fewshot/token"][..., 0],
                             arrays["vit_cls/fewshot/cls"], atol=1e-6)
  # Even a random ViT's flattened tokens separate digits far above chance (0.1).
  assert np.all(arrays["vit_cls/fewshot/all"][:, -1] > 0.6)
  assert np.all(arrays["vit_cls/linear/all"] > 0.7)
  for name, values in arrays.items():
    if "/fewshot/" in name or "/linear/" in name:
      assert np.all((values >= 0) & (values <= 1)), name
  assert summary["vit_cls"]["fewshot_5shot_last_layer"]["all"] == pytest.approx(
      arrays["vit_cls/fewshot/all"][-1, -1].mean(), abs=1e-4)
  for stem in ("linear_probes", "linear_probes_tokens"):
    assert os.path.getsize(tmp_path / "figures" / f"{stem}.png") > 1000


def test_feature_extraction_resumes_after_a_kill(tmp_path):
  """Features extracted in two runs (the first stopped after 2 of 3 batches, its features
  saved as they stream) equal those of one uninterrupted run, in the same order."""
  config = small_config()
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, patch_size=8, depth=2,
                        hidden_size=16, num_heads=2, mlp_dim=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  mesh = parallel.make_mesh()

  def extract(state_file, stop_after_batches=None):
    config.stop_after_batches = stop_after_batches
    batches = data.eval_batches("digits", "test", image_size=32, global_batch_size=40,
                                mesh=mesh, num_examples=120)
    return linear_probes.extract(model, params, [r".*/out"], ["cls", "token"], batches,
                                 study=runner.Study(config, str(tmp_path)),
                                 state_file=state_file)

  stopped = extract("resumed.npz", stop_after_batches=2)
  assert stopped.summary == {"batches_done": 2, "batches_total": 3}
  with np.load(tmp_path / "resumed.npz") as saved:
    assert len(saved["label"]) == 80 and int(saved["batches_done"]) == 2
  names, resumed, labels = extract("resumed.npz")
  _, whole, whole_labels = extract("whole.npz")
  assert names == ["Transformer/encoderblock_0/out", "Transformer/encoderblock_1/out"]
  np.testing.assert_array_equal(labels, whole_labels)
  assert set(resumed) == set(whole)
  for key, value in whole.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_per_token_probe_of_pooled_layer_is_refused_before_streaming(tmp_path):
  """Checked from the layer shapes alone: no parameters, no data are needed."""
  model = models.create("ViT-Ti/16", num_classes=10, image_size=32, patch_size=8, depth=2)
  with pytest.raises(ValueError, match="spatial tokens.*pre_logits"):
    linear_probes.extract(model, None, ["pre_logits"], ["token"], None,
                          study=runner.Study(small_config(), str(tmp_path)), state_file="")


def test_bad_config_arg():
  with pytest.raises(ValueError, match="vit_b16_i21k"):
    probe_configs.get_config("vit_b99")
  config = probe_configs.get_config("vit_b16_i1k+vit_b16_i21k")
  assert list(config.specs) == ["vit_b16_i1k", "vit_b16_i21k"]
  assert "augreg/B_16-i1k" in config.specs.vit_b16_i1k.checkpoint


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  """Features are extracted from batches sharded over the mesh and gathered: the probes see
  the same features, in the same order, for any device count."""
  code = f"""
import jax
from tests.test_probes import small_config
from vit_repr.studies import linear_probes
config = small_config()
del config.specs['vit_gap']
config.probes.update(modes=('mean',), per_token=False)
config.linear.enabled = False
linear_probes.run(config, {str(tmp_path)!r} + '/' + str(jax.device_count()))
"""
  run_python(code, num_devices=8)
  run_python(code, num_devices=1)
  eight, _ = results.read_results(str(tmp_path / "8"), "linear_probes")
  one, _ = results.read_results(str(tmp_path / "1"), "linear_probes")
  np.testing.assert_allclose(eight["vit_cls/fewshot/mean"], one["vit_cls/fewshot/mean"],
                             atol=1e-6)


@pytest.mark.slow
def test_dinov2_probes_tell_registers_from_patches(tmp_path):
  """`dinov2_b14,runlocal` with per-token probes (12 blocks; 16 x 16 patches behind CLS and 4
  registers; blocks 0 and 11 probed, for time): 'mean' is the mean of the 256 patch tokens
  (tokens 5..), 'cls' token 0, recomputed in float64 from the saved per-token features; the
  per-token results keep the 5 prefix tokens' kinds; the summary's 'token' entry averages the
  patch tokens' probes only."""
  config = probe_configs.get_config("dinov2_b14,runlocal")
  config.specs.dinov2_b14.layers = (r"Transformer/encoderblock_(0|11)/out",)
  config.probes.update(per_token=True, shots=(1,), seeds=(0,))  # 40 digits: 1 of each.
  config.data.update(train_num_examples=40, test_num_examples=40)
  summary = linear_probes.run(config, str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "linear_probes")
  meta = metadata["models"]["dinov2_b14"]
  prefix = ["cls", "register", "register", "register", "register"]
  assert meta["kinds"] == ["cls", "mean", "token"] and meta["prefix_tokens"] == prefix
  per_token = arrays["dinov2_b14/fewshot/token"]
  assert per_token.shape == (2, 1, 1, 5 + 16 * 16)
  np.testing.assert_allclose(per_token[..., 0], arrays["dinov2_b14/fewshot/cls"], atol=1e-6)
  assert summary["dinov2_b14"]["fewshot_1shot_last_layer"]["token"] == pytest.approx(
      per_token[-1, -1, :, 5:].mean(), abs=1e-4)
  with np.load(tmp_path / "features_dinov2_b14_test.npz") as saved:
    for layer in arrays["dinov2_b14/layers"]:
      tokens = np.asarray(saved[f"token:{layer}"], np.float64)  # [40, 261, 96]
      assert tokens.shape == (40, 261, 96)
      np.testing.assert_allclose(saved[f"mean:{layer}"], tokens[:, 5:].mean(1), rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_array_equal(saved[f"cls:{layer}"], saved[f"token:{layer}"][:, 0])
  assert os.path.getsize(tmp_path / "figures" / "linear_probes_tokens.png") > 1000


def test_token_figure_and_summary_keep_prefix_tokens_apart(monkeypatch, tmp_path):
  """Per-token accuracies 0.9 on CLS, 0.7 on the 4 registers, 0.2 on the 4 patches (DINOv2's
  prefix), and a MAP-head model without prefix tokens: the figure's curves and the summary's
  'token' entry see each kind apart; the MAP model has no CLS curve."""
  prefix = ["cls", "register", "register", "register", "register"]
  dinov2 = np.concatenate([[0.9], [0.7] * 4, [0.2] * 4])[None, None, None].repeat(3, 0)
  arrays = {"dinov2/fewshot/token": dinov2, "map/fewshot/token": np.full((3, 1, 1, 4), 0.4)}
  layers = np.asarray([f"Transformer/encoderblock_{i}/out" for i in range(3)])
  arrays.update({"dinov2/layers": layers, "map/layers": layers})
  meta = {"dinov2": dict(kinds=["token"], prefix_tokens=prefix, has_cls_token=True),
          "map": dict(kinds=["token"], prefix_tokens=[], has_cls_token=False)}
  config = probe_configs.get_config("runlocal")
  drawn = []
  monkeypatch.setattr(linear_probes.plotting, "plot_layer_curves",
                      lambda panels, path, **kw: drawn.extend(panels))
  linear_probes._figures(config, arrays, meta, 10)["linear_probes_tokens"](str(tmp_path / "t"))
  curves = {key: {name: np.unique(np.round(c, 6)).tolist() for name, c in panel.curves.items()}
            for key, panel in zip(meta, drawn)}
  assert curves == {"dinov2": {"CLS token": [0.9], "spatial tokens (mean)": [0.2],
                               "register tokens (mean)": [0.7]},
                    "map": {"spatial tokens (mean)": [0.4]}}
  assert linear_probes._last_layer(dinov2[:, -1], "token", prefix) == pytest.approx(0.2)
  assert linear_probes._last_layer(np.array([[0.1, 0.3], [0.5, 0.7]]), "cls", prefix) == 0.6
