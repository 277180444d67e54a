"""The one shape of every streaming analysis: `init` / `update` / `result` over a small state.

Each analysis of this package (`cka.MinibatchCKA`, `attention.MeanAttentionDistance`,
`receptive_field.ReceptiveField`, `residual.NormRatio`, `localization.LocalizationCKA`) is an
`Accumulator`, as an optax transformation is: `init(...)` builds a zero state, `update(state,
batch...)` folds in one global batch `[batch, ...]` sharded over the mesh's data axis (pure,
jitted, donating the state) and `result(state)` returns NumPy arrays (one host
synchronisation). A state is a frozen dataclass registered as a pytree
(`jax.tree_util.register_dataclass`) that subclasses `State`: its arrays are data fields, plain
Python values (layer names, token counts) are fields marked
`dataclasses.field(metadata=dict(static=True))`, and `to_numpy` / `from_numpy` save and restore
it as `{field name: array}` (how `vit_repr.studies.resume` checkpoints a study).

This module holds what the analyses share: `State`, Kahan-compensated sums (Kahan, "Further
remarks on reducing truncation errors", CACM 1965), the default mesh, placing a state on the
mesh, and the check that something was accumulated before `result`.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax
import numpy as np
from jax.sharding import Mesh

from vit_repr import parallel

StateT = TypeVar("StateT")
ResultT = TypeVar("ResultT")
S = TypeVar("S", bound="State")


@runtime_checkable
class Accumulator(Protocol[StateT, ResultT]):
  """The contract every analysis accumulator keeps (the arguments of `init` and of the batch
  differ per analysis: CKA reads its layers from a first batch, attention needs nothing).

  Attributes:
    mesh: the one-axis `parallel.DATA_AXIS` mesh the batches are sharded over (`data_mesh`).
    init: `(...) -> state`, the zero state, replicated over the mesh.
    update: `(state, *batch, **options) -> state`, one global batch `[batch, ...]` folded in;
      jitted and donating `state`; also takes a state restored by `from_numpy` (host arrays,
      placed once by `replicated`).
    result: `(state) -> result` in NumPy; raises ValueError when nothing was accumulated
      (`check_accumulated`).
  """
  mesh: Mesh
  init: Callable[..., StateT]
  update: Callable[..., StateT]
  result: Callable[[StateT], ResultT]


class State:
  """Base of the analyses' states: saved and restored as NumPy arrays keyed by field name.

  Subclasses are frozen dataclasses registered with `jax.tree_util.register_dataclass`; their
  static fields (`metadata=dict(static=True)`) hold str, int, bool or tuples of them.
  """

  def to_numpy(self) -> dict[str, np.ndarray]:
    """Every field as NumPy, read from this process's copy of a replicated (possibly multi-host)
    array; e.g. `np.savez(path, **state.to_numpy())`."""
    return {f.name: parallel.to_host(getattr(self, f.name)) for f in dataclasses.fields(self)}

  @classmethod
  def from_numpy(cls: type[S], arrays: Mapping[str, Any]) -> S:
    """Inverse of `to_numpy` (accepts the mapping of `np.load`): data fields as host arrays
    (the accumulator's `update` places them on its mesh), static fields as Python values.

    Raises:
      ValueError: the field names differ (missing and unexpected ones are named).
    """
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in arrays]
    unexpected = sorted(set(arrays) - {f.name for f in fields})
    if missing or unexpected:
      raise ValueError(f"Not a saved {cls.__name__}: missing fields {missing}, unexpected "
                       f"fields {unexpected}. Pass the arrays of {cls.__name__}.to_numpy() "
                       "(saved by this version, for this analysis).")
    return cls(**{f.name: _python(arrays[f.name]) if f.metadata.get("static")
                  else np.asarray(arrays[f.name]) for f in fields})


def _python(value: Any) -> Any:
  """A static field's saved array as the Python value it was: a scalar, or nested tuples."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else tuple(_python(v) for v in value)


def prefixed(parts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Several states' `to_numpy` arrays as one flat mapping `'<key>/<name>'` (one `.npz`)."""
  return {f"{key}/{name}": a for key, arrays in parts.items() for name, a in arrays.items()}


def unprefixed(arrays: Mapping[str, Any],
               keys: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
  """Inverse of `prefixed`: `{key: {name: array}}`.

  Raises:
    ValueError: a name without a key, or (given `keys`) keys missing or unexpected.
  """
  parts = {}
  for name, a in arrays.items():
    key, slash, rest = name.partition("/")
    if not slash:
      raise ValueError(f"Saved array {name!r} is not '<key>/<name>' (streaming.prefixed).")
    parts.setdefault(key, {})[rest] = a
  if keys is not None:
    keys = list(keys)
    missing, unexpected = [k for k in keys if k not in parts], sorted(set(parts) - set(keys))
    if missing or unexpected:
      raise ValueError(f"The saved states are not those of {keys}: missing {missing}, "
                       f"unexpected {unexpected}.")
  return parts


def kahan_add(sums: jax.Array, compensation: jax.Array,
              values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`sums + values` with Kahan compensation (traceable; elementwise).

  Args:
    sums: running float32 sums `[...]`.
    compensation: their compensation, same shape: the low-order bits the last addition lost.
    values: the terms to add, same shape.

  Returns:
    (new sums, new compensation); the compensated total is `kahan_total` of them.
  """
  corrected = values - compensation
  new_sums = sums + corrected
  return new_sums, (new_sums - sums) - corrected


def kahan_total(sums: Any, compensation: Any) -> np.ndarray:
  """The compensated total `sums - compensation` of host arrays, in float64."""
  return np.asarray(sums, np.float64) - np.asarray(compensation, np.float64)


def data_mesh(mesh: Mesh | None, what: str) -> Mesh:
  """`mesh`, or a mesh of this process's first device when None.

  Raises:
    ValueError: the mesh does not have exactly the axis `parallel.DATA_AXIS`.
  """
  mesh = parallel.make_mesh(jax.local_devices()[:1]) if mesh is None else mesh
  if tuple(mesh.axis_names) != (parallel.DATA_AXIS,):
    raise ValueError(f"{what} needs a one-axis mesh named {parallel.DATA_AXIS!r} "
                     f"(parallel.make_mesh()); got axes {mesh.axis_names}.")
  return mesh


def replicated(state: StateT, mesh: Mesh) -> StateT:
  """`state` with every array replicated over `mesh` (`parallel.replicate`): host arrays (a
  new or restored state) are copied once, placed ones kept; a traced state (inside jit) is
  returned as it is."""
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(state)):
    return state
  return parallel.replicate(state, mesh)


def check_accumulated(count: Any, unit: str) -> int:
  """`count` (a host or replicated scalar) as an int.

  Raises:
    ValueError: `count` is 0: no `unit` (e.g. 'batch') was accumulated.
  """
  count = int(parallel.to_host(count))
  if count == 0:
    raise ValueError(f"No {unit} was accumulated; call update before result.")
  return count
