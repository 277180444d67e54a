"""Spatial localization: CKA between each output token and every input patch (Raghu et al. 2021).

Figures 9-10 of "Do Vision Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021)
ask whether a token at grid position q of a chosen layer still "knows" where it is: for every
pair (q, p) of grid positions they compare, by CKA over examples, the token at q `[batch, width]`
with the raw pixels of the input patch at p `[batch, patch * patch * 3]`. A map `[grid, grid]`
over p per query position q peaks at p = q when the token is localized.

Layers are token sequences `[batch, T, D]` (ViT, Mixer; T = `num_prefix_tokens` + grid², the
prefix tokens, e.g. CLS, dropped; the grid is the model's `token_grid`) or feature maps
`[batch, grid, grid, C]` (ResNet: each location is compared with the patches of the image split
into the same grid, i.e. the `image_size / grid`-pixel region the location sits over). Tokens are
numbered row-major (q = row * grid + column), as a ViT's patch-embedding convolution orders them.

Estimator: minibatch linear CKA with the unbiased HSIC (Nguyen, Raghu & Kornblith 2021), the
paper's estimator, through `vit_repr.cka.MinibatchCKA`: every token of every chosen layer is a
"layer" of model A and every input patch a "layer" of model B, so one Gram per token and per
patch per minibatch and one all-pairs product give every map. The tokens of a layer
`[batch, N, D]` and the patches `[batch, N, P]` go in as stacked groups
(`MinibatchCKA.update(..., stacked=True)`), so each group's N Grams are one batched product and
the compiled update grows with L, not with N. Layers with the same grid share one CKA state (one
set of patch Grams): `LocalizationCKA` is a `vit_repr.streaming.Accumulator` whose
`LocalizationState` holds one per grid.

Cost per minibatch of b examples, for L layers of N = grid² tokens of width D and patches of
P = patch² · 3 pixels: Grams 2 b² N (L D + P) FLOPs, the all-pairs product 2 L N² b², and
(L + 1) N U-centred Grams of b² floats in memory; the state is 21 L N² float32. For ViT-B/16 at
224 px (N = 196, D = P = 768), one layer and b = 256: 39.5 GFLOP of Grams + 5.0 GFLOP of
pairs (~0.5% of the 9 TFLOP forward pass of the batch), 103 MB of Grams and a 3.2 MB state.
Measured with `benchmarks/localization_bench.py` (L = 3, one device) on a 2-core CPU shared with
other jobs (float32 GEMM peak ~90 GFLOP/s): ~1 s to compile at b = 32 and at b = 256 (one
operand per token compiled for ~70 s), then 0.27 s (b = 32) and 3.9 s (b = 256, 94 GFLOP,
~24 GFLOP/s) per update.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_repr import cka, streaming

# Named token positions of a grid (resolved by `position_index`).
NAMED_POSITIONS = ("corner", "edge", "centre")


def layer_grid(shape: Sequence[int], *, image_size: int, num_prefix_tokens: int = 0,
               token_grid: Sequence[int] | None = None, name: str = "") -> int:
  """The side of the square grid of spatial positions of a layer.

  Args:
    shape: per-example shape, `[T, D]` tokens or `[h, w, C]` feature map.
    image_size: side of the square input images, which the grid must divide.
    num_prefix_tokens: tokens before the patches of a `[T, D]` layer (dropped).
    token_grid: (rows, columns) of the patch tokens of a `[T, D]` layer.
    name: the layer's name, for error messages.

  Returns:
    The grid side g (the layer has g² spatial positions).

  Raises:
    ValueError: the layer has no square grid of spatial positions dividing the image.
  """
  shape = tuple(int(s) for s in shape)
  what = f"Layer {name!r}" if name else "The layer"
  if len(shape) == 2:
    rows, cols = (0, 0) if token_grid is None else (int(n) for n in token_grid)
    if shape[0] != num_prefix_tokens + rows * cols or rows < 1:
      raise ValueError(f"{what} has {shape[0]} tokens; expected num_prefix_tokens "
                       f"({num_prefix_tokens}) + the patches of token_grid ({token_grid}): pass "
                       "the model's token layout (its prefix tokens and patch grid).")
    if rows != cols:
      raise ValueError(f"{what} has a {rows}x{cols} grid of patch tokens; localization needs a "
                       "square one: use square images and patches.")
    grid = rows
  elif len(shape) == 3:
    if shape[0] != shape[1]:
      raise ValueError(f"{what} is a {shape[0]}x{shape[1]} feature map; localization needs a "
                       "square one: use square images.")
    grid = shape[0]
  else:
    raise ValueError(f"{what} has per-example shape {shape}, neither tokens [T, D] nor a feature "
                     "map [h, w, C]: it has no spatial positions to localize. Choose a block or "
                     "unit output, e.g. 'Transformer/encoderblock_11/out' or 'block4/out'.")
  if image_size % grid:
    raise ValueError(f"{what} has a {grid}x{grid} grid, which does not split a {image_size}-pixel "
                     f"image into equal patches; use an image size that is a multiple of {grid} "
                     "or another layer.")
  return grid


def spatial_tokens(x: jax.typing.ArrayLike, *, num_prefix_tokens: int = 0) -> jax.Array:
  """The spatial positions of a batch of one layer as `[batch, N, D]`, row-major.

  Args:
    x: `[batch, T, D]` tokens or a `[batch, h, w, C]` map.
    num_prefix_tokens: tokens before the patches of a token sequence (dropped).

  Returns:
    `[batch, N, D]` with N = T - num_prefix_tokens, or h * w.
  """
  x = jnp.asarray(x)
  if x.ndim == 3:
    return x[:, num_prefix_tokens:]
  if x.ndim == 4:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
  raise ValueError(f"Expected [batch, T, D] tokens or a [batch, h, w, C] map; got {x.shape}.")


def image_patches(images: jax.typing.ArrayLike, grid: int) -> jax.Array:
  """The raw pixels of each patch of a `grid` x `grid` split of the images.

  Args:
    images: `[b, H, W, C]` with H and W multiples of `grid`.
    grid: patches per side.

  Returns:
    `[b, grid * grid, (H / grid) * (W / grid) * C]`, patches row-major, each patch's pixels
    in (row, column, channel) order.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[1] % grid or images.shape[2] % grid:
    raise ValueError(f"images must be [b, H, W, C] with H and W multiples of grid={grid}; got "
                     f"{images.shape}.")
  b, h, w, c = images.shape
  x = images.reshape(b, grid, h // grid, grid, w // grid, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, (h // grid) * (w // grid) * c)


def position_index(position: str | Sequence[int], grid: int) -> tuple[int, int]:
  """(row, column) of a named ('corner', 'edge', 'centre') or explicit position of a grid.

  'corner' is (0, 0), 'edge' the middle of the top row (0, grid // 2), 'centre'
  (grid // 2, grid // 2).
  """
  if isinstance(position, str):
    named = {"corner": (0, 0), "edge": (0, grid // 2), "centre": (grid // 2, grid // 2)}
    if position not in named:
      raise ValueError(f"Unknown position {position!r}; use one of {NAMED_POSITIONS} or a "
                       "(row, column) pair.")
    return named[position]
  row, col = (int(v) for v in position)
  if not (0 <= row < grid and 0 <= col < grid):
    raise ValueError(f"Position {(row, col)} is outside the {grid}x{grid} grid; use rows and "
                     f"columns in [0, {grid - 1}].")
  return row, col


def own_patch_similarity(maps: np.ndarray) -> np.ndarray:
  """`[g, g]`: each token's CKA with its own input patch (the diagonal of the maps).

  Args:
    maps: `[g, g, g, g]` CKA of the token at (q_row, q_col) with the patch at (p_row, p_col).
  """
  g = maps.shape[0]
  flat = np.asarray(maps).reshape(g * g, g * g)
  return np.diagonal(flat).reshape(g, g)


def peaks_at_own_patch(maps: np.ndarray) -> np.ndarray:
  """`[g, g]` bool: whether each token's most similar patch is its own (NaN maps: False)."""
  g = maps.shape[0]
  flat = np.asarray(maps).reshape(g * g, g * g)
  defined = ~np.isnan(flat).all(axis=1)
  peaks = np.argmax(np.where(np.isnan(flat), -np.inf, flat), axis=1)
  return (defined & (peaks == np.arange(g * g))).reshape(g, g)


class LocalizationResult(NamedTuple):
  """Token-vs-patch CKA maps of every layer (NumPy, float64).

  Attributes:
    maps: `{layer: [g, g, g, g]}`, CKA of the token at (q_row, q_col) with the input patch at
      (p_row, p_col); NaN where a token or a patch never varied within a minibatch.
    stderr: `{layer: [g, g, g, g]}` delta-method standard errors over minibatches.
    grids: `{layer: g}`.
    num_batches: minibatches accumulated.
    num_examples: examples accumulated.
  """
  maps: dict[str, np.ndarray]
  stderr: dict[str, np.ndarray]
  grids: dict[str, int]
  num_batches: int
  num_examples: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LocalizationState(streaming.State):
  """The running sums of `LocalizationCKA`: one minibatch-CKA state per grid size.

  Attributes:
    per_grid: `{str(grid): cka.MinibatchCKAState}` of the tokens `'<layer>@<q>'` of the layers
      with that grid (model A) against the patches `'patch@<p>'` (model B).
  """
  per_grid: dict[str, cka.MinibatchCKAState]

  def to_numpy(self) -> dict[str, np.ndarray]:
    """Every grid's CKA state as NumPy, keys '<grid>/<field>' (`streaming.prefixed`)."""
    return streaming.prefixed({g: s.to_numpy() for g, s in self.per_grid.items()})

  @classmethod
  def from_numpy(cls, arrays: Mapping[str, Any]) -> "LocalizationState":
    """Inverse of `to_numpy`."""
    return cls({g: cka.MinibatchCKAState.from_numpy(a)
                for g, a in streaming.unprefixed(arrays).items()})


class LocalizationCKA:
  """Streaming token-vs-patch minibatch CKA of chosen layers (`streaming.Accumulator`).

  Example:
    loc = LocalizationCKA({'Transformer/encoderblock_11/out': (197, 768)}, image_size=224,
                          num_prefix_tokens=1, token_grid=(14, 14), mesh=mesh)
    state = loc.init()
    for batch in batches:
      state = loc.update(state, extractor(params, batch['image']), batch['image'])
    maps = loc.result(state).maps['Transformer/encoderblock_11/out']  # [14, 14, 14, 14]

  Attributes:
    names: the layer names, in the given order.
    shapes: `{layer: per-example shape}`.
    grids: `{layer: grid side}`.
    mesh: the data mesh the minibatches are spread over.

  Under a mesh each device's shard of the global batch is one minibatch (see
  `cka.MinibatchCKA`), so results do not depend on the device count. `update` donates the
  state.
  """

  def __init__(self, layer_shapes: Mapping[str, Sequence[int]], *, image_size: int,
               num_prefix_tokens: int = 0, token_grid: Sequence[int] | None = None,
               mesh: Mesh | None = None, grams: str = "auto", gram_blocks: int = 1):
    """Builds the accumulator.

    Args:
      layer_shapes: `{layer name: per-example shape}` (`[T, D]` or `[h, w, C]`), e.g.
        `FeatureExtractor.shapes`.
      image_size: side of the square input images.
      num_prefix_tokens: tokens before the patches of the token layers (dropped; 1 with CLS).
      token_grid: (rows, columns) of the patch tokens of the token layers (a model's
        `token_layout().grid`); feature maps carry their grid in their shape.
      mesh: one-axis data mesh (default one local device).
      grams: passed to `cka.MinibatchCKA`.
      gram_blocks: passed to `cka.MinibatchCKA`.

    Raises:
      ValueError: no layers, or a layer without a square grid dividing the image.
    """
    if not layer_shapes:
      raise ValueError("No layers given; pass {name: per-example shape} of at least one layer.")
    self.shapes = {str(n): tuple(int(s) for s in shape) for n, shape in layer_shapes.items()}
    self.names = tuple(self.shapes)
    self.grids = {n: layer_grid(s, image_size=image_size, num_prefix_tokens=num_prefix_tokens,
                                token_grid=token_grid, name=n) for n, s in self.shapes.items()}
    self.image_size = image_size
    self.num_prefix_tokens = num_prefix_tokens
    self._by_grid = {g: tuple(n for n in self.names if self.grids[n] == g)
                     for g in sorted(set(self.grids.values()))}
    # Per grid: the CKA state's names, its tokens (model A) and patches (model B).
    self._cka_names = {str(g): (tuple(f"{n}@{q}" for n in names for q in range(g * g)),
                                tuple(f"patch@{p}" for p in range(g * g)))
                       for g, names in self._by_grid.items()}
    self._estimator = cka.MinibatchCKA(mesh, grams=grams, gram_blocks=gram_blocks)
    self.mesh = self._estimator.mesh
    self._split = jax.jit(self._split_fn)

  def _split_fn(self, features: dict[str, jax.Array], images: jax.Array
                ) -> dict[str, tuple[tuple[jax.Array, ...], tuple[jax.Array]]]:
    """Per grid, the stacked groups of `cka.MinibatchCKA.update`: (the tokens `[b, N, D]` of
    each layer, in the order of `_by_grid`; the patches `[b, N, P]`)."""
    out = {}
    for grid, names in self._by_grid.items():
      tokens = tuple(
          spatial_tokens(features[n].reshape(features[n].shape[0], *self.shapes[n]),
                         num_prefix_tokens=self.num_prefix_tokens) for n in names)
      out[str(grid)] = (tokens, (image_patches(images, grid),))
    return out

  def init(self) -> LocalizationState:
    """The zero state, replicated over the mesh."""
    return LocalizationState({key: self._estimator.init(x, y, names_x=x, names_y=y)
                              for key, (x, y) in self._cka_names.items()})

  def update(self, state: LocalizationState, features: Mapping[str, Any],
             images: jax.typing.ArrayLike,
             valid: jax.typing.ArrayLike | None = None) -> LocalizationState:
    """Folds one global batch into `state` (no host synchronisation).

    Args:
      state: from `init` or a previous `update` (donated), or restored with `from_numpy`.
      features: `{layer: [b, ...]}` for every layer of `layer_shapes` (per-example sizes
        matching; e.g. `FeatureExtractor` outputs with token_mode 'all').
      images: `[b, H, W, 3]` the features were computed from.
      valid: `[b]` bool, padding minibatches False (see `cka.MinibatchCKA.update`).

    Returns:
      The new state.

    Raises:
      ValueError: a state of other layers, missing layers, wrong sizes, or images of another
        size.
    """
    if {g: (s.names_x, s.names_y) for g, s in state.per_grid.items()} != self._cka_names:
      raise ValueError(f"The state holds other layers than {list(self.names)}; start from this "
                       "accumulator's init, or restore a state saved with the same layers.")
    missing = [n for n in self.names if n not in features]
    if missing:
      raise ValueError(f"features lack layers {missing}; pass every layer given at "
                       f"construction ({list(self.names)}).")
    images = images if isinstance(images, jax.Array) else jnp.asarray(images)
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images must be [b, {self.image_size}, {self.image_size}, C]; got "
                       f"{images.shape}.")
    for n in self.names:
      size = int(np.prod(np.shape(features[n])[1:]))
      if size != int(np.prod(self.shapes[n])) or np.shape(features[n])[0] != images.shape[0]:
        raise ValueError(f"Layer {n!r}: expected [{images.shape[0]}, ...] with "
                         f"{int(np.prod(self.shapes[n]))} features per example (shape "
                         f"{self.shapes[n]}); got {np.shape(features[n])}.")
    split = self._split({n: features[n] for n in self.names}, images)
    return LocalizationState({
        key: self._estimator.update(s, *split[key], stacked=True, valid=valid)
        for key, s in state.per_grid.items()})

  def result(self, state: LocalizationState) -> LocalizationResult:
    """The maps and their standard errors (one host synchronisation per grid)."""
    maps, stderr, counts = {}, {}, set()
    for grid, names in self._by_grid.items():
      res = self._estimator.result(state.per_grid[str(grid)])
      counts.add((res.num_batches, res.num_examples))
      n = grid * grid
      for i, name in enumerate(names):
        rows = slice(i * n, (i + 1) * n)
        maps[name] = res.cka[rows].reshape(grid, grid, grid, grid)
        stderr[name] = res.stderr[rows].reshape(grid, grid, grid, grid)
    (num_batches, num_examples), = counts
    return LocalizationResult(maps={n: maps[n] for n in self.names},
                              stderr={n: stderr[n] for n in self.names}, grids=dict(self.grids),
                              num_batches=num_batches, num_examples=num_examples)


def localization_maps(layers: Mapping[str, jax.typing.ArrayLike], images: jax.typing.ArrayLike,
                      *, num_prefix_tokens: int = 0, token_grid: Sequence[int] | None = None,
                      batch_size: int = 256, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
  """Token-vs-patch minibatch CKA maps over whole arrays, in consecutive minibatches.

  Args:
    layers: `{name: [n, T, D] tokens or [n, h, w, C] feature maps}`.
    images: `[n, H, W, C]` square images the layers were computed from.
    num_prefix_tokens: tokens before the patches of the token layers (dropped).
    token_grid: (rows, columns) of the patch tokens of the token layers.
    batch_size: minibatch size b >= 4 (per device under a mesh).
    mesh: run under this mesh (default one local device).

  Returns:
    `{name: [g, g, g, g]}` float64 maps; trailing examples that do not fill a step are
    dropped.

  Raises:
    ValueError: bad shapes, batch_size < 4 or fewer examples than one step.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be square [n, H, H, C]; got {images.shape}.")
  if batch_size < 4:
    raise ValueError(f"batch_size must be >= 4 (HSIC1 divides by b - 3); got {batch_size}.")
  loc = LocalizationCKA({n: np.shape(x)[1:] for n, x in layers.items()},
                        image_size=images.shape[1], num_prefix_tokens=num_prefix_tokens,
                        token_grid=token_grid, mesh=mesh)
  step = batch_size * loc.mesh.devices.size
  num_steps = images.shape[0] // step
  if num_steps == 0:
    raise ValueError(f"{images.shape[0]} examples do not fill one step of {step} (batch_size x "
                     "devices); use more examples or a smaller batch_size.")
  state = loc.init()
  for s in range(num_steps):
    chunk = slice(s * step, (s + 1) * step)
    state = loc.update(state, {n: np.asarray(x)[chunk] for n, x in layers.items()},
                       images[chunk])
  return loc.result(state).maps
