"""Eval plans: which examples an eval pass uses, and which host and device reads each one.

Pure index arithmetic, no data access. Eval batches are the first `num_examples` of the
(subset) split in canonical order (see `sources`), or, with `sample_seed=s`, `num_examples` of
them drawn at random without replacement (a seeded permutation; read in canonical order, e.g.
the paper's 10,240 random validation images); the last partial batch is dropped (a padded
batch would add fake examples to CKA Gram matrices): `EvalPlan.num_batches` /
`.num_examples` say how many are used.

Multi-host: the numbers do not depend on the host count. An eval pass's sequence (canonical,
or one global permutation for a reshuffled pass) is laid out device-major: device d's rows of
every global batch are one contiguous run of it (`eval_plan`), host h loads rows
`parallel.host_shard(B)` of every batch, so the global batch, and every device's shard of it,
is the same for any number of hosts, and in canonical order each host reads one contiguous
run of records. A reshuffled pass over several hosts loads each host's own records and
exchanges rows on the devices (`EvalPlan.exchange`).
"""

import dataclasses

import jax
import numpy as np

from vit_repr import parallel
from vit_repr.data import sources


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Which examples an eval pass uses, and where each one goes.

  Attributes:
    num_batches: global batches per pass.
    global_batch_size: rows per global batch (all hosts), padding included.
    num_examples: examples used (the real rows of all the batches).
    num_dropped: requested examples left out (the last partial batch or minibatch).
    positions: `[num_batches, global_batch_size]` position in the pass's sequence of every
      row of every global batch (-1 for a padding row); the same on every host.
    host_indices: canonical indices this host loads, in load order (its rows of every global
      batch, batch after batch, or with `exchange` its buffer rows); -1 marks a padding row
      (an all-zero image, `valid` False).
    exchange: None when each host loads its own rows of every global batch. Otherwise
      `[num_batches, global_batch_size]`: global batch i is rows `exchange[i]` of the hosts'
      loaded batches `[hosts * buffer, ...]` (host h's buffer rows first `[h * buffer, (h + 1)
      * buffer)`): a reshuffled pass in which every host loads only its own records and the
      devices exchange them.
  """
  num_batches: int
  global_batch_size: int
  num_examples: int
  num_dropped: int
  positions: np.ndarray
  host_indices: np.ndarray
  exchange: np.ndarray | None = None


def eval_plan(num_split_examples: int, *, global_batch_size: int,
              num_examples: int | None = None, subset_fraction: float = 1.0,
              subset_seed: int = 0, sample_seed: int | None = None,
              shuffle_seed: int | None = None, minibatch_size: int | None = None,
              num_devices: int = 1, exchange: bool = False,
              process_index: int | None = None, process_count: int | None = None) -> EvalPlan:
  """The examples an eval pass reads: pure index arithmetic, no data access.

  The pass's sequence is the used examples in canonical order, or with `shuffle_seed` that
  sequence permuted by `jax.random.permutation(jax.random.key(shuffle_seed), used)`: one
  global permutation, so the batches are the same for any number of hosts.

  The sequence is cut into units read by one device each: without `minibatch_size`, the first
  `floor(n / B)` global batches' worth of examples (the rest dropped) in units of B / devices
  rows; with `minibatch_size` m (each device's shard of a batch is one minibatch: the studies
  whose numbers depend on the grouping, such as minibatch CKA), `M = floor(n / m)` minibatches
  (minibatch j = entries `[j m, (j + 1) m)`), so the examples used and the minibatches do not
  depend on the device count. The units fill the devices' slots of the global batches as
  `parallel.minibatch_slots` says: device d holds one contiguous run of the sequence, so in
  canonical order each host reads one contiguous run of records; slots left over at the end
  of a minibatch plan are padding (`valid` False). Host h loads the rows
  `parallel.host_shard(B)` of each global batch.

  A reshuffled pass over several hosts would have every host read nearly every record. With
  `exchange`, host h instead loads only the records of its canonical (pass 0) rows, those of
  each global batch into a buffer of the same size on every host, and the devices exchange
  rows (`EvalPlan.exchange`): the same batches, each record read by one host.

  Args:
    num_split_examples: size of the split.
    global_batch_size: rows per global batch (all hosts).
    num_examples: examples requested (default the whole subset).
    subset_fraction: nested subset fraction (see `subset_indices`).
    subset_seed: nested subset seed.
    sample_seed: None for the first `num_examples` of the subset; s for `num_examples` of it
      drawn at random without replacement (permutation from `jax.random.key(s)`), used in
      canonical order.
    shuffle_seed: None for canonical order; s to permute the used examples globally.
    minibatch_size: None, or the examples of one device's minibatch (divides B).
    num_devices: devices the global batch is sharded over (without `minibatch_size`, the
      layout of the examples over the batches depends on it; the examples used do not).
    exchange: let hosts exchange rows on the devices in a reshuffled multi-host pass.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    The `EvalPlan`.

  Raises:
    ValueError: more examples requested than the subset has, fewer than one batch (one
      minibatch), or sizes that do not divide.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  subset = sources.subset_indices(num_split_examples, subset_fraction, subset_seed)
  if num_examples is None:
    num_examples = len(subset)
  if num_examples > len(subset):
    raise ValueError(
        f"num_examples={num_examples} but the split has only {len(subset)} examples "
        f"(subset_fraction={subset_fraction} of {num_split_examples}); lower num_examples or "
        "use a larger split / subset_fraction.")
  if sample_seed is not None:
    subset = np.sort(subset[sources._permutation(len(subset), sample_seed)[:num_examples]])
  if global_batch_size % process_count or global_batch_size % num_devices:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                     f"{num_devices} devices of {process_count} host(s).")
  lo, hi = parallel.host_shard(global_batch_size, process_index, process_count)
  if minibatch_size is None:
    unit, num_units = global_batch_size // num_devices, num_examples // global_batch_size
    used = num_units * global_batch_size
    slots = parallel.minibatch_slots(num_units * num_devices, num_devices)
  else:
    unit = minibatch_size
    if (hi - lo) % unit:
      raise ValueError(f"A global batch of {global_batch_size} over {process_count} host(s) "
                       f"does not split into whole minibatches of {unit} examples per host; "
                       "use a minibatch size that divides each host's share of the batch.")
    num_units = num_examples // unit
    used = num_units * unit
    slots = parallel.minibatch_slots(num_units, global_batch_size // unit)
  if num_units == 0:
    raise ValueError(
        f"num_examples={num_examples} is smaller than one " +
        ("global batch" if minibatch_size is None else "minibatch") +
        f" of {global_batch_size if minibatch_size is None else unit}; lower the batch size "
        "or use more examples.")
  positions = np.where(slots[..., None] >= 0, slots[..., None] * unit + np.arange(unit), -1)
  positions = positions.reshape(len(slots), global_batch_size)
  order = np.arange(used)
  if shuffle_seed is not None:
    order = sources._permutation(used, shuffle_seed)
  sequence = subset[:used][order]
  plan = EvalPlan(num_batches=len(slots), global_batch_size=global_batch_size,
                  num_examples=used, num_dropped=num_examples - used, positions=positions,
                  host_indices=np.where(positions >= 0, sequence[np.maximum(positions, 0)],
                                        -1)[:, lo:hi].ravel())
  if not exchange or shuffle_seed is None or process_count == 1:
    return plan
  return _exchange_plan(plan, subset[:used], order, process_index, process_count,
                        local_devices=num_devices // process_count)


def _exchange_plan(plan: EvalPlan, used: np.ndarray, order: np.ndarray, process_index: int,
                   process_count: int, local_devices: int) -> EvalPlan:
  """`plan` (a reshuffled pass) with each host loading only the records of its canonical
  rows: `used` are the examples in canonical order, `order` the pass's permutation of them."""
  host_of_row = np.arange(plan.global_batch_size) // (plan.global_batch_size // process_count)
  canonical = plan.positions  # Pass 0's positions: the same layout in canonical order.
  owner = np.empty(len(used), np.int64)  # Host reading each canonical position's record.
  owner[canonical[canonical >= 0]] = np.broadcast_to(host_of_row, canonical.shape)[canonical >= 0]
  # Each row's source host: the owner of its example; a padding row stays on its own host.
  source = np.where(plan.positions >= 0, owner[order[np.maximum(plan.positions, 0)]],
                    host_of_row)
  counts = np.stack([np.bincount(s, minlength=process_count) for s in source])
  buffer = -(-counts.max() // local_devices) * local_devices
  exchange = np.empty_like(plan.positions)
  host_indices = np.full((plan.num_batches, buffer), -1)
  for i, (rows_source, rows_position) in enumerate(zip(source, plan.positions)):
    by_host = np.argsort(rows_source, kind="stable")  # Rows grouped by source host, in order.
    first = np.concatenate([[0], np.cumsum(counts[i])[:-1]])
    rank = np.arange(plan.global_batch_size) - first[rows_source[by_host]]
    exchange[i, by_host] = rows_source[by_host] * buffer + rank
    mine = by_host[rows_source[by_host] == process_index]
    host_indices[i, :len(mine)] = np.where(rows_position[mine] >= 0,
                                           used[order[np.maximum(rows_position[mine], 0)]], -1)
  return dataclasses.replace(plan, host_indices=host_indices.ravel(), exchange=exchange)
