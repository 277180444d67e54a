"""The main job's text and headline statistics (vit_repr.findings).

Each statistic is checked on small heatmaps whose answer is known by construction (the
argmax rows and the maxima are placed by hand, with larger values elsewhere that the wrong
slice or axis would pick up), and each "what this run shows" sentence on a small numbers dict.
"""

import numpy as np
import pytest

from vit_repr import findings, reproduction


def test_mean_cka_ignores_nan_and_keeps_the_diagonal():
  heatmap = np.array([[1.0, np.nan], [0.5, 0.0]], np.float32)
  assert findings.mean_cka(heatmap) == pytest.approx(0.5)
  rng = np.random.default_rng(0)
  heatmap = rng.uniform(size=(7, 5))
  heatmap[rng.uniform(size=heatmap.shape) < 0.3] = np.nan
  kept = [float(v) for v in heatmap.ravel() if not np.isnan(v)]
  assert findings.mean_cka(heatmap) == pytest.approx(sum(kept) / len(kept), rel=1e-12)


def _cross_with_argmax_rows(rows: list[int], num_vit_layers: int) -> np.ndarray:
  """`[num_vit_layers, len(rows)]`: column j peaks (0.9) at ViT layer rows[j]; every other
  entry is in [0.1, 0.5], rising with the row, so the other rows' maxima sit elsewhere."""
  cross = np.linspace(0.1, 0.5, num_vit_layers * len(rows)).reshape(num_vit_layers, len(rows))
  for column, row in enumerate(rows):
    cross[row, column] = 0.9
  return cross


@pytest.mark.parametrize("rows, num_vit_layers, expected", [
    # Lower half of 4 ResNet layers = columns 0, 1 (peaks at ViT layers 1 and 3 of 0..4); the
    # upper columns peak at the last ViT layer and must not count.
    ([1, 3, 4, 4], 5, (1 / 4 + 3 / 4) / 2),
    # 5 ResNet layers: the lower half is the first 2.
    ([0, 2, 4, 4, 4], 5, (0 / 4 + 2 / 4) / 2),
    # One ResNet layer: it is the lower half.
    ([6], 7, 6 / 6),
    # One ViT layer: relative depth 0.
    ([0, 0], 1, 0.0),
], ids=["4_resnet_layers", "5_resnet_layers", "1_resnet_layer", "1_vit_layer"])
def test_vit_depth_matching_lower_resnet(rows, num_vit_layers, expected):
  cross = _cross_with_argmax_rows(rows, num_vit_layers)
  assert findings.vit_depth_matching_lower_resnet(cross) == pytest.approx(expected)


def test_vit_depth_matching_lower_resnet_ignores_nan():
  cross = _cross_with_argmax_rows([2, 1], 4)
  cross[0, 0] = np.nan  # Not a peak: NaN is skipped, not taken as the maximum.
  assert findings.vit_depth_matching_lower_resnet(cross) == pytest.approx(2 / 3)


@pytest.mark.parametrize("num_vit_layers, top_rows", [
    (8, [6, 7]),   # Top quarter of 8 ViT layers: the last 2.
    (11, [9, 10]),  # 11 // 4 = 2.
    (3, [2]),      # Fewer than 4 layers: the last one.
], ids=["8_vit_layers", "11_vit_layers", "3_vit_layers"])
def test_top_vit_best_cka_to_resnet(num_vit_layers, top_rows):
  cross = np.full((num_vit_layers, 3), 0.05)
  cross[0, :] = 0.99  # The lowest ViT layer matches every ResNet layer: must not count.
  cross[:, 0] = 0.98  # Column maxima over the whole ViT: must not count either.
  best = np.linspace(0.2, 0.6, len(top_rows))
  for row, value in zip(top_rows, best):
    cross[row, :] = [0.01, value, 0.1]  # Row maximum in the middle ResNet layer.
  assert findings.top_vit_best_cka_to_resnet(cross) == pytest.approx(float(np.mean(best)))


@pytest.mark.parametrize("statistic", [findings.vit_depth_matching_lower_resnet,
                                       findings.top_vit_best_cka_to_resnet],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(5,), (0, 3), (3, 0), (2, 2, 2)], ids=str)
def test_cross_statistics_reject_a_non_heatmap(statistic, shape):
  with pytest.raises(ValueError, match=r"\[ViT layers, ResNet layers\]"):
    statistic(np.zeros(shape))


@pytest.mark.parametrize("key, numbers, sentence", [
    ("dataset",
     {"splits": {"train": 1437, "test": 360}, "num_classes": 10,
      "pipeline_examples_per_second": 1900.2, "pipeline_rate_includes_startup": False},
     "1797 images in 10 classes ({'train': 1437, 'test': 360}); the sharded pipeline streamed "
     "1900.2 images/s (after the first batch: start-up excluded)."),
    ("dataset",
     {"splits": {"train": 100, "test": 20}, "num_classes": 10,
      "pipeline_examples_per_second": 30.5, "pipeline_rate_includes_startup": True},
     "120 images in 10 classes ({'train': 100, 'test': 20}); the sharded pipeline streamed "
     "30.5 images/s (one batch only: start-up included)."),
    ("models", {"test_accuracy": {"vit_cls": 0.6789, "bit": 0.1}},
     "Test accuracy of each model trained here: vit_cls 68%, bit 10%."),
    ("representation",
     {"mean_cka": {"cka_aa": 0.912, "cka_bb": 0.5, "cka_ab": 0.301},
      "vit_depth_matching_lower_resnet": 0.25, "top_vit_best_cka_to_resnet": 0.4567,
      "num_examples": 720},
     "Mean CKA over all layer pairs within ViT 0.91, within ResNet 0.50, across 0.30; "
     "ResNet's lower-half layers best match ViT layers at mean relative depth 0.25 (0 = first, "
     "1 = last); ViT's top-quarter layers reach mean CKA 0.46 with their best ResNet layer "
     "(720 examples accumulated)."),
    ("attention",
     {"mean_distance_per_layer": [3.1, 7.2], "first_layer_distance_range": [1.0, 5.5],
      "last_layer_distance_range": [6.0, 8.0], "num_examples": 120,
      "distance_cka_correlation": {"stem": -0.42, "block1/unit01": -0.1}},
     "Mean attention distance per block, averaged over heads (px): [3.1, 7.2]; first block's "
     "heads span [1.0, 5.5] px, last block's [6.0, 8.0] px; Pearson correlation over heads of "
     "a head's distance with its CKA to each ResNet layer: {'stem': -0.42, 'block1/unit01': "
     "-0.1} (120 examples)."),
    ("attention",
     {"mean_distance_per_layer": [3.1], "first_layer_distance_range": [1.0, 5.5],
      "last_layer_distance_range": [1.0, 5.5], "num_examples": 8},
     "Mean attention distance per block, averaged over heads (px): [3.1]; first block's heads "
     "span [1.0, 5.5] px, last block's [1.0, 5.5] px; Pearson correlation over heads of a "
     "head's distance with its CKA to each ResNet layer: not computed (8 examples)."),
    ("receptive_fields",
     {"models": {"ViT": {"radius_px": {"block_0": 1.234, "block_5": 10.0}},
                 "BiT": {"radius_px": {"stem": 2.0}}}},
     "Effective receptive-field radius (px; RMS distance from the centre, weighted by the "
     "receptive field) from the first to the last layer: ViT 1.2 → 10.0; BiT 2.0."),
    ("skip_connections",
     {"norm_ratios": {"mean_ratio_of_means": {"vit": {"cls": 10.123, "spatial": 3.0},
                                              "bit": {"all": 1.5},
                                              "dinov2": {"cls": 2.0, "spatial": 1.0,
                                                         "register": 7.0}}},
      "ablation": {"test_accuracy": {"vit": 0.5, "vit_noskip": 0.126},
                   "mean_diagonal_cka_vs_reference": {"vit_noskip": 0.777}}},
     "Norm ratio ||z|| / ||f(z)|| of the residual stream to its branch, mean over sub-layers "
     "(CLS / spatial tokens): vit 10.12 / 3.00; bit 1.50; dinov2 2.00 / 1.00. Test accuracy: "
     "vit 50%, vit_noskip 13%; CKA of each ablated ViT's layer with the same layer of the "
     "unablated one, mean over layers: vit_noskip 0.78."),
    ("localization",
     {"own_patch": {"ViT:block_5": {"own_patch_cka": 0.634, "peak_at_own_patch": 0.75},
                    "BiT:stage_4": {"own_patch_cka": 0.2, "peak_at_own_patch": 0.0}},
      "num_examples": 64},
     "Mean CKA of each token with its own patch (fraction of tokens most similar to their own "
     "patch): ViT:block_5 0.63 (75%); BiT:stage_4 0.20 (0%) (64 examples)."),
    # Shaped like linear_probes.run's summary (modes 'cls', 'mean', per-token probes, full
    # probes on): 'token' is the spatial tokens' mean; the GAP ViT has no 'cls'; a model
    # probed without per-token probes is named as such.
    ("probes",
     {"models": {
         "vit_cls": {"fewshot_25shot_last_layer": {"cls": 0.9012, "mean": 0.42,
                                                   "token": 0.1234},
                     "seconds": 12.3,
                     "linear_last_layer": {"cls": 0.99, "mean": 0.5, "token": 0.2}},
         "vit_gap": {"fewshot_25shot_last_layer": {"mean": 0.8, "token": 0.7521},
                     "seconds": 10.1,
                     "linear_last_layer": {"mean": 0.9, "token": 0.85}},
         "vit_old": {"fewshot_25shot_last_layer": {"cls": 0.5, "mean": 0.4}, "seconds": 3.0}}},
     "25-shot probe accuracy on the last block of the CLS token and of a single spatial token "
     "(mean over the spatial tokens' probes): vit_cls CLS 90%, spatial 12%; vit_gap spatial "
     "75%; vit_old no per-token probes."),
    ("data_scale",
     {"models": {"vit": {"fraction": 1.0, "test_accuracy": 0.9},
                 "vit_0p1": {"fraction": 0.1, "test_accuracy": 0.55, "cka_first_layer": 0.951,
                             "cka_last_layer": 0.333}}},
     "CKA of a layer with the same layer of the full-data model, first → last layer: vit_0p1 "
     "(10% of the data, test accuracy 55%) 0.95 → 0.33."),
], ids=["dataset", "dataset_one_batch", "models", "representation", "attention",
        "attention_no_correlation", "receptive_fields", "skip_connections", "localization",
        "probes", "data_scale"])
def test_observed_sentence(key, numbers, sentence):
  assert findings.FINDINGS[key].observed(numbers) == sentence


def test_every_step_of_the_main_job_has_its_text_in_order():
  assert list(findings.FINDINGS) == [step.key for step in reproduction.STEPS]
  for key, finding in findings.FINDINGS.items():
    assert finding.title and finding.paper_finding.endswith("."), key
  summary = {"models": {"test_accuracy": {"vit": 0.5}}}
  assert reproduction.observations(summary) == {
      "models": "Test accuracy of each model trained here: vit 50%."}
