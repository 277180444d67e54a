"""Study 1 end to end (vit_repr.studies.representation) on the embedded data."""

import os

import numpy as np
import pytest

from configs import cka_heatmap, common
from tests.conftest import run_python
from tests.test_similarity import ref_procrustes
from vit_repr import data, features, parallel, results
from vit_repr.studies import loading, representation


def tiny_config(**analysis):
  """The runlocal config shrunk further: a 2-block ViT against itself, 120 examples."""
  config = cka_heatmap.get_config("runlocal")
  config.model_a.overrides.depth = 2
  config.model_b = common.model_spec(config.model_a.name, layers=config.model_a.layers,
                                     overrides=config.model_a.overrides.to_dict())
  config.data.num_examples = 120
  config.analysis.update({"minibatch_size": 20, "num_passes": 2, **analysis})
  config.checkpoint_every = 2
  return config


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
  summary = representation.run(cka_heatmap.get_config("runlocal"), str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "cka_heatmap")
  num_vit, num_resnet = 8, 4  # 4 blocks x (mid, out); 4 stages x 1 unit.
  assert arrays["cka_aa"].shape == (num_vit, num_vit)
  assert arrays["cka_bb"].shape == (num_resnet, num_resnet)
  assert arrays["cka_ab"].shape == (num_vit, num_resnet)
  assert list(arrays["names_b"]) == [f"block{s}/unit01/out" for s in range(1, 5)]
  assert summary["num_examples"] == 720 and metadata["num_minibatches"] == 18
  for name in ("cka_aa", "cka_bb"):
    np.testing.assert_allclose(np.diag(arrays[name]), 1.0, atol=1e-5)
  assert np.all((arrays["cka_ab"] > 0) & (arrays["cka_ab"] < 1))
  assert np.all(arrays["stderr_ab"] > 0) and np.all(arrays["stderr_ab"] < 0.1)
  for ext in ("png", "pdf"):
    assert os.path.getsize(tmp_path / "figures" / f"cka_heatmap.{ext}") > 1000


@pytest.mark.slow
def test_model_against_itself_is_symmetric_with_unit_diagonal(tmp_path):
  returned = representation.run(tiny_config(), str(tmp_path))
  arrays, metadata = results.read_results(str(tmp_path), "cka_heatmap")
  # Composed studies take the returned result: it holds what the files hold.
  assert set(returned.arrays) == set(arrays)
  for name, value in arrays.items():
    np.testing.assert_array_equal(returned.arrays[name], value, err_msg=name)
  assert returned.metadata["num_minibatches"] == metadata["num_minibatches"] == 12
  cross = arrays["cka_ab"]
  np.testing.assert_allclose(cross, cross.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(cross), 1.0, atol=1e-5)
  np.testing.assert_allclose(cross, arrays["cka_aa"], atol=1e-6)
  # Adjacent sub-layers are more alike than the first and the last.
  assert cross[0, 1] > cross[0, -1]


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
  representation.run(tiny_config(), str(tmp_path / "straight"))
  interrupted = tiny_config()
  interrupted.stop_after_batches = 5  # 6 batches per pass: stops inside pass 1.
  partial = representation.run(interrupted, str(tmp_path / "resumed")).summary
  assert partial == {"batches_done": 5, "batches_total": 12}
  assert not os.path.exists(tmp_path / "resumed" / "cka_heatmap.npz")
  representation.run(tiny_config(), str(tmp_path / "resumed"))
  straight, _ = results.read_results(str(tmp_path / "straight"), "cka_heatmap")
  resumed, _ = results.read_results(str(tmp_path / "resumed"), "cka_heatmap")
  for name in ("cka_ab", "stderr_ab", "cka_aa"):
    np.testing.assert_array_equal(resumed[name], straight[name])


def test_state_from_another_config_is_refused(tmp_path):
  config = tiny_config()
  config.stop_after_batches = 1
  representation.run(config, str(tmp_path))
  other = tiny_config(num_passes=3)
  with pytest.raises(ValueError, match="different config"):
    representation.run(other, str(tmp_path))


def test_state_from_another_device_count_is_refused(tmp_path):
  config = tiny_config()
  config.stop_after_batches = 1
  representation.run(config, str(tmp_path))
  state = tmp_path / representation.STATE_FILE
  arrays = dict(np.load(state))
  assert str(arrays["layout"]) == "1 devices"  # The host count is not part of it.
  np.savez(state, **{**arrays, "layout": np.asarray("4 devices")})  # As 4 devices save it.
  with pytest.raises(ValueError, match=r"accumulated with 4 devices, this run has 1 devices.*"
                                       r"original device count \(any number of hosts\)"):
    representation.run(tiny_config(), str(tmp_path))


def test_unknown_layer_pattern_lists_available_names(tmp_path):
  config = tiny_config()
  config.model_a.layers = ("Transformer/encoderblock_7/out",)
  with pytest.raises(ValueError, match=r"Available names: .*Transformer/encoderblock_1/out"):
    representation.run(config, str(tmp_path))


def test_bad_config_arg():
  with pytest.raises(ValueError, match="vit_b16"):
    cka_heatmap.get_config("vit_b99")
  config = cka_heatmap.get_config("vit_l16+r50")
  assert (config.model_a.name, config.model_b.name) == ("ViT-L/16", "BiT-R50x1")
  assert config.model_b.checkpoint.endswith("BiT-M-R50x1.npz")


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  """Each device's shard is a minibatch: 8 devices x 5 examples == 1 device x 5 examples,
  the calibrations (permutation null, bootstrap) included: their draws follow the global
  minibatch numbers, not the devices."""
  code = f"""
import jax
from tests.test_representation import tiny_config
from vit_repr.studies import representation
config = tiny_config(minibatch_size={{mb}}, num_permutations=19, num_bootstrap=50)
representation.run(config, {str(tmp_path)!r} + '/' + str(jax.device_count()))
"""
  run_python(code.replace("{mb}", "5"), num_devices=8)
  run_python(code.replace("{mb}", "5"), num_devices=1)
  eight, eight_meta = results.read_results(str(tmp_path / "8"), "cka_heatmap")
  one, one_meta = results.read_results(str(tmp_path / "1"), "cka_heatmap")
  assert eight_meta["num_minibatches"] == one_meta["num_minibatches"] == 48
  np.testing.assert_allclose(eight["cka_ab"], one["cka_ab"], atol=1e-6)
  # Error bars of near-1 CKA pairs carry float32 cancellation: equal to ~1% of their size.
  np.testing.assert_allclose(eight["stderr_ab"], one["stderr_ab"], rtol=1e-2, atol=5e-6)
  np.testing.assert_array_equal(eight["p_value_ab"], one["p_value_ab"])
  np.testing.assert_allclose(eight["null_mean_ab"], one["null_mean_ab"], atol=1e-5)
  for bound in ("ci_low_ab", "ci_high_ab"):
    np.testing.assert_allclose(eight[bound], one[bound], atol=1e-5)
  assert np.all(one["ci_low_ab"] <= one["cka_ab"]) and np.all(one["cka_ab"] <= one["ci_high_ab"])
  assert eight_meta["calibration"]["permutations"] == 19


@pytest.mark.slow
def test_three_models_give_every_pair_from_one_accumulator(tmp_path):
  """Models A and C the same 2-block ViT, B another seed: each block of the joint heatmap is
  cut at its model's offset (A x C equals A x A, B x C the transpose of A x B)."""
  config = tiny_config(num_passes=1)
  config.model_b.seed = 1
  config.model_c = common.model_spec(config.model_a.name, layers=config.model_a.layers,
                                     overrides=config.model_a.overrides.to_dict())
  returned = representation.run(config, str(tmp_path))
  assert sorted(k for k in returned.arrays if k.startswith("cka_")) == [
      "cka_aa", "cka_ab", "cka_ac", "cka_bb", "cka_bc", "cka_cc"]
  arrays = returned.arrays
  np.testing.assert_allclose(arrays["cka_ac"], arrays["cka_aa"], atol=1e-6)
  np.testing.assert_allclose(arrays["cka_cc"], arrays["cka_aa"], atol=1e-6)
  np.testing.assert_allclose(arrays["cka_bc"], arrays["cka_ab"].T, atol=1e-6)
  assert np.abs(arrays["cka_ab"] - arrays["cka_aa"]).max() > 1e-3  # B is another model.
  assert list(arrays["names_c"]) == list(arrays["names_a"])


def test_model_c_without_model_b_is_refused(tmp_path):
  config = tiny_config()
  config.model_c, config.model_b = config.model_b, common.model_spec()
  with pytest.raises(ValueError, match="model_c .* is set but model_b is not"):
    representation.run(config, str(tmp_path))


@pytest.mark.slow
def test_todays_vit_families_at_full_depth(tmp_path):
  """`dinov2_b14+siglip_b16+r50,runlocal`: a DINOv2 ViT-B/14 (4 registers, LayerScale,
  16 x 16 grid), a SigLIP ViT-B/16 (MAP head, 14 x 14 grid), 12 blocks each, and a BiT-R50x1
  (16 units), random narrow weights: each model's heatmap has a unit diagonal and is
  symmetric, and all three cross-model heatmaps are there."""
  config = cka_heatmap.get_config("dinov2_b14+siglip_b16+r50,runlocal")
  returned = representation.run(config, str(tmp_path))
  assert returned.summary["layers"] == {"a": 24, "b": 24, "c": 16}
  for block in ("aa", "bb", "cc"):
    heatmap = returned.arrays[f"cka_{block}"]
    np.testing.assert_allclose(np.diag(heatmap), 1.0, atol=1e-5)
    np.testing.assert_allclose(heatmap, heatmap.T, atol=1e-5)
  for block, shape in (("ab", (24, 24)), ("ac", (24, 16)), ("bc", (24, 16))):
    assert returned.arrays[f"cka_{block}"].shape == shape
    assert np.all(np.isfinite(returned.arrays[f"cka_{block}"]))
  assert returned.metadata["models"]["a"]["overrides"]["num_registers"] == 4
  assert returned.metadata["models"]["b"]["overrides"]["classifier"] == "map"


# --- Other similarity measures (vit_repr.similarity) --------------------------------------------


def _reference_features(config, key, token_mode):
  """Model `key`'s features of the study's examples, computed outside the study: the model
  loaded from its spec, the pipeline's batches of pass 0, padding rows dropped."""
  mesh = parallel.make_mesh()
  spec = config[f"model_{key}"]
  model, params = loading.load_model(spec, image_size=config.data.image_size,
                                     num_classes=data.dataset_info("digits").num_classes,
                                     mesh=mesh)
  extractor = features.FeatureExtractor(model, list(spec.layers),
                                        image_size=config.data.image_size, token_mode=token_mode)
  rows = {name: [] for name in extractor.names}
  for batch in data.eval_batches("digits", config.data.split, image_size=config.data.image_size,
                                 global_batch_size=config.analysis.minibatch_size, mesh=mesh,
                                 num_examples=config.data.num_examples):
    valid = np.asarray(batch["valid"])
    for name, value in extractor(params, batch["image"]).items():
      rows[name].append(np.asarray(value, np.float64)[valid])
  return {name: np.concatenate(value) for name, value in rows.items()}


@pytest.mark.slow
def test_full_set_measure_matches_float64_reference(tmp_path):
  """measure='procrustes', token_mode='mean': every block of the joint heatmap equals the
  Procrustes distance computed in float64 from features extracted outside the study."""
  config = tiny_config(minibatch_size=20)
  config.model_b.seed = 1
  config.analysis.update(measure="procrustes", token_mode="mean")
  returned = representation.run(config, str(tmp_path))
  assert returned.summary["measure"] == "procrustes" and returned.summary["num_examples"] == 120
  assert returned.metadata["measure"]["kind"] == "distance"
  feats = {key: _reference_features(config, key, "mean") for key in "ab"}
  for row, col in ("aa", "bb", "ab"):
    want = np.array([[ref_procrustes(x, y) for y in feats[col].values()]
                     for x in feats[row].values()])
    np.testing.assert_allclose(returned.arrays[f"procrustes_{row}{col}"], want, atol=2e-4,
                               err_msg=row + col)
  assert "stderr_ab" not in returned.arrays and "cka_ab" not in returned.arrays
  assert os.path.getsize(tmp_path / "figures" / "cka_heatmap.png") > 1000


@pytest.mark.slow
def test_full_set_measure_with_permutation_null(tmp_path):
  """measure='rsa' with K = 9 permutations, options from the command line's fields: each layer
  against itself has the smallest p-value 1 / (K + 1); chance levels are far below 1."""
  config = tiny_config(minibatch_size=20)
  config.analysis.update(measure="rsa", token_mode="mean", num_permutations=9)
  config.analysis.measure_options.comparison = "pearson"
  returned = representation.run(config, str(tmp_path))
  assert returned.metadata["measure"]["options"] == {"dissimilarity": "correlation",
                                                     "comparison": "pearson"}
  np.testing.assert_allclose(np.diag(returned.arrays["p_value_ab"]), 0.1)
  np.testing.assert_allclose(np.diag(returned.arrays["rsa_ab"]), 1.0, atol=1e-6)
  assert np.all(np.abs(returned.arrays["null_mean_ab"]) < 0.5)
  assert returned.metadata["calibration"]["permutations"] == 9


@pytest.mark.parametrize("analysis,message", [
    (dict(measure="cca"), "Unknown similarity measure 'cca'"),
    (dict(measure="svcca", num_bootstrap=10), "bootstrap intervals are computed for the "
                                              "streaming measures"),
    (dict(measure="procrustes", max_host_gib=1e-6), "needs every example's features at once"),
], ids=["unknown-measure", "bootstrap-of-full-set-measure", "features-too-large"])
def test_bad_measure_settings_are_clear_errors(tmp_path, analysis, message):
  config = tiny_config()
  config.analysis.update(analysis)
  with pytest.raises(ValueError, match=message):
    representation.run(config, str(tmp_path))


def test_measure_option_it_does_not_take_is_refused(tmp_path):
  config = tiny_config()
  config.analysis.measure = "svcca"
  config.analysis.measure_options.k = 5
  with pytest.raises(ValueError, match="Unknown option.*'k' for measure 'svcca'"):
    representation.run(config, str(tmp_path))


@pytest.mark.slow
def test_angular_cka_streams_with_its_calibration(tmp_path):
  """measure='angular_cka': the angle of minibatch CKA, a distance (0 on the diagonal of a
  model against itself), its bootstrap interval around it and a p-value per cell."""
  config = tiny_config(num_passes=1, num_permutations=9, num_bootstrap=30)
  config.analysis.measure = "angular_cka"
  returned = representation.run(config, str(tmp_path))
  arrays = returned.arrays
  assert "cka_ab" not in arrays and returned.metadata["measure"]["kind"] == "distance"
  np.testing.assert_allclose(np.diag(arrays["angular_cka_ab"]), 0.0, atol=5e-3)
  assert np.all((arrays["angular_cka_ab"] >= 0) & (arrays["angular_cka_ab"] <= np.pi / 2))
  assert np.all(arrays["ci_low_ab"] <= arrays["angular_cka_ab"] + 1e-6)
  assert np.all(arrays["angular_cka_ab"] <= arrays["ci_high_ab"] + 1e-6)
  np.testing.assert_allclose(np.diag(arrays["p_value_ab"]), 0.1)
