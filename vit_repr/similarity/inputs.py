"""Input checks and per-layer summaries shared by every similarity measure.

Features arrive as array-likes `[n, ...]` from any framework; each example's features are
flattened to `[n, p]` and converted to NumPy float64 on the host. A measure's `prepare` turns one
layer into a `Prepared` summary and its `compare` takes two summaries of the same examples.
"""

from typing import Any, NamedTuple

from absl import logging
import numpy as np

_EPS = np.finfo(np.float64).eps


class Prepared(NamedTuple):
  """One layer's summary for one measure.

  Attributes:
    name: the layer's name in messages ('x', 'y' or a heatmap key).
    n: number of examples.
    data: the measure's summary, or None where the measure is undefined for this layer (a
      constant layer); comparisons with it are NaN.
  """
  name: str
  n: int
  data: Any


def as_features(x: Any, name: str) -> np.ndarray:
  """`x` as float64 `[n, p]` features (each example flattened), validated.

  Raises:
    ValueError: on a missing example axis, no features, a non-real dtype or non-finite values.
  """
  if isinstance(x, Prepared):
    raise ValueError(f"{name} is already a prepared summary; pass the layer's features.")
  a = np.asarray(x)
  if np.iscomplexobj(a):
    raise ValueError(f"{name} must hold real numbers; got complex dtype {a.dtype}.")
  try:
    a = a.astype(np.float64, copy=False)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}. Pass features as a "
                     "numeric array [n, ...] (for PyTorch: tensor.detach().cpu()).") from None
  if a.ndim < 1 or a.shape[0] == 0:
    raise ValueError(f"{name} must have a leading example axis [n, ...] with n >= 1; got shape "
                     f"{a.shape}.")
  a = a.reshape(a.shape[0], -1)
  if a.shape[1] == 0:
    raise ValueError(f"{name} has no features: shape {np.shape(x)} flattens to {a.shape}.")
  finite = np.isfinite(a)
  if not finite.all():
    bad_rows = np.flatnonzero(~finite.all(1))
    raise ValueError(
        f"{name} has {int((~finite).sum())} non-finite values (NaN or Inf) in {len(bad_rows)} "
        f"of its {a.shape[0]} examples (first: example {bad_rows[0]}). Similarity measures need "
        "finite features: check the model's activations (overflow in float16/bfloat16?) or drop "
        "those examples from every layer.")
  return a


def check_examples(n: int, minimum: int, name: str, measure: str, why: str = "") -> None:
  """Raises ValueError unless `n >= minimum` examples."""
  if n < minimum:
    raise ValueError(f"{measure} needs at least {minimum} examples{why}; {name} has n = {n}. "
                     "Use more examples.")


def check_pair(a: Prepared, b: Prepared) -> None:
  """Raises ValueError unless two summaries hold the same number of examples."""
  if not (isinstance(a, Prepared) and isinstance(b, Prepared)):
    raise ValueError("compare takes two summaries made by the same measure's prepare; got "
                     f"{type(a).__name__} and {type(b).__name__}.")
  if a.n != b.n:
    raise ValueError(
        f"{a.name} and {b.name} must hold the same examples: {a.name} has {a.n} examples, "
        f"{b.name} has {b.n} (leading axis = examples). Pass features of the same inputs, in the "
        "same order.")


def centre(x: np.ndarray) -> tuple[np.ndarray, bool]:
  """Column-centred features and whether the layer is constant (no variance over examples).

  Constant means ||x - mean||_F <= 4 n eps64 ||x||_F: the centring's own rounding on identical
  examples, far below float32 resolution.
  """
  xc = x - x.mean(0)
  scale = np.linalg.norm(x)
  return xc, bool(np.linalg.norm(xc) <= 4 * x.shape[0] * _EPS * scale)


def undefined(measure: str, name: str, n: int, why: str) -> Prepared:
  """Logs that `measure` is undefined (NaN) for layer `name` and returns its empty summary."""
  logging.warning("%s is undefined (NaN) for layer %r: %s.", measure, name, why)
  return Prepared(name, n, None)


CONSTANT = "it is constant (every example has the same features: zero variance)"
