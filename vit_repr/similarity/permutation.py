"""Permutation null of a similarity heatmap: which cells are above what chance gives.

Similarity grows with a layer's width and depth even between unrelated layers (a CKA of two
random layers is not 0), so a heatmap cell means little without its chance level. The usual
remedy is a permutation test: shuffling the examples of one model against the other keeps each
layer's own geometry and destroys their correspondence. For K random permutations P_k (drawn
from `seed`) the examples of every layer of B are reordered, B is prepared again and every cell
recomputed; cell (i, j)'s null distribution is its K shuffled values. The p-value is
(1 + #{k: null_k >= value}) / (K + 1) for a similarity and (1 + #{k: null_k <= value}) / (K + 1)
for a distance (never 0; Phipson & Smyth 2010, "Permutation p-values should never be zero").

Cost: K preparations of each layer of B and K full heatmaps of comparisons; memory: the float64
features of every layer (`as_features`) while it runs. The minibatch CKA's streamed null is
`vit_repr.cka.MinibatchCKA(num_permutations=K)`.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from numpy.typing import ArrayLike

from vit_repr.similarity.api import get_measure
from vit_repr.similarity.inputs import as_features


class PermutationTest(NamedTuple):
  """A heatmap with its permutation null.

  Attributes:
    values: `[La, Lb]` the measure between the layers, as `heatmap` returns it.
    p_value: `[La, Lb]` one-sided permutation p-value of each cell (more alike than chance).
    null_mean: `[La, Lb]` mean of the cell's K shuffled values (its chance level).
    num_permutations: K.
  """
  values: np.ndarray
  p_value: np.ndarray
  null_mean: np.ndarray
  num_permutations: int


def _features(layers: Any, what: str) -> dict[str, np.ndarray]:
  if not isinstance(layers, Mapping) or not layers:
    raise ValueError(f"{what} must be a non-empty mapping {{layer name: features [n, ...]}}.")
  found = {str(k): as_features(v, f"{what}[{k!r}]") for k, v in layers.items()}
  counts = {k: v.shape[0] for k, v in found.items()}
  if len(set(counts.values())) != 1:
    raise ValueError(f"Every layer must hold the same examples; {what} has example counts "
                     f"{counts}.")
  return found


def permutation_test(layers_a: Mapping[str, ArrayLike],
                     layers_b: Mapping[str, ArrayLike] | None = None, measure: str = "cka", *,
                     num_permutations: int = 100, seed: int = 0,
                     **options: Any) -> PermutationTest:
  """The heatmap of `measure` between A's and B's layers with its permutation null.

  Args:
    layers_a: {layer name: features `[n, ...]`}, rows in key order.
    layers_b: {layer name: features `[n, ...]`}, columns, same examples; None: A against A (the
      shuffled copy of A plays B).
    measure: one of `similarity.MEASURES`.
    num_permutations: K >= 1 shuffles of B's examples.
    seed: seed of the permutations (`np.random.default_rng`).
    **options: the measure's options (`similarity.get_measure`).

  Returns:
    A `PermutationTest`; cells that are NaN (a constant layer) stay NaN.

  Raises:
    ValueError: K < 1, different example counts, or what `heatmap` raises.
  """
  if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or (
      num_permutations < 1):
    raise ValueError(f"num_permutations must be an integer >= 1 (e.g. 100); got "
                     f"{num_permutations!r}.")
  m = get_measure(measure, **options)
  features_a = _features(layers_a, "layers_a")
  features_b = features_a if layers_b is None else _features(layers_b, "layers_b")
  n = next(iter(features_a.values())).shape[0]
  if next(iter(features_b.values())).shape[0] != n:
    raise ValueError(f"layers_a and layers_b must hold the same examples: {n} vs "
                     f"{next(iter(features_b.values())).shape[0]}.")
  prepared_a = [m.prepare(x, name) for name, x in features_a.items()]
  prepared_b = [m.prepare(x, name) for name, x in features_b.items()]

  def cells(columns: list[Any]) -> np.ndarray:
    return np.array([[m.compare(a, b) for b in columns] for a in prepared_a], np.float64)

  values = cells(prepared_b)
  rng = np.random.default_rng(seed)
  more_extreme = np.zeros_like(values)
  null_sum = np.zeros_like(values)
  logging.info("similarity permutation test: %s, %d x %d layers, %d examples, K=%d.", measure,
               len(prepared_a), len(prepared_b), n, num_permutations)
  for _ in range(num_permutations):
    order = rng.permutation(n)
    null = cells([m.prepare(x[order], name) for name, x in features_b.items()])
    null_sum += null
    more_extreme += null >= values if m.kind == "similarity" else null <= values
  p_value = (1 + more_extreme) / (num_permutations + 1)
  p_value[np.isnan(values)] = np.nan
  return PermutationTest(values=values, p_value=p_value,
                         null_mean=null_sum / num_permutations,
                         num_permutations=num_permutations)
