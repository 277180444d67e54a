"""The jitted, sharded update of minibatch CKA: the computation of `MinibatchCKA.update`.

Under a one-axis mesh, each device takes its shard of the global batch as one minibatch b. It
takes every layer's Gram (column-centred, computed here by XLA in feature chunks, or the
`host_grams` Gram of its rows), U-centres it (`full_batch`, Székely & Rizzo 2014) and gets the
unbiased HSIC1 (Song et al., 2012) of every pair of layers from a single `[La, b²] x [b², Lb]`
product: HSIC1(K, L) = <U(K), U(L)>_F / (b (b - 3)), one Gram per layer per minibatch. The
terms are shifted, multiplied pairwise (for the error bars), summed over the devices
(`jax.shard_map`) and added to the state's Kahan-compensated sums (`streaming.kahan_add`),
with the permutation null and Poisson bootstrap sums when asked (`calibration`).
A stacked group `[b, k, ...]` of k layers takes its k Grams as one batched computation, so the
compiled program grows with the number of groups, not of layers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from vit_repr import parallel, streaming
from vit_repr.cka.calibration import _device_calibration, _minibatch_index
from vit_repr.cka.full_batch import _u_centre

# Channels of `MinibatchCKAState.sums`: three shifted per-batch terms, then their products.
_TERMS = ("xy", "xx", "yy")
_PRODUCTS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _gram_blocked(x: jax.Array, blocks: int) -> jax.Array:
  """X Xᵀ computing only the lower block triangle (SYRK-like) with `blocks` row blocks.

  Costs (1 + 1/blocks) b² p FLOPs instead of 2 b² p.
  """
  n = x.shape[0]
  blocks = min(blocks, n)
  if blocks == 1:
    return x @ x.T
  edges = [round(i * n / blocks) for i in range(blocks + 1)]
  lower = jnp.concatenate([
      jnp.pad(x[start:stop] @ x[:stop].T, ((0, 0), (0, n - stop)))
      for start, stop in zip(edges[:-1], edges[1:])])
  block = np.repeat(np.arange(blocks), np.diff(edges))
  return jnp.where(block[:, None] >= block[None, :], lower, lower.T)


# A layer counts as constant within a minibatch when its centred sum of squares is below this
# fraction of its uncentred one: what float32 rounding of the mean leaves of a constant layer.
_CONSTANT_RTOL = 1e3 * float(np.finfo(np.float32).eps)**2
# Default features per chunk of the centred Gram on CPU: each chunk is centred in cache and
# multiplied at once, so centring costs no extra pass over memory. On a 2-core AVX-512 CPU
# (benchmarks/cka_bench.py, CPU time per update) 512 and 1024 tie, 2048 costs ~10% more and
# no chunking ~40% more. Accelerators take one unchunked product.
_CPU_FEATURE_CHUNK = 1024


def _centred_gram(x: jax.Array, gram_blocks: int,
                  feature_chunk: int) -> tuple[jax.Array, jax.Array]:
  """Gram `[b, b]` of the column-centred features `[b, p]`, and b·||column means||².

  Works through the features in chunks of `feature_chunk` (0: one chunk): each chunk is read
  from memory once, its column means taken (as a matrix-vector product: XLA:CPU's axis-0
  reduce is ~50x slower), subtracted and multiplied while it is in cache.
  """
  b, p = x.shape
  size = min(p, feature_chunk or p)
  num_chunks, rest = divmod(p, size)

  def chunk_terms(chunk):
    mean = jnp.ones(b, x.dtype) @ chunk / b
    return _gram_blocked(chunk - mean, gram_blocks), b * (mean @ mean)

  def add_chunk(i, terms):
    new = chunk_terms(jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1))
    return terms[0] + new[0], terms[1] + new[1]

  gram, mean_sq = jax.lax.fori_loop(1, num_chunks, add_chunk, chunk_terms(x[:, :size]))
  if rest:
    tail = chunk_terms(x[:, num_chunks * size:])
    gram, mean_sq = gram + tail[0], mean_sq + tail[1]
  return gram, mean_sq


def _group_grams(x: jax.Array, gram_blocks: int,
                 feature_chunk: int) -> tuple[jax.Array, jax.Array]:
  """`_centred_gram` of each layer of a group `[b, k, p]`, as one batched computation.

  A group of one layer takes the plain 2-D products, so a layer passed on its own gives the
  same bits as before groups existed (batched products round differently, by ~1 ulp).

  Returns:
    The centred Grams `[k, b, b]` and b·||column means||² `[k]` of the k layers.
  """
  gram = functools.partial(_centred_gram, gram_blocks=gram_blocks, feature_chunk=feature_chunk)
  if x.shape[1] == 1:
    return jax.tree.map(lambda a: a[None], gram(x[:, 0]))
  return jax.vmap(gram, in_axes=1)(x)


def _layer_grams(layers: tuple[jax.Array, ...], stacked: bool, gram_blocks: int,
                 feature_chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Column-centred Grams `[L, b, b]` of one minibatch, their traces and b·||column means||²
  `[L]`, computed by XLA.

  Args:
    layers: per-layer arrays `[b, ...]`, or with `stacked` groups `[b, k, ...]` of k layers
      (L = the sum of the k's); features flattened.
    stacked: whether `layers` are groups.
    gram_blocks: see `_gram_blocked`.
    feature_chunk: see `_centred_gram`.

  Features are centred per minibatch (and per layer) first: HSIC1 is exactly translation
  invariant, and without it float32 cancellation costs ~1e-2 on activations with large means.
  """
  groups = (x.reshape(x.shape[0], x.shape[1] if stacked else 1, -1).astype(jnp.float32)
            for x in layers)
  grams, mean_sq = zip(*(_group_grams(x, gram_blocks, feature_chunk) for x in groups))
  grams = jnp.concatenate(grams)
  return grams, jnp.trace(grams, axis1=1, axis2=2), jnp.concatenate(mean_sq)


def _u_centred(grams: jax.Array, centred_sq: jax.Array,
               mean_sq: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """U-centred Grams `[L, b, b]` with non-finite and varied flags `[L]`.

  Args:
    grams: `[L, b, b]` Grams of the layers' features, each translated by any constant vector
      (U-centring removes it exactly).
    centred_sq: `[L]` sum of squares of the column-centred features (the trace of the
      centred Gram).
    mean_sq: `[L]` the rest of the uncentred sum of squares (b·||column means||², or the
      same scale), the reference for "constant up to rounding".
  """
  varied = centred_sq > _CONSTANT_RTOL * (centred_sq + mean_sq)
  return _u_centre(grams), ~jnp.isfinite(centred_sq), varied




def _device_sums(shift: jax.Array, num_batches: jax.Array, valid: jax.Array,
                 index: jax.Array | None, xs: tuple[jax.Array, ...] | jax.Array,
                 ys: tuple[jax.Array, ...] | jax.Array | None, host_grams: bool, stacked: bool,
                 gram_blocks: int, feature_chunk: int,
                 calibration: tuple[int, int, int]) -> tuple[jax.Array, ...]:
  """Per-device minibatch terms, summed over the mesh (runs inside shard_map); a device
  whose minibatch is not all `valid` (padding) adds nothing. With `host_grams`, xs and ys
  are this device's `host_grams._host_grams` blocks `[L, b, b + 2]`, else its layers.
  `index`: this device's rows' global minibatch index (None: its place in the stream)."""
  counts = jnp.all(valid)
  first = num_batches == 0

  def u_centred(layers):
    if host_grams:
      b = layers.shape[1]
      return _u_centred(layers[..., :b], layers[:, 0, b], layers[:, 0, b + 1])
    return _u_centred(*_layer_grams(layers, stacked, gram_blocks, feature_chunk))

  ux, bad_x, varied_x = u_centred(xs)
  b = ux.shape[-1]
  ux = ux.reshape(ux.shape[0], b * b)
  if ys is None:
    hxy = ux @ ux.T / (b * (b - 3))
    hxx = hyy = jnp.diagonal(hxy)
    bad_y, varied_y = bad_x, varied_x
  else:
    uy, bad_y, varied_y = u_centred(ys)
    uy = uy.reshape(uy.shape[0], b * b)
    hxy = ux @ uy.T / (b * (b - 3))
    hxx = jnp.sum(ux * ux, axis=1) / (b * (b - 3))
    hyy = jnp.sum(uy * uy, axis=1) / (b * (b - 3))
  terms = jnp.stack(jnp.broadcast_arrays(hxy, hxx[:, None], hyy[None, :]))
  axis = parallel.DATA_AXIS
  num_minibatches = jax.lax.psum(counts.astype(jnp.int32), axis)
  mean_terms = jax.lax.psum(jnp.where(counts, terms, 0), axis) / jnp.maximum(num_minibatches, 1)
  shift = jnp.where(first, mean_terms, shift)
  d = terms - shift
  moments = jnp.concatenate([d, jnp.stack([d[i] * d[j] for i, j in _PRODUCTS])])
  moments = jnp.where(counts, moments, 0)
  flags = [jax.lax.psum((f & counts).astype(jnp.int32), axis) > 0
           for f in (bad_x, bad_y, varied_x, varied_y)]
  if index is None and any(calibration[:2]):
    index = _minibatch_index(num_batches, counts, axis)
  calibrated = _device_calibration(ux, ux if ys is None else uy, terms, counts,
                                   None if index is None else index.reshape(-1)[0], calibration,
                                   axis)
  return (shift, jax.lax.psum(moments, axis), num_minibatches, *flags, *calibrated)


@functools.partial(jax.jit,
                   static_argnames=("minibatch_size", "host_grams", "stacked", "mesh",
                                    "gram_blocks", "feature_chunk", "precision", "calibration"),
                   donate_argnums=0)
def _update(state: dict[str, jax.Array], valid: jax.Array, xs: tuple[jax.Array, ...] | jax.Array,
            ys: tuple[jax.Array, ...] | jax.Array | None, *, minibatch_size: int,
            host_grams: bool, stacked: bool, mesh: Mesh, gram_blocks: int, feature_chunk: int,
            precision: str, calibration: tuple[int, int, int] = (0, 0, 0),
            index: jax.Array | None = None) -> dict[str, jax.Array]:
  """One jitted update of the state's arrays (names stay outside, so they never recompile);
  every matrix product at `precision`. xs / ys: layers, or with `host_grams` the
  `host_grams._host_grams` arrays. calibration: `(num_permutations, num_bootstrap, seed)`.
  index: `[global_batch]` global minibatch index of each row, sharded like `valid`, or None
  for the minibatches' places in the stream."""
  with jax.default_matmul_precision(precision):
    return _update_body(state, valid, xs, ys, minibatch_size=minibatch_size,
                        host_grams=host_grams, stacked=stacked, mesh=mesh,
                        gram_blocks=gram_blocks, feature_chunk=feature_chunk,
                        calibration=calibration, index=index)


def _update_body(state: dict[str, jax.Array], valid: jax.Array,
                 xs: tuple[jax.Array, ...] | jax.Array,
                 ys: tuple[jax.Array, ...] | jax.Array | None, *, minibatch_size: int,
                 host_grams: bool, stacked: bool, mesh: Mesh, gram_blocks: int,
                 feature_chunk: int, calibration: tuple[int, int, int],
                 index: jax.Array | None) -> dict[str, jax.Array]:
  data = PartitionSpec(parallel.DATA_AXIS)
  in_specs = (PartitionSpec(), PartitionSpec(), data, None if index is None else data, data,
              None if ys is None else data)
  sums_fn = jax.shard_map(
      functools.partial(_device_sums, host_grams=host_grams, stacked=stacked,
                        gram_blocks=gram_blocks, feature_chunk=feature_chunk,
                        calibration=calibration),
      mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec())
  shift, moments, num_minibatches, bad_x, bad_y, varied_x, varied_y, null, boot = sums_fn(
      state["shift"], state["num_batches"], valid, index, xs, ys)
  sums, compensation = streaming.kahan_add(state["sums"], state["compensation"], moments)
  null_sums, null_compensation = streaming.kahan_add(state["null_sums"],
                                                     state["null_compensation"], null)
  bootstrap_sums, bootstrap_compensation = streaming.kahan_add(
      state["bootstrap_sums"], state["bootstrap_compensation"], boot)
  return dict(
      null_sums=null_sums, null_compensation=null_compensation,
      bootstrap_sums=bootstrap_sums, bootstrap_compensation=bootstrap_compensation,
      shift=shift, sums=sums, compensation=compensation,
      num_batches=state["num_batches"] + num_minibatches,
      num_examples=state["num_examples"] + num_minibatches * minibatch_size,
      nonfinite_x=state["nonfinite_x"] | bad_x, nonfinite_y=state["nonfinite_y"] | bad_y,
      varied_x=state["varied_x"] | varied_x, varied_y=state["varied_y"] | varied_y)

