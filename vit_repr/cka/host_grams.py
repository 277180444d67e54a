"""Minibatch CKA Grams on the host: `MinibatchCKA(grams='host')`, the default on CPU meshes.

Each device's minibatch of every layer is multiplied by the host's BLAS as a symmetric product
(SYRK), on the features as they are or, when their means are large next to their spread,
translated by their first example so that float32 keeps its accuracy (U-centring removes any
translation exactly). The Grams, with the sums of squares that flag constant layers, go to the
jitted update (`sharded_update`) as one global array sharded over the mesh.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vit_repr import parallel

# Host Grams (CPU meshes): a layer is multiplied uncentred when its first rows say its sum of
# squares is at most this many times its centred one (column means up to ~1.7x the spread),
# and the Gram itself confirms it (up to twice this); other layers are first shifted by their
# first example. Measured float32 CKA errors of uncentred Grams grow as (mean / spread)²:
# ~1e-7 at 3x, 1e-6 at 10x, 1.5e-5 at 30x, 5e-4 at 100x; shifted ones stay at ~1e-8.
_UNCENTRED_MAX_RATIO = 4.0
_SAMPLE_ROWS = 16


def _sums_of_squares(gram: np.ndarray) -> tuple[float, float]:
  """(uncentred, column-centred) sums of squares of the features behind a Gram `[n, n]`, in
  float64: trace(K) and trace(K) - sum(K) / n."""
  total = float(np.trace(gram, dtype=np.float64))
  return total, total - float(np.sum(gram, dtype=np.float64)) / len(gram)


@np.errstate(invalid="ignore", over="ignore")  # NaN / Inf features: flagged later.
def _host_gram(x: np.ndarray, buffers: dict) -> tuple[np.ndarray, float, float]:
  """The Gram `[b, b]` of features `[b, f]` (rows possibly strided) by the host's BLAS (a
  symmetric product, SYRK), translated when needed so float32 keeps its accuracy; with the
  centred sum of squares and the rest of the uncentred one (as `sharded_update._u_centred`
  takes them)."""
  sample = x[:_SAMPLE_ROWS]
  sample_total, sample_centred = _sums_of_squares(sample @ sample.T)
  if sample_total <= _UNCENTRED_MAX_RATIO * sample_centred:
    gram = x @ x.T
    total, centred = _sums_of_squares(gram)
    if total <= 2 * _UNCENTRED_MAX_RATIO * centred:
      return gram, centred, total - centred
  first = x[0].astype(np.float64)
  shifted = buffers.get(x.shape)
  if shifted is None:
    shifted = buffers[x.shape] = np.empty(x.shape, x.dtype)
  np.subtract(x, x[0], out=shifted)
  gram = shifted @ shifted.T
  return gram, _sums_of_squares(gram)[1], len(x) * float(first @ first)


def _host_group_grams(rows: np.ndarray, stacked: bool, buffers: dict) -> np.ndarray:
  """`_host_gram` of each layer of one device's minibatch: `[b, ...]`, or with `stacked`
  `[b, k, ...]`, to `[k, b, b + 2]` (Gram, then the two sums of squares as columns)."""
  b = rows.shape[0]
  rows = rows.reshape(b, rows.shape[1] if stacked else 1, -1)
  dtype = np.float64 if rows.dtype == np.float64 and jax.config.jax_enable_x64 else np.float32
  rows = rows.astype(dtype, copy=False)
  out = np.empty((rows.shape[1], b, b + 2), dtype)
  for j in range(rows.shape[1]):
    gram, centred, rest = _host_gram(rows[:, j], buffers)
    out[j, :, :b], out[j, :, b], out[j, :, b + 1] = gram, centred, rest
  return out


def _device_rows(a: Any, mesh: Mesh) -> list[tuple[jax.Device, np.ndarray]]:
  """(device, its minibatch as NumPy) for this process's devices of `mesh`, in mesh order:
  device i's rows are block i of the leading axis (read from its own shard when there is
  one, without a copy on CPU)."""
  devices = list(mesh.devices.flat)
  n = np.shape(a)[0]
  size = n // len(devices)
  shards = {s.device: s for s in a.addressable_shards} if isinstance(a, jax.Array) else {}
  out = []
  for i, device in enumerate(devices):
    if device.process_index != jax.process_index():
      continue
    start, stop = i * size, (i + 1) * size
    shard = shards.get(device)
    covered = shard.index[0].indices(n)[:2] if shard is not None else None
    if covered == (start, stop):
      out.append((device, np.asarray(shard.data)))
    elif covered == (0, n):
      out.append((device, np.asarray(shard.data)[start:stop]))
    else:
      out.append((device, np.asarray(a[start:stop])))
  return out


def _host_grams(layers: tuple[Any, ...], stacked: bool, mesh: Mesh) -> jax.Array:
  """Every layer's minibatch Grams on the host (`_host_group_grams`), as one global array
  `[devices · L, b, b + 2]` sharded over the mesh's data axis (device d's L layers)."""
  buffers = {}
  per_device = {}
  for layer in layers:
    for device, rows in _device_rows(layer, mesh):
      per_device.setdefault(device, []).append(_host_group_grams(rows, stacked, buffers))
  blocks = [jax.device_put(np.concatenate(grams), device)
            for device, grams in per_device.items()]
  shape = (mesh.devices.size * blocks[0].shape[0], *blocks[0].shape[1:])
  return jax.make_array_from_single_device_arrays(shape, parallel.batch_sharding(mesh), blocks)

