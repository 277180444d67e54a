"""Judgements of the paper's findings on one run's numbers (vit_repr.judgements).

Every statistic is checked on inputs at full size (24 ViT sub-layers, 16 ResNet layers, 12
blocks x 12 heads, 196 tokens) whose answer is written out here by explicit loops or closed
formulas, with larger values where a wrong slice would pick them up; every interval of a linear
statistic or of accuracies is checked against its normal formula; every judge is shown a
clearly-shown and a clearly-not-shown input.
"""

import json
import math

import numpy as np
import pytest

from vit_repr import judgements
from vit_repr.judgements import Judgement

Z95 = 1.959964  # Two-sided 95% standard normal quantile.


def _judgement(**overrides) -> Judgement:
  fields = dict(finding="a finding", statistic="a difference (px)", value=0.2, low=0.1,
                high=0.3, threshold=0.0, side="above", interval="95% interval, by hand")
  return Judgement(**(fields | overrides))


@pytest.mark.parametrize("overrides, shown", [
    (dict(side="above", low=0.1, high=0.3), True),
    (dict(side="above", low=0.0, high=0.3), False),  # Touching the threshold is not enough.
    (dict(side="above", low=-0.1, high=0.3), False),
    (dict(side="below", value=0.3, low=0.2, high=0.4, threshold=0.5), True),
    (dict(side="below", value=0.45, low=0.2, high=0.6, threshold=0.5), False),
    (dict(side="above", value=math.nan), False),
    (dict(side="above", low=math.nan), False),
    (dict(side="below", high=math.nan, threshold=0.5), False),
], ids=["above", "above_touching", "above_straddling", "below", "below_straddling",
        "nan_value", "nan_low", "nan_high"])
def test_shown_and_verdict(overrides, shown):
  judgement = _judgement(**overrides)
  assert judgement.shown is shown
  assert judgement.verdict() == ("shown" if shown else "not shown on this data")


def test_json_round_trip_rounds_and_keeps_nan():
  judgement = _judgement(value=math.nan, low=0.123456, high=1.98766, threshold=0.5,
                         side="below")
  record = json.loads(json.dumps(judgement.to_json()))
  assert record == {"finding": "a finding", "statistic": "a difference (px)", "value": None,
                    "low": 0.1235, "high": 1.9877, "threshold": 0.5, "side": "below",
                    "interval": "95% interval, by hand", "shown": False,
                    "verdict": "not shown on this data"}
  restored = Judgement.from_json(record)
  assert math.isnan(restored.value)
  assert (restored.low, restored.high, restored.threshold) == (0.1235, 1.9877, 0.5)
  assert (restored.finding, restored.statistic, restored.side, restored.interval) == (
      judgement.finding, judgement.statistic, judgement.side, judgement.interval)
  shown = _judgement()
  assert Judgement.from_json(shown.to_json()) == shown
  assert shown.to_json()["shown"] is True


def test_bad_side_is_rejected():
  with pytest.raises(ValueError, match=r"side.*'above', 'below'.*'over'"):
    _judgement(side="over")


def test_resampled_interval_of_a_mean_matches_the_normal_interval():
  rng = np.random.default_rng(1)
  values = [rng.uniform(size=(3, 4)), rng.uniform(size=5)]
  stderrs = [rng.uniform(0.01, 0.2, size=(3, 4)), rng.uniform(0.01, 0.2, size=5)]
  cells = 3 * 4 + 5
  mean = (values[0].sum() + values[1].sum()) / cells
  half_width = Z95 * math.sqrt((stderrs[0] ** 2).sum() + (stderrs[1] ** 2).sum()) / cells
  low, high = judgements.resampled_interval(
      lambda a, b: (a.sum() + b.sum()) / cells, values, stderrs, draws=4000)
  assert low == pytest.approx(mean - half_width, abs=0.1 * half_width)
  assert high == pytest.approx(mean + half_width, abs=0.1 * half_width)
  low90, high90 = judgements.resampled_interval(
      lambda a, b: (a.sum() + b.sum()) / cells, values, stderrs, confidence=0.9, draws=4000)
  assert high90 - low90 == pytest.approx(2 * half_width * 1.644854 / Z95, rel=0.1)


def test_resampled_interval_collapses_without_noise():
  values = np.array([0.2, 0.5, 0.8])
  assert judgements.resampled_interval(np.mean, [values], [np.zeros(3)]) == (
      pytest.approx(0.5), pytest.approx(0.5))


def test_resampled_interval_reads_nan_stderr_as_zero_and_keeps_nan_values():
  values = np.array([0.3, np.nan, 0.9, 0.4])
  stderrs = np.array([np.nan, 0.5, 0.1, np.nan])
  # Cells 0 and 3 have NaN stderrs: never resampled.
  low, high = judgements.resampled_interval(lambda v: v[0] + v[3], [values], [stderrs])
  assert (low, high) == (pytest.approx(0.7), pytest.approx(0.7))
  # Cell 1 stays NaN in every draw; the NaN draws are dropped; all NaN gives (nan, nan).
  low, high = judgements.resampled_interval(lambda v: v[1], [values], [stderrs])
  assert math.isnan(low) and math.isnan(high)
  low, high = judgements.resampled_interval(lambda v: np.nanmean(v), [values], [stderrs],
                                            draws=4000)
  half_width = Z95 * 0.1 / 3
  assert low == pytest.approx(1.6 / 3 - half_width, abs=0.1 * half_width)
  assert high == pytest.approx(1.6 / 3 + half_width, abs=0.1 * half_width)


@pytest.mark.parametrize("values, stderrs, keywords, match", [
    ([np.zeros(3)], [np.zeros(4)], {}, r"stderrs\[0\] in the shape of values\[0\], \(3,\)"),
    ([np.zeros(3), np.zeros(2)], [np.zeros(3)], {}, r"one stderr array per value array"),
    ([np.zeros(3)], [-np.ones(3)], {}, r"non-negative"),
    ([np.zeros(3)], [np.zeros(3)], dict(confidence=95), r"between 0 and 1"),
    ([np.zeros(3)], [np.zeros(3)], dict(confidence=0.0), r"between 0 and 1"),
    ([np.zeros(3)], [np.zeros(3)], dict(draws=10), r"at least 100 draws"),
], ids=["shape", "count", "negative", "percent_confidence", "zero_confidence", "few_draws"])
def test_resampled_interval_rejects_bad_input(values, stderrs, keywords, match):
  with pytest.raises(ValueError, match=match):
    judgements.resampled_interval(np.mean, values, stderrs, **keywords)


def test_normal_interval():
  low, high = judgements.normal_interval(1.0, 2.0)
  assert (low, high) == (pytest.approx(1 - 2 * Z95), pytest.approx(1 + 2 * Z95))
  low, high = judgements.normal_interval(0.0, 1.0, confidence=0.9)
  assert (low, high) == (pytest.approx(-1.644854), pytest.approx(1.644854))
  with pytest.raises(ValueError, match="between 0 and 1"):
    judgements.normal_interval(0.0, 1.0, confidence=1.0)


def _cross_half_by_loops(heatmap: np.ndarray) -> float:
  """Mean of the entries (row in the first L // 2, column in the last L // 2), NaN skipped."""
  size = len(heatmap)
  kept = [heatmap[i, j] for i in range(size // 2) for j in range(size - size // 2, size)
          if not np.isnan(heatmap[i, j])]
  return sum(kept) / len(kept)


def _marked_heatmap(size: int, seed: int = 0) -> np.ndarray:
  """`[size, size]`: the lower-rows x upper-columns block in [0.1, 0.3], every other entry
  (the mirrored block, the diagonal blocks, an odd size's middle layer) 0.95."""
  heatmap = np.full((size, size), 0.95)
  half = size // 2
  heatmap[:half, size - half:] = np.random.default_rng(seed).uniform(0.1, 0.3, (half, half))
  return heatmap


@pytest.mark.parametrize("size", [24, 7, 2], ids=["24_layers", "7_layers", "2_layers"])
def test_cross_half_cka(size):
  heatmap = _marked_heatmap(size)
  expected = _cross_half_by_loops(heatmap)
  assert 0.1 <= expected <= 0.3
  assert judgements.cross_half_cka(heatmap) == pytest.approx(expected, rel=1e-12)


def test_cross_half_cka_ignores_nan():
  heatmap = np.full((4, 4), 0.9)
  heatmap[:2, 2:] = [[0.1, np.nan], [0.2, 0.6]]
  assert judgements.cross_half_cka(heatmap) == pytest.approx(0.3)


@pytest.mark.parametrize("shape", [(3, 4), (1, 1), (5,), (2, 2, 2)], ids=str)
def test_cross_half_cka_rejects_a_non_square_heatmap(shape):
  with pytest.raises(ValueError, match=r"\[L, L\] with L >= 2"):
    judgements.cross_half_cka(np.zeros(shape))


def _staged_heatmap(size: int, stages: int) -> np.ndarray:
  """ResNet-like: 0.9 within a stage, 0.2 across stages."""
  stage = np.arange(size) * stages // size
  return np.where(stage[:, None] == stage[None, :], 0.9, 0.2)


def test_judge_uniformity():
  vit = _marked_heatmap(24) + 0.5  # Lower-upper block in [0.6, 0.8].
  resnet = _staged_heatmap(16, 4)
  judgement = judgements.judge_uniformity(vit, np.full((24, 24), 0.01), resnet,
                                          np.full((16, 16), 0.01))
  assert judgement.value == pytest.approx(_cross_half_by_loops(vit) - 0.2, rel=1e-12)
  assert judgement.low < judgement.value < judgement.high
  assert (judgement.threshold, judgement.side) == (0.0, "above")
  assert judgement.interval == "95% interval, CKA cells resampled from their standard errors"
  assert judgement.verdict() == "shown"
  staged_vit = _staged_heatmap(24, 4)
  judgement = judgements.judge_uniformity(staged_vit, np.full((24, 24), 0.3), resnet,
                                          np.full((16, 16), 0.3))
  assert judgement.value == pytest.approx(0.0, abs=1e-12)
  assert judgement.verdict() == "not shown on this data"


def _cross_with_peaks(rows: list[int]) -> np.ndarray:
  """`[24, len(rows)]`: column j peaks (0.9) at ViT layer rows[j]; elsewhere at most 0.5."""
  cross = np.linspace(0.1, 0.5, 24 * len(rows)).reshape(24, len(rows))
  cross[rows, range(len(rows))] = 0.9
  return cross


def test_judge_lower_vit_depth():
  # ResNet's lower half (columns 0-7) peaks low in ViT; the upper half at the top (ignored).
  rows = [1, 2, 2, 3, 4, 5, 5, 6] + [23] * 8
  judgement = judgements.judge_lower_vit_depth(_cross_with_peaks(rows), np.full((24, 16), 0.01))
  assert judgement.value == pytest.approx(sum(rows[:8]) / 8 / 23)
  assert (judgement.threshold, judgement.side) == (0.5, "below")
  assert judgement.high < 0.5 and judgement.verdict() == "shown"
  rows = [20, 21, 22, 23, 19, 18, 20, 21] + [0] * 8
  judgement = judgements.judge_lower_vit_depth(_cross_with_peaks(rows), np.full((24, 16), 0.01))
  assert judgement.value == pytest.approx(sum(rows[:8]) / 8 / 23)
  assert judgement.verdict() == "not shown on this data"


def _distances(spreads: list[float]) -> np.ndarray:
  """`[len(spreads), 12]`: block b's heads evenly from 50 to 50 + spreads[b] px."""
  return np.array([np.linspace(50, 50 + spread, 12) for spread in spreads])


def test_head_distance_spread():
  distance = _distances([10.0, 200.0, 30.0])
  distance[2] = distance[2][::-1]  # Order of the heads does not matter.
  assert judgements.head_distance_spread(distance, [0, 2]) == pytest.approx(20.0)
  assert judgements.head_distance_spread(distance, [1]) == pytest.approx(200.0)


def test_judge_local_and_global_heads():
  # 12 blocks: the lower third (0-3) and the top third (8-11); the middle's spread must not count.
  spreads = [90.0, 80.0, 70.0, 60.0] + [500.0] * 4 + [5.0, 4.0, 3.0, 2.0]
  judgement = judgements.judge_local_and_global_heads(_distances(spreads), np.ones((12, 12)))
  assert judgement.value == pytest.approx(75.0 - 3.5)
  assert judgement.low < judgement.value < judgement.high
  assert judgement.verdict() == "shown"
  judgement = judgements.judge_local_and_global_heads(_distances([10.0] * 12),
                                                      np.full((12, 12), 5.0))
  assert judgement.value == pytest.approx(0.0, abs=1e-12)
  assert judgement.verdict() == "not shown on this data"


def test_judge_norm_ratio_change():
  # 24 sub-layers: CLS / spatial is e^2 in the lower half, e^-1 in the upper half.
  spatial = np.linspace(2.0, 6.0, 24)
  cls = spatial * np.exp(np.where(np.arange(24) < 12, 2.0, -1.0))
  cls[3] = np.nan  # Ignored.
  judgement = judgements.judge_norm_ratio_change(cls, spatial, np.full(24, 0.01),
                                                 np.full(24, 0.01))
  assert judgement.value == pytest.approx(2.0 - (-1.0))
  assert "natural log" in judgement.statistic
  assert judgement.verdict() == "shown"
  lower = [math.log(c / s) for c, s in zip([5.0, 4.0, 3.0], [1.0, 2.0, 3.0])]
  upper = [math.log(c / s) for c, s in zip([1.0, 2.0, 1.5], [2.0, 2.0, 1.0])]
  judgement = judgements.judge_norm_ratio_change(
      [5.0, 4.0, 3.0, 99.0, 1.0, 2.0, 1.5], [1.0, 2.0, 3.0, 1.0, 2.0, 2.0, 1.0], np.zeros(7),
      np.zeros(7))  # 7 sub-layers: the middle one is in neither half.
  assert judgement.value == pytest.approx(sum(lower) / 3 - sum(upper) / 3)
  judgement = judgements.judge_norm_ratio_change(np.full(24, 3.0), np.full(24, 3.0),
                                                 np.full(24, 0.5), np.full(24, 0.5))
  assert judgement.verdict() == "not shown on this data"


def test_judge_skip_removal():
  reference, ablated, n = 0.8, [0.7, 0.75, 0.6], 1000
  judgement = judgements.judge_skip_removal(reference, ablated, n)
  stderr = math.sqrt(0.8 * 0.2 / n + (0.7 * 0.3 + 0.75 * 0.25 + 0.6 * 0.4) / n / 9)
  drop = 0.8 - (0.7 + 0.75 + 0.6) / 3
  assert judgement.value == pytest.approx(drop)
  assert judgement.low == pytest.approx(drop - Z95 * stderr, rel=1e-6)
  assert judgement.high == pytest.approx(drop + Z95 * stderr, rel=1e-6)
  assert judgement.interval == ("95% normal interval, binomial noise of each accuracy on 1000 "
                                "test examples")
  assert judgement.verdict() == "shown"
  assert judgements.judge_skip_removal(0.5, [0.49], 100).verdict() == "not shown on this data"


def test_judge_cls_localization():
  cls = np.linspace(0.5, 0.7, 196)
  cls[17] = np.nan  # Ignored.
  gap = np.linspace(0.1, 0.3, 196)
  judgement = judgements.judge_cls_localization(cls, np.full(196, 0.02), gap,
                                                np.full(196, 0.02))
  expected = (sum(cls[:17]) + sum(cls[18:])) / 195 - sum(gap) / 196
  assert judgement.value == pytest.approx(expected, rel=1e-12)
  assert judgement.verdict() == "shown"
  judgement = judgements.judge_cls_localization(gap, np.full(196, 0.3), gap[::-1],
                                                np.full(196, 0.3))
  assert judgement.value == pytest.approx(0.0, abs=1e-12)
  assert judgement.verdict() == "not shown on this data"


@pytest.mark.parametrize("full, subset, n, stderr", [
    ([0.6, 0.62, 0.64], [0.5, 0.52], 500,
     math.sqrt(0.0004 / 3 + 0.62 * 0.38 / 500 + 0.0002 / 2 + 0.51 * 0.49 / 500)),
    ([0.6], [0.5], 500, math.sqrt(0.6 * 0.4 / 500 + 0.5 * 0.5 / 500)),  # One seed each.
], ids=["several_seeds", "one_seed"])
def test_judge_probe_data_scale(full, subset, n, stderr):
  judgement = judgements.judge_probe_data_scale(full, subset, n)
  value = sum(full) / len(full) - sum(subset) / len(subset)
  assert judgement.value == pytest.approx(value)
  assert judgement.low == pytest.approx(value - Z95 * stderr, rel=1e-6)
  assert judgement.high == pytest.approx(value + Z95 * stderr, rel=1e-6)
  assert judgement.verdict() == "shown"


def test_judge_probe_data_scale_not_shown():
  judgement = judgements.judge_probe_data_scale([0.5, 0.6, 0.4], [0.48, 0.5], 200)
  assert judgement.verdict() == "not shown on this data"


def _seven_judgements() -> list[Judgement]:
  """One judgement per judge; the 2nd, 4th and 7th not shown."""
  return [
      judgements.judge_uniformity(_marked_heatmap(24) + 0.5, np.full((24, 24), 0.01),
                                  _staged_heatmap(16, 4), np.full((16, 16), 0.01), draws=200),
      judgements.judge_lower_vit_depth(_cross_with_peaks([20] * 16), np.zeros((24, 16)),
                                       draws=200),
      judgements.judge_local_and_global_heads(_distances([90.0] * 4 + [5.0] * 8),
                                              np.ones((12, 12)), draws=200),
      judgements.judge_norm_ratio_change(np.ones(24), np.ones(24), np.full(24, 0.1),
                                         np.full(24, 0.1), draws=200),
      judgements.judge_skip_removal(0.8, [0.5, 0.6], 1000),
      judgements.judge_cls_localization(np.full(196, 0.6), np.full(196, 0.01),
                                        np.full(196, 0.2), np.full(196, 0.01), draws=200),
      judgements.judge_probe_data_scale([0.5], [0.5], 100),
  ]


def test_table():
  rows = _seven_judgements()
  text = judgements.table(rows)
  lines = text.splitlines()
  assert all(len(line) <= 100 for line in lines), text
  assert lines[-1] == "Shown: 4 of 7 findings."
  for number, judgement in enumerate(rows, start=1):
    row = next(line for line in lines if line.startswith(f"{number} "))
    assert " ".join(judgement.finding.split()[:3]) in row
    assert row.endswith(judgement.verdict())
    assert (f"{judgement.value:+.3f} [{judgement.low:+.3f}, {judgement.high:+.3f}]") in row
    assert all(word in text for word in judgement.finding.split())
    assert any(line.startswith(f"{number}. {judgement.statistic.split()[0]}")
               for line in lines)
  assert [row.verdict() for row in rows].count("not shown on this data") == 3


def test_table_writes_nan():
  text = judgements.table([_judgement(value=math.nan)])
  assert "nan [+0.100, +0.300]" in text
  assert text.splitlines()[-1] == "Shown: 0 of 1 findings."


def _vectors(tokens: int = 196):
  return np.full(tokens, 0.5), np.full(tokens, 0.01)


@pytest.mark.parametrize("judge, match", [
    (lambda: judgements.judge_uniformity(np.zeros((24, 23)), np.zeros((24, 23)),
                                         np.zeros((16, 16)), np.zeros((16, 16))),
     r"vit_cka as a within-model CKA heatmap \[L, L\]"),
    (lambda: judgements.judge_uniformity(np.zeros((24, 24)), np.zeros((24, 24)),
                                         np.zeros((16, 16)), np.zeros((24, 24))),
     r"standard errors of resnet_cka in its shape \[M, M\] = \(16, 16\); got shape \(24, 24\)"),
    (lambda: judgements.judge_lower_vit_depth(np.zeros(24), np.zeros(24)),
     r"cross as an array \[ViT layers, ResNet layers\]"),
    (lambda: judgements.judge_lower_vit_depth(np.zeros((24, 16)), np.zeros((16, 24))),
     r"standard errors of cross"),
    (lambda: judgements.judge_local_and_global_heads(np.zeros((1, 12)), np.zeros((1, 12))),
     r"at least 2 blocks"),
    (lambda: judgements.judge_local_and_global_heads(np.zeros(12), np.zeros(12)),
     r"distance as an array \[blocks, heads\]"),
    (lambda: judgements.judge_local_and_global_heads(np.zeros((12, 12)), np.zeros((12, 6))),
     r"standard errors of distance"),
    (lambda: judgements.judge_norm_ratio_change(np.ones(24), np.ones(23), np.ones(24),
                                                np.ones(23)),
     r"same sub-layers"),
    (lambda: judgements.judge_norm_ratio_change(np.ones(1), np.ones(1), np.ones(1), np.ones(1)),
     r"cls_ratio as an array \[sublayers\], at least 2"),
    (lambda: judgements.judge_norm_ratio_change(np.ones(24), np.ones(24), np.ones(24),
                                                np.ones(12)),
     r"standard errors of spatial_ratio"),
    (lambda: judgements.judge_skip_removal(80.0, [0.5], 100), r"fractions in \[0, 1\]"),
    (lambda: judgements.judge_skip_removal(0.8, [0.5, math.nan], 100), r"not NaN"),
    (lambda: judgements.judge_skip_removal(0.8, [], 100), r"ablated_accuracies as an array"),
    (lambda: judgements.judge_skip_removal(0.8, [0.5], 0), r"num_test_examples >= 1"),
    (lambda: judgements.judge_cls_localization(*_vectors(), np.zeros((14, 14)),
                                               np.zeros((14, 14))),
     r"gap_own as an array \[tokens\]"),
    (lambda: judgements.judge_cls_localization(_vectors()[0], np.zeros(197), *_vectors()),
     r"standard errors of cls_own in its shape \[tokens\] = \(196,\)"),
    (lambda: judgements.judge_probe_data_scale([0.5, 1.5], [0.5], 100), r"fractions in \[0, 1\]"),
    (lambda: judgements.judge_probe_data_scale([0.5], [], 100), r"subset_accuracies as an array"),
    (lambda: judgements.judge_probe_data_scale([0.5], [0.4], 0), r"num_test_examples >= 1"),
    (lambda: judgements.head_distance_spread(np.zeros((12, 12)), []), r"at least one block"),
], ids=["uniformity_shape", "uniformity_stderr", "depth_shape", "depth_stderr",
        "heads_one_block", "heads_shape", "heads_stderr", "norm_lengths", "norm_one",
        "norm_stderr", "skip_percent", "skip_nan", "skip_none", "skip_n", "localization_shape",
        "localization_stderr", "probe_range", "probe_empty", "probe_n", "spread_no_block"])
def test_judges_reject_bad_input(judge, match):
  with pytest.raises(ValueError, match=match):
    judge()
