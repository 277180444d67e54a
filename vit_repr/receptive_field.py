"""Effective receptive fields (Raghu et al., NeurIPS 2021, Figure 6 and appendix).

The effective receptive field (Luo et al., NeurIPS 2016) of a representation r `[locations,
channels]` at its centre location l is the map over input pixels

    ERF[y, x] = mean_images mean_c sum_rgb |d r[l, c] / d image[y, x, rgb]|,

normalised to a maximum of 1 per layer, as the paper describes it: the absolute value of the
gradient, averaged over channels (and images). The absolute value is taken PER CHANNEL before
averaging (estimator 'mean_abs'); since |.| does not commute with the channel sum there is no
single-backward-pass shortcut, so the gradients of all C channels are computed exactly as C
vector-Jacobian products sharing one forward pass (`jax.vjp`, vmapped over one-hot
cotangents in chunks of `channel_chunk` channels, `lax.map` over the chunks). The cheaper
estimator 'abs_of_sum' (one backward pass: the absolute gradient of the channel mean) is
offered for large models and recorded as such; it is not the paper's quantity. For cheap runs
`max_channels` = K averages over a fixed random subset of K channels of each wider layer (drawn
once from `channel_seed`; an unbiased Monte-Carlo estimate of the channel mean, exact for layers
with at most K channels; the cost of 'mean_abs' is one backward pass per channel used). The colour
channels of a pixel are summed (any fixed reduction is the same after normalisation).

Representations are ViT token sequences `[b, T, D]` (the first `num_prefix_tokens`, e.g. CLS,
skipped; patches row-major on `token_grid`) or feature maps `[b, h, w, C]`. The centre
location: for an odd grid the middle cell; for an even grid `center='single'` (default) takes
cell (rows // 2, cols // 2), the one containing the image-centre pixel (H / 2, W / 2) (0-based,
i.e. the lower-right of the four central cells), and `center='mean'` averages the ERF maps of
the two or four central cells.

Each image's representation depends on that image only (no batch statistics in these models),
so one VJP of the batch sum gives every image's gradient. `ReceptiveField` accumulates the
per-layer sums over images in a small state (`[layers, H, W]` + a count), jitted, with the batch
sharded over a mesh's data axis (sums inside jit: the result does not depend on device count).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_repr import parallel

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


class ReceptiveFieldState(NamedTuple):
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
               mesh: Mesh | None = None):
    """Builds the accumulator.

    Args:
      fn: `(params, images [b, H, W, 3]) -> {name: representation}` for at least the names of
        `shapes` (e.g. a model's flattened intermediates).
      shapes: `{name: per-example shape}`, in layer order: `(T, D)` tokens or `(h, w, C)` maps.
      image_size: H = W of the inputs.
      token_grid: (rows, columns) of the patch grid of token representations.
      num_prefix_tokens: tokens before the patches (1 for a CLS-token ViT).
      center: 'single' or 'mean' (see the module docstring).
      estimator: 'mean_abs' (the paper's, exact per-channel gradients) or 'abs_of_sum'.
      channel_chunk: channels whose gradients are computed together ('mean_abs'; memory
        grows with it).
      max_channels: None for every channel (exact); K for a fixed random subset of K channels
        of each layer wider than K ('mean_abs' only; see the module docstring).
      channel_seed: seed of that subset (`jax.random.key`).
      mesh: one-axis mesh over `parallel.DATA_AXIS` (default: one local device).

    Raises:
      ValueError: an unknown option, a representation that is neither tokens nor a map, or a
        token count that does not match the grid.
    """
    if not shapes:
      raise ValueError("ReceptiveField needs at least one layer.")
    if estimator not in ESTIMATORS:
      raise ValueError(f"Unknown estimator {estimator!r}; use one of {ESTIMATORS}.")
    if channel_chunk < 1:
      raise ValueError(f"channel_chunk must be >= 1; got {channel_chunk}.")
    if max_channels is not None and max_channels < 1:
      raise ValueError(f"max_channels must be None (all channels) or >= 1; got {max_channels}.")
    self.names = tuple(shapes)
    self.image_size = image_size
    self.center = center
    self.estimator = estimator
    self.max_channels = max_channels
    self.channel_chunk = channel_chunk
    self.mesh = parallel.make_mesh(jax.local_devices()[:1]) if mesh is None else mesh
    self._selectors, self._channels = {}, {}
    centres = []
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
    self.centres = np.asarray(centres)
    self._fn = fn
    self._update = jax.jit(self._fold, donate_argnums=0,
                           out_shardings=parallel.replicated(self.mesh))

  def init(self) -> ReceptiveFieldState:
    """The zero state, replicated over the mesh."""
    replicated = parallel.replicated(self.mesh)
    shape = (len(self.names), self.image_size, self.image_size)
    return ReceptiveFieldState(jax.device_put(np.zeros(shape, np.float32), replicated),
                               jax.device_put(np.zeros((), np.int32), replicated))

  def _layer_maps(self, params: Any, images: jax.Array, name: str) -> jax.Array:
    """Per-image ERF `[b, H, W]` of one layer (un-normalised)."""
    select = self._selectors[name]
    at_centre, pullback = jax.vjp(lambda x: select(self._fn(params, x)[name]), images)
    _, num_cells, channels = at_centre.shape
    dtype = at_centre.dtype

    def abs_grad(cotangent):  # cotangent [b, cells, C] -> sum_rgb |grad| [b, H, W].
      (grad,) = pullback(cotangent.astype(dtype))
      return jnp.abs(grad.astype(jnp.float32)).sum(-1)

    if self.estimator == "abs_of_sum":
      ones = jnp.ones_like(at_centre, jnp.float32) / channels
      return jnp.mean(jnp.stack([abs_grad(ones * (jnp.arange(num_cells) == i)[:, None])
                                 for i in range(num_cells)]), axis=0)
    used = self._channels.get(name, np.arange(channels))
    chunk = min(self.channel_chunk, len(used))
    num_chunks = -(-len(used) // chunk)
    # Channel -1 pads the last chunk: its one-hot cotangent is zero.
    ids = jnp.pad(jnp.asarray(used), (0, num_chunks * chunk - len(used)), constant_values=-1)
    batch = images.shape[0]

    def chunk_sum(channel_ids):  # [chunk] -> sum over the chunk's channels and cells [b, H, W].
      def one_channel(c):
        onehot = jax.nn.one_hot(c, channels, dtype=jnp.float32)  # [C]
        total = 0.0
        for i in range(num_cells):
          cell = (jnp.arange(num_cells) == i).astype(jnp.float32)
          total = total + abs_grad(jnp.broadcast_to(cell[:, None] * onehot[None],
                                                    (batch, num_cells, channels)))
        return total
      return jax.vmap(one_channel)(channel_ids).sum(0)

    sums = jax.lax.map(chunk_sum, ids.reshape(num_chunks, chunk))
    return sums.sum(0) / (len(used) * num_cells)

  def _fold(self, state: ReceptiveFieldState, params: Any,
            images: jax.Array) -> ReceptiveFieldState:
    maps = jnp.stack([self._layer_maps(params, images, n).sum(0) for n in self.names])
    return ReceptiveFieldState(state.sums + maps, state.num_examples + images.shape[0])

  def update(self, state: ReceptiveFieldState, params: Any,
             images: jax.typing.ArrayLike) -> ReceptiveFieldState:
    """Adds one batch of images (jitted; donates `state`).

    Args:
      state: the current state.
      params: the parameters `fn` takes.
      images: `[b, image_size, image_size, 3]`, sharded over the mesh's data axis.

    Returns:
      The new state.

    Raises:
      ValueError: images of the wrong shape.
    """
    shape = np.shape(images)
    if len(shape) != 4 or shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"Expected images [batch, {self.image_size}, {self.image_size}, 3]; "
                       f"got {shape}.")
    return self._update(state, params, images)

  def result(self, state: ReceptiveFieldState) -> ReceptiveFieldResult:
    """Mean maps, normalised to max 1 per layer, and their radii (one host synchronisation).

    Raises:
      ValueError: no image accumulated.
    """
    count = int(state.num_examples)
    if count == 0:
      raise ValueError("No image accumulated yet; call update before result.")
    raw = np.asarray(state.sums, np.float64) / count
    peak = raw.max(axis=(1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      maps = np.where(peak > 0, raw / peak, 0.0)
      pixels = np.arange(self.image_size) + 0.5
      dy2 = (pixels[None, :, None] - self.centres[:, 0, None, None]) ** 2
      dx2 = (pixels[None, None, :] - self.centres[:, 1, None, None]) ** 2
      radius = np.sqrt((maps * (dy2 + dx2)).sum((1, 2)) / maps.sum((1, 2)))
    return ReceptiveFieldResult(maps=maps, raw_maps=raw, radius=radius, centres=self.centres,
                                names=self.names, num_examples=count)
