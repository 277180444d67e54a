"""Effective receptive fields (Raghu et al., NeurIPS 2021, Figure 6 and appendix).

The effective receptive field (Luo et al., NeurIPS 2016) of a representation r `[locations,
channels]` at its centre location l is the map over input pixels

    ERF[y, x] = mean_images mean_c sum_rgb |d r[l, c] / d image[y, x, rgb]|,

normalised to a maximum of 1 per layer, as the paper describes it: the absolute value of the
gradient, averaged over channels (and images). The absolute value is taken PER CHANNEL before
averaging (estimator 'mean_abs'); since |.| does not commute with the channel sum there is no
single-backward-pass shortcut: the gradients of all C channels are computed exactly, as C
vector-Jacobian products (one backward pass each) sharing one forward pass. The cheaper
estimator 'abs_of_sum' (one backward pass per layer: the absolute gradient of the channel mean)
is offered for large models and recorded as such; it is not the paper's quantity. For cheap
runs `max_channels` = K averages over a fixed random subset of K channels of each wider layer
(drawn once from `channel_seed`; an unbiased Monte-Carlo estimate of the channel mean, exact for
layers with at most K channels; the cost of 'mean_abs' is one backward pass per channel used).
The colour channels of a pixel are summed (any fixed reduction is the same after normalisation).

Representations are ViT token sequences `[batch, T, D]` (the first `num_prefix_tokens` skipped:
CLS, a distillation token, registers, e.g. DINOv2's 5; patches row-major on `token_grid`, so
the centre is always a patch token) or feature maps `[batch, h, w, C]`. The centre
location: for an odd grid the middle cell; for an even grid `center='single'` (default) takes
cell (rows // 2, cols // 2), the one containing the image-centre pixel (H / 2, W / 2) (0-based,
i.e. the lower-right of the four central cells), and `center='mean'` averages the ERF maps of
the two or four central cells. The ERF radius is measured from the centre location's centre in
pixel coordinates (pixel (y, x) has its centre at (y + 0.5, x + 0.5)).

Computation. Every backward pass is a probe: a cotangent that is one-hot at (layer, centre
cell, channel) ('mean_abs'), or 1/C on every channel of one centre cell ('abs_of_sum'). The
layers are split into `layer_groups` groups of consecutive layers; per group, one forward pass
(`jax.vjp` of the group's centre representations; XLA merges the groups' forward passes into
one) is shared by all its probes, which run in chunks of `channel_chunk` vmapped cotangents
under one `lax.scan`, so the compiled program holds one forward and one (vmapped) backward graph
per group whatever the number of layers, channels or chunks. A probe of a lower layer in a
group still runs the backward pass from the group's top layer (through zero cotangents), so the
executed work is about (groups + 1) / groups times the minimum (C backward passes from each
layer) for evenly spaced layers, and the compiled graph about (groups + 1) / 2 backward passes:
`layer_groups` trades compile time for run time. `fn` is traced once (it is jitted and shared
by the groups). Memory and, on CPUs, speed depend on the `channel_chunk` x batch cotangents in
flight: their backward activations outgrow the caches. `benchmarks/receptive_field_bench.py`
measures the cost per model.

Each image's representation depends on that image only (no batch statistics in these models),
so one VJP of the batch sum gives every image's gradient. `ReceptiveField` (a
`vit_repr.streaming.Accumulator`) accumulates the per-layer sums over images in a small state
(`[layers, H, W]` + a count), jitted, with the images `[batch, H, W, 3]` sharded over a mesh's
data axis (sums inside jit: the result does not depend on device count).
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_repr import parallel, streaming

CENTERS = ("single", "mean")
ESTIMATORS = ("mean_abs", "abs_of_sum")
RepresentationFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


def center_cells(grid: tuple[int, int], center: str = "single") -> list[tuple[int, int]]:
  """The centre cell(s) of a (rows, columns) grid (see the module docstring).

  Args:
    grid: (rows, columns).
    center: 'single' or 'mean'.

  Returns:
    One (row, column) for 'single' or an odd grid; the 2 or 4 central cells for 'mean'.
  """
  if center not in CENTERS:
    raise ValueError(f"Unknown center {center!r}; use one of {CENTERS}.")
  rows, cols = grid
  if rows < 1 or cols < 1:
    raise ValueError(f"grid must be (rows, columns) of positive sizes; got {grid}.")

  def middle(n):
    return [n // 2] if center == "single" or n % 2 else [n // 2 - 1, n // 2]

  return [(r, c) for r in middle(rows) for c in middle(cols)]


def group_layers(num_layers: int, num_groups: int) -> list[range]:
  """Splits layers `0..num_layers-1` into at most `num_groups` runs of consecutive layers.

  Returns:
    Ranges of near-equal length (the longer ones last) covering every layer once, in order.
  """
  num_groups = min(num_groups, num_layers)
  bounds = [num_layers * g // num_groups for g in range(num_groups + 1)]
  return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


class Probes(NamedTuple):
  """The backward passes of one layer group, padded to whole chunks (static NumPy arrays).

  Attributes:
    layer: `[chunks, chunk]` int32 index of the probe's layer within its group.
    cell: `[chunks, chunk]` int32 centre cell; -1 pads (a zero cotangent).
    channel: `[chunks, chunk]` int32 channel ('mean_abs'; unused by 'abs_of_sum').
  """
  layer: np.ndarray
  cell: np.ndarray
  channel: np.ndarray


def make_probes(cells_and_channels: Sequence[tuple[int, np.ndarray]], chunk: int) -> Probes:
  """Every (layer, cell, channel) of a group, in layer order, in chunks of `chunk`.

  Args:
    cells_and_channels: per layer of the group, its number of centre cells and the channels
      `[k]` whose gradients are taken (one dummy channel for 'abs_of_sum').
    chunk: probes per chunk (at most the number of probes is used).

  Returns:
    The probes, the last chunk padded with zero cotangents (cell -1).
  """
  layer, cell, channel = (np.concatenate(a) for a in zip(*[
      (np.full(num_cells * len(used), index), np.repeat(np.arange(num_cells), len(used)),
       np.tile(used, num_cells))
      for index, (num_cells, used) in enumerate(cells_and_channels)]))
  chunk = min(chunk, len(layer))
  pad = -len(layer) % chunk
  return Probes(*(np.pad(a, (0, pad), constant_values=v).astype(np.int32).reshape(-1, chunk)
                  for a, v in ((layer, 0), (cell, -1), (channel, 0))))


def probe_cotangent(centre: jax.Array, selected: jax.Array, cell: jax.Array,
                    channel: jax.Array, estimator: str) -> jax.Array:
  """The cotangent of one layer's centre representation for one probe.

  Args:
    centre: `[b, cells, C]` the layer's representation at its centre cell(s).
    selected: `[]` bool, whether the probe belongs to this layer (else the cotangent is zero).
    cell: `[]` int32 centre cell (-1: zero cotangent).
    channel: `[]` int32 channel ('mean_abs').
    estimator: 'mean_abs' (one-hot channel) or 'abs_of_sum' (1/C on every channel).

  Returns:
    `[b, cells, C]` in `centre`'s dtype, the same for every image.
  """
  _, num_cells, channels = centre.shape
  per_channel = (jax.nn.one_hot(channel, channels) if estimator == "mean_abs"
                 else jnp.full((channels,), 1.0 / channels))
  cotangent = jnp.where(selected, jax.nn.one_hot(cell, num_cells)[:, None] * per_channel, 0.0)
  return jnp.broadcast_to(cotangent, centre.shape).astype(centre.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReceptiveFieldState(streaming.State):
  """Streaming sums over images.

  Attributes:
    sums: `[layers, H, W]` float32 sum over images of the per-image (un-normalised) ERF.
    num_examples: `[]` int32 images accumulated.
  """
  sums: jax.Array
  num_examples: jax.Array


class ReceptiveFieldResult(NamedTuple):
  """Effective receptive fields of the selected layers.

  Attributes:
    maps: `[layers, H, W]` mean ERF over images, each layer normalised to max 1.
    raw_maps: `[layers, H, W]` the same before normalisation (gradient units).
    radius: `[layers]` ERF radius in pixels: sqrt of the ERF-weighted mean squared distance of
      the pixel centres from the centre location's centre.
    centres: `[layers, 2]` the (y, x) pixel centre of each layer's centre location(s).
    names: the layer names, in order.
    num_examples: images accumulated.
  """
  maps: np.ndarray
  raw_maps: np.ndarray
  radius: np.ndarray
  centres: np.ndarray
  names: tuple[str, ...]
  num_examples: int


class ReceptiveField:
  """Streaming effective receptive fields (init / update / result), jitted and sharded.

  Example:
    fn = lambda params, x: flatten_intermediates(
        model.apply({'params': params}, x, mutable=['intermediates'])[1])
    erf = ReceptiveField(fn, {name: (T, D) for name in names}, image_size=224,
                         token_grid=(14, 14), num_prefix_tokens=1, mesh=mesh)
    state = erf.init()
    for batch in batches:
      state = erf.update(state, params, batch['image'])
    res = erf.result(state)  # res.maps [layers, 224, 224], max 1 per layer

  `update` donates the state.
  """

  def __init__(self, fn: RepresentationFn, shapes: Mapping[str, Sequence[int]], *,
               image_size: int, token_grid: tuple[int, int] | None = None,
               num_prefix_tokens: int = 0, center: str = "single",
               estimator: str = "mean_abs", channel_chunk: int = 64,
               max_channels: int | None = None, channel_seed: int = 0,
               mesh: Mesh | None = None, layer_groups: int = 8):
    """Builds the accumulator.

    Args:
      fn: `(params, images [b, H, W, 3]) -> {name: representation}` for at least the names of
        `shapes` (e.g. a model's flattened intermediates).
      shapes: `{name: per-example shape}`, in layer order: `(T, D)` tokens or `(h, w, C)` maps.
      image_size: H = W of the inputs.
      token_grid: (rows, columns) of the patch grid of token representations.
      num_prefix_tokens: tokens before the patches (1 for a CLS-token ViT, 5 for DINOv2's CLS
        and 4 registers, 0 for a GAP or MAP-head ViT).
      center: 'single' or 'mean' (see the module docstring).
      estimator: 'mean_abs' (the paper's, exact per-channel gradients) or 'abs_of_sum'.
      channel_chunk: backward passes (probes) vmapped together; memory grows with it times the
        batch.
      max_channels: None for every channel (exact); K for a fixed random subset of K channels
        of each layer wider than K ('mean_abs' only; see the module docstring).
      channel_seed: seed of that subset (`jax.random.key`).
      mesh: one-axis mesh over `parallel.DATA_AXIS` (default: one local device).
      layer_groups: groups of consecutive layers that each get their own forward and backward
        graph (see the module docstring); 1 compiles fastest, len(shapes) wastes no work.

    Raises:
      ValueError: an unknown option, a representation that is neither tokens nor a map, a
        token count that does not match the grid, or a mesh with other axes.
    """
    if not shapes:
      raise ValueError("ReceptiveField needs at least one layer.")
    if estimator not in ESTIMATORS:
      raise ValueError(f"Unknown estimator {estimator!r}; use one of {ESTIMATORS}.")
    if channel_chunk < 1:
      raise ValueError(f"channel_chunk must be >= 1; got {channel_chunk}.")
    if max_channels is not None and max_channels < 1:
      raise ValueError(f"max_channels must be None (all channels) or >= 1; got {max_channels}.")
    if layer_groups < 1:
      raise ValueError(f"layer_groups must be >= 1; got {layer_groups}.")
    self.names = tuple(shapes)
    self.image_size = image_size
    self.center = center
    self.estimator = estimator
    self.max_channels = max_channels
    self.channel_chunk = channel_chunk
    self.layer_groups = layer_groups
    self.mesh = streaming.data_mesh(mesh, "ReceptiveField")
    self._selectors, self._channels = {}, {}
    centres, cells_and_channels = [], []
    key = jax.random.key(channel_seed)
    for name, shape in shapes.items():
      shape = tuple(shape)
      if max_channels is not None and shape[-1] > max_channels:
        key, subkey = jax.random.split(key)
        self._channels[name] = np.sort(np.asarray(jax.random.choice(
            subkey, shape[-1], (max_channels,), replace=False)))
      if len(shape) == 2:  # Tokens [T, D].
        if token_grid is None or shape[0] != num_prefix_tokens + token_grid[0] * token_grid[1]:
          raise ValueError(
              f"Layer {name!r} has {shape[0]} tokens; expected num_prefix_tokens "
              f"({num_prefix_tokens}) + the cells of token_grid ({token_grid}). Pass the "
              "model's patch grid (image_size // patch_size per side).")
        grid = tuple(token_grid)
        cells = center_cells(grid, center)
        index = np.asarray([num_prefix_tokens + r * grid[1] + c for r, c in cells])
        self._selectors[name] = lambda rep, index=index: rep[:, index]
      elif len(shape) == 3:  # Feature map [h, w, C].
        grid = shape[:2]
        cells = center_cells(grid, center)
        rows, cols = (np.asarray(a) for a in zip(*cells))
        self._selectors[name] = lambda rep, rows=rows, cols=cols: rep[:, rows, cols]
      else:
        raise ValueError(f"Layer {name!r} has per-example shape {shape}; receptive fields need "
                         "tokens [T, D] or feature maps [h, w, C].")
      stride = (image_size / grid[0], image_size / grid[1])
      centres.append(np.mean([((r + 0.5) * stride[0], (c + 0.5) * stride[1])
                              for r, c in cells], axis=0))
      used = (np.zeros(1, np.int32) if estimator == "abs_of_sum"
              else self._channels.get(name, np.arange(shape[-1])))
      cells_and_channels.append((len(cells), used))
    self.centres = np.asarray(centres)
    # Backward passes per layer: the divisor of its probe sum (cells x channels used).
    self._num_probes = np.asarray([n * len(used) for n, used in cells_and_channels], np.float32)
    self._groups = [(tuple(self.names[i] for i in group),
                     make_probes([cells_and_channels[i] for i in group], channel_chunk))
                    for group in group_layers(len(self.names), layer_groups)]
    self._fn = jax.jit(fn)  # Traced once, however many groups call it.
    self._update = jax.jit(self._fold, donate_argnums=0,
                           out_shardings=parallel.replicated(self.mesh))

  def init(self) -> ReceptiveFieldState:
    """The zero state, replicated over the mesh."""
    shape = (len(self.names), self.image_size, self.image_size)
    return streaming.replicated(
        ReceptiveFieldState(np.zeros(shape, np.float32), np.zeros((), np.int32)), self.mesh)

  def _group_sums(self, params: Any, images: jax.Array, valid: jax.Array,
                  names: tuple[str, ...], probes: Probes) -> jax.Array:
    """`[len(names), H, W]` sums over the valid images and the probes of sum_rgb |gradient|
    (one group)."""
    def centre_representations(x):  # One forward pass for the group.
      reps = self._fn(params, x)
      return [self._selectors[n](reps[n]) for n in names]

    centres, pullback = jax.vjp(centre_representations, images)

    def probe_map(layer, cell, channel):  # Scalars -> [H, W], summed over images and rgb.
      (grad,) = pullback([probe_cotangent(centre, layer == j, cell, channel, self.estimator)
                          for j, centre in enumerate(centres)])
      return jnp.where(valid[:, None, None, None], jnp.abs(grad.astype(jnp.float32)),
                       0).sum((0, 3))

    def add_chunk(sums, chunk):  # chunk: Probes of [chunk] arrays.
      maps = jax.vmap(probe_map)(*chunk)
      return sums + jax.ops.segment_sum(maps, chunk.layer, num_segments=len(names)), None

    zeros = jnp.zeros((len(names),) + images.shape[1:3], jnp.float32)
    if len(probes.layer) == 1:  # No loop: XLA:CPU ran BiT's convolutions ~2x slower in one.
      return add_chunk(zeros, Probes(*(jnp.asarray(a[0]) for a in probes)))[0]
    sums, _ = jax.lax.scan(add_chunk, zeros, Probes(*map(jnp.asarray, probes)))
    return sums

  def _fold(self, state: ReceptiveFieldState, params: Any, images: jax.Array,
            valid: jax.Array) -> ReceptiveFieldState:
    sums = jnp.concatenate([self._group_sums(params, images, valid, names, probes)
                            for names, probes in self._groups])
    return ReceptiveFieldState(state.sums + sums / self._num_probes[:, None, None],
                               state.num_examples + valid.astype(jnp.int32).sum())

  def update(self, state: ReceptiveFieldState, params: Any, images: jax.typing.ArrayLike,
             valid: jax.typing.ArrayLike | None = None) -> ReceptiveFieldState:
    """Adds one batch of images (jitted; donates `state`).

    Args:
      state: the current state.
      params: the parameters `fn` takes.
      images: `[b, image_size, image_size, 3]`, sharded over the mesh's data axis.
      valid: `[b]` bool sharded like the images, False for padding rows (left out); default
        all True.

    Returns:
      The new state.

    Raises:
      ValueError: images of the wrong shape.
    """
    shape = np.shape(images)
    if len(shape) != 4 or shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"Expected images [batch, {self.image_size}, {self.image_size}, 3]; "
                       f"got {shape}.")
    if valid is None:
      valid = jnp.ones(shape[0], bool)
    return self._update(streaming.replicated(state, self.mesh), params, images, valid)

  def result(self, state: ReceptiveFieldState) -> ReceptiveFieldResult:
    """Mean maps, normalised to max 1 per layer, and their radii (one host synchronisation).

    Raises:
      ValueError: no image accumulated.
    """
    host = state.to_numpy()
    count = streaming.check_accumulated(host["num_examples"], "image")
    raw = np.asarray(host["sums"], np.float64) / count
    peak = raw.max(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      maps = np.where(peak > 0, raw / peak, 0.0)
      pixels = np.arange(self.image_size) + 0.5
      dy2 = (pixels[None, :, None] - self.centres[:, 0, None, None]) ** 2
      dx2 = (pixels[None, None, :] - self.centres[:, 1, None, None]) ** 2
      radius = np.sqrt((maps * (dy2 + dx2)).sum((1, 2)) / maps.sum((1, 2)))
    return ReceptiveFieldResult(maps=maps, raw_maps=raw, radius=radius, centres=self.centres,
                                names=self.names, num_examples=count)
