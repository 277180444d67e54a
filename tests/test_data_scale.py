"""Data-scale study (vit_repr.studies.data_scale) and its config."""

import os

import numpy as np
import pytest

from configs import data_scale as data_scale_configs
from configs import train as train_configs
from tests.test_cka import ref_minibatch_cka
from vit_repr import checkpoints, data, features, models, parallel, results
from vit_repr.studies import data_scale


def test_local_config_trains_nested_subsets_beside_the_main_jobs_model():
  config = data_scale_configs.get_config("local")
  assert sorted(config.models) == ["vit_cls", "vit_cls_fraction0p1", "vit_cls_fraction0p3"]
  assert config.reference == "vit_cls"
  # The reference is exactly the main job's recipe, so a shared models_dir reuses it.
  assert config.models.vit_cls.to_dict() == train_configs.get_config("vit_cls").to_dict()
  for name, fraction in (("vit_cls_fraction0p1", 0.1), ("vit_cls_fraction0p3", 0.3)):
    subset = config.models[name]
    assert subset.data.subset_fraction == fraction
    assert subset.data.subset_seed == config.models.vit_cls.data.subset_seed  # Nested subsets.
    assert subset.train.total_steps == config.models.vit_cls.train.total_steps
  assert not config.probes.specs  # No public checkpoints offline.


@pytest.mark.parametrize("arg,names", [
    ("local,fractions=0.03/0.5", ["vit_cls", "vit_cls_fraction0p03", "vit_cls_fraction0p5"]),
    ("imagenet_vit_b16", ["imagenet_vit_b16", "imagenet_vit_b16_fraction0p03",
                          "imagenet_vit_b16_fraction0p1", "imagenet_vit_b16_fraction0p3"]),
], ids=["fractions_option", "paper"])
def test_config_names(arg, names):
  config = data_scale_configs.get_config(arg)
  assert sorted(config.models) == names
  if arg == "imagenet_vit_b16":
    assert sorted(config.probes.specs) == ["vit_b16_i1k", "vit_b16_i21k"]
    assert config.cka.data.name == "imagenet2012"


@pytest.mark.parametrize("arg,match", [
    ("vit_cls", "settings are"), ("local,fractions=0.1/1.5", "in \\(0, 1\\)"),
    ("local,fractions=ten", "fractions=0.1/0.3"),
    ("local,steps=5",
     "unknown option 'steps'; options are setting=<str>, fractions=<str>, runlocal")],
    ids=["unknown_setting", "fraction_out_of_range", "fraction_not_a_number", "unknown_option"])
def test_bad_config_arg(arg, match):
  with pytest.raises(ValueError, match=match):
    data_scale_configs.get_config(arg)


def test_reference_must_be_a_full_data_model(tmp_path):
  config = data_scale_configs.get_config("runlocal")
  config.reference = "vit_gap"
  with pytest.raises(ValueError, match="not among config.models"):
    data_scale.run(config, str(tmp_path))
  config.reference = "vit_cls_fraction0p3"
  with pytest.raises(ValueError, match="subset_fraction=0.3"):
    data_scale.run(config, str(tmp_path))


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
  config = data_scale_configs.get_config("runlocal")
  config.models_dir = str(tmp_path / "shared_models")
  summary = data_scale.run(config, str(tmp_path / "ds")).summary
  workdir = str(tmp_path / "ds")
  arrays, metadata = results.read_results(workdir, "data_scale")
  assert list(arrays["models"]) == ["vit_cls_fraction0p3", "vit_cls"]
  np.testing.assert_array_equal(arrays["fractions"], [0.3, 1.0])
  assert sorted(os.listdir(tmp_path / "shared_models")) == ["vit_cls", "vit_cls_fraction0p3"]
  assert metadata["models"]["vit_cls_fraction0p3"]["subset_fraction"] == 0.3
  # Per-layer CKA to the reference is the diagonal of Study 1's cross heatmap.
  cka, _ = results.read_results(os.path.join(workdir, "cka", "vit_cls_fraction0p3"),
                                "cka_heatmap")
  depth = 2  # runlocal ViT: 2 blocks.
  assert arrays["cka_to_reference"].shape == (1, depth)
  np.testing.assert_array_equal(arrays["cka_to_reference"][0], np.diag(cka["cka_ab"]))
  np.testing.assert_array_equal(arrays["cka_stderr"][0], np.diag(cka["stderr_ab"]))
  assert list(arrays["layers"]) == [f"Transformer/encoderblock_{i}/out" for i in range(depth)]
  # ... and equals float64 minibatch CKA of the two TRAINED models' block outputs, their
  # parameters read back from their run directories here (not through the study's loader).
  cka_data = config.cka.data
  images = next(iter(data.eval_batches(
      cka_data.name, cka_data.split, image_size=cka_data.image_size, global_batch_size=120,
      mesh=parallel.make_mesh(), num_examples=120)))["image"]
  outputs = {}
  for name in ("vit_cls", "vit_cls_fraction0p3"):
    model_config = config.models[name].model
    model = models.create_from_config(model_config.name, model_config.overrides.to_dict(),
                                      num_classes=10, image_size=cka_data.image_size)
    params = checkpoints.restore(str(tmp_path / "shared_models" / name / "params"))
    outputs[name] = features.FeatureExtractor(model, list(config.layers),
                                              image_size=cka_data.image_size)(params, images)
  for i, layer in enumerate(arrays["layers"]):
    expected = ref_minibatch_cka(np.asarray(outputs["vit_cls_fraction0p3"][layer]),
                                 np.asarray(outputs["vit_cls"][layer]),
                                 config.cka.analysis.minibatch_size)
    np.testing.assert_allclose(arrays["cka_to_reference"][0, i], expected, rtol=1e-4)
  # Probe curves of both models, equal to the probe study's own arrays.
  probes, _ = results.read_results(os.path.join(workdir, "probes"), "linear_probes")
  for name in ("vit_cls", "vit_cls_fraction0p3"):
    for mode in ("cls", "mean"):
      np.testing.assert_allclose(arrays[f"probe/fewshot/{mode}/{name}"],
                                 probes[f"{name}/fewshot/{mode}"][:, -1].mean(-1))
      np.testing.assert_array_equal(arrays[f"probe/linear/{mode}/{name}"],
                                    probes[f"{name}/linear/{mode}"])
  assert summary["models"]["vit_cls_fraction0p3"]["cka_last_layer"] == pytest.approx(
      arrays["cka_to_reference"][0, -1], abs=1e-4)
  assert os.path.getsize(os.path.join(workdir, "figures", "data_scale.png")) > 1000
