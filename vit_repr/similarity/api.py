"""The public API: named measures (`Measure`, `get_measure`), `compare`, `heatmap` and one
convenience function per measure. See the package docstring for the table of measures."""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import numbers
from typing import Any

from absl import logging
import numpy as np
from numpy.typing import ArrayLike

from vit_repr.similarity import cca, kernel, neighbours, rdm
from vit_repr.similarity.inputs import as_features

MEASURES: tuple[str, ...] = ("cka", "angular_cka", "svcca", "pwcca", "procrustes", "rsa",
                             "mutual_knn", "cknna")


@dataclasses.dataclass(frozen=True)
class Measure:
  """A similarity or distance between two layers' features on the same examples.

  Attributes:
    name: one of `MEASURES`.
    kind: 'similarity' (larger = more alike) or 'distance' (0 = alike).
    streaming: whether a minibatch (streaming) form exists (`vit_repr.cka.MinibatchCKA`);
      otherwise the measure needs the full example set at once.
    reference: the paper that defines it.
    prepare: one layer's features `[n, ...]` (and an optional `name` for messages) -> its
      summary; the measure's options are bound in.
    compare: two summaries of the same n examples -> the value (float; NaN where undefined).
    options: the option values bound into `prepare` (`get_measure`).
  """
  name: str
  kind: str
  streaming: bool
  reference: str
  prepare: Callable[[np.ndarray], Any]
  compare: Callable[[Any, Any], float]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _variance_kept(value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not 0 < float(value) <= 1):
    raise ValueError("allowed: a number in (0, 1], the fraction of each layer's variance whose "
                     "leading directions are kept (1 = every direction above the rank "
                     "tolerance)")
  return float(value)


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str]:
  def check(value: Any) -> str:
    if value not in allowed:
      raise ValueError(f"allowed: {', '.join(map(repr, allowed))}")
    return value
  return check


def _neighbours(minimum: int) -> Callable[[Any], int]:
  def check(value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
        or value < minimum):
      raise ValueError(f"allowed: an integer >= {minimum}, the number of nearest neighbours")
    return int(value)
  return check


@dataclasses.dataclass(frozen=True)
class _Spec:
  kind: str
  streaming: bool
  reference: str
  prepare: Callable[..., Any]
  compare: Callable[[Any, Any], float]
  options: dict[str, tuple[Any, Callable[[Any], Any]]]   # name -> (default, validator)


_SPECS = {
    "cka": _Spec("similarity", True, "Kornblith et al. 2019, Similarity of Neural Network "
                 "Representations Revisited (linear CKA, biased HSIC)",
                 functools.partial(kernel.prepare_cka, measure="cka"), kernel.compare_cka, {}),
    "angular_cka": _Spec("distance", True, "Williams et al. 2021, Generalized Shape Metrics on "
                         "Neural Representations (arccos of linear CKA)",
                         functools.partial(kernel.prepare_cka, measure="angular_cka"),
                         kernel.compare_angular_cka, {}),
    "svcca": _Spec("similarity", False, "Raghu et al. 2017, SVCCA",
                   functools.partial(cca.prepare, measure="svcca"), cca.compare_svcca,
                   {"variance_kept": (0.99, _variance_kept)}),
    "pwcca": _Spec("similarity", False, "Morcos et al. 2018, Insights on representational "
                   "similarity in neural networks with canonical correlation (PWCCA)",
                   functools.partial(cca.prepare, measure="pwcca"), cca.compare_pwcca,
                   {"variance_kept": (1.0, _variance_kept)}),
    "procrustes": _Spec("distance", False, "Williams et al. 2021, Generalized Shape Metrics on "
                        "Neural Representations (Procrustes shape distance); Ding et al. 2021",
                        kernel.prepare_procrustes, kernel.compare_procrustes, {}),
    "rsa": _Spec("similarity", False, "Kriegeskorte et al. 2008, Representational similarity "
                 "analysis", rdm.prepare, rdm.compare,
                 {"dissimilarity": ("correlation", _one_of(rdm.DISSIMILARITIES)),
                  "comparison": ("spearman", _one_of(rdm.COMPARISONS))}),
    "mutual_knn": _Spec("similarity", False, "Huh et al. 2024, The Platonic Representation "
                        "Hypothesis (mutual k-NN alignment)",
                        functools.partial(neighbours.prepare, measure="mutual_knn"),
                        neighbours.compare_mutual_knn, {"k": (10, _neighbours(1))}),
    "cknna": _Spec("similarity", False, "Huh et al. 2024, The Platonic Representation "
                   "Hypothesis (CKNNA)", functools.partial(neighbours.prepare, measure="cknna"),
                   neighbours.compare_cknna, {"k": (10, _neighbours(2))}),
}
assert tuple(_SPECS) == MEASURES


def get_measure(name: str, **options: Any) -> Measure:
  """The measure `name` with its options bound.

  Args:
    name: one of `MEASURES`.
    **options: 'svcca', 'pwcca': `variance_kept` in (0, 1] (defaults 0.99 and 1.0); 'rsa':
      `dissimilarity` ('correlation' | 'euclidean', default 'correlation') and `comparison`
      ('spearman' | 'pearson', default 'spearman'); 'mutual_knn', 'cknna': `k` (int, default
      10; cknna needs k >= 2). The other measures take none.

  Returns:
    The `Measure`.

  Raises:
    ValueError: on an unknown measure or option, or a bad option value (the message lists what
      is allowed).
  """
  if name not in _SPECS:
    raise ValueError(f"Unknown similarity measure {name!r}; known: {', '.join(MEASURES)}.")
  spec = _SPECS[name]
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    allowed = (f"its options are {', '.join(map(repr, spec.options))}" if spec.options
               else "it takes no options")
    raise ValueError(f"Unknown option(s) {', '.join(map(repr, unknown))} for measure "
                     f"{name!r}: {allowed}.")
  bound = {}
  for option, (default, check) in spec.options.items():
    value = options.get(option, default)
    try:
      bound[option] = check(value)
    except ValueError as e:
      raise ValueError(f"Bad value {value!r} for option {option!r} of measure {name!r}; "
                       f"{e}.") from None
  return Measure(name=name, kind=spec.kind, streaming=spec.streaming, reference=spec.reference,
                 prepare=functools.partial(spec.prepare, **bound), compare=spec.compare,
                 options=bound)


def compare(x: ArrayLike, y: ArrayLike, measure: str = "cka",
            **options: Any) -> float:
  """The measure between two layers' features on the same examples.

  Args:
    x: features `[n, ...]` of the first layer (any framework; each example flattened).
    y: features `[n, ...]` of the second layer, same examples in the same order.
    measure: one of `MEASURES`.
    **options: the measure's options (`get_measure`).

  Returns:
    The value as a float; NaN (with a logged warning) if a layer is constant.

  Raises:
    ValueError: on an unknown measure or option, mismatched example counts, too few examples or
      non-finite features.
  """
  m = get_measure(measure, **options)
  fx, fy = as_features(x, "x"), as_features(y, "y")
  if fx.shape[0] != fy.shape[0]:
    raise ValueError(
        f"x and y must hold the same examples: x has shape {np.shape(x)}, y has shape "
        f"{np.shape(y)} (leading axis = examples). Pass features of the same inputs, in the same "
        "order.")
  return m.compare(m.prepare(fx, "x"), m.prepare(fy, "y"))


def _prepared(layers: Any, what: str, m: Measure, n: int | None) -> tuple[list[Any], int]:
  if not isinstance(layers, Mapping) or not layers:
    raise ValueError(f"{what} must be a non-empty mapping {{layer name: features [n, ...]}} "
                     f"in layer order; got {type(layers).__name__} of length "
                     f"{len(layers) if hasattr(layers, '__len__') else '?'}.")
  out = []
  for key, value in layers.items():
    features = as_features(value, f"{what}[{key!r}]")
    if n is None:
      n = features.shape[0]
    elif features.shape[0] != n:
      raise ValueError(
          f"Every layer must hold the same examples: {what}[{key!r}] has {features.shape[0]} "
          f"examples, the first layer has {n}. Pass features of the same inputs to every layer.")
    out.append(m.prepare(features, str(key)))
  return out, n


def heatmap(layers_a: Mapping[str, ArrayLike],
            layers_b: Mapping[str, ArrayLike] | None = None, measure: str = "cka",
            **options: Any) -> np.ndarray:
  """The measure between every layer of A and every layer of B (or of A, within A).

  Each layer is prepared once (one spectral step or Gram per layer), then every pair compared.

  Args:
    layers_a: {layer name: features `[n, ...]`}, in the order of the heatmap's rows.
    layers_b: {layer name: features `[n, ...]`} for the columns, same examples; None compares A
      with itself.
    measure: one of `MEASURES`.
    **options: the measure's options (`get_measure`).

  Returns:
    `[len(layers_a), len(layers_b)]` float64 values in the mappings' key order; NaN in the row
    or column of a constant layer (with a logged warning naming it). For 'pwcca', entry [i, j]
    is pwcca(A_i, B_j), weighted by A_i.

  Raises:
    ValueError: on empty mappings, unknown measures or options, layers with different example
      counts, too few examples or non-finite features (naming the layer).
  """
  m = get_measure(measure, **options)
  within = layers_b is None
  prepared_a, n = _prepared(layers_a, "layers_a", m, None)
  prepared_b = prepared_a if within else _prepared(layers_b, "layers_b", m, n)[0]
  logging.info("similarity heatmap: %s between %d and %d layers of %d examples.", measure,
               len(prepared_a), len(prepared_b), n)
  return np.array([[m.compare(a, b) for b in prepared_b] for a in prepared_a], np.float64)


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
  """Full-batch linear CKA with centred Grams and the biased HSIC (Kornblith et al. 2019), in
  [0, 1]. (`vit_repr.cka.linear_cka` is the same value in JAX; `vit_repr.cka.MinibatchCKA` the
  streaming, unbiased-HSIC form.)"""
  return compare(x, y, "cka")


def angular_cka(x: ArrayLike, y: ArrayLike) -> float:
  """arccos(linear CKA) in radians, in [0, π/2]: a metric (Williams et al. 2021)."""
  return compare(x, y, "angular_cka")


def svcca(x: ArrayLike, y: ArrayLike, *,
          variance_kept: float = 0.99) -> float:
  """SVCCA (Raghu et al. 2017): mean canonical correlation between the leading singular
  directions explaining `variance_kept` of each layer's variance; in [0, 1]."""
  return compare(x, y, "svcca", variance_kept=variance_kept)


def pwcca(x: ArrayLike, y: ArrayLike, *,
          variance_kept: float = 1.0) -> float:
  """PWCCA (Morcos et al. 2018): canonical correlations weighted by how much of `x` each
  canonical variate of `x` accounts for; in [0, 1]. Asymmetric: weights from `x`."""
  return compare(x, y, "pwcca", variance_kept=variance_kept)


def procrustes_distance(x: ArrayLike, y: ArrayLike) -> float:
  """Procrustes shape distance sqrt(2 - 2 ||Xᵀ Y||_*) of centred, unit-Frobenius-norm
  features (Williams et al. 2021); in [0, √2], a metric."""
  return compare(x, y, "procrustes")


def rsa(x: ArrayLike, y: ArrayLike, *, dissimilarity: str = "correlation",
        comparison: str = "spearman") -> float:
  """RSA (Kriegeskorte et al. 2008): rank (or Pearson) correlation of the two layers'
  dissimilarity matrices over examples; in [-1, 1]."""
  return compare(x, y, "rsa", dissimilarity=dissimilarity, comparison=comparison)


def mutual_knn(x: ArrayLike, y: ArrayLike, *, k: int = 10) -> float:
  """Mutual k-NN alignment (Huh et al. 2024): mean fraction of shared k nearest neighbours
  (cosine similarity, self excluded); in [0, 1]."""
  return compare(x, y, "mutual_knn", k=k)


def cknna(x: ArrayLike, y: ArrayLike, *, k: int = 10) -> float:
  """CKNNA (Huh et al. 2024): CKA with unbiased HSIC restricted to mutual k-NN pairs."""
  return compare(x, y, "cknna", k=k)
