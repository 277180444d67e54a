"""BiT ResNet-v2 (Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020, arXiv 1912.11370).

The pre-activation bottleneck ResNet-v2 with GroupNorm and weight-standardised convolutions, as
google-research/big_transfer defines it, one of the two CNN families of Raghu et al. (NeurIPS
2021). The parameter tree is exactly the big_transfer `.npz` key layout without its leading
`resnet/` (wf = width factor, s = stage 1..4, uu = unit 01.., C = num_classes):

  root_block/standardized_conv2d/kernel              [7, 7, 3, 64wf]
  block{s}/unit{uu}/a/group_norm/{gamma,beta}        [cin]
  block{s}/unit{uu}/a/standardized_conv2d/kernel     [1, 1, cin, cmid]
  block{s}/unit01/a/proj/standardized_conv2d/kernel  [1, 1, cin, 4cmid]
  block{s}/unit{uu}/b/group_norm/{gamma,beta}        [cmid]
  block{s}/unit{uu}/b/standardized_conv2d/kernel     [3, 3, cmid, cmid]
  block{s}/unit{uu}/c/group_norm/{gamma,beta}        [cmid]
  block{s}/unit{uu}/c/standardized_conv2d/kernel     [1, 1, cmid, 4cmid]
  group_norm/{gamma,beta}                            [2048wf]
  head/conv2d/{kernel [1, 1, 2048wf, C], bias [C]}

with cmid = 64wf * 2^(s-1) and cin the unit's input width. Each of a, b, c is GroupNorm + ReLU
followed by its convolution (pre-activation); `a/proj` projects the pre-activated input (after
a's GroupNorm + ReLU) and exists only in units whose input and output shapes differ. The stem
is a 7x7 stride-2 convolution (input padded by 3), zero padding by 1 and a 3x3 stride-2 VALID
max-pool, with no normalisation. Stage strides are 1, 2, 2, 2 and `b` carries the stride (input
padded by 1, VALID). GroupNorm: 32 groups, eps 1e-5, statistics over (H, W, channels of the
group). Weight standardisation per output channel over (H, W, in): (w - mean) / sqrt(var +
1e-10), recomputed from `kernel` on every call, as in the original code.

Intermediates, sown into the 'intermediates' collection (names are module path + tag, for a
[b, H, W, 3] input; (h, w) is the stage's resolution: H/4, H/8, H/16, H/32, rounded up):

  root_block/out             [b, H/4, W/4, 64wf]   stem output, after the max-pool
  block{s}/unit{uu}/branch   [b, h, w, 4cmid]      f(z): the unit's residual branch (c's output)
  block{s}/unit{uu}/out      [b, h, w, 4cmid]      z + f(z) (f(z) for a unit in remove_skips)
  block{s}/out               [b, h, w, 4cmid]      stage output (its last unit's output)
  pre_logits                 [b, 2048wf]           after the final GroupNorm + ReLU + mean pool
  logits                     [b, C]                float32

z, the skip path, is the unit's input (the previous `out`, or `root_block/out`) except in the
projecting units (`unit01` of every stage with a changed width or stride), where z = out - branch.
Sown values have the compute dtype (float32 or bfloat16); parameters are always float32.

The model describes itself (`vit_repr.models.layout`): `residual_sublayers()` lists every unit
but those of `remove_skips` with that z and f = branch; `token_layout()` is None, as the
representations are feature maps, not token sequences.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_repr.models import layout, variants

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-5
WEIGHT_STANDARDIZATION_EPS = 1e-10

VARIANTS: dict[str, dict[str, Any]] = {
    "R50x1": {"units_per_stage": (3, 4, 6, 3), "width_factor": 1},
    "R50x3": {"units_per_stage": (3, 4, 6, 3), "width_factor": 3},
    "R101x1": {"units_per_stage": (3, 4, 23, 3), "width_factor": 1},
    "R101x3": {"units_per_stage": (3, 4, 23, 3), "width_factor": 3},
    "R152x2": {"units_per_stage": (3, 8, 36, 3), "width_factor": 2},
    "R152x4": {"units_per_stage": (3, 8, 36, 3), "width_factor": 4},
}


def standardize_weight(kernel: jax.typing.ArrayLike,
                       eps: float = WEIGHT_STANDARDIZATION_EPS) -> jax.Array:
  """Weight standardisation (Qiao et al., 2019) of an HWIO convolution kernel, in float32.

  Args:
    kernel: `[kh, kw, in, out]`.
    eps: added to the variance under the square root (1e-10 in big_transfer).

  Returns:
    `[kh, kw, in, out]` float32: (kernel - mean) / sqrt(var + eps), with mean and (biased)
    variance taken per output channel over (kh, kw, in).
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  centred = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  variance = jnp.mean(jnp.square(centred), axis=(0, 1, 2), keepdims=True)
  return centred * jax.lax.rsqrt(variance + eps)


def _projects_shortcut(in_width: int, out_width: int, strides: int) -> bool:
  """Whether a unit's shortcut is projected (`a/proj`): its width or resolution changes."""
  return in_width != out_width or strides != 1


def _same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """big_transfer's `fixed_padding`: (k-1)//2 before, the rest after, independent of stride."""
  before = (kernel_size - 1) // 2
  return ((before, kernel_size - 1 - before),) * 2


class GroupNorm(nn.Module):
  """GroupNorm (Wu & He, 2018) with big_transfer's parameter names `gamma` and `beta`.

  Statistics are computed in float32 over (H, W, channels of the group); the result is cast to
  `dtype`.
  """
  num_groups: int = GROUP_NORM_GROUPS
  epsilon: float = GROUP_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Normalises `x` `[b, h, w, c]` (c divisible by `num_groups`) -> `[b, h, w, c]`."""
    x = jnp.asarray(x)
    batch, height, width, channels = x.shape
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm with {self.num_groups} groups needs channels divisible by "
                       f"{self.num_groups}; got {channels}. Change the width (or num_groups).")
    gamma = self.param("gamma", nn.initializers.ones, (channels,), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (channels,), jnp.float32)
    grouped = x.astype(jnp.float32).reshape(
        batch, height, width, self.num_groups, channels // self.num_groups)
    mean = jnp.mean(grouped, axis=(1, 2, 4), keepdims=True)
    variance = jnp.mean(jnp.square(grouped - mean), axis=(1, 2, 4), keepdims=True)
    # Fold the statistics and the affine parameters into one per-(example, channel) scale and
    # shift, so the full-size tensor is touched by a single multiply-add.
    scale = jax.lax.rsqrt(variance + self.epsilon) * gamma.reshape(
        self.num_groups, channels // self.num_groups)
    shift = beta.reshape(self.num_groups, channels // self.num_groups) - mean * scale
    scale = scale.reshape(batch, 1, 1, channels)
    shift = shift.reshape(batch, 1, 1, channels)
    return (x.astype(jnp.float32) * scale + shift).astype(self.dtype)


class StandardizedConv(nn.Module):
  """Bias-free convolution of a weight-standardised kernel; param `kernel` `[k, k, in, out]`.

  Padding is big_transfer's explicit `fixed_padding` ((k-1)//2 before, the rest after) followed
  by a VALID convolution, so strided outputs match the original (not TensorFlow's SAME).
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Convolves `x` `[b, h, w, in]` -> `[b, ceil(h/strides), ceil(w/strides), features]`."""
    x = jnp.asarray(x)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    if self.kernel_size == 1:  # A channel matmul: XLA:CPU runs it 1.4-5x faster than a conv.
      x = x[:, ::self.strides, ::self.strides]
      return jnp.einsum("bhwc,cd->bhwd", x.astype(self.dtype),
                        standardize_weight(kernel)[0, 0].astype(self.dtype))
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), standardize_weight(kernel).astype(self.dtype),
        window_strides=(self.strides, self.strides), padding=_same_padding(self.kernel_size),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Projection(nn.Module):
  """The shortcut projection `proj`: a 1x1 standardised convolution named as in big_transfer."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Projects `x` `[b, h, w, in]` -> `[b, h/strides, w/strides, features]`."""
    return StandardizedConv(self.features, 1, self.strides, self.dtype,
                            name="standardized_conv2d")(x)


class PreActConv(nn.Module):
  """GroupNorm + ReLU + standardised convolution: one of a unit's `a`, `b`, `c`.

  With `proj_features`, also projects the pre-activated input through `proj` (unit `a` of a
  projecting unit) and returns the projection as the second output, else None.
  """
  features: int
  kernel_size: int
  strides: int = 1
  proj_features: int | None = None
  proj_strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array | None]:
    """`x` `[b, h, w, in]` -> (`[b, h/strides, w/strides, features]`, projection or None)."""
    x = nn.relu(GroupNorm(dtype=self.dtype, name="group_norm")(x))
    projection = None
    if self.proj_features is not None:
      projection = Projection(self.proj_features, self.proj_strides, self.dtype,
                              name="proj")(x)
    y = StandardizedConv(self.features, self.kernel_size, self.strides, self.dtype,
                         name="standardized_conv2d")(x)
    return y, projection


class BottleneckUnit(nn.Module):
  """Pre-activation bottleneck unit: z + f(z), f = c(b(a(z))); or f(z) alone if not `skip`.

  The shortcut z is projected (`a/proj`, carrying the stride) when the input width differs from
  4 * `cmid` or `strides` > 1. A unit without skip has no projection parameters.
  """
  cmid: int
  strides: int = 1
  skip: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """`x` `[b, h, w, cin]` -> `[b, h/strides, w/strides, 4 cmid]`; sows `branch` and `out`."""
    x = jnp.asarray(x)
    cout = 4 * self.cmid
    project = self.skip and _projects_shortcut(x.shape[-1], cout, self.strides)
    y, shortcut = PreActConv(self.cmid, 1, proj_features=cout if project else None,
                             proj_strides=self.strides, dtype=self.dtype, name="a")(x)
    y, _ = PreActConv(self.cmid, 3, self.strides, dtype=self.dtype, name="b")(y)
    y, _ = PreActConv(cout, 1, dtype=self.dtype, name="c")(y)
    self.sow("intermediates", "branch", y)
    if self.skip:
      y = y + (x.astype(self.dtype) if shortcut is None else shortcut)
    self.sow("intermediates", "out", y)
    return y


class Stage(nn.Module):
  """A stage `block{s}`: bottleneck units `unit01`, `unit02`, ...; the first carries the stride.

  `skips[i]` says whether unit i keeps its skip connection.
  """
  cmid: int
  strides: int
  skips: Sequence[bool]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """`x` `[b, h, w, cin]` -> `[b, h/strides, w/strides, 4 cmid]`; sows `out`."""
    for i, skip in enumerate(self.skips):
      x = BottleneckUnit(self.cmid, self.strides if i == 0 else 1, skip, self.dtype,
                         name=f"unit{i + 1:02d}")(x)
    self.sow("intermediates", "out", x)
    return x


class RootBlock(nn.Module):
  """Stem `root_block`: 7x7/2 standardised conv, zero-pad 1, 3x3/2 VALID max-pool; no norm."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """`x` `[b, H, W, 3]` -> `[b, H/4, W/4, width]`; sows `out`."""
    x = StandardizedConv(self.width, 7, 2, self.dtype, name="standardized_conv2d")(x)
    # big_transfer pads with zeros (not -inf) before the max-pool; the stem has no ReLU, so
    # the zeros can win at the border.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    self.sow("intermediates", "out", x)
    return x


class Head(nn.Module):
  """Classifier `head`: the 1x1 convolution `conv2d` with bias, applied to pooled features."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
    """`x` `[b, width]` -> logits `[b, num_classes]`. Zero-initialised, as in big_transfer."""
    x = jnp.asarray(x)[:, None, None, :]
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.zeros, name="conv2d")(x)
    return x[:, 0, 0, :]


def _check_fields(units_per_stage: Sequence[int], width_factor: float, num_classes: int,
                  image_size: int, dtype: Any, remove_skips: Sequence[int]) -> None:
  """Raises ValueError for an invalid ResNet configuration, saying how to fix it."""
  if (not isinstance(units_per_stage, Sequence) or not units_per_stage
      or not all(isinstance(n, int) and n > 0 for n in units_per_stage)):
    raise ValueError(f"units_per_stage must be a non-empty tuple of positive ints, e.g. "
                     f"(3, 4, 6, 3); got {units_per_stage!r}.")
  stem_width = 64 * width_factor
  if (not width_factor > 0 or stem_width != int(stem_width)
      or int(stem_width) % GROUP_NORM_GROUPS):
    raise ValueError(f"width_factor={width_factor!r} gives {stem_width} stem channels; GroupNorm"
                     f" needs a positive multiple of {GROUP_NORM_GROUPS}: use a multiple of 0.5"
                     f" (0.5, 1, 2, 3, 4).")
  if not isinstance(num_classes, int) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
  if not isinstance(image_size, int) or image_size <= 0:
    raise ValueError(f"image_size must be a positive int (e.g. 224); got {image_size!r}.")
  variants.check_dtype(dtype)
  variants.check_remove_skips(remove_skips, sum(units_per_stage), unit="unit")


class ResNet(nn.Module):
  """BiT ResNet-v2 classifier; see the module docstring for parameters and intermediates.

  Attributes:
    num_classes: classes of the head.
    image_size: the side of the square RGB inputs the model accepts.
    units_per_stage: bottleneck units in each stage, e.g. (3, 4, 6, 3) for R50.
    width_factor: multiplies every width (64wf stem channels); a multiple of 0.5.
    dtype: compute dtype (parameters stay float32; GroupNorm statistics are float32).
    remove_skips: flat 0-based indices (over all units, stage by stage) of the units whose skip
      connection is removed: such a unit returns f(z) instead of z + f(z).
  """
  num_classes: int = 1000
  image_size: int = 224
  units_per_stage: Sequence[int] = (3, 4, 6, 3)
  width_factor: float = 1
  dtype: Any = jnp.float32
  remove_skips: Sequence[int] = ()

  def __post_init__(self):
    _check_fields(self.units_per_stage, self.width_factor, self.num_classes, self.image_size,
                  self.dtype, self.remove_skips)
    super().__post_init__()

  @nn.nowrap
  def _stages(self) -> list[tuple[int, int]]:
    """(cmid, strides) of each stage `block{s}`: cmid = 64wf * 2^(s-1), strides 1, 2, 2, ..."""
    width = int(64 * self.width_factor)
    return [(width * 2**s, 1 if s == 0 else 2) for s in range(len(self.units_per_stage))]

  @nn.nowrap
  def token_layout(self) -> None:
    """None: the representations are feature maps `[h, w, C]` (no token sequence), with a
    grid that differs per stage and is read from their shapes."""
    return None

  @nn.nowrap
  def attention_layers(self) -> tuple[layout.AttentionLayer, ...]:
    """Empty: this model has no self-attention."""
    return ()

  @nn.nowrap
  def residual_sublayers(self) -> tuple[layout.SubLayer, ...]:
    """The residual sub-layers in computation order: every unit 'block{s}/unit{uu}' but those of
    `remove_skips`, f = '.../branch'; z = the unit's input (the previous unit's 'out') for an
    identity shortcut, else the projected shortcut '.../out' - '.../branch'."""
    removed = set(self.remove_skips)
    found = []
    previous, in_width, index = "root_block/out", int(64 * self.width_factor), 0
    for s, (num_units, (cmid, strides)) in enumerate(zip(self.units_per_stage, self._stages())):
      for u in range(num_units):
        unit = f"block{s + 1}/unit{u + 1:02d}"
        project = _projects_shortcut(in_width, 4 * cmid, strides if u == 0 else 1)
        if index not in removed:
          found.append(layout.SubLayer(unit, f"{unit}/out" if project else previous,
                                       f"{unit}/branch", index, stream_minus_branch=project))
        previous, in_width, index = f"{unit}/out", 4 * cmid, index + 1
    return tuple(found)

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, *, train: bool = False) -> jax.Array:
    """Classifies `images`.

    Args:
      images: `[batch, image_size, image_size, 3]`, typically in [-1, 1].
      train: unused (BiT has no dropout or batch statistics); kept for the shared signature.

    Returns:
      Logits `[batch, num_classes]`, float32.

    Raises:
      ValueError: `images` is not `[batch, image_size, image_size, 3]`.
    """
    del train
    images = jnp.asarray(images)
    variants.check_images(images, self.image_size, "BiT ResNet")
    removed = set(self.remove_skips)
    x = RootBlock(int(64 * self.width_factor), self.dtype, name="root_block")(images)
    first_unit = 0
    for s, (num_units, (cmid, strides)) in enumerate(zip(self.units_per_stage, self._stages())):
      skips = tuple(first_unit + i not in removed for i in range(num_units))
      x = Stage(cmid, strides, skips, self.dtype, name=f"block{s + 1}")(x)
      first_unit += num_units
    x = nn.relu(GroupNorm(dtype=self.dtype, name="group_norm")(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    self.sow("intermediates", "pre_logits", x)
    logits = Head(self.num_classes, self.dtype, name="head")(x).astype(jnp.float32)
    self.sow("intermediates", "logits", logits)
    return logits


def from_variant(variant: str, **overrides) -> ResNet:
  """Builds the BiT ResNet-v2 `variant` ('R50x1', ..., see `VARIANTS`).

  Args:
    variant: a key of `VARIANTS`.
    **overrides: replace the variant's defaults; any of num_classes, image_size,
      units_per_stage, width_factor, dtype, remove_skips.

  Returns:
    An unbound `ResNet`.

  Raises:
    ValueError: unknown variant or override (the message lists the accepted ones), or an
      invalid field value.
  """
  return variants.build(ResNet, "BiT", VARIANTS, variant, overrides)
