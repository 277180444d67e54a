"""MLP-Mixer (Tolstikhin et al., NeurIPS 2021, arXiv 2105.01601) that sows its representations.

The Mixer of google-research/vision_transformer, which Raghu et al., "Do Vision Transformers See
Like Convolutional Neural Networks?" (NeurIPS 2021) compare with ViT and ResNet. Module and
parameter names are those of the public `.npz` checkpoints. With N = (image_size /
patch_size)^2 tokens, D = hidden_size, S = tokens_mlp_dim, F = channels_mlp_dim and C =
num_classes, the parameters are:

  stem/{kernel [p, p, 3, D], bias [D]}                         patch embedding
  MixerBlock_{i}/LayerNorm_0/{scale, bias}                     [D]
  MixerBlock_{i}/token_mixing/Dense_0/{kernel [N, S], bias [S]}   (applied across tokens)
  MixerBlock_{i}/token_mixing/Dense_1/{kernel [S, N], bias [N]}
  MixerBlock_{i}/LayerNorm_1/{scale, bias}                     [D]
  MixerBlock_{i}/channel_mixing/Dense_0/{kernel [D, F], bias [F]}
  MixerBlock_{i}/channel_mixing/Dense_1/{kernel [F, D], bias [D]}
  pre_head_layer_norm/{scale, bias}                            [D]
  head/{kernel [D, C], bias [C]}

As in the original: LayerNorm eps 1e-6, tanh-approximated GELU (Flax's default), no position
embedding and no CLS token, the mean over tokens after `pre_head_layer_norm`, a zero-initialised
head.

Intermediates, sown into the 'intermediates' collection (names are module path + tag,
'/'-joined; `vit_repr.models.flatten_intermediates` gives a flat dict), for b images:

  stem_tokens                              [b, N, D]  patch embeddings entering block 0
  MixerBlock_{i}/in                        [b, N, D]  block input z
  MixerBlock_{i}/token_mixing_branch       [b, N, D]  f(z): token-mixing MLP of LN(z)
  MixerBlock_{i}/mid                       [b, N, D]  y = z + f(z) (f(z) without the skip)
  MixerBlock_{i}/channel_mixing_branch     [b, N, D]  g(y): channel-mixing MLP of LN(y)
  MixerBlock_{i}/out                       [b, N, D]  y + g(y) (g(y) without the skip)
  pre_head_layer_norm_out                  [b, N, D]  pre_head_layer_norm of the last out
  pre_logits                               [b, D]     mean over tokens, the head's input
  logits                                   [b, C]     float32

Blocks listed in `remove_skips` drop both residual additions. Sown values have the compute dtype
(float32 or bfloat16), except the float32 logits; parameters are always float32.

The model describes itself (`vit_repr.models.layout`): `token_layout()` (the
(image_size / patch_size)^2 patches, row-major, no prefix token) and `residual_sublayers()`
(per block 'token_mixing': z = in, f = token_mixing_branch; 'channel_mixing': z = mid,
f = channel_mixing_branch; blocks in `remove_skips` left out).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_repr.models import layout, variants
from vit_repr.models.vit import LAYER_NORM_EPS

# Mixer sizes (Table 1 of the Mixer paper): width, depth, token-MLP width, channel-MLP width.
_SIZES: dict[str, dict[str, int]] = {
    "S": {"hidden_size": 512, "depth": 8, "tokens_mlp_dim": 256, "channels_mlp_dim": 2048},
    "B": {"hidden_size": 768, "depth": 12, "tokens_mlp_dim": 384, "channels_mlp_dim": 3072},
    "L": {"hidden_size": 1024, "depth": 24, "tokens_mlp_dim": 512, "channels_mlp_dim": 4096},
}
VARIANTS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": {**_SIZES[size], "patch_size": patch}
    for size in ("S", "B", "L") for patch in (32, 16)
}


class MlpBlock(nn.Module):
  """Dense_0 (width `mlp_dim`), tanh-GELU, Dense_1 (back to the input width), on the last axis.

  Attributes:
    mlp_dim: hidden width.
    dtype: compute dtype.
  """
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[..., n]` to `[..., n]`."""
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    y = nn.gelu(y, approximate=True)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="Dense_1")(y)


class MixerBlock(nn.Module):
  """y = z + TokenMLP(LN(z)^T)^T, out = y + ChannelMLP(LN(y)).

  Attributes:
    tokens_mlp_dim: hidden width S of the token-mixing MLP.
    channels_mlp_dim: hidden width F of the channel-mixing MLP.
    skip: False drops both residual additions.
    dtype: compute dtype.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  skip: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """Maps tokens `[b, N, D]` to `[b, N, D]`, sowing the block's intermediates."""
    self.sow("intermediates", "in", z)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="LayerNorm_0")(z)
    y = MlpBlock(self.tokens_mlp_dim, self.dtype, name="token_mixing")(jnp.swapaxes(y, 1, 2))
    token_branch = jnp.swapaxes(y, 1, 2)
    self.sow("intermediates", "token_mixing_branch", token_branch)
    mid = z + token_branch if self.skip else token_branch
    self.sow("intermediates", "mid", mid)
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="LayerNorm_1")(mid)
    channel_branch = MlpBlock(self.channels_mlp_dim, self.dtype, name="channel_mixing")(y)
    self.sow("intermediates", "channel_mixing_branch", channel_branch)
    out = mid + channel_branch if self.skip else channel_branch
    self.sow("intermediates", "out", out)
    return out


class MlpMixer(nn.Module):
  """MLP-Mixer classifier; see the module docstring for its parameters and intermediates.

  Attributes:
    num_classes: classes of the head (C).
    image_size: side of the square RGB inputs; a multiple of patch_size.
    patch_size: side p of the square patches.
    hidden_size: channel width D.
    depth: number of Mixer blocks.
    tokens_mlp_dim: hidden width of the token-mixing MLPs.
    channels_mlp_dim: hidden width of the channel-mixing MLPs.
    remove_skips: 0-based indices of the blocks whose two skip connections are removed.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  tokens_mlp_dim: int = 384
  channels_mlp_dim: int = 3072
  remove_skips: Sequence[int] = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    positive = {"num_classes": self.num_classes, "image_size": self.image_size,
                "patch_size": self.patch_size, "hidden_size": self.hidden_size,
                "depth": self.depth, "tokens_mlp_dim": self.tokens_mlp_dim,
                "channels_mlp_dim": self.channels_mlp_dim}
    bad = {k: v for k, v in positive.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
      raise ValueError(f"Mixer fields {sorted(bad)} must be positive integers; got {bad}.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size="
                       f"{self.patch_size}; choose an image_size divisible by the patch size.")
    variants.check_remove_skips(self.remove_skips, self.depth)
    variants.check_dtype(self.dtype)
    super().__post_init__()

  @nn.nowrap
  def token_layout(self) -> layout.TokenLayout:
    """The tokens `[N, D]` of every block: the `image_size / patch_size` square grid of
    patches, row-major, without prefix tokens."""
    side = int(self.image_size // self.patch_size)
    return layout.TokenLayout(grid=(side, side), patch_size=int(self.patch_size))

  @nn.nowrap
  def attention_layers(self) -> tuple[layout.AttentionLayer, ...]:
    """Empty: this model has no self-attention."""
    return ()

  @nn.nowrap
  def residual_sublayers(self) -> tuple[layout.SubLayer, ...]:
    """The residual sub-layers in computation order: per block i (but those of
    `remove_skips`) 'MixerBlock_{i}/token_mixing' (z = '.../in', f =
    '.../token_mixing_branch') and '.../channel_mixing' (z = '.../mid', f =
    '.../channel_mixing_branch')."""
    removed = set(self.remove_skips)
    found = []
    for i in range(self.depth):
      if i in removed:
        continue
      block = f"MixerBlock_{i}"
      found.append(layout.SubLayer(f"{block}/token_mixing", f"{block}/in",
                                   f"{block}/token_mixing_branch", i))
      found.append(layout.SubLayer(f"{block}/channel_mixing", f"{block}/mid",
                                   f"{block}/channel_mixing_branch", i))
    return tuple(found)

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, *, train: bool = False) -> jax.Array:
    """Classifies `images`.

    Args:
      images: `[batch, image_size, image_size, 3]`, typically in [-1, 1].
      train: unused (the Mixer has no dropout); kept for the shared signature.

    Returns:
      Logits `[batch, num_classes]`, float32.

    Raises:
      ValueError: `images` is not `[batch, image_size, image_size, 3]`.
    """
    del train
    images = jnp.asarray(images)
    variants.check_images(images, self.image_size, "MLP-Mixer")
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", dtype=self.dtype,
                name="stem")(images)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    self.sow("intermediates", "stem_tokens", x)
    removed = set(self.remove_skips)
    for i in range(self.depth):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, i not in removed, self.dtype,
                     name=f"MixerBlock_{i}")(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="pre_head_layer_norm")(x)
    self.sow("intermediates", "pre_head_layer_norm_out", x)
    x = jnp.mean(x, axis=1)
    self.sow("intermediates", "pre_logits", x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name="head")(x).astype(jnp.float32)
    self.sow("intermediates", "logits", logits)
    return logits


def from_variant(variant: str, **overrides) -> MlpMixer:
  """Builds the MLP-Mixer `variant` ('S/32', 'B/16', ..., see `VARIANTS`).

  Args:
    variant: a key of `VARIANTS`.
    **overrides: replace the variant's defaults; any constructor field (num_classes, image_size,
      patch_size, hidden_size, depth, tokens_mlp_dim, channels_mlp_dim, remove_skips, dtype).

  Returns:
    An unbound `MlpMixer`.

  Raises:
    ValueError: unknown variant or override (the message lists the accepted ones), or an
      invalid field value.
  """
  return variants.build(MlpMixer, "Mixer", VARIANTS, variant, overrides)
