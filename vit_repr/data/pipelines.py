"""Eval and train input pipelines (tf.data), sharded over a JAX mesh.

Eval: `eval_batches` reads the examples of an eval plan (`plans.eval_plan`: which examples a
pass uses and which host and device reads each one) with the eval preprocessing, host h its
own rows of every global batch; a reshuffled pass over several hosts holds each host's
encoded records for the pass and exchanges rows on the devices (`EvalPlan.exchange`).
Training cuts the subset into reader shards; host h reads only its shards, which are its rows
of every global batch (see `train_batches`), so the numbers do not depend on the host count.
Both transfer the next `DEVICE_PREFETCH` batches to the devices while one is in use.
"""

import collections
import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from vit_repr import parallel
from vit_repr.data import plans, preprocessing, sources

# Encoded examples held for the training shuffle, summed over hosts and reader shards.
DEFAULT_SHUFFLE_BUFFER = 50_000
# Batches of the next steps already transferred to the devices.
DEVICE_PREFETCH = 2


# ---------------------------------------------------------------------------------------------
# Eval pipeline.


def _eval_dataset(source: sources._Source, plan: plans.EvalPlan, image_size: int,
                  host_batch: int, crop_fraction: float | None) -> tf.data.Dataset:
  """This host's batches `{'image', 'label', 'valid'}` of `plan`; it reads the records from
  its first index to its last (one contiguous run: its own records)."""
  idx = plan.host_indices
  real = idx[idx >= 0]
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros((image_size, image_size, 3)), "label": tf.constant(0),
      "valid": tf.constant(False)}).repeat()
  if not len(real):  # Fewer minibatches than devices: this host holds only padding.
    ds = padding.take(len(idx))
  else:
    start = real.min()
    keep = np.zeros(real.max() + 1 - start, bool)
    keep[real - start] = True
    ds = sources._read_indexed(source, start, start + len(keep), keep)
    canonical = np.sort(real)
    if not np.array_equal(real, canonical):
      # A globally permuted pass: this host's encoded records, read in canonical order, are
      # held (not decoded) and emitted in the plan's order.
      order = tf.constant(np.searchsorted(canonical, real))
      ds = ds.batch(len(real)).map(lambda ex: {k: tf.gather(v, order) for k, v in ex.items()})
      ds = ds.unbatch()

    def preprocess(ex):
      image = preprocessing._eval_preprocess(source.decode(ex["image"]), image_size,
                                             crop_fraction)
      return {"image": image, "label": tf.cast(ex["label"], tf.int32),
              "valid": tf.constant(True)}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    if len(real) < len(idx):  # Padding rows where the plan has -1.
      choice = tf.data.Dataset.from_tensor_slices((idx < 0).astype(np.int64))
      ds = tf.data.Dataset.choose_from_datasets([ds, padding], choice)
  ds = ds.batch(host_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(sources._options())


class EvalBatches:
  """A finite, re-iterable sequence of global eval batches; `len()` is the batch count.

  Each iteration yields `{'image': [B, H, W, 3] float32 in [-1, 1], 'label': [B] int32,
  'valid': [B] bool}` (`valid` False on the padding rows of a minibatch plan) as global
  `jax.Array`s sharded over the mesh's data axis, the next `DEVICE_PREFETCH` batches already
  on their way to the devices (and, for a plan with `exchange`, the rows then exchanged).
  Attributes `plan` and `info` describe what is read.
  """

  def __init__(self, dataset: tf.data.Dataset, mesh: Mesh, plan: plans.EvalPlan,
               info: sources.DatasetInfo):
    self._dataset = dataset
    self._mesh = mesh
    self.plan = plan
    self.info = info

  def __len__(self) -> int:
    return self.plan.num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    batches = _device_prefetch(self._dataset.as_numpy_iterator(), self._mesh)
    if self.plan.exchange is None:
      return batches
    sharding = parallel.batch_sharding(self._mesh)
    return (_take_rows(loaded, parallel.replicate(rows, self._mesh), sharding)
            for loaded, rows in zip(batches, self.plan.exchange))


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(batch: dict[str, jax.Array], rows: jax.Array,
               sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """`batch[rows]` for every entry, sharded as `sharding` (the devices' row exchange)."""
  return jax.lax.with_sharding_constraint(jax.tree.map(lambda x: x[rows], batch), sharding)


def _device_prefetch(host_batches: Iterator[dict[str, np.ndarray]],
                     mesh: Mesh) -> Iterator[dict[str, jax.Array]]:
  """Transfers upcoming batches to the devices while the current one is being used."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(parallel.global_batch(batch, mesh))
    if len(queue) > DEVICE_PREFETCH:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def eval_numpy_batches(name: str, split: str, *, image_size: int, global_batch_size: int,
                       num_examples: int | None = None, data_dir: str | None = None,
                       subset_fraction: float = 1.0, subset_seed: int = 0,
                       sample_seed: int | None = None, crop_fraction: float | None = None,
                       shuffle_seed: int | None = None, minibatch_size: int | None = None,
                       num_devices: int = 1, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local eval batches as NumPy (this host's rows of each global batch).

  Same arguments and order as `eval_batches`, without a mesh and without the devices' row
  exchange (a reshuffled pass over several hosts reads every record of the used range).

  Args:
    name, split, image_size, global_batch_size, num_examples, data_dir, subset_fraction,
      subset_seed, sample_seed, crop_fraction, shuffle_seed, minibatch_size: as in
      `eval_batches`.
    num_devices: devices the global batch would be sharded over (its layout; default 1).
    process_index: host whose rows to load (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    `{'image': [B / hosts, H, W, 3] float32, 'label': [B / hosts] int32,
    'valid': [B / hosts] bool}`.
  """
  preprocessing._check_image_size(image_size)
  source = sources._source(name, split, data_dir)
  plan = plans.eval_plan(source.num_examples, global_batch_size=global_batch_size,
                         num_examples=num_examples, subset_fraction=subset_fraction,
                         subset_seed=subset_seed, sample_seed=sample_seed,
                         shuffle_seed=shuffle_seed, minibatch_size=minibatch_size,
                         num_devices=num_devices, process_index=process_index,
                         process_count=process_count)
  host_batch = len(plan.host_indices) // plan.num_batches
  return _eval_dataset(source, plan, image_size, host_batch,
                       crop_fraction).as_numpy_iterator()


def eval_batches(name: str, split: str, *, image_size: int, global_batch_size: int, mesh: Mesh,
                 num_examples: int | None = None, data_dir: str | None = None,
                 subset_fraction: float = 1.0, subset_seed: int = 0,
                 sample_seed: int | None = None, crop_fraction: float | None = None,
                 shuffle_seed: int | None = None,
                 minibatch_size: int | None = None) -> EvalBatches:
  """Deterministic eval batches for analyses, sharded over `mesh`.

  A pass uses the first `floor(n / B) * B` examples of the (subset) split (the rest are
  dropped, see `EvalBatches.plan`), the same for any number of hosts; device d's rows of
  every batch are one contiguous run of them, so each host reads one contiguous run of records
  (`eval_plan`: a consumer that needs canonical order reorders by `plan.positions`). With
  `shuffle_seed`, the same examples are used in an order permuted globally by that seed (the
  reshuffled passes of minibatch CKA: the examples stay, their grouping into minibatches
  changes, identically for any number of hosts); each host still reads only its own records,
  holds them (encoded) for the pass (ImageNet JPEGs average ~110 kB each), and with several
  hosts the devices exchange the rows of each batch.

  Args:
    name: dataset name ('digits' or any prepared TFDS name).
    split: split name or TFDS split spec ('validation', 'train[:10%]').
    image_size: model resolution H = W.
    global_batch_size: examples per global batch B, a multiple of the device count.
    mesh: mesh whose data axis shards the batch.
    num_examples: examples to use (default all of the subset).
    data_dir: TFDS data directory (local or gs://).
    subset_fraction: nested subset fraction in (0, 1].
    subset_seed: nested subset seed.
    sample_seed: None for the first `num_examples`; s for `num_examples` drawn at random
      without replacement with seed s (see `eval_plan`).
    crop_fraction: None for the ViT/BiT plain resize; c for resize-shorter-side to
      `round(image_size / c)` and central crop.
    shuffle_seed: None for canonical order; else the seed of a global permutation of the
      used examples (see `eval_plan`).
    minibatch_size: None, or the examples of each device's minibatch: then the examples
      used do not depend on the device count, each host reads one contiguous run of records
      in pass 0, and the last batch may hold padding minibatches (see `eval_plan`).

  Returns:
    `EvalBatches` yielding `{'image': [B, H, W, 3] float32, 'label': [B] int32,
    'valid': [B] bool}`.

  Raises:
    ValueError: unknown dataset or split, bad sizes, batch not divisible by the devices.
    FileNotFoundError: TFDS dataset not prepared in `data_dir`.
  """
  preprocessing._check_image_size(image_size)
  parallel.check_global_batch_size(global_batch_size, mesh)
  source = sources._source(name, split, data_dir)
  plan = plans.eval_plan(source.num_examples, global_batch_size=global_batch_size,
                         num_examples=num_examples, subset_fraction=subset_fraction,
                         subset_seed=subset_seed, sample_seed=sample_seed,
                         shuffle_seed=shuffle_seed, minibatch_size=minibatch_size,
                         num_devices=mesh.devices.size, exchange=True)
  if plan.num_dropped:
    logging.warning("%s/%s: using %d examples in %d batches of %d; the last %d are dropped.",
                    name, split, plan.num_examples, plan.num_batches, global_batch_size,
                    plan.num_dropped)
  host_batch = len(plan.host_indices) // plan.num_batches
  dataset = _eval_dataset(source, plan, image_size, host_batch, crop_fraction)
  return EvalBatches(dataset, mesh, plan, source.info)


# ---------------------------------------------------------------------------------------------
# Train pipeline.


def default_num_shards(global_batch_size: int) -> int:
  """Reader shards of a training pipeline: the largest power of two (at most 64) dividing
  the global batch (a function of the batch alone, so results do not depend on the hosts)."""
  return math.gcd(global_batch_size, 64)


def _train_dataset(source: sources._Source, *, image_size: int, global_batch_size: int,
                   seed: int, subset_fraction: float, subset_seed: int, start_step: int,
                   shuffle_buffer: int, area_range: tuple[float, float], random_flip: bool,
                   num_shards: int, process_index: int, process_count: int) -> tf.data.Dataset:
  """This host's rows of every global training batch (see `train_batches`)."""
  if num_shards < 1 or global_batch_size % num_shards or num_shards % process_count:
    raise ValueError(
        f"num_shards={num_shards} must divide the global batch {global_batch_size} and be a "
        f"multiple of the {process_count} hosts; set data.num_shards accordingly (e.g. "
        f"{math.lcm(process_count, default_num_shards(global_batch_size))} if it divides the "
        "batch).")
  subset = sources.subset_indices(source.num_examples, subset_fraction, subset_seed)
  shard_size, shard_batch = len(subset) // num_shards, global_batch_size // num_shards
  if shard_size < shard_batch:
    raise ValueError(f"{source.info.name}/{source.split} has {len(subset)} (subset) examples, "
                     f"fewer than one global batch of {global_batch_size}; use a smaller batch "
                     "or more data.")
  steps_per_epoch = shard_size // shard_batch
  first_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  buffer = max(1, min(shard_size, shuffle_buffer // num_shards))
  seed_scale = tf.constant(2**31 - 1, tf.int64)

  def shard_stream(shard: int) -> tf.data.Dataset:
    indices = subset[shard * shard_size:(shard + 1) * shard_size]
    start, stop = int(indices[0]), int(indices[-1]) + 1
    keep = np.zeros(stop - start, bool)
    keep[indices - start] = True
    base = sources._read_indexed(source, start, stop, keep)

    def epoch(e):
      # (seed, epoch) seeds the examples' augmentation; (seed, epoch, shard) the shard's order.
      epoch_seed = tf.constant(seed, tf.int64) * seed_scale + e
      ds = base.shuffle(buffer, seed=epoch_seed * num_shards + shard,
                        reshuffle_each_iteration=False)
      ds = ds.take(steps_per_epoch * shard_batch)
      return ds.map(lambda ex: {**ex, "seed": tf.stack([epoch_seed, ex["index"]])})

    return tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(
        skip_steps * shard_batch)

  host_shards = range(process_index * num_shards // process_count,
                      (process_index + 1) * num_shards // process_count)
  # Every step takes shard_batch consecutive examples of each shard, shard after shard.
  choice = tf.data.Dataset.from_tensor_slices(
      np.repeat(np.arange(len(host_shards), dtype=np.int64), shard_batch)).repeat()
  ds = tf.data.Dataset.choose_from_datasets([shard_stream(r) for r in host_shards], choice)

  def preprocess(ex):
    image = preprocessing._train_preprocess(source.decode(ex["image"]), image_size, ex["seed"],
                                            area_range, random_flip)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(shard_batch * len(host_shards), drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(sources._options())


def train_numpy_batches(name: str, split: str, *, image_size: int, global_batch_size: int,
                        seed: int, data_dir: str | None = None, subset_fraction: float = 1.0,
                        subset_seed: int = 0, start_step: int = 0,
                        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                        area_range: tuple[float, float] = preprocessing.TRAIN_AREA_RANGE,
                        random_flip: bool = True, num_shards: int | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Host-local training batches as NumPy; same arguments as `train_batches`, no mesh.

  Args:
    name, split, image_size, global_batch_size, seed, data_dir, subset_fraction, subset_seed,
      start_step, shuffle_buffer, area_range, random_flip, num_shards: as in `train_batches`.
    process_index: host whose rows to load (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Yields:
    `{'image': [B / hosts, H, W, 3] float32, 'label': [B / hosts] int32}`, forever: rows
    `parallel.host_shard(B)` of every global batch.
  """
  preprocessing._check_image_size(image_size)
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} must be a positive multiple of "
                     f"the {process_count} hosts.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  source = sources._source(name, split, data_dir)
  return _train_dataset(
      source, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      subset_fraction=subset_fraction, subset_seed=subset_seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, area_range=area_range, random_flip=random_flip,
      num_shards=num_shards or default_num_shards(global_batch_size),
      process_index=process_index, process_count=process_count).as_numpy_iterator()


def train_batches(name: str, split: str, *, image_size: int, global_batch_size: int, mesh: Mesh,
                  seed: int, data_dir: str | None = None, subset_fraction: float = 1.0,
                  subset_seed: int = 0, start_step: int = 0,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  area_range: tuple[float, float] = preprocessing.TRAIN_AREA_RANGE,
                  random_flip: bool = True,
                  num_shards: int | None = None) -> Iterator[dict[str, jax.Array]]:
  """Infinite augmented training batches, reshuffled every epoch from `seed`.

  The (subset) split is cut into `num_shards` contiguous reader shards of equal size. Every
  epoch each shard is shuffled (seed, epoch, shard) and global batch s takes B / num_shards
  consecutive examples of each shard, shard after shard. Host h reads only its shards
  (`num_shards / hosts` of them, TFDS split slicing), which are its rows of every global
  batch, so step s's batch depends on (config, seed, s) and not on the host or device count.
  The canonical order of a prepared TFDS split is already shuffled (and the digits split is
  seeded), so the strata are like random draws. An iterator started with `start_step=s`
  yields exactly the batches an uninterrupted run yields from step s on (it skips whole
  epochs without reading them and the rest of the epoch without decoding).

  Args:
    name: dataset name ('digits' or any prepared TFDS name).
    split: split name or TFDS split spec.
    image_size: model resolution H = W.
    global_batch_size: examples per step B, a multiple of the device count.
    mesh: mesh whose data axis shards the batch.
    seed: shuffle and augmentation seed.
    data_dir: TFDS data directory (local or gs://).
    subset_fraction: nested subset fraction in (0, 1] (data-scale study).
    subset_seed: nested subset seed.
    start_step: first step to produce (resume).
    shuffle_buffer: encoded examples held for shuffling, summed over all hosts and shards
      (each shard holds `shuffle_buffer / num_shards`; a full shuffle of each shard when
      that fits).
    area_range: random-crop area range as fractions of the image.
    random_flip: flip half the images left-right (off for data that mirroring changes, such
      as digits).
    num_shards: reader shards; must divide B and be a multiple of the host count (default
      `default_num_shards(B)`). Changing it changes the batches.

  Returns:
    Iterator of `{'image': [B, H, W, 3] float32 in [-1, 1], 'label': [B] int32}`.

  Raises:
    ValueError: unknown dataset or split, bad sizes, batch not divisible by the devices or
      the shards, shards not divisible by the hosts.
    FileNotFoundError: TFDS dataset not prepared in `data_dir`.
  """
  parallel.check_global_batch_size(global_batch_size, mesh)
  host_batches = train_numpy_batches(
      name, split, image_size=image_size, global_batch_size=global_batch_size, seed=seed,
      data_dir=data_dir, subset_fraction=subset_fraction, subset_seed=subset_seed,
      start_step=start_step, shuffle_buffer=shuffle_buffer, area_range=area_range,
      random_flip=random_flip, num_shards=num_shards)
  return _device_prefetch(host_batches, mesh)

