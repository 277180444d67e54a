"""Mean attention distance per head and layer (Raghu et al., NeurIPS 2021, Figures 3-5).

For head h of a layer with attention weights A_h `[queries, keys]` over a grid of patches, the
mean attention distance of query patch i is the attention-weighted average pixel distance to
the key patches,

    d_i = sum_j A_h[i, j] * ||p_i - p_j||,

with p_i the centre of patch i in pixels ((row + 1/2) * patch_size, (col + 1/2) * patch_size),
so the patch size and the resolution matter. d_i is averaged over the query patches and then
over images. This is the analysis of Dosovitskiy et al. (ICLR 2021, Fig. 7), used by Raghu et
al. to separate local heads (small distance) from global ones.

The CLS token (any tokens before the patches, `num_prefix_tokens`) is excluded both as a query
and as a key. Public implementations differ on what to do with the weight that patch queries
put on CLS: `renormalize=True` (default here) divides each query's patch-to-patch weights by
their sum, so d_i is a proper weighted average over patches and a head that mostly attends to
CLS is not mistaken for a local one; `renormalize=False` uses the weights as they are (d_i then
shrinks by the mass on CLS). `AttentionDistanceResult.cls_attention` reports that mass per
head either way, and the studies record the flag in their metadata.

`MeanAttentionDistance` (a `vit_repr.streaming.Accumulator`) streams it: a small state (per
layer and head: the sums over images of the distance, of its square and of the CLS mass; the
example count), jitted updates of attention maps `[batch, heads, T, T]` sharded over a mesh's
data axis (sums inside jit: the result does not depend on the device count), and `fold`, the
same update as a pure function to fuse into a jitted forward pass so the attention maps of all
layers are never materialised at once.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_repr import parallel, streaming


def patch_centres(grid: tuple[int, int], patch_size: float) -> np.ndarray:
  """Pixel coordinates of the patch centres of a row-major grid.

  Args:
    grid: (rows, columns) of patches.
    patch_size: side of a patch in pixels.

  Returns:
    `[rows * columns, 2]` float64 (y, x) centres, in the models' row-major token order.
  """
  rows, cols = _check_grid(grid)
  if patch_size <= 0:
    raise ValueError(f"patch_size must be positive; got {patch_size}.")
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return (np.stack([y.ravel(), x.ravel()], axis=-1) + 0.5) * float(patch_size)


def patch_distances(grid: tuple[int, int], patch_size: float) -> np.ndarray:
  """Euclidean pixel distances between all pairs of patch centres.

  Args:
    grid: (rows, columns) of patches.
    patch_size: side of a patch in pixels.

  Returns:
    `[N, N]` float64 with N = rows * columns, row-major token order.
  """
  centres = patch_centres(grid, patch_size)
  return np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
  if len(grid) != 2 or min(grid) < 1:
    raise ValueError(f"grid must be (rows, columns) of positive sizes; got {tuple(grid)}.")
  return int(grid[0]), int(grid[1])


def per_example_distance(attn_probs: jax.typing.ArrayLike, distances: jax.typing.ArrayLike, *,
                         num_prefix_tokens: int = 0,
                         renormalize: bool = True) -> tuple[jax.Array, jax.Array]:
  """Mean attention distance of every head for every example.

  Args:
    attn_probs: `[b, heads, T, T]` attention weights (queries x keys), T = num_prefix_tokens + N.
    distances: `[N, N]` pixel distances between patch centres (`patch_distances`).
    num_prefix_tokens: tokens before the patches (1 for a CLS-token ViT), excluded as queries
      and keys.
    renormalize: divide each patch query's weights on the patch keys by their sum.

  Returns:
    (distance `[b, heads]`: mean over query patches of the attention-weighted distance,
     cls_mass `[b, heads]`: mean over query patches of the weight on the prefix tokens), float32.

  Raises:
    ValueError: the attention maps are not `[b, heads, T, T]` with T = prefix + N.
  """
  probs = jnp.asarray(attn_probs)
  distances = jnp.asarray(distances, jnp.float32)
  num_patches = distances.shape[0]
  expected = num_prefix_tokens + num_patches
  if (probs.ndim != 4 or probs.shape[-1] != probs.shape[-2] or probs.shape[-1] != expected
      or distances.shape != (num_patches, num_patches)):
    raise ValueError(
        f"Expected attention weights [batch, heads, T, T] with T = {num_prefix_tokens} prefix "
        f"tokens + {num_patches} patches = {expected} and distances [{num_patches}, "
        f"{num_patches}]; got {probs.shape} and {distances.shape}. Check the patch grid "
        "(image_size / patch_size) and num_prefix_tokens (1 for a CLS-token ViT).")
  queries = probs[:, :, num_prefix_tokens:].astype(jnp.float32)  # [b, H, N, T]
  patch_weights = queries[..., num_prefix_tokens:]                # [b, H, N, N]
  weighted = jnp.einsum("bhqk,qk->bhq", patch_weights, distances)
  if renormalize:
    weighted = weighted / patch_weights.sum(-1)
  cls_mass = queries[..., :num_prefix_tokens].sum(-1)
  return weighted.mean(-1), cls_mass.mean(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionDistanceState(streaming.State):
  """Streaming sums over examples, per layer and head.

  Attributes:
    distance_sum: `[layers, heads]` sum over examples of the per-example mean distance.
    distance_sq_sum: `[layers, heads]` sum of its squares (for the spread over images).
    cls_sum: `[layers, heads]` sum of the mean weight of patch queries on prefix tokens.
    num_examples: `[]` int32 examples accumulated.
  """
  distance_sum: jax.Array
  distance_sq_sum: jax.Array
  cls_sum: jax.Array
  num_examples: jax.Array


class AttentionDistanceResult(NamedTuple):
  """Mean attention distance per layer and head.

  Attributes:
    distance: `[layers, heads]` mean attention distance in pixels (float64).
    distance_std: `[layers, heads]` standard deviation over images of the per-image distance.
    stderr: `[layers, heads]` its standard error (std / sqrt(examples)).
    cls_attention: `[layers, heads]` mean weight of patch queries on the prefix tokens.
    names: the layer names, in order.
    num_examples: images accumulated.
  """
  distance: np.ndarray
  distance_std: np.ndarray
  stderr: np.ndarray
  cls_attention: np.ndarray
  names: tuple[str, ...]
  num_examples: int


class MeanAttentionDistance:
  """Streaming mean attention distance (init / update / result), jitted and sharded.

  Example:
    mad = MeanAttentionDistance(names, num_heads=12, grid=(14, 14), patch_size=16,
                                num_prefix_tokens=1, mesh=mesh)
    state = mad.init()
    for batch in batches:
      state = mad.update(state, {name: attn_probs [batch, H, T, T] for name in names})
    res = mad.result(state)  # res.distance [layers, heads] in pixels

  `update` donates the state. `fold` is the same update as a pure function, to call inside
  a jitted forward pass.
  """

  def __init__(self, names: Sequence[str], *, num_heads: int, grid: tuple[int, int],
               patch_size: float, num_prefix_tokens: int = 0, renormalize: bool = True,
               mesh: Mesh | None = None):
    """Builds the accumulator.

    Args:
      names: the attention layers (e.g. 'Transformer/encoderblock_3/attn_probs'), in order.
      num_heads: heads per layer.
      grid: (rows, columns) of the patch grid.
      patch_size: patch side in pixels (distances are in pixels of the model's input).
      num_prefix_tokens: tokens before the patches (1 for a CLS-token ViT).
      renormalize: see the module docstring.
      mesh: one-axis mesh over `parallel.DATA_AXIS` (default: one local device).

    Raises:
      ValueError: no layer names, num_heads < 1, a bad grid or a mesh with other axes.
    """
    if not names:
      raise ValueError("MeanAttentionDistance needs at least one attention layer name.")
    if num_heads < 1 or num_prefix_tokens < 0:
      raise ValueError(f"num_heads must be >= 1 and num_prefix_tokens >= 0; got {num_heads} "
                       f"and {num_prefix_tokens}.")
    self.names = tuple(names)
    self.num_heads = num_heads
    self.grid = _check_grid(grid)
    self.patch_size = float(patch_size)
    self.num_prefix_tokens = num_prefix_tokens
    self.renormalize = renormalize
    self.mesh = streaming.data_mesh(mesh, "MeanAttentionDistance")
    self.distances = patch_distances(self.grid, self.patch_size).astype(np.float32)
    self._update = jax.jit(self.fold, donate_argnums=0,
                           out_shardings=parallel.replicated(self.mesh))

  def init(self) -> AttentionDistanceState:
    """The zero state, replicated over the mesh."""
    zeros = np.zeros((len(self.names), self.num_heads), np.float32)
    return streaming.replicated(
        AttentionDistanceState(zeros, zeros, zeros, np.zeros((), np.int32)), self.mesh)

  def fold(self, state: AttentionDistanceState, attn_probs: Mapping[str, jax.Array],
           valid: jax.Array | None = None) -> AttentionDistanceState:
    """Adds one batch (pure, traceable; `update` is its jitted form).

    Args:
      state: the current state.
      attn_probs: `{name: [b, heads, T, T]}` for every name of `self.names`.
      valid: `[b]` bool, False for padding rows (left out); default all True.

    Returns:
      The new state.

    Raises:
      ValueError: a layer is missing or has the wrong shape.
    """
    missing = [n for n in self.names if n not in attn_probs]
    if missing:
      raise ValueError(f"Attention maps missing for layers {missing}; pass every layer of "
                       f"{list(self.names)}.")
    per_layer = [per_example_distance(attn_probs[n], self.distances,
                                      num_prefix_tokens=self.num_prefix_tokens,
                                      renormalize=self.renormalize) for n in self.names]
    heads = {d.shape[1] for d, _ in per_layer}
    if heads != {self.num_heads}:
      raise ValueError(f"Expected {self.num_heads} heads in every layer; got {sorted(heads)}.")
    distance = jnp.stack([d for d, _ in per_layer])  # [layers, b, heads]
    cls_mass = jnp.stack([c for _, c in per_layer])
    if valid is None:
      valid = jnp.ones(distance.shape[1], bool)
    weight = valid.astype(jnp.float32)[None, :, None]
    # where, not a product: a padding row's distance may be NaN (uniform attention of zeros).
    distance, cls_mass = (jnp.where(weight > 0, a, 0) for a in (distance, cls_mass))
    return AttentionDistanceState(
        state.distance_sum + distance.sum(1), state.distance_sq_sum + (distance ** 2).sum(1),
        state.cls_sum + cls_mass.sum(1),
        state.num_examples + valid.astype(jnp.int32).sum())

  def update(self, state: AttentionDistanceState, attn_probs: Mapping[str, jax.Array],
             valid: jax.Array | None = None) -> AttentionDistanceState:
    """Jitted `fold` (donates `state`); `attn_probs` (and `valid`) arrive sharded over the
    data axis."""
    return self._update(streaming.replicated(state, self.mesh),
                        {n: attn_probs[n] for n in self.names if n in attn_probs}, valid)

  def result(self, state: AttentionDistanceState) -> AttentionDistanceResult:
    """Means over the accumulated examples (one host synchronisation).

    Raises:
      ValueError: no example accumulated.
    """
    host = state.to_numpy()
    count = streaming.check_accumulated(host["num_examples"], "example")
    mean = np.asarray(host["distance_sum"], np.float64) / count
    second = np.asarray(host["distance_sq_sum"], np.float64) / count
    std = np.sqrt(np.maximum(second - mean ** 2, 0.0) * count / max(count - 1, 1))
    return AttentionDistanceResult(
        distance=mean, distance_std=std, stderr=std / np.sqrt(count),
        cls_attention=np.asarray(host["cls_sum"], np.float64) / count, names=self.names,
        num_examples=count)
