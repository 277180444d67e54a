"""Device meshes, batch sharding and multi-host helpers, in plain JAX.

Every analysis and training step runs under a one-axis `jax.sharding.Mesh` named `DATA_AXIS`
over all devices of all hosts (one CPU is a mesh of one). Each host reads only its share of the
data (`host_shard`), and `global_batch` assembles the hosts' local arrays into one global
`jax.Array` sharded along the batch dimension.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh named `DATA_AXIS` over `devices` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading (batch) dimension over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the batch splits evenly over devices and hosts.

  Args:
    global_batch_size: examples per step summed over all hosts.
    mesh: the mesh the batch is sharded over.
  """
  num_devices = mesh.devices.size
  if global_batch_size <= 0:
    raise ValueError(f"Global batch size must be positive, got {global_batch_size}.")
  if global_batch_size % num_devices:
    raise ValueError(
        f"Global batch size {global_batch_size} is not divisible by the {num_devices} devices "
        f"of the mesh; choose a multiple of {num_devices}, e.g. "
        + (f"{global_batch_size // num_devices * num_devices} or "
           if global_batch_size > num_devices else "")
        + f"{-(-global_batch_size // num_devices) * num_devices}.")
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(
        f"Global batch size {global_batch_size} is not divisible by the {num_processes} hosts.")


def host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The number of examples this host loads per step (validated against `mesh`)."""
  check_global_batch_size(global_batch_size, mesh)
  return global_batch_size // jax.process_count()


def host_shard(num_examples: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
  """The `[start, stop)` range of example indices this host reads.

  Hosts get contiguous, disjoint, equally sized ranges; the `num_examples % process_count`
  examples at the end are read by no host, so every host runs the same number of steps.

  Args:
    num_examples: examples in the whole (possibly subset) split.
    process_index: this host's index (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    (start, stop) with `stop - start == num_examples // process_count`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  per_host = num_examples // process_count
  if per_host == 0:
    raise ValueError(
        f"{num_examples} examples cannot be split over {process_count} hosts; "
        "use more examples or fewer hosts.")
  start = process_index * per_host
  return start, start + per_host


def minibatch_slots(num_minibatches: int, slots_per_step: int) -> np.ndarray:
  """`[steps, slots_per_step]`: which minibatch each device slot of each step holds (-1 for
  padding), with steps = ceil(num_minibatches / slots_per_step).

  Slot d holds minibatches `[d * steps, (d + 1) * steps)`, one per step: the minibatches (and
  so every minibatch statistic) are the same for any device count, each device (and host)
  reads one contiguous run of them, and the padding is at the end of the last slots.
  """
  steps = -(-num_minibatches // slots_per_step)
  slots = np.full(slots_per_step * steps, -1)
  slots[:num_minibatches] = np.arange(num_minibatches)
  return slots.reshape(slots_per_step, steps).T


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each host's local arrays into global arrays sharded over the batch axis.

  Args:
    local_batch: pytree of host-local arrays `[host_batch, ...]`; every host passes the same
      structure and shapes.
    mesh: the mesh to shard over.

  Returns:
    The same pytree of `jax.Array`s of shape `[host_batch * process_count, ...]`.
  """
  sharding = batch_sharding(mesh)

  def to_global(x):
    x = np.asarray(x)
    if x.shape[0] % (mesh.devices.size // jax.process_count()):
      raise ValueError(
          f"Host batch of {x.shape[0]} examples does not split over this host's "
          f"{mesh.devices.size // jax.process_count()} devices.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(to_global, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places the leaves of `tree` on every device of `mesh`, replicated.

  Works in multi-process jobs (each process passes the same values). Leaves already
  replicated on `mesh` are kept; other single-process arrays (NumPy, or a `jax.Array` on
  one device) are copied once.
  """
  sharding = replicated(mesh)

  def place(leaf):
    if isinstance(leaf, jax.Array):
      if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        return leaf
      if not leaf.is_fully_addressable:
        raise ValueError(f"Cannot replicate an array sharded as {leaf.sharding} over another "
                         "mesh's processes; place it on this mesh first.")
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

  return jax.tree.map(place, tree)


def host_values(values: np.ndarray) -> np.ndarray:
  """Every process's int32 `values` `[k]`, stacked in process order: `[process_count, k]`.

  A collective: every process calls it at the same point (one process returns its own row).
  """
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values)).reshape(
      jax.process_count(), *values.shape)


def to_host(leaf: Any) -> np.ndarray:
  """A replicated (possibly multi-host) array as NumPy, read from this process's copy."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(leaf)
