"""Skip-connection norm ratios ||z|| / ||f(z)|| per sub-layer (Raghu et al. 2021, Fig 7).

A residual sub-layer maps its stream z to z + f(z). Raghu et al., "Do Vision Transformers See
Like Convolutional Neural Networks?" (NeurIPS 2021, Section 6) compare how much of the
representation travels through the skip connection and how much through the branch f with the
ratio of norms ||z|| / ||f(z)||, separately for the CLS token and the spatial tokens.

Definition used here (the paper does not spell out the averaging; recorded in every result).
For sub-layer l, example e and token t (a ViT/Mixer token, or a ResNet feature-map location),
  n_z(e, t) = ||z[e, t, :]||_2  and  n_f(e, t) = ||f(z)[e, t, :]||_2   (L2 norm over width),
and, over every example e and the tokens t of a group G,
  ratio_of_means = mean_{e, t in G} n_z / mean_{e, t in G} n_f   (the ratio of mean norms),
  mean_of_ratios = mean_{e, t in G} n_z / n_f                     (the mean per-token ratio).
Both are accumulated; `ratio_of_means` is the default statistic of the study (it is not thrown
off by the rare token whose branch output is almost zero). Its standard error over examples is
the ratio estimator's delta-method one: with a_e = sum_{t in G} n_z(e, t), b_e likewise for n_f,
R = sum_e a_e / sum_e b_e and n examples,
  stderr(R)^2 = n / (n - 1) * sum_e (a_e - R b_e)^2 / (sum_e b_e)^2,
from the accumulated sums of a_e^2, b_e^2 and a_e b_e (NaN below 2 examples). The groups (`GROUPS`, the columns of
every result array, in this order), read from the kinds of the tokens before the patches (a
model's `token_layout().prefix`, kinds of `vit_repr.models.layout.PREFIX_KINDS`):
  'cls'       the classification tokens: the CLS token and, in a distilled DeiT, its
              distillation token (the paper's CLS group);
  'spatial'   the patch tokens, or every location of a feature map;
  'register'  register tokens (DINOv2's 4), which carry no patch and classify nothing; the
              last column, so that 'cls' and 'spatial' are columns 0 and 1 in every result.
A group a layer does not have is NaN: 'cls' in a Mixer, a GAP ViT, a MAP-head ViT (SigLIP) or a
ResNet; 'register' in every model without registers.

This module takes arrays only: `{sub-layer name: z}` and `{sub-layer name: f(z)}` (tokens
`[batch, T, D]` or maps `[batch, h, w, C]`) and the kinds of the model's prefix tokens. Which
intermediates are z and f(z) is for the model to say: each model of `vit_repr.models` lists its
sub-layers (`model.residual_sublayers()`; ViT attn and mlp, Mixer token and channel mixing,
ResNet units with identity or projected shortcuts; blocks without skip connections left out),
and `vit_repr.models.streams_and_branches` picks those arrays from the model's intermediates.

`NormRatio` (a `vit_repr.streaming.Accumulator`) accumulates the per-batch sums in a small
jitted pytree state: the batch arrives sharded over the mesh's data axis and the sums over
examples are plain `jnp.sum`s inside jit, so XLA adds the cross-device reductions and the
result does not depend on the device count.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from vit_repr import parallel, streaming

GROUPS = ("cls", "spatial", "register")
# The prefix token kinds (vit_repr.models.layout.PREFIX_KINDS) each non-spatial group holds.
PREFIX_GROUPS = {"cls": ("cls", "distillation"), "register": ("register",)}
STATISTICS = ("ratio_of_means", "mean_of_ratios")
# Accumulated sums, in this order, per layer and group: over examples and tokens of n_z, n_f
# and n_z / n_f, then over examples of a_e^2, b_e^2 and a_e b_e (module docstring).
_SUMS = ("norm_stream", "norm_branch", "ratio", "example_stream_sq", "example_branch_sq",
         "example_cross")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormRatioState(streaming.State):
  """Running sums of the per-token norms; its size does not grow with the data.

  Attributes:
    sums: `[6, L, 3]` float32 sums (channel order `_SUMS`) per layer and group (`GROUPS`).
    compensation: `[6, L, 3]` Kahan compensation of `sums` (`streaming.kahan_add`).
    num_examples: int32 examples accumulated.
    nonfinite: `[L]` bool, whether a layer ever had NaN/Inf in z or f(z).
    names: sub-layer names (static).
    tokens: `((cls tokens, spatial tokens, register tokens), ...)` per layer (static).
    prefix: kinds of the tokens before the patches of a `[batch, T, D]` layer, in token order,
      e.g. ('cls', 'register', 'register', 'register', 'register') (static).
  """
  sums: jax.Array
  compensation: jax.Array
  num_examples: jax.Array
  nonfinite: jax.Array
  names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  tokens: tuple[tuple[int, int, int], ...] = dataclasses.field(metadata=dict(static=True))
  prefix: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))


class NormRatioResult(NamedTuple):
  """Norm ratios per sub-layer and group (NumPy float64; NaN for a group a layer lacks).

  Attributes:
    names: `[L]` sub-layer names.
    ratio_of_means: `[L, 3]` mean n_z / mean n_f, columns `GROUPS` ('cls', 'spatial',
      'register').
    ratio_of_means_stderr: `[L, 3]` its standard error over examples (delta method).
    mean_of_ratios: `[L, 3]` mean of n_z / n_f.
    norm_stream: `[L, 3]` mean n_z = mean ||z|| per token.
    norm_branch: `[L, 3]` mean n_f = mean ||f(z)|| per token.
    num_tokens: `[L, 3]` int, tokens per example in each group.
    num_examples: examples accumulated.
  """
  names: tuple[str, ...]
  ratio_of_means: np.ndarray
  ratio_of_means_stderr: np.ndarray
  mean_of_ratios: np.ndarray
  norm_stream: np.ndarray
  norm_branch: np.ndarray
  num_tokens: np.ndarray
  num_examples: int


def _prefix_indices(prefix: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(cls-group indices, register indices) `[k]` of the prefix tokens of kinds `prefix`."""
  return tuple(np.asarray([t for t, kind in enumerate(prefix) if kind in PREFIX_GROUPS[group]],
                          np.int32) for group in ("cls", "register"))


def _token_norms(x: jax.Array, prefix: Sequence[str]) -> tuple[jax.Array | None, ...]:
  """Per-group token norms (`GROUPS` order; None for a group without tokens) `[batch, tokens]`
  of tokens `[batch, T, D]` or a feature map `[batch, h, w, C]`."""
  norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
  if x.ndim == 4:
    return None, norms.reshape(norms.shape[0], -1), None
  cls, register = _prefix_indices(prefix)
  return (norms[:, cls] if cls.size else None, norms[:, len(prefix):],
          norms[:, register] if register.size else None)


def _group_tokens(shape: Sequence[int], prefix: Sequence[str], name: str
                  ) -> tuple[int, int, int]:
  """(cls, spatial, register) tokens per example of a sub-layer's `[batch, ...]` shape."""
  if len(shape) == 4:
    return 0, int(np.prod(shape[1:-1])), 0
  if len(shape) == 3 and shape[1] > len(prefix):
    cls, register = _prefix_indices(prefix)
    return cls.size, shape[1] - len(prefix), register.size
  raise ValueError(f"Sub-layer {name!r}: expected tokens [batch, tokens, width] with more than "
                   f"the {len(prefix)} prefix tokens {tuple(prefix)}, or a feature map [batch, "
                   f"height, width, channels]; got shape {tuple(shape)}.")


def _group_sums(stream: jax.Array, branch: jax.Array, prefix: Sequence[str]) -> jax.Array:
  """`[6, 3]` batch sums `_SUMS` (rows) for the groups `GROUPS` (columns)."""
  sums = []
  for norms_z, norms_f in zip(_token_norms(stream, prefix), _token_norms(branch, prefix)):
    if norms_z is None:
      sums.append(jnp.zeros(len(_SUMS), jnp.float32))
    else:
      per_example_z, per_example_f = norms_z.sum(1), norms_f.sum(1)  # a_e, b_e `[batch]`
      sums.append(jnp.stack([
          norms_z.sum(), norms_f.sum(), (norms_z / norms_f).sum(),
          (per_example_z ** 2).sum(), (per_example_f ** 2).sum(),
          (per_example_z * per_example_f).sum()]))
  return jnp.stack(sums, axis=-1)


def _update(state: NormRatioState, streams: tuple[jax.Array, ...],
            branches: tuple[jax.Array, ...]) -> NormRatioState:
  batch_sums = jnp.stack([_group_sums(z, f, state.prefix)
                          for z, f in zip(streams, branches)], axis=1)
  finite = jnp.stack([jnp.isfinite(z).all() & jnp.isfinite(f).all()
                      for z, f in zip(streams, branches)])
  sums, compensation = streaming.kahan_add(state.sums, state.compensation, batch_sums)
  return dataclasses.replace(state, sums=sums, compensation=compensation,
                             num_examples=state.num_examples + streams[0].shape[0],
                             nonfinite=state.nonfinite | ~finite)


class NormRatio:
  """Streaming norm ratios ||z|| / ||f(z)|| of residual sub-layers, jitted and sharded.

  Example:
    layers = model.residual_sublayers()   # model: a vit_repr.models ViT
    estimator = residual.NormRatio(mesh)
    state = None
    for batch in batches:
      streams, branches = models.streams_and_branches(layers, intermediates(batch))
      state = state or estimator.init(streams, prefix=model.token_layout().prefix)
      state = estimator.update(state, streams, branches)
    result = estimator.result(state)   # ratio_of_means: [L, 3] (cls, spatial, register)

  The jitted update donates the state: do not reuse a state passed to `update`.
  """

  def __init__(self, mesh: Mesh | None = None):
    """Builds the estimator.

    Args:
      mesh: one-axis mesh named `parallel.DATA_AXIS` over which batches are sharded; default
        one local device.

    Raises:
      ValueError: the mesh does not have exactly the data axis.
    """
    self.mesh = streaming.data_mesh(mesh, "NormRatio")
    self._update = jax.jit(_update, donate_argnums=0,
                           out_shardings=parallel.replicated(self.mesh))

  def init(self, streams: Mapping[str, Any], *, prefix: Sequence[str] = ()
           ) -> NormRatioState:
    """An empty state for the sub-layers of `streams`.

    Args:
      streams: `{sub-layer name: z}`; only names and shapes are used (a first batch or
        `jax.ShapeDtypeStruct`s), `[batch, T, D]` tokens or `[batch, h, w, C]` feature maps.
      prefix: the kinds of the tokens before the patches of the `[batch, T, D]` layers, in
        token order (the model's `token_layout().prefix`; kinds of `PREFIX_GROUPS`): ('cls',)
        for a CLS-token ViT, ('cls', 'register', 'register', 'register', 'register') for
        DINOv2, () for a GAP or MAP-head ViT, a Mixer or a ResNet.

    Returns:
      The zero state, replicated over the mesh.

    Raises:
      ValueError: no sub-layers, an unknown prefix kind, or a layer that is neither tokens
        (more than the prefix) nor a feature map.
    """
    if not streams:
      raise ValueError("NormRatio.init needs at least one sub-layer; pass {name: z}.")
    known = sum(PREFIX_GROUPS.values(), ())
    unknown = [kind for kind in prefix if kind not in known]
    if unknown:
      raise ValueError(f"prefix must be a sequence of token kinds of {known} (a model's "
                       f"token_layout().prefix); got {prefix!r}.")
    zeros = np.zeros((len(_SUMS), len(streams), len(GROUPS)), np.float32)
    state = NormRatioState(
        sums=zeros, compensation=zeros, num_examples=np.zeros((), np.int32),
        nonfinite=np.zeros(len(streams), bool), names=tuple(streams),
        tokens=tuple(_group_tokens(z.shape, prefix, name) for name, z in streams.items()),
        prefix=tuple(prefix))
    return streaming.replicated(state, self.mesh)

  def update(self, state: NormRatioState, streams: Mapping[str, jax.typing.ArrayLike],
             branches: Mapping[str, jax.typing.ArrayLike]) -> NormRatioState:
    """Folds one global batch into `state` (jitted; no host synchronisation).

    Args:
      state: from `init` or a previous `update` (donated).
      streams: `{sub-layer name: z [global_batch, ...]}`, the names of `init`.
      branches: `{sub-layer name: f(z)}`, same names and shapes as `streams`.

    Returns:
      The new state.

    Raises:
      ValueError: names or token counts differ from `init`, or z and f(z) of a sub-layer
        differ in shape.
    """
    for what, given in (("streams", streams), ("branches", branches)):
      if set(given) != set(state.names):
        raise ValueError(f"{what} hold sub-layers {sorted(given)} but the state was "
                         f"initialised with {sorted(state.names)}; pass the same sub-layers.")
    bad = {n: (np.shape(streams[n]), np.shape(branches[n])) for n in state.names
           if np.shape(streams[n]) != np.shape(branches[n])}
    if bad:
      raise ValueError(f"z and f(z) must have the same shape; got (z, f) shapes {bad}.")
    for name, tokens in zip(state.names, state.tokens):
      found = _group_tokens(np.shape(streams[name]), state.prefix, name)
      if found != tokens:
        raise ValueError(f"Sub-layer {name!r} has (cls, spatial, register) tokens {found}, "
                         f"init saw {tokens}; pass the same sub-layers to init and update.")
    return self._update(streaming.replicated(state, self.mesh),
                        tuple(streams[n] for n in state.names),
                        tuple(branches[n] for n in state.names))

  def result(self, state: NormRatioState) -> NormRatioResult:
    """The norm ratios (one host synchronisation).

    Returns:
      A `NormRatioResult`; `mean_of_ratios` is inf for a group where some branch output is
      exactly zero.

    Raises:
      ValueError: nothing was accumulated, or a layer had NaN/Inf values (named).
    """
    host = state.to_numpy()
    num_examples = streaming.check_accumulated(host["num_examples"], "batch")
    nonfinite = [n for n, bad in zip(state.names, host["nonfinite"]) if bad]
    if nonfinite:
      raise ValueError(f"NaN or Inf in the stream or branch of sub-layers {nonfinite}; check "
                       "the checkpoint and the input range (expected images in [-1, 1]).")
    sums = streaming.kahan_total(host["sums"], host["compensation"]).astype(np.float64)
    tokens = np.asarray(state.tokens, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
      means = sums[:3] / np.where(tokens > 0, tokens * num_examples, np.nan)
      ratio_of_means = means[0] / means[1]
      stream_sq, branch_sq, cross = sums[3:]
      residual_sq = np.maximum(
          stream_sq - 2 * ratio_of_means * cross + ratio_of_means ** 2 * branch_sq, 0.0)
      stderr = (np.sqrt(num_examples / (num_examples - 1) * residual_sq) / sums[1]
                if num_examples > 1 else np.full_like(ratio_of_means, np.nan))
    if np.isinf(means[2]).any():
      logging.warning("Some branch outputs are exactly zero: mean_of_ratios is inf there.")
    return NormRatioResult(names=state.names, ratio_of_means=ratio_of_means,
                           ratio_of_means_stderr=stderr, mean_of_ratios=means[2], norm_stream=means[0],
                           norm_branch=means[1], num_tokens=tokens, num_examples=num_examples)
