"""Verdicts on seven findings of Raghu et al. (NeurIPS 2021) from one run's numbers.

"Do Vision Transformers See Like Convolutional Neural Networks?" states findings about ViT and
ResNet representations. Each judge below reduces one finding to one statistic of this run's
arrays, gives its value and an interval (95% by default), and returns a `Judgement`: the
finding is "shown" when the whole interval lies on the finding's side of a threshold (0 for a
difference, 0.5 for a relative depth), and otherwise "not shown on this data", which is not
evidence against the finding: a small run can leave the interval across the threshold.

Every interval is stated with what it covers, in `Judgement.interval`:
- statistics of measured arrays (CKA heatmaps, attention distances, norm ratios, per-token
  CKA) get parametric resampling intervals (`resampled_interval`): each cell is redrawn from a
  normal distribution around its value with its standard error, so the interval covers the
  estimation noise of those cells over the analysed examples, not retraining the models;
- differences of test accuracies get normal intervals (`normal_interval`) from the binomial
  noise of a finite test set (and, for few-shot probes, the variance over few-shot seeds).

Pure NumPy in float64: arrays in, `Judgement` out.
"""

import dataclasses
import math
import statistics
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vit_repr import findings

SIDES = ("above", "below")
_NUMBERS = ("value", "low", "high", "threshold")
_WIDTH = 100


@dataclasses.dataclass(frozen=True)
class Judgement:
  """One finding of the paper, judged on one run's numbers.

  Attributes:
    finding: the paper's finding, a short phrase.
    statistic: what the statistic measures, one phrase with its unit.
    value: the statistic on this run.
    low: lower end of the interval.
    high: upper end of the interval.
    threshold: the value the finding must clear.
    side: 'above' or 'below': the finding holds when the value is above / below `threshold`.
    interval: what the interval covers, e.g. "95% interval, CKA cells resampled from their
      standard errors".
  """
  finding: str
  statistic: str
  value: float
  low: float
  high: float
  threshold: float
  side: str
  interval: str

  def __post_init__(self):
    if self.side not in SIDES:
      raise ValueError(f"Expected side to be one of {SIDES}; got {self.side!r}.")

  @property
  def shown(self) -> bool:
    """Whether the whole interval lies on the finding's side of the threshold (False if any of
    value, low, high, threshold is NaN)."""
    if any(math.isnan(getattr(self, name)) for name in _NUMBERS):
      return False
    if self.side == "above":
      return self.low > self.threshold
    return self.high < self.threshold

  def verdict(self) -> str:
    """'shown' or 'not shown on this data'."""
    return "shown" if self.shown else "not shown on this data"

  def to_json(self) -> dict[str, Any]:
    """Every field (numbers rounded to 4 decimals, NaN as None), plus 'shown' and 'verdict'."""
    record = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    for name in _NUMBERS:
      number = float(record[name])
      record[name] = None if math.isnan(number) else round(number, 4)
    return record | {"shown": self.shown, "verdict": self.verdict()}

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> "Judgement":
    """The inverse of `to_json` (None read as NaN; 'shown' and 'verdict' ignored)."""
    fields = {field.name: record[field.name] for field in dataclasses.fields(cls)}
    for name in _NUMBERS:
      fields[name] = math.nan if fields[name] is None else float(fields[name])
    return cls(**fields)


def _check_confidence(confidence: float) -> None:
  if not 0 < confidence < 1:
    raise ValueError(f"Expected a confidence strictly between 0 and 1 (0.95 for a 95% "
                     f"interval); got {confidence}.")


def _percent(confidence: float) -> str:
  return f"{100 * confidence:g}%"


def resampled_interval(statistic: Callable[..., float], values: Sequence[npt.ArrayLike],
                       stderrs: Sequence[npt.ArrayLike], *, confidence: float = 0.95,
                       draws: int = 2000, seed: int = 0) -> tuple[float, float]:
  """Percentile interval of a statistic under parametric resampling of its input arrays.

  Each draw replaces every `values[k]` by `values[k] + stderrs[k] * z`, z iid standard normal
  per entry, and evaluates `statistic(*drawn)`.

  Args:
    statistic: arrays -> one number; called with `len(values)` arrays.
    values: the measured arrays (NaN entries stay NaN in every draw).
    stderrs: one standard error per entry of each array, each in its array's shape (NaN is
      read as 0: that entry is not resampled).
    confidence: the interval's coverage, in (0, 1).
    draws: number of draws, at least 100.
    seed: seed of `np.random.default_rng`.

  Returns:
    The (1 - confidence) / 2 and 1 - (1 - confidence) / 2 quantiles of the draws that are not
    NaN; (nan, nan) when every draw is NaN.

  Raises:
    ValueError: the numbers of values and stderrs differ, a stderr's shape differs from its
      array's, a stderr is negative, `confidence` is outside (0, 1) or `draws` < 100.
  """
  if len(values) != len(stderrs):
    raise ValueError(f"Expected one stderr array per value array; got {len(values)} value "
                     f"arrays and {len(stderrs)} stderr arrays.")
  values = [np.asarray(value, np.float64) for value in values]
  stderrs = [np.nan_to_num(np.asarray(stderr, np.float64), nan=0.0) for stderr in stderrs]
  for k, (value, stderr) in enumerate(zip(values, stderrs)):
    if value.shape != stderr.shape:
      raise ValueError(f"Expected stderrs[{k}] in the shape of values[{k}], {value.shape}; got "
                       f"{stderr.shape}. Pass one standard error per entry (NaN where unknown).")
    if np.any(stderr < 0):
      raise ValueError(f"Expected non-negative standard errors; stderrs[{k}] has negative "
                       f"entries.")
  _check_confidence(confidence)
  if draws < 100:
    raise ValueError(f"Expected at least 100 draws for a percentile interval; got {draws}.")
  rng = np.random.default_rng(seed)
  noise = [stderr * rng.standard_normal((draws,) + stderr.shape) for stderr in stderrs]
  drawn = np.array([statistic(*(value + z[d] for value, z in zip(values, noise)))
                    for d in range(draws)], np.float64)
  drawn = drawn[~np.isnan(drawn)]
  if drawn.size == 0:
    return math.nan, math.nan
  tail = (1 - confidence) / 2
  low, high = np.quantile(drawn, [tail, 1 - tail])
  return float(low), float(high)


def normal_interval(value: float, stderr: float,
                    confidence: float = 0.95) -> tuple[float, float]:
  """value -/+ z * stderr, z the two-sided standard normal quantile of `confidence`.

  Raises:
    ValueError: `confidence` is outside (0, 1).
  """
  _check_confidence(confidence)
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  return value - z * stderr, value + z * stderr


def _array(array: npt.ArrayLike, name: str, shape: str, *, ndim: int,
           minimum: int = 1) -> np.ndarray:
  """`array` in float64, checked to have `ndim` axes, each of at least `minimum` entries."""
  array = np.asarray(array, np.float64)
  if array.ndim != ndim or min(array.shape, default=0) < minimum:
    raise ValueError(f"Expected {name} as an array {shape}, at least {minimum} along each "
                     f"axis; got shape {array.shape}. Pass {name} as {shape}.")
  return array


def _stderr(stderr: npt.ArrayLike, value: np.ndarray, name: str, shape: str) -> np.ndarray:
  """`stderr` in float64, checked to be in `value`'s shape."""
  stderr = np.asarray(stderr, np.float64)
  if stderr.shape != value.shape:
    raise ValueError(f"Expected the standard errors of {name} in its shape {shape} = "
                     f"{value.shape}; got shape {stderr.shape}. Pass one standard error per "
                     f"entry (NaN where unknown).")
  return stderr


def _accuracies(accuracies: npt.ArrayLike, name: str, shape: str) -> np.ndarray:
  """`accuracies` as a non-empty 1-D float64 array `shape` of fractions in [0, 1]."""
  accuracies = _array(accuracies, name, shape, ndim=1)
  if not np.all((accuracies >= 0) & (accuracies <= 1)):
    raise ValueError(f"Expected {name} as fractions in [0, 1] (not percent, not NaN); got "
                     f"{accuracies.tolist()}.")
  return accuracies


def _check_num_test_examples(num_test_examples: int) -> None:
  if num_test_examples < 1:
    raise ValueError(f"Expected num_test_examples >= 1 (the test set size each accuracy was "
                     f"measured on); got {num_test_examples}.")


def _resampled_judgement(compute: Callable[..., float], values: Sequence[np.ndarray],
                         stderrs: Sequence[np.ndarray], *, finding: str, statistic: str,
                         threshold: float, side: str, resampled: str, confidence: float,
                         draws: int, seed: int) -> Judgement:
  """`compute` on `values` with its resampled interval; `resampled` names the cells."""
  value = compute(*values)
  low, high = resampled_interval(compute, values, stderrs, confidence=confidence, draws=draws,
                                 seed=seed)
  return Judgement(
      finding=finding, statistic=statistic, value=value, low=low, high=high,
      threshold=threshold, side=side,
      interval=f"{_percent(confidence)} interval, {resampled} resampled from their standard "
               f"errors")


def _normal_judgement(value: float, stderr: float, *, finding: str, statistic: str,
                      noise: str, confidence: float) -> Judgement:
  """A difference of accuracies judged above 0 with its normal interval; `noise` names what
  `stderr` covers."""
  low, high = normal_interval(value, stderr, confidence)
  return Judgement(
      finding=finding, statistic=statistic, value=value, low=low, high=high, threshold=0.0,
      side="above", interval=f"{_percent(confidence)} normal interval, {noise}")


def _within_model(heatmap: npt.ArrayLike, name: str) -> np.ndarray:
  """`heatmap` in float64, checked to be square `[L, L]` with L >= 2."""
  heatmap = np.asarray(heatmap, np.float64)
  if heatmap.ndim != 2 or heatmap.shape[0] != heatmap.shape[1] or len(heatmap) < 2:
    raise ValueError(f"Expected {name} as a within-model CKA heatmap [L, L] with L >= 2 "
                     f"layers; got shape {heatmap.shape}. Pass one model's layers against "
                     f"themselves.")
  return heatmap


def cross_half_cka(heatmap: npt.ArrayLike) -> float:
  """Mean CKA between a model's lower and upper layers (paper Fig 1: high in ViT only).

  Args:
    heatmap: CKA `[L, L]` within one model, layers in computation order, L >= 2.

  Returns:
    The mean of `heatmap[lower, upper]`, lower the first L // 2 layers and upper the last
    L // 2 (for odd L the middle layer is in neither), NaN entries ignored.

  Raises:
    ValueError: `heatmap` is not square with at least 2 layers.
  """
  heatmap = _within_model(heatmap, "heatmap")
  half = len(heatmap) // 2
  return float(np.nanmean(heatmap[:half, -half:]))


def judge_uniformity(vit_cka: npt.ArrayLike, vit_stderr: npt.ArrayLike,
                     resnet_cka: npt.ArrayLike, resnet_stderr: npt.ArrayLike, *,
                     confidence: float = 0.95, draws: int = 2000,
                     seed: int = 0) -> Judgement:
  """ViT's lower and upper layers are more alike than ResNet's (paper Fig 1).

  Args:
    vit_cka: CKA `[L, L]` within ViT, layers in computation order.
    vit_stderr: standard errors `[L, L]` of `vit_cka` (NaN where unknown).
    resnet_cka: CKA `[M, M]` within ResNet, layers in computation order.
    resnet_stderr: standard errors `[M, M]` of `resnet_cka`.
    confidence: the interval's coverage.
    draws: resampling draws.
    seed: resampling seed.

  Returns:
    `cross_half_cka(vit_cka) - cross_half_cka(resnet_cka)`, judged above 0.

  Raises:
    ValueError: a heatmap is not square with 2 layers or more, or a stderr's shape differs.
  """
  vit_cka = _within_model(vit_cka, "vit_cka")
  resnet_cka = _within_model(resnet_cka, "resnet_cka")
  return _resampled_judgement(
      lambda vit, resnet: cross_half_cka(vit) - cross_half_cka(resnet),
      [vit_cka, resnet_cka],
      [_stderr(vit_stderr, vit_cka, "vit_cka", "[L, L]"),
       _stderr(resnet_stderr, resnet_cka, "resnet_cka", "[M, M]")],
      finding="ViT's layers are uniform, ResNet's staged",
      statistic="mean CKA between the lower and upper halves of the layers, ViT minus ResNet",
      threshold=0.0, side="above", resampled="CKA cells", confidence=confidence, draws=draws,
      seed=seed)


def judge_lower_vit_depth(cross: npt.ArrayLike, cross_stderr: npt.ArrayLike, *,
                          confidence: float = 0.95, draws: int = 2000,
                          seed: int = 0) -> Judgement:
  """ResNet's lower half resembles ViT's lower layers (paper Fig 2: its lowest quarter).

  Args:
    cross: CKA `[ViT layers, ResNet layers]`, each side in computation order.
    cross_stderr: standard errors of `cross`, in its shape (NaN where unknown).
    confidence: the interval's coverage.
    draws: resampling draws.
    seed: resampling seed.

  Returns:
    `findings.vit_depth_matching_lower_resnet(cross)`, judged below 0.5.

  Raises:
    ValueError: `cross` is not 2-D with a layer on each side, a lower-half column is all NaN,
      or the stderr's shape differs.
  """
  cross = _array(cross, "cross", "[ViT layers, ResNet layers]", ndim=2)
  return _resampled_judgement(
      findings.vit_depth_matching_lower_resnet, [cross],
      [_stderr(cross_stderr, cross, "cross", "[ViT layers, ResNet layers]")],
      finding="ResNet's lower half matches ViT's lower layers",
      statistic="relative ViT depth (0 first, 1 last) best matching ResNet's lower half",
      threshold=0.5, side="below", resampled="CKA cells", confidence=confidence, draws=draws,
      seed=seed)


def head_distance_spread(distance: npt.ArrayLike, blocks: Sequence[int]) -> float:
  """How far apart a block's heads attend (paper Fig 3), averaged over some blocks.

  Args:
    distance: mean attention distance `[blocks, heads]` of each head, in pixels.
    blocks: indices of the blocks to average over, at least one.

  Returns:
    The mean over `blocks` of (max - min over heads), in pixels (NaN if a distance is NaN).

  Raises:
    ValueError: `distance` is not `[blocks, heads]` with a head, or `blocks` is empty.
  """
  distance = _array(distance, "distance", "[blocks, heads]", ndim=2)
  if len(blocks) == 0:
    raise ValueError("Expected at least one block index to average the head spread over.")
  chosen = distance[list(blocks)]
  return float(np.mean(np.max(chosen, axis=1) - np.min(chosen, axis=1)))


def judge_local_and_global_heads(distance: npt.ArrayLike, distance_stderr: npt.ArrayLike, *,
                                 confidence: float = 0.95, draws: int = 2000,
                                 seed: int = 0) -> Judgement:
  """ViT's lower blocks mix local and global heads, its top blocks are global (paper Fig 3).

  Args:
    distance: mean attention distance `[blocks, heads]` of each head, in pixels, blocks in
      computation order, at least 2.
    distance_stderr: standard errors `[blocks, heads]` of `distance` (NaN where unknown).
    confidence: the interval's coverage.
    draws: resampling draws.
    seed: resampling seed.

  Returns:
    The head spread (`head_distance_spread`) of the lower third of the blocks (the first
    max(1, n // 3)) minus that of the top third (the last max(1, n // 3)), judged above 0.

  Raises:
    ValueError: `distance` is not `[blocks, heads]` with 2 blocks or more, or the stderr's
      shape differs.
  """
  distance = _array(distance, "distance", "[blocks, heads]", ndim=2)
  if len(distance) < 2:
    raise ValueError(f"Expected distance [blocks, heads] with at least 2 blocks to compare "
                     f"lower and top blocks; got shape {distance.shape}.")
  third = max(1, len(distance) // 3)
  lower, top = range(third), range(len(distance) - third, len(distance))
  return _resampled_judgement(
      lambda d: head_distance_spread(d, lower) - head_distance_spread(d, top), [distance],
      [_stderr(distance_stderr, distance, "distance", "[blocks, heads]")],
      finding="lower blocks mix local and global heads, higher blocks are global",
      statistic="spread of attention distance over heads (max - min, px), lower third of "
                "blocks minus top third",
      threshold=0.0, side="above", resampled="attention distances", confidence=confidence,
      draws=draws, seed=seed)


def _log_ratio_fall(cls_ratio: np.ndarray, spatial_ratio: np.ndarray) -> float:
  """Mean log(cls / spatial) over the lower half of the sub-layers minus the upper half (a
  ratio that is not positive, as a resampled one can be, counts as NaN: ignored)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    log_ratio = np.log(cls_ratio / spatial_ratio)
  log_ratio[~np.isfinite(log_ratio)] = np.nan
  half = len(log_ratio) // 2
  return float(np.nanmean(log_ratio[:half]) - np.nanmean(log_ratio[-half:]))


def judge_norm_ratio_change(cls_ratio: npt.ArrayLike, spatial_ratio: npt.ArrayLike,
                            cls_stderr: npt.ArrayLike, spatial_stderr: npt.ArrayLike, *,
                            confidence: float = 0.95, draws: int = 2000,
                            seed: int = 0) -> Judgement:
  """The CLS token's norm ratio falls relative to the spatial tokens' (paper Fig 7).

  Args:
    cls_ratio: norm ratio ||z|| / ||f(z)|| `[sublayers]` of the CLS token, ViT's residual
      sub-layers in computation order, at least 2.
    spatial_ratio: the same `[sublayers]` for the spatial tokens.
    cls_stderr: standard errors `[sublayers]` of `cls_ratio` (NaN where unknown).
    spatial_stderr: standard errors `[sublayers]` of `spatial_ratio`.
    confidence: the interval's coverage.
    draws: resampling draws.
    seed: resampling seed.

  Returns:
    With log_ratio = log(cls_ratio / spatial_ratio) per sub-layer: its mean over the lower
    half of the sub-layers (the first S // 2) minus its mean over the upper half (the last
    S // 2), NaN ignored; judged above 0.

  Raises:
    ValueError: the ratios are not `[sublayers]` of one length, at least 2, or a stderr's
      shape differs.
  """
  cls_ratio = _array(cls_ratio, "cls_ratio", "[sublayers]", ndim=1, minimum=2)
  spatial_ratio = _array(spatial_ratio, "spatial_ratio", "[sublayers]", ndim=1, minimum=2)
  if cls_ratio.shape != spatial_ratio.shape:
    raise ValueError(f"Expected cls_ratio and spatial_ratio over the same sub-layers; got "
                     f"shapes {cls_ratio.shape} and {spatial_ratio.shape}.")
  return _resampled_judgement(
      _log_ratio_fall, [cls_ratio, spatial_ratio],
      [_stderr(cls_stderr, cls_ratio, "cls_ratio", "[sublayers]"),
       _stderr(spatial_stderr, spatial_ratio, "spatial_ratio", "[sublayers]")],
      finding="the CLS token's norm ratio falls relative to the spatial tokens' with depth",
      statistic="natural log of the CLS / spatial norm ratio, mean over the lower half of the "
                "sub-layers minus the upper half",
      threshold=0.0, side="above", resampled="norm ratios", confidence=confidence,
      draws=draws, seed=seed)


def judge_skip_removal(reference_accuracy: float, ablated_accuracies: Sequence[float],
                       num_test_examples: int, *, confidence: float = 0.95) -> Judgement:
  """Removing one block's skip connections lowers ViT's accuracy (paper Fig 8).

  Args:
    reference_accuracy: test accuracy of the unablated ViT, in [0, 1].
    ablated_accuracies: test accuracy `[k]` of each ablated ViT (one block's skip connections
      removed), in [0, 1], at least one.
    num_test_examples: test set size n each accuracy was measured on.
    confidence: the interval's coverage.

  Returns:
    reference - mean(ablated), with a normal interval from independent binomial variances:
    stderr = sqrt(p_r (1 - p_r) / n + sum_i p_i (1 - p_i) / n / k^2); judged above 0.

  Raises:
    ValueError: an accuracy is outside [0, 1], no ablated accuracy, or n < 1.
  """
  reference = _accuracies([float(reference_accuracy)], "reference_accuracy", "[1]")[0]
  ablated = _accuracies(ablated_accuracies, "ablated_accuracies", "[k]")
  _check_num_test_examples(num_test_examples)
  variance = (reference * (1 - reference) / num_test_examples
              + np.sum(ablated * (1 - ablated) / num_test_examples) / len(ablated) ** 2)
  return _normal_judgement(
      float(reference - np.mean(ablated)), math.sqrt(variance),
      finding="removing a block's skip connections lowers accuracy",
      statistic="test accuracy of the unablated ViT minus the mean of the ablated ones "
                "(fraction)",
      noise=f"binomial noise of each accuracy on {num_test_examples} test examples",
      confidence=confidence)


def judge_cls_localization(cls_own: npt.ArrayLike, cls_stderr: npt.ArrayLike,
                           gap_own: npt.ArrayLike, gap_stderr: npt.ArrayLike, *,
                           confidence: float = 0.95, draws: int = 2000,
                           seed: int = 0) -> Judgement:
  """A CLS-trained ViT's top block keeps location better than a GAP-trained one's (Fig 10).

  Args:
    cls_own: CKA `[tokens]` of each top-block output token of the CLS-trained ViT with the
      input patch at its own position.
    cls_stderr: standard errors `[tokens]` of `cls_own` (NaN where unknown).
    gap_own: the same `[tokens]` for the GAP-trained ViT.
    gap_stderr: standard errors `[tokens]` of `gap_own`.
    confidence: the interval's coverage.
    draws: resampling draws.
    seed: resampling seed.

  Returns:
    nanmean(cls_own) - nanmean(gap_own), judged above 0.

  Raises:
    ValueError: an array is not `[tokens]` with a token, or a stderr's shape differs.
  """
  cls_own = _array(cls_own, "cls_own", "[tokens]", ndim=1)
  gap_own = _array(gap_own, "gap_own", "[tokens]", ndim=1)
  return _resampled_judgement(
      lambda cls, gap: float(np.nanmean(cls) - np.nanmean(gap)), [cls_own, gap_own],
      [_stderr(cls_stderr, cls_own, "cls_own", "[tokens]"),
       _stderr(gap_stderr, gap_own, "gap_own", "[tokens]")],
      finding="a CLS-trained ViT keeps location better than a GAP-trained one in its top "
              "block",
      statistic="mean CKA of a top-block token with its own input patch, CLS-trained minus "
                "GAP-trained ViT",
      threshold=0.0, side="above", resampled="per-token CKA values", confidence=confidence,
      draws=draws, seed=seed)


def _mean_accuracy_variance(accuracies: np.ndarray, num_test_examples: int) -> float:
  """Variance of the mean over seeds: seed variance / seeds (0 for one seed) plus the
  binomial p (1 - p) / n of the mean accuracy p."""
  seeds = np.var(accuracies, ddof=1) / len(accuracies) if len(accuracies) >= 2 else 0.0
  p = np.mean(accuracies)
  return float(seeds + p * (1 - p) / num_test_examples)


def judge_probe_data_scale(full_accuracies: npt.ArrayLike, subset_accuracies: npt.ArrayLike,
                           num_test_examples: int, *, confidence: float = 0.95) -> Judgement:
  """Intermediate layers probe better when the model saw more training data (paper Fig 12).

  Args:
    full_accuracies: few-shot probe test accuracy `[seeds]` of an intermediate layer of the
      full-data model, one per few-shot seed, in [0, 1].
    subset_accuracies: the same `[seeds]` for the model trained on a subset of the data.
    num_test_examples: test set size n each accuracy was measured on.
    confidence: the interval's coverage.

  Returns:
    mean(full) - mean(subset), with a normal interval whose stderr combines both models'
    variances (seed variance / seeds when seeds >= 2, plus p (1 - p) / n); judged above 0.

  Raises:
    ValueError: an accuracy is outside [0, 1], an array is empty or not 1-D, or n < 1.
  """
  full = _accuracies(full_accuracies, "full_accuracies", "[seeds]")
  subset = _accuracies(subset_accuracies, "subset_accuracies", "[seeds]")
  _check_num_test_examples(num_test_examples)
  stderr = math.sqrt(_mean_accuracy_variance(full, num_test_examples)
                     + _mean_accuracy_variance(subset, num_test_examples))
  return _normal_judgement(
      float(np.mean(full) - np.mean(subset)), stderr,
      finding="intermediate layers probe better with more training data",
      statistic="few-shot probe test accuracy of an intermediate layer, full-data minus subset "
                "model (fraction)",
      noise=f"few-shot seed variance and binomial noise on {num_test_examples} test examples",
      confidence=confidence)


def _signed(number: float) -> str:
  return "nan" if math.isnan(number) else f"{number:+.3f}"


def table(judgements: Sequence[Judgement]) -> str:
  """A plain-text table of judgements for a terminal, lines at most 100 characters.

  One row per judgement (#, finding, value [low, high], verdict; long findings wrap within
  their column), then one numbered note per judgement (the statistic and the side of the
  threshold it needs; what each interval covers is in `Judgement.interval`), then
  "Shown: k of N findings."
  """
  values = [f"{_signed(j.value)} [{_signed(j.low)}, {_signed(j.high)}]" for j in judgements]
  value_width = max([len("value [interval]")] + [len(v) for v in values])
  verdict_width = len("not shown on this data")
  number_width = max(1, len(str(len(judgements))))
  finding_width = _WIDTH - number_width - value_width - verdict_width - 6

  def row(number: str, finding: str, value: str, verdict: str) -> str:
    return (f"{number:<{number_width}}  {finding:<{finding_width}}  {value:<{value_width}}  "
            f"{verdict}").rstrip()

  lines = [row("#", "finding", "value [interval]", "verdict"),
           row("-" * number_width, "-" * finding_width, "-" * value_width, "-" * verdict_width)]
  for number, (judgement, value) in enumerate(zip(judgements, values), start=1):
    wrapped = textwrap.wrap(judgement.finding, finding_width) or [""]
    lines.append(row(str(number), wrapped[0], value, judgement.verdict()))
    lines.extend(row("", more, "", "") for more in wrapped[1:])
  lines.append("")
  for number, judgement in enumerate(judgements, start=1):
    lines.extend(textwrap.wrap(
        f"{number}. {judgement.statistic}; shown when the interval is {judgement.side} "
        f"{judgement.threshold:g}.", _WIDTH,
        subsequent_indent=" " * (len(str(number)) + 2)))
  shown = sum(judgement.shown for judgement in judgements)
  lines.append(f"Shown: {shown} of {len(judgements)} findings.")
  return "\n".join(lines)
