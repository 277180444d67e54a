"""Streaming minibatch CKA: `MinibatchCKA`, its state and result, and `minibatch_cka`.

Minibatch CKA (Nguyen, Raghu & Kornblith, "Do Wide and Deep Networks Learn the Same Things?",
ICLR 2021), the estimator of Raghu et al., "Do Vision Transformers See Like Convolutional Neural
Networks?" (NeurIPS 2021):
`CKA = mean_i HSIC1(K_i, L_i) / sqrt(mean_i HSIC1(K_i, K_i) * mean_i HSIC1(L_i, L_i))`
over minibatches i, with K_i = X_i X_iᵀ the linear Gram of minibatch i (each example's
features flattened) and HSIC1 the unbiased HSIC estimator of Song et al. (JMLR 2012), computed
through U-centring (`vit_repr.cka.full_batch`). `MinibatchCKA` streams it (a
`vit_repr.streaming.Accumulator`: jitted, sharded over a device mesh, with error bars);
`minibatch_cka` runs it over whole arrays.

Many layers of one shape (every token of a ViT layer, as in `vit_repr.localization`) can be
passed stacked, as one group `[batch, k, ...]` of k layers (`MinibatchCKA.update(...,
stacked=True)`): the k Grams are then one batched product, and the compiled program grows with
the number of groups, not of layers.

Optional calibrations (`vit_repr.cka.calibration`): a permutation null per cell (`p_value`,
`null_mean`; `num_permutations`) and Poisson-bootstrap intervals over minibatches (`ci_low`,
`ci_high`; `num_bootstrap`), both streamed in the state.

Layers may be NumPy, JAX or any array convertible by `np.asarray` (e.g. PyTorch CPU tensors).
Every matrix product runs at `precision`, 'highest' by default (see `vit_repr.cka.full_batch`).
The per-minibatch computation lives in `sharded_update` (the jitted update) and `host_grams`
(Grams by the host's BLAS). This module stays whole (~565 lines, two fifths of them
docstrings): the state, the result and the estimator that builds, checks and reads them are one
API, read together.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from vit_repr import parallel, streaming
from vit_repr.cka import calibration as calib
from vit_repr.cka.full_batch import _check_precision
from vit_repr.cka.host_grams import _host_grams
from vit_repr.cka.sharded_update import _CPU_FEATURE_CHUNK, _PRODUCTS, _TERMS, _update

Layers = Sequence[jax.typing.ArrayLike] | Mapping[str, jax.typing.ArrayLike]
# Where `MinibatchCKA` computes Grams.
GRAMS = ("auto", "host", "device")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinibatchCKAState(streaming.State):
  """Running sums of minibatch CKA; a small pytree whose size does not grow with the data.

  For every minibatch and every pair of layers (a of model A, c of model B) the terms
  t = (HSIC1(K_a, L_c), HSIC1(K_a, K_a), HSIC1(L_c, L_c)) are shifted by the terms of the
  first update (`shift`: it keeps the sums small, so float32 sums and the variances computed
  from them stay accurate) and summed with Kahan compensation, together with their pairwise
  products (for the error bars).

  Attributes:
    shift: `[3, La, Lb]` float32 shift of the (xy, xx, yy) terms.
    sums: `[9, La, Lb]` float32 sums over minibatches of the shifted terms d = t - shift
      (channels xy, xx, yy) then of the products d_xy², d_xx², d_yy², d_xy d_xx, d_xy d_yy,
      d_xx d_yy.
    compensation: `[9, La, Lb]` Kahan compensation of `sums` (`streaming.kahan_add`).
    null_sums: `[K, La, Lb]` float32 sums over minibatches of the permuted cross terms
      HSIC1(K_i, P_ik L_i P_ikᵀ) of the K null replicates (K = 0 when off).
    null_compensation: its Kahan compensation.
    bootstrap_sums: `[B, 3, La, Lb]` float32 sums over minibatches of the Poisson-weighted
      terms w_ir (xy, xx, yy) of the B bootstrap replicates (B = 0 when off).
    bootstrap_compensation: its Kahan compensation.
    num_batches: int32 number of minibatches accumulated.
    num_examples: int32 number of examples accumulated.
    nonfinite_x: `[La]` bool, whether a layer of model A ever had NaN/Inf features.
    nonfinite_y: `[Lb]` bool, same for model B.
    varied_x: `[La]` bool, whether a layer of model A ever varied within a minibatch.
    varied_y: `[Lb]` bool, same for model B.
    names_x: layer names of model A (static).
    names_y: layer names of model B, empty for a within-model heatmap (static).
    calibration: `(num_permutations, num_bootstrap, seed)` it was made with (static).
  """
  shift: jax.Array
  sums: jax.Array
  compensation: jax.Array
  null_sums: jax.Array
  null_compensation: jax.Array
  bootstrap_sums: jax.Array
  bootstrap_compensation: jax.Array
  num_batches: jax.Array
  num_examples: jax.Array
  nonfinite_x: jax.Array
  nonfinite_y: jax.Array
  varied_x: jax.Array
  varied_y: jax.Array
  names_x: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  names_y: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  calibration: tuple[int, int, int] = dataclasses.field(default=(0, 0, 0),
                                                        metadata=dict(static=True))

  @classmethod
  def from_numpy(cls, arrays: Mapping[str, Any]) -> "MinibatchCKAState":
    """`streaming.State.from_numpy`; a state saved before the calibrations existed restores
    as one without them."""
    arrays = dict(arrays)
    if "calibration" not in arrays and "sums" in arrays:
      arrays.update(calibration=np.zeros(3, int),
                    **calib.empty_sums((0, 0, 0), *np.shape(arrays["sums"])[1:]))
    return super().from_numpy(arrays)


_STATE_ARRAYS = tuple(f.name for f in dataclasses.fields(MinibatchCKAState)
                      if not f.metadata.get("static"))


class CKAResult(NamedTuple):
  """A minibatch CKA heatmap with its standard errors (NumPy, float64).

  Attributes:
    cka: `[La, Lb]` CKA between layer i of model A and layer j of model B.
    stderr: `[La, Lb]` delta-method standard errors (see `MinibatchCKA.result`).
    names_x: layer names of model A (rows).
    names_y: layer names of model B (columns); equal to names_x within a model.
    num_batches: minibatches accumulated.
    num_examples: examples accumulated.
    null_mean: `[La, Lb]` mean CKA of the permutation null (about 0), or None when off.
    p_value: `[La, Lb]` one-sided permutation p-value (1 + #{k: null_k >= cka}) / (K + 1),
      or None when off.
    ci_low: `[La, Lb]` lower end of the Poisson-bootstrap percentile interval, or None.
    ci_high: `[La, Lb]` upper end, or None.
  """
  cka: np.ndarray
  stderr: np.ndarray
  names_x: tuple[str, ...]
  names_y: tuple[str, ...]
  num_batches: int
  num_examples: int
  null_mean: np.ndarray | None = None
  p_value: np.ndarray | None = None
  ci_low: np.ndarray | None = None
  ci_high: np.ndarray | None = None



def _layer_names(layers: Layers, names: Sequence[str] | None, what: str) -> tuple[str, ...]:
  if isinstance(layers, Mapping):
    found = tuple(str(k) for k in layers)
    if names is not None and tuple(names) != found:
      raise ValueError(f"{what} is a dict; its keys {found} are the layer names, but names "
                       f"{tuple(names)} were also given. Drop `names` or rename the keys.")
    names = found
  elif isinstance(layers, Sequence) and not isinstance(layers, str):
    names = tuple(str(i) for i in range(len(layers))) if names is None else tuple(
        str(n) for n in names)
    if len(names) != len(layers):
      raise ValueError(f"{what} has {len(layers)} layers but {len(names)} names were given.")
  else:
    raise TypeError(
        f"{what} must be a sequence or dict of per-layer arrays [n, ...]; got "
        f"{type(layers).__name__}. Wrap a single layer as [x] or {{'name': x}}.")
  if not names:
    raise ValueError(f"{what} holds no layers; pass at least one array [n, ...].")
  if len(set(names)) != len(names):
    raise ValueError(f"Layer names of {what} must be unique; got {names}.")
  return names


def _ordered(layers: Layers, names: tuple[str, ...], what: str) -> tuple[Any, ...]:
  """The arrays of `layers` in the order of `names`, checked against them."""
  if isinstance(layers, Mapping):
    keys = {str(k): v for k, v in layers.items()}
    if set(keys) != set(names):
      raise ValueError(
          f"{what} has layers {sorted(keys)} but the state was initialised with {list(names)}:"
          f" missing {sorted(set(names) - set(keys))}, unexpected "
          f"{sorted(set(keys) - set(names))}. Pass the same layers to init and update.")
    arrays = tuple(keys[n] for n in names)
  elif isinstance(layers, Sequence) and not isinstance(layers, str):
    if len(layers) != len(names):
      raise ValueError(f"{what} has {len(layers)} layers but the state was initialised with "
                       f"{len(names)}; pass the same layers to init and update.")
    arrays = tuple(layers)
  else:
    raise TypeError(f"{what} must be a sequence or dict of per-layer arrays [b, ...]; got "
                    f"{type(layers).__name__}.")
  return tuple(a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a) for a in arrays)


def _stacked(groups: Sequence[jax.typing.ArrayLike], names: tuple[str, ...],
             what: str) -> tuple[Any, ...]:
  """The groups `[b, k, ...]` of `groups`, checked to hold one layer per name together."""
  if not isinstance(groups, Sequence) or isinstance(groups, str):
    raise TypeError(f"With stacked=True, {what} must be a sequence of groups [b, k, ...] of k "
                    f"layers each; got {type(groups).__name__}.")
  arrays = tuple(a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a) for a in groups)
  shapes = [tuple(np.shape(a)) for a in arrays]
  if any(len(s) < 2 for s in shapes) or sum(s[1] for s in shapes) != len(names):
    raise ValueError(
        f"{what} holds groups of shapes {shapes}, but the state was initialised with "
        f"{len(names)} layers: with stacked=True pass groups [b, k, ...] (k layers on axis 1) "
        "whose k's add up to the layer count, in the order of the state's names.")
  return arrays


class MinibatchCKA:
  """Streaming minibatch CKA (Nguyen, Raghu & Kornblith, 2021), jitted and sharded.

  Optax-like: `init` builds a `MinibatchCKAState`, `update` folds in one minibatch of every
  layer of model A (and of model B), `result` returns the heatmap with standard errors. Under
  a mesh, the global batch passed to `update` is split along the `parallel.DATA_AXIS` axis
  and each device's shard is its own minibatch of `global_batch / num_devices` examples;
  the per-minibatch terms are summed across devices and hosts, so results do not depend on
  the device count (for the same minibatches). Several passes over a reshuffled example set
  are several streams of `update` calls on the same state.

  Example:
    est = cka.MinibatchCKA()
    state = est.init(feats_a, feats_b)   # dicts or sequences of [b, ...] arrays
    for epoch in range(10):
      for batch in batches(jax.random.fold_in(key, epoch)):
        state = est.update(state, model_a(batch), model_b(batch))
    res = est.result(state)              # res.cka, res.stderr: [La, Lb]

  The jitted update donates the state: do not reuse a state passed to `update`.
  """

  def __init__(self, mesh: Mesh | None = None, *, grams: str = "auto", gram_blocks: int = 1,
               feature_chunk: int | None = None, precision: str = "highest",
               num_permutations: int = 0, num_bootstrap: int = 0, confidence: float = 0.95,
               seed: int = 0):
    """Builds the estimator.

    Args:
      mesh: one-axis mesh named `parallel.DATA_AXIS`; default one local device.
      grams: where each minibatch's Grams are computed, one of `GRAMS`: 'host' (CPU meshes
        only) by the host's BLAS as symmetric products (SYRK) on each device's rows, then
        the rest jitted; 'device' by XLA inside the jitted update (centred feature chunks);
        'auto' (default) is 'host' on a CPU mesh, 'device' otherwise and when `update` is
        traced (inside jit or scan). On a 2-core CPU the host's SYRK is ~1.7x faster than
        XLA's product (benchmarks/cka_bench.py). Both give the same numbers to float32
        rounding; a host Gram is of the features as they are when their means are small
        next to their spread (checked on the Gram), else of the features minus their first
        example.
      gram_blocks: device Grams: row blocks of the SYRK-like Gram (1 = one plain matrix
        product); more blocks save up to half the Gram FLOPs but use smaller matrix products
        (on a 2-core CPU with XLA's dot, 1 is fastest).
      feature_chunk: device Grams: features per chunk of each Gram (0 = no chunking);
        default 1024 on CPU (centring in cache), 0 on accelerators.
      precision: matrix-product precision, one of `PRECISIONS`: 'highest' (float32-accurate
        on every backend), or 'default' for the backend's fastest (TF32 / bfloat16 passes
        on GPUs / TPUs).
      num_permutations: K > 0 keeps a permutation null per cell (`CKAResult.p_value`,
        `null_mean`; `vit_repr.cka.calibration`): per minibatch, K gathers of B's U-centred
        Grams and K more `[La, b²] x [b², Lb]` products (2 La Lb b² FLOPs each, no new
        Gram); state `[K, La, Lb]` x2. 0 (default): off.
      num_bootstrap: B > 0 keeps B Poisson-bootstrap replicates over minibatches
        (`CKAResult.ci_low`, `ci_high`): 3 B La Lb multiply-adds per minibatch; state
        `[B, 3, La, Lb]` x2. 0 (default): off.
      confidence: level of the bootstrap interval, in (0, 1) (`result` may override it).
      seed: seed of `jax.random.key` for both, folded with each minibatch's global index.

    Raises:
      ValueError: on a mesh without the data axis, an unknown `grams`, 'host' Grams on a
        mesh of accelerators, gram_blocks < 1, feature_chunk < 0, an unknown precision,
        negative num_permutations / num_bootstrap or a confidence outside (0, 1).
    """
    mesh = streaming.data_mesh(mesh, "MinibatchCKA")
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    if grams not in GRAMS:
      raise ValueError(f"grams must be one of {GRAMS}; got {grams!r}.")
    if grams == "host" and not on_cpu:
      raise ValueError("grams='host' computes Grams with the host's BLAS and needs a mesh of "
                       "CPU devices; use grams='device' (or 'auto') on accelerators.")
    if gram_blocks < 1:
      raise ValueError(f"gram_blocks must be >= 1; got {gram_blocks}.")
    if feature_chunk is None:
      feature_chunk = _CPU_FEATURE_CHUNK if on_cpu else 0
    if feature_chunk < 0:
      raise ValueError(f"feature_chunk must be >= 0 (0 = no chunking); got {feature_chunk}.")
    self.mesh = mesh
    self.grams = grams
    self.host_grams = grams == "host" or (grams == "auto" and on_cpu)  # When not traced.
    self.gram_blocks = gram_blocks
    self.feature_chunk = feature_chunk
    self.precision = _check_precision(precision)
    self.calibration = calib.check_options(num_permutations, num_bootstrap, confidence, seed)
    self.confidence = float(confidence)

  def init(self, xs: Layers, ys: Layers | None = None, *,
           names_x: Sequence[str] | None = None,
           names_y: Sequence[str] | None = None) -> MinibatchCKAState:
    """An empty state for the layers of `xs` (and `ys`).

    Args:
      xs: model A's layers: a dict (keys = layer names) or a sequence of arrays; only the
        structure is used (a first batch or `jax.ShapeDtypeStruct`s).
      ys: model B's layers, or None for a within-model heatmap of xs against itself (which
        reuses the Grams and the symmetry).
      names_x: layer names for a sequence xs (default "0", "1", ...).
      names_y: layer names for a sequence ys.

    Returns:
      The zero state, replicated over the mesh.
    """
    names_x = _layer_names(xs, names_x, "xs")
    names_y = () if ys is None else _layer_names(ys, names_y, "ys")
    la, lb = len(names_x), len(names_y or names_x)
    zeros = np.zeros((len(_TERMS) + len(_PRODUCTS), la, lb), np.float32)
    state = MinibatchCKAState(
        shift=np.zeros((len(_TERMS), la, lb), np.float32), sums=zeros, compensation=zeros,
        calibration=self.calibration, **calib.empty_sums(self.calibration, la, lb),
        num_batches=np.zeros((), np.int32), num_examples=np.zeros((), np.int32),
        nonfinite_x=np.zeros(la, bool), nonfinite_y=np.zeros(lb, bool),
        varied_x=np.zeros(la, bool), varied_y=np.zeros(lb, bool),
        names_x=names_x, names_y=names_y)
    return streaming.replicated(state, self.mesh)

  def update(self, state: MinibatchCKAState, xs: Layers, ys: Layers | None = None, *,
             stacked: bool = False, valid: jax.typing.ArrayLike | None = None,
             minibatch_index: jax.typing.ArrayLike | None = None) -> MinibatchCKAState:
    """Folds one global batch into `state`. With device Grams it is jitted and does not wait
    for the host; with host Grams it waits for the features, computes their Grams, and
    returns once the jitted rest is dispatched.

    Args:
      state: from `init` or a previous `update` (donated), or restored with `from_numpy`.
      xs: model A's layers `[global_batch, ...]`, same structure as at `init`. Under a
        multi-host mesh, global arrays (`parallel.global_batch`).
      ys: model B's layers `[global_batch, ...]`; None iff the state is within-model.
      stacked: xs (and ys) are sequences of groups `[global_batch, k, ...]` of k layers
        stacked on axis 1 (layer j of a group is `group[:, j]`, features flattened), which
        cover the state's layers in the order of its names. Each group's k Grams are one
        batched computation, so the compiled update grows with the number of groups, not of
        layers (e.g. every token of a ViT layer as one group `[b, N, D]`); the state and the
        numbers (to float32 rounding) are those of the same layers passed one by one. A state
        for groups is initialised with one name per layer (`init(names, names_x=names)`).
      valid: `[global_batch]` bool, sharded like the layers (default all True): a device's
        minibatch counts only when all its rows are valid, so padding minibatches (the
        batch's `valid` of `data.eval_batches(..., minibatch_size=...)`) add nothing.
      minibatch_index: `[global_batch]` int, sharded like the layers: each row's global
        minibatch number (the same on a device's rows), which seeds the calibrations'
        draws, unique over the stream (e.g. the data plan's `parallel.minibatch_slots`, plus
        the pass times the minibatches per pass). Default: the minibatches' places in the
        stream (those accumulated before, plus the counted ones before it in mesh order),
        the same for any device count when every step holds the next minibatches in order.

    Returns:
      The new state.

    Raises:
      ValueError: on layers that differ from `init` (with `stacked`: groups whose k's do not
        add up to the layer count), mismatched example counts, a batch that does not split
        over the devices, fewer than 4 examples per device, or a state made with other
        calibration settings.
    """
    self._check_calibration(state)
    within = not state.names_y
    if within != (ys is None):
      raise ValueError(
          "The state was initialised " + ("without ys (within-model) but ys was given"
                                          if within else "with ys but ys is missing") +
          "; pass the same models to init and update.")
    checked = _stacked if stacked else _ordered
    arrays_x = checked(xs, state.names_x, "xs")
    arrays_y = () if within else checked(ys, state.names_y, "ys")
    label = lambda names, i: f"group {i}" if stacked else names[i]
    named = [("A", label(state.names_x, i), a) for i, a in enumerate(arrays_x)] + [
        ("B", label(state.names_y, i), a) for i, a in enumerate(arrays_y)]
    counts = {np.shape(a)[0] if np.ndim(a) else 0 for _, _, a in named}
    if len(counts) != 1:
      shapes = ", ".join(f"{m}:{n} {tuple(np.shape(a))}" for m, n, a in named)
      raise ValueError(f"All layers of both models must hold the same examples; got shapes "
                       f"{shapes}. Pass features of the same batch.")
    batch, devices = counts.pop(), self.mesh.devices.size
    if batch % devices or batch // devices < 4:
      raise ValueError(
          f"A global batch of {batch} examples over {devices} device(s) must split into "
          f"minibatches of at least 4 examples each (HSIC1 divides by b - 3); use a multiple "
          f"of {devices} that is >= {4 * devices}.")
    spans_hosts = any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)
    if spans_hosts and not all(isinstance(a, jax.Array) for _, _, a in named):
      raise ValueError("The mesh spans several processes: pass global arrays built with "
                       "parallel.global_batch, not host-local NumPy arrays (or use a mesh of "
                       "this process's devices, e.g. the default one).")
    if valid is None:
      valid = np.ones(batch, bool)
    if np.shape(valid) != (batch,):
      raise ValueError(f"valid must be one flag per example, shape ({batch},); got "
                       f"{np.shape(valid)}.")
    valid = self._rows(valid, batch, bool)
    if minibatch_index is not None:
      if np.shape(minibatch_index) != (batch,):
        raise ValueError(f"minibatch_index must be one number per example, shape ({batch},); "
                         f"got {np.shape(minibatch_index)}.")
      minibatch_index = self._rows(minibatch_index, batch, np.int32)
    traced = any(isinstance(a, jax.core.Tracer) for _, _, a in named)
    if traced and self.grams == "host":
      raise ValueError("grams='host' needs concrete arrays, but update is being traced (inside "
                       "jit or scan); use grams='auto' or 'device' there.")
    host_grams = self.host_grams and not traced
    if host_grams:
      arrays_x = _host_grams(arrays_x, stacked, self.mesh)
      arrays_y = arrays_y and _host_grams(arrays_y, stacked, self.mesh)
    placed = streaming.replicated(state, self.mesh)
    arrays = {f: getattr(placed, f) for f in _STATE_ARRAYS}
    arrays = _update(arrays, valid, arrays_x, None if within else arrays_y,
                     minibatch_size=batch // devices, host_grams=host_grams,
                     stacked=stacked, mesh=self.mesh, gram_blocks=self.gram_blocks,
                     feature_chunk=self.feature_chunk, precision=self.precision,
                     calibration=self.calibration, index=minibatch_index)
    return MinibatchCKAState(**arrays, names_x=state.names_x, names_y=state.names_y,
                             calibration=state.calibration)

  def _rows(self, flags: Any, batch: int, dtype: Any) -> Any:
    """Per-example values `[batch]` sharded like the layers (the same on every host)."""
    if isinstance(flags, jax.Array):
      return flags
    flags = np.asarray(flags, dtype)
    return jax.make_array_from_callback((batch,), parallel.batch_sharding(self.mesh),
                                        lambda index: flags[index])

  def _check_calibration(self, state: MinibatchCKAState) -> None:
    if tuple(state.calibration) != self.calibration:
      describe = lambda c: f"num_permutations={c[0]}, num_bootstrap={c[1]}, seed={c[2]}"
      raise ValueError(
          f"The state was made with {describe(state.calibration)}, this MinibatchCKA has "
          f"{describe(self.calibration)}: continuing would mix two calibrations. Use a "
          "MinibatchCKA with the state's settings, or start a new state with init.")

  def result(self, state: MinibatchCKAState, *, confidence: float | None = None) -> CKAResult:
    """The heatmap and its standard errors (one host synchronisation).

    With m = the means over B minibatches of the terms (h_xy, h_xx, h_yy), CKA =
    m_xy / sqrt(m_xx m_yy). Its standard error is the delta method on the means: with
    Σ the sample covariance (B - 1 denominator) of the per-minibatch terms and
    g = (1 / sqrt(m_xx m_yy), -CKA / (2 m_xx), -CKA / (2 m_yy)) the gradient,
    stderr = sqrt(gᵀ Σ g / B). It treats minibatches as independent (several passes over
    one example set make it an error bar for the minibatch sampling only) and is NaN for
    B = 1.

    With `num_permutations` K, `p_value` and `null_mean` compare CKA with its K null
    replicates; with `num_bootstrap`, `ci_low` and `ci_high` are the percentile interval of
    the bootstrap replicates (NaN for B = 1). See `vit_repr.cka.calibration`.

    Args:
      state: the accumulated state.
      confidence: level of the bootstrap interval (default the constructor's).

    Returns:
      A `CKAResult`. Rows (columns) of layers that never varied within a minibatch, for
      which CKA is undefined, are NaN, with a logged warning naming them.

    Raises:
      ValueError: if no minibatch was accumulated, a layer had NaN/Inf features (named), the
        state was made with other calibration settings, or a confidence outside (0, 1).
    """
    self._check_calibration(state)
    confidence = calib.check_confidence(self.confidence if confidence is None else confidence)
    host = state.to_numpy()
    names_y = state.names_y or state.names_x
    num_batches = streaming.check_accumulated(host["num_batches"], "minibatch")
    bad = [f"model A layer {n!r}" for n, f in zip(state.names_x, host["nonfinite_x"]) if f]
    if state.names_y:
      bad += [f"model B layer {n!r}" for n, f in zip(names_y, host["nonfinite_y"]) if f]
    if bad:
      raise ValueError(f"NaN or Inf features in {', '.join(bad)}: CKA is undefined. Check "
                       "these activations (e.g. overflow in float16) before computing CKA.")
    sums = streaming.kahan_total(host["sums"], host["compensation"])
    mean_d = sums[:len(_TERMS)] / num_batches
    m_xy, m_xx, m_yy = host["shift"].astype(np.float64) + mean_d
    with np.errstate(divide="ignore", invalid="ignore"):
      cka = m_xy / np.sqrt(m_xx * m_yy)
      grad = (1 / np.sqrt(m_xx * m_yy), -cka / (2 * m_xx), -cka / (2 * m_yy))
      if num_batches > 1:
        var = np.zeros_like(cka)
        for channel, (i, j) in enumerate(_PRODUCTS, start=len(_TERMS)):
          cov = (sums[channel] - sums[i] * sums[j] / num_batches) / (num_batches - 1)
          var += (1 if i == j else 2) * grad[i] * grad[j] * cov
        stderr = np.sqrt(np.maximum(var, 0) / num_batches)
      else:
        logging.info("One minibatch accumulated: standard errors are undefined (NaN).")
        stderr = np.full_like(cka, np.nan)
    undefined_x = ~host["varied_x"] | ~(m_xx[:, 0] > 0)
    undefined_y = ~host["varied_y"] | ~(m_yy[0, :] > 0)
    for model, names, undefined in (("A", state.names_x, undefined_x),
                                    ("B", names_y, undefined_y)):
      if undefined.any() and (model == "A" or state.names_y):
        logging.warning(
            "CKA is undefined (NaN) for constant (zero-variance) layers of model %s: %s.",
            model, ", ".join(n for n, u in zip(names, undefined) if u))
    cka[undefined_x, :] = np.nan
    cka[:, undefined_y] = np.nan
    calibrated = calib.calibrated_result(host, cka, m_xx, m_yy, num_batches,
                                         self.calibration, confidence)
    for a in (stderr, *calibrated.values()):
      if a is not None:
        a[undefined_x, :] = np.nan
        a[:, undefined_y] = np.nan
    return CKAResult(cka=cka, stderr=stderr, names_x=state.names_x, names_y=names_y,
                     num_batches=num_batches, num_examples=int(host["num_examples"]),
                     **calibrated)


def minibatch_cka(xs: Layers, ys: Layers | None = None, *, batch_size: int = 256,
                  mesh: Mesh | None = None, names_x: Sequence[str] | None = None,
                  names_y: Sequence[str] | None = None, precision: str = "highest",
                  num_permutations: int = 0, num_bootstrap: int = 0,
                  confidence: float = 0.95, seed: int = 0) -> np.ndarray | CKAResult:
  """Minibatch CKA heatmap over whole arrays, in consecutive minibatches.

  Args:
    xs: model A's layers, a dict or sequence of arrays `[n, ...]` (features flattened).
    ys: model B's layers `[n, ...]`; None for the within-model heatmap of xs.
    batch_size: minibatch size b >= 4 (the reference code uses 256).
    mesh: run under this mesh (default one local device); each step then takes one
      minibatch per device (`parallel.minibatch_slots`), the same minibatches for any
      device count.
    names_x: layer names for a sequence xs.
    names_y: layer names for a sequence ys.
    precision: matrix-product precision, one of `PRECISIONS` (see `MinibatchCKA`).
    num_permutations: K null replicates (see `MinibatchCKA`); 0: off.
    num_bootstrap: B bootstrap replicates over minibatches (see `MinibatchCKA`); 0: off.
    confidence: level of the bootstrap interval.
    seed: seed of both; minibatch j (examples `[j b, (j + 1) b)`) draws with index j, so
      the numbers are the same for any device count.

  Returns:
    `[len(xs), len(ys)]` float64 CKA heatmap (`[len(xs), len(xs)]` when ys is None); with a
    calibration, the whole `CKAResult` (heatmap `.cka`, `.p_value`, `.ci_low`, ...). The
    trailing examples that do not fill a minibatch are dropped (logged). Use `MinibatchCKA` for
    several passes or streaming.

  Raises:
    ValueError: on mismatched example counts, batch_size < 4, too few examples or bad
      calibration settings.
  """
  if batch_size < 4:
    raise ValueError(f"batch_size must be >= 4 (HSIC1 divides by b - 3); got {batch_size}.")
  estimator = MinibatchCKA(mesh, precision=precision, num_permutations=num_permutations,
                           num_bootstrap=num_bootstrap, confidence=confidence, seed=seed)
  state = estimator.init(xs, ys, names_x=names_x, names_y=names_y)
  arrays = _ordered(xs, state.names_x, "xs") + (
      () if ys is None else _ordered(ys, state.names_y, "ys"))
  counts = [np.shape(a)[0] for a in arrays]
  if len(set(counts)) != 1:
    raise ValueError(f"All layers of both models must hold the same examples; got shapes "
                     f"{[tuple(np.shape(a)) for a in arrays]}.")
  num_minibatches = counts[0] // batch_size
  if num_minibatches == 0:
    raise ValueError(f"{counts[0]} examples do not fill one minibatch of {batch_size}; use "
                     "more examples or a smaller batch_size.")
  if counts[0] % batch_size:
    logging.info("minibatch_cka: dropping the last %d of %d examples (not a full minibatch "
                 "of %d).", counts[0] % batch_size, counts[0], batch_size)
  rows = np.arange(batch_size)
  for slots in parallel.minibatch_slots(num_minibatches, estimator.mesh.devices.size):
    index = (np.maximum(slots, 0)[:, None] * batch_size + rows).ravel()
    chunk = lambda layers: [a[index] for a in layers]
    state = estimator.update(
        state, chunk(arrays[:len(state.names_x)]),
        None if ys is None else chunk(arrays[len(state.names_x):]),
        valid=np.repeat(slots >= 0, batch_size),
        minibatch_index=np.repeat(np.maximum(slots, 0), batch_size) if (
            num_permutations or num_bootstrap) else None)
  result = estimator.result(state)
  return result if num_permutations or num_bootstrap else result.cka
