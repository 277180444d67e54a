"""Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929), sowing its representations.

The ViT of google-research/vision_transformer, the main model family of Raghu et al., "Do Vision
Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021), and the layouts of
google-research/big_vision's ViT (SigLIP image towers among them): attention pooling
(classifier='map'), the fixed 2-D sine-cosine position embedding (posemb='sincos2d') and the
So400m sizes; and the options of timm's ViT families (DeiT / DeiT III, DINOv2, OpenAI and
OpenCLIP image towers): LayerScale (layer_scale_init), the MLP activation (mlp_activation), the
LayerNorm epsilon (layer_norm_eps), a patch embedding without bias (patch_bias), a LayerNorm
before the first block (pre_norm), register tokens (num_registers) and DeiT's distillation token
and head (distillation). Module and parameter names are those of the public `.npz` checkpoints,
so loading one is an unflatten of its '/'-joined keys (see `vit_repr.checkpoints`). With P prefix
tokens (CLS for classifier='token', then the distillation token, then R' = num_registers
registers), N = (image_size / patch_size)^2 patches and T = P + N tokens, D = hidden_size, H heads
of size d = D / H, F = mlp_dim, R = representation_size and C = num_classes, the parameters are:

  embedding/{kernel [p, p, 3, D], bias [D]}             patch embedding (a stride-p convolution;
                                                           no bias if patch_bias=False)
  cls                                           [1, 1, D]  (classifier='token' only)
  dist                                          [1, 1, D]  (distillation only)
  registers                                     [1, R', D] (num_registers > 0 only)
  Transformer/posembed_input/pos_embedding      [1, T, D]  (posemb='learn' only; a slot per prefix
                                                           token, in token order; [1, N, D] if
                                                           posemb_includes_cls=False)
  Transformer/pre_norm/{scale, bias}            [D]        (pre_norm only)
  Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}                 [D]
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query, key, value}/kernel [D, H, d]
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query, key, value}/bias   [H, d]
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/{kernel [H, d, D], bias [D]}
  Transformer/encoderblock_{i}/LayerNorm_2/{scale, bias}                 [D]
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/{kernel [D, F], bias [F]}
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_1/{kernel [F, D], bias [D]}
  Transformer/encoderblock_{i}/{ls1, ls2}/gamma                          [D]
                                        (layer_scale_init set only; DeiT III's and DINOv2's
                                        `blocks.{i}.ls1.gamma`, `ls2.gamma`)
  Transformer/encoder_norm/{scale, bias}                                 [D]
  MAPHead_0/probe                                                        [1, 1, D]
  MAPHead_0/MultiHeadDotProductAttention_0/{query, key, value}/kernel    [D, H, d]
  MAPHead_0/MultiHeadDotProductAttention_0/{query, key, value}/bias      [H, d]
  MAPHead_0/MultiHeadDotProductAttention_0/out/{kernel [H, d, D], bias [D]}
  MAPHead_0/LayerNorm_0/{scale, bias}                                    [D]
  MAPHead_0/MlpBlock_0/Dense_0/{kernel [D, F], bias [F]}
  MAPHead_0/MlpBlock_0/Dense_1/{kernel [F, D], bias [D]}   (MAPHead_0: classifier='map' only)
  pre_logits/{kernel [D, R], bias [R]}                     (representation_size set only)
  head/{kernel [D or R, C], bias [C]}
  head_dist/{kernel [D, C], bias [C]}                      (distillation only)

As in the original: pre-norm blocks, LayerNorm eps 1e-6 (layer_norm_eps; OpenAI CLIP: 1e-5),
GELU with the tanh approximation (Flax's default; mlp_activation='gelu_tanh'; 'gelu' is the exact
erf GELU of timm's nn.GELU, 'quick_gelu' CLIP's x * sigmoid(1.702 x), in every MlpBlock, the
MAP head's included), attention logits scaled by 1/sqrt(d), the prefix tokens concatenated BEFORE
the position embedding is added (posemb_includes_cls=True, timm's no_embed_class=False;
big_vision checkpoints add it to the patches before concatenating them, posemb_includes_cls=False,
timm's no_embed_class=True), with pre_norm a LayerNorm of those tokens (CLIP's ln_pre, timm's
norm_pre), the encoder norm applied to all tokens before pooling ('token': the CLS output; 'gap':
the mean over the N patch tokens, every prefix token excluded, as timm's global_pool='avg' does
with num_prefix_tokens; 'map': big_vision's MAPHead on all T normalised tokens, registers
included, as timm's attn_pool), pre-logits `tanh(dense(x))` when representation_size is set, and
a zero-initialised head. With distillation (classifier='token', no pre-logits layer), the logits
are (head(CLS output) + head_dist(distillation-token output)) / 2, timm's
VisionTransformerDistilled at inference (whose own pre_logits is the mean of the two tokens; here
`pre_logits` is the CLS output and `pre_logits_dist` the distillation token's).

big_vision's MAPHead (classifier='map') pools the normalised tokens t `[b, T, D]` with a learned
probe: a = MHA(query = probe, keys and values = t) `[b, 1, D]` (H heads, the model's num_heads),
pooled = (a + MLP(LN(a)))[:, 0] `[b, D]` with the model's MLP width F; no norm before its
attention and no dropout. posemb='sincos2d' replaces the learned embedding by big_vision's
`posemb_sincos_2d` (no parameter): with q = D / 4 and omega_k = 10000^(-k / (q - 1)), the patch
at row r, column c gets [sin(c omega), cos(c omega), sin(r omega), cos(r omega)], added to the
patches before CLS is concatenated (the big_vision order).

Intermediates, sown into the 'intermediates' collection (names are module path + tag,
'/'-joined; `vit_repr.models.flatten_intermediates` gives a flat dict), for a batch of b images:

  Transformer/in                               [b, T, D]     tokens entering block 0: patch
                                                             embeddings, prefix tokens
                                                             concatenated, position embedding
                                                             added (then pre_norm, if set)
  Transformer/encoderblock_{i}/in              [b, T, D]     block input z
  Transformer/encoderblock_{i}/attn_probs      [b, H, T, T]  softmax attention weights
                                                             (queries x keys)
  Transformer/encoderblock_{i}/head_outputs    [b, T, H, d]  each head's attention-weighted
                                                             values, before the out projection
  Transformer/encoderblock_{i}/attn_branch     [b, T, D]     attention branch f(z) = MHA(LN(z))
                                                             (ls1/gamma * MHA(LN(z)) with
                                                             LayerScale)
  Transformer/encoderblock_{i}/mid             [b, T, D]     z + f(z) (f(z) without the skip)
  Transformer/encoderblock_{i}/mlp_branch      [b, T, D]     MLP branch g(y) = MLP(LN(y)), y = mid
                                                             (ls2/gamma * MLP(LN(y)) with
                                                             LayerScale)
  Transformer/encoderblock_{i}/out             [b, T, D]     y + g(y) (g(y) without the skip)
  Transformer/encoder_norm_out                 [b, T, D]     encoder_norm of the last block's out
  MAPHead_0/attn_probs                         [b, H, 1, T]  the MAP probe's softmax attention
                                                             weights over the tokens
                                                             (classifier='map' only)
  pre_logits                                   [b, D or R]   pooled representation the head sees
                                                             (the MAPHead output for 'map', then
                                                             the tanh pre-logits layer if set)
  pre_logits_dist                              [b, D]        the distillation token's output that
                                                             head_dist sees (distillation only)
  logits                                       [b, C]        float32

Blocks listed in `remove_skips` drop both residual additions: mid = f(z) and out = g(mid).
Sown values have the compute dtype (float32 or bfloat16), except the float32 logits; parameters
are always float32. `pre_logits` is a parameter pytree of the top-level module rather than a
submodule so that the sown tag can carry the same name (Flax forbids a sown variable named like a
submodule of the same scope); its parameter paths are those of the checkpoints.

The model describes itself (`vit_repr.models.layout`): `token_layout()` (the prefix kinds in
token order: 'cls' for classifier='token', 'distillation', then one 'register' per register; no
CLS for 'gap' and 'map'; then the (image_size / patch_size)^2 patches, row-major) and
`residual_sublayers()` (per block 'attn': z = in, f = attn_branch; 'mlp':
z = mid, f = mlp_branch; blocks in `remove_skips` left out) and `attention_layers()` (per block
its attn_probs and head_outputs; the MAPHead's cross-attention is not a block's self-attention
and is not listed).

One module for the family (~735 lines, over two fifths of them docstrings with the sown names,
shapes and formulas): the embeddings, the encoder block, the poolings (CLS, GAP, MAP) and the
registered sizes are one model, read together.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_repr.models import layout, variants

LAYER_NORM_EPS = 1e-6
CLASSIFIERS = ("token", "gap", "map")
# CLIP's quick GELU x * sigmoid(1.702 x), a sigmoid approximation of GELU.
QUICK_GELU_SCALE = 1.702
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # Flax's default.
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch / timm nn.GELU (erf).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(QUICK_GELU_SCALE * x),  # OpenAI CLIP.
}
MLP_ACTIVATIONS = tuple(_ACTIVATIONS)
POSEMBS = ("learn", "sincos2d")
# big_vision's `posemb_sincos_2d` default (MoCo v3's): frequencies temperature^(-k / (q - 1)).
SINCOS_TEMPERATURE = 10_000.0

# Model sizes, as in vision_transformer's configs (Table 1 of the ViT paper; Ti and S from
# Steiner et al., "How to train your ViT?", 2021): width, depth, MLP width, heads.
_SIZES: dict[str, dict[str, int]] = {
    "Ti": {"hidden_size": 192, "depth": 12, "mlp_dim": 768, "num_heads": 3},
    "S": {"hidden_size": 384, "depth": 12, "mlp_dim": 1536, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "mlp_dim": 4096, "num_heads": 16},
    "H": {"hidden_size": 1280, "depth": 32, "mlp_dim": 5120, "num_heads": 16},
    # Shape-optimised (Alabdulmohsin et al., "Getting ViT in Shape", NeurIPS 2023): SigLIP's
    # image towers; big_vision's `decode_variant` numbers.
    "So400m": {"hidden_size": 1152, "depth": 27, "mlp_dim": 4304, "num_heads": 16},
}
# The size/patch combinations with public checkpoints.
VARIANTS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": {**_SIZES[size], "patch_size": patch}
    for size, patch in [("Ti", 16), ("S", 16), ("S", 32), ("B", 8), ("B", 16), ("B", 32),
                        ("L", 16), ("L", 32), ("H", 14), ("So400m", 14), ("So400m", 16)]
}


def dense_tanh_params(key: jax.Array, in_features: int, out_features: int
                      ) -> dict[str, jax.Array]:
  """Initial parameters of the pre-logits layer (a Dense layer's initialisers).

  Args:
    key: PRNG key.
    in_features: input width D.
    out_features: representation_size R.

  Returns:
    `{'kernel': [D, R] lecun-normal, 'bias': [R] zeros}`, float32.
  """
  return {"kernel": nn.initializers.lecun_normal()(key, (in_features, out_features)),
          "bias": jnp.zeros((out_features,), jnp.float32)}


def posemb_sincos_2d(rows: int, columns: int, width: int,
                     temperature: float = SINCOS_TEMPERATURE) -> jax.Array:
  """big_vision's fixed 2-D sine-cosine position embedding (`posemb_sincos_2d`, MoCo v3's).

  With q = width / 4 frequencies omega_k = temperature^(-k / (q - 1)), k = 0, ..., q - 1, the
  patch at grid row r and column c gets
  `[sin(c * omega), cos(c * omega), sin(r * omega), cos(r * omega)]`: the column terms first.

  Args:
    rows: patch-grid rows.
    columns: patch-grid columns.
    width: embedding width D; a multiple of 4, at least 8.
    temperature: the frequency base.

  Returns:
    `[1, rows * columns, width]` float32, patches row-major.
  """
  quarter = width // 4
  omega = 1.0 / temperature ** (jnp.arange(quarter, dtype=jnp.float32) / (quarter - 1))
  row, column = jnp.mgrid[:rows, :columns]
  row = row.reshape(-1, 1).astype(jnp.float32) * omega
  column = column.reshape(-1, 1).astype(jnp.float32) * omega
  return jnp.concatenate([jnp.sin(column), jnp.cos(column), jnp.sin(row), jnp.cos(row)],
                         axis=1)[None]


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense_0 (width `mlp_dim`), activation, Dense_1 (input width).

  Attributes:
    mlp_dim: hidden width F.
    dropout_rate: dropout after the activation and after Dense_1 (training only).
    dtype: compute dtype.
    activation: one of `MLP_ACTIVATIONS` (see `VisionTransformer.mlp_activation`).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps `[b, T, D]` to `[b, T, D]`."""
    dense = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.Dense(self.mlp_dim, name="Dense_0", **dense)(x)
    y = _ACTIVATIONS[self.activation](y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.Dense(x.shape[-1], name="Dense_1", **dense)(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the original parameter layout, returning its internals.

  Params: `{query, key, value}/kernel` [D, H, d] and `/bias` [H, d]; `out/kernel` [H, d, D] and
  `out/bias` [D]. The softmax is computed in float32 whatever the compute dtype.

  Attributes:
    num_heads: H; must divide the input width D.
    dropout_rate: dropout on the attention weights (training only).
    dtype: compute dtype.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, inputs_kv: jax.Array | None = None, *, train: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of the Q queries `x` `[b, Q, D]` over the T tokens `inputs_kv` `[b, T, D]`.

    Args:
      x: the queries' inputs `[b, Q, D]`.
      inputs_kv: the keys' and values' inputs `[b, T, D]`; None: `x` (self-attention, Q = T).
      train: enables dropout on the attention weights.

    Returns:
      (output `[b, Q, D]`, attention weights `[b, H, Q, T]` (before dropout),
      per-head outputs `[b, Q, H, d]`).
    """
    inputs_kv = x if inputs_kv is None else inputs_kv
    width = x.shape[-1]
    head_dim = width // self.num_heads
    projection = dict(features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
                      kernel_init=nn.initializers.xavier_uniform())
    # Heads-major [b, H, T, d] operands and plain batched matmuls: on XLA:CPU this attention
    # core runs ~25% faster than the equivalent token-major einsums (benchmarks/models_bench).
    query, key, value = (
        nn.DenseGeneral(name=name, **projection)(inputs).transpose(0, 2, 1, 3)
        for name, inputs in (("query", x), ("key", inputs_kv), ("value", inputs_kv)))
    query = query / jnp.sqrt(head_dim).astype(query.dtype)
    scores = query @ jnp.swapaxes(key, -1, -2)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
    heads = (weights @ value).transpose(0, 2, 1, 3)
    out = HeadsProjection(width, self.dtype, name="out")(heads)
    return out, probs, heads


class HeadsProjection(nn.Module):
  """The attention output projection `[b, T, H, d]` -> `[b, T, D]` with the original layout
  (`kernel` [H, d, D], `bias` [D]; initialised like `nn.DenseGeneral(axis=(-2, -1))`),
  computed as one `[b·T, H·d] x [H·d, D]` product.

  Attributes:
    features: output width D.
    dtype: compute dtype.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, heads: jax.Array) -> jax.Array:
    *batch, num_heads, head_dim = heads.shape
    flat_init = nn.initializers.xavier_uniform()
    kernel = self.param(
        "kernel", lambda rng, shape: flat_init(rng, (num_heads * head_dim, self.features)
                                               ).reshape(shape),
        (num_heads, head_dim, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    flat = heads.reshape(*batch, num_heads * head_dim).astype(self.dtype)
    return (flat @ kernel.reshape(num_heads * head_dim, self.features).astype(self.dtype)
            + bias.astype(self.dtype))


class LayerScale(nn.Module):
  """A residual branch's learned per-channel scale: `x * gamma`, `gamma` `[D]` (Touvron et al.,
  "Going deeper with Image Transformers", ICCV 2021; used by DeiT III and DINOv2).

  Attributes:
    init_value: every entry of `gamma` at initialisation.
  """
  init_value: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Scales the channels of `x` `[..., D]`, in the dtype of `x`."""
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * gamma.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm Transformer block: y = z + MHA(LN(z)), out = y + MLP(LN(y)); with LayerScale,
  y = z + gamma_1 * MHA(LN(z)), out = y + gamma_2 * MLP(LN(y)).

  Attributes:
    num_heads: attention heads H.
    mlp_dim: MLP width F.
    dropout_rate: dropout on each branch output (training only).
    attention_dropout_rate: dropout on the attention weights (training only).
    skip: False drops both residual additions (y = MHA(LN(z)), out = MLP(LN(y))).
    dtype: compute dtype.
    layer_scale_init: None for no LayerScale; else the initial value of `ls1/gamma` and
      `ls2/gamma`, the learned scales of the attention and MLP branches.
    activation: the MLP activation, one of `MLP_ACTIVATIONS`.
    layer_norm_eps: epsilon of both LayerNorms.
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  skip: bool = True
  dtype: Any = jnp.float32
  layer_scale_init: float | None = None
  activation: str = "gelu_tanh"
  layer_norm_eps: float = LAYER_NORM_EPS

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """Maps tokens `[b, T, D]` to `[b, T, D]`, sowing the block's intermediates."""
    self.sow("intermediates", "in", z)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(z)
    attn, probs, heads = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype,
        name="MultiHeadDotProductAttention_1")(y, train=train)
    attn = nn.Dropout(self.dropout_rate)(attn, deterministic=not train)
    if self.layer_scale_init is not None:
      attn = LayerScale(self.layer_scale_init, name="ls1")(attn)
    self.sow("intermediates", "attn_probs", probs)
    self.sow("intermediates", "head_outputs", heads)
    self.sow("intermediates", "attn_branch", attn)
    mid = z + attn if self.skip else attn
    self.sow("intermediates", "mid", mid)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_2")(mid)
    mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.activation,
                   name="MlpBlock_3")(y, train=train)
    if self.layer_scale_init is not None:
      mlp = LayerScale(self.layer_scale_init, name="ls2")(mlp)
    self.sow("intermediates", "mlp_branch", mlp)
    out = mid + mlp if self.skip else mlp
    self.sow("intermediates", "out", out)
    return out


class AddPositionEmbs(nn.Module):
  """Adds the learned position embedding `pos_embedding` `[1, T, D]` to tokens `[b, T, D]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns `x + pos_embedding` in the dtype of `x`."""
    pos_embedding = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                               (1,) + x.shape[1:], jnp.float32)
    return x + pos_embedding.astype(x.dtype)


class Encoder(nn.Module):
  """The `Transformer` module: position embedding, `depth` blocks and the final LayerNorm.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_dim: MLP width.
    dropout_rate: dropout after the position embedding and on every branch (training only).
    attention_dropout_rate: dropout on the attention weights (training only).
    posemb_includes_cls: True: the prefix tokens are concatenated first and the position
      embedding has a slot for each (vision_transformer; timm's no_embed_class=False); False: the
      embedding is added to the patches only and the prefix tokens are concatenated afterwards
      (big_vision; timm's no_embed_class=True).
    remove_skips: indices of the blocks without skip connections.
    dtype: compute dtype.
    posemb: 'learn' (the `posembed_input` parameter) or 'sincos2d' (`posemb_sincos_2d` of the
      patch grid, no parameter; added to the patches only, posemb_includes_cls must be False).
    layer_scale_init: see `Encoder1DBlock`.
    activation: the MLP activation, one of `MLP_ACTIVATIONS`.
    layer_norm_eps: epsilon of every LayerNorm.
    pre_norm: adds the LayerNorm `pre_norm` of the tokens before block 0.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  posemb_includes_cls: bool = True
  remove_skips: Sequence[int] = ()
  dtype: Any = jnp.float32
  posemb: str = "learn"
  layer_scale_init: float | None = None
  activation: str = "gelu_tanh"
  layer_norm_eps: float = LAYER_NORM_EPS
  pre_norm: bool = False

  @nn.compact
  def __call__(self, grid: jax.Array, prefix: jax.Array | None, *, train: bool = False
               ) -> jax.Array:
    """Encodes the patch embeddings `grid` `[b, rows, columns, D]` and prefix tokens `[1, P, D]`.

    Args:
      grid: the patch embeddings `[b, rows, columns, D]`.
      prefix: the P prefix tokens `[1, P, D]` in token order (CLS, distillation, registers), or
        None for none.
      train: enables dropout.

    Returns:
      The normalised tokens `[b, T, D]`: the prefix tokens, then the patches row-major.
    """
    batch, rows, columns, width = grid.shape
    patches = grid.reshape(batch, rows * columns, width)

    def with_prefix(x):
      if prefix is None:
        return x
      return jnp.concatenate([jnp.tile(prefix.astype(x.dtype), (batch, 1, 1)), x], axis=1)

    x = with_prefix(patches) if self.posemb_includes_cls else patches
    if self.posemb == "learn":
      x = AddPositionEmbs(name="posembed_input")(x)
    else:
      x = x + posemb_sincos_2d(rows, columns, width).astype(x.dtype)
    x = x if self.posemb_includes_cls else with_prefix(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="pre_norm")(x)
    self.sow("intermediates", "in", x)
    removed = set(self.remove_skips)
    for i in range(self.depth):
      x = Encoder1DBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                         self.attention_dropout_rate, i not in removed, self.dtype,
                         self.layer_scale_init, self.activation, self.layer_norm_eps,
                         name=f"encoderblock_{i}")(x, train=train)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(x)
    self.sow("intermediates", "encoder_norm_out", x)
    return x


class MAPHead(nn.Module):
  """big_vision's multi-head attention pooling: a learned probe attends over the tokens.

  pooled = a + MLP(LN(a)) with a = MHA(query = probe, keys and values = the tokens); no norm
  before the attention (the tokens come from `encoder_norm`) and no dropout, as in big_vision.

  Attributes:
    num_heads: attention heads H; must divide the token width D.
    mlp_dim: MLP width F.
    dtype: compute dtype.
    activation: the MLP activation, one of `MLP_ACTIVATIONS`.
    layer_norm_eps: epsilon of its LayerNorm.
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  activation: str = "gelu_tanh"
  layer_norm_eps: float = LAYER_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Pools tokens `[b, T, D]` into `[b, D]`, sowing the probe's attention weights."""
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]),
                       jnp.float32)
    probe = jnp.tile(probe.astype(x.dtype), (x.shape[0], 1, 1))
    attn, probs, _ = MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, name="MultiHeadDotProductAttention_0")(probe, x)
    self.sow("intermediates", "attn_probs", probs)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(attn)
    pooled = attn + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation,
                             name="MlpBlock_0")(y)
    return pooled[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; see the module docstring for its parameters and intermediates.

  Attributes:
    num_classes: classes of the head (C).
    image_size: side of the square RGB inputs; a multiple of patch_size.
    patch_size: side p of the square patches.
    hidden_size: token width D.
    depth: number of Transformer blocks.
    num_heads: attention heads H; must divide hidden_size.
    mlp_dim: MLP width F.
    classifier: 'token' (CLS token), 'gap' (mean over the patch tokens) or 'map' (big_vision's
      `MAPHead`, attention pooling).
    representation_size: width R of the tanh pre-logits layer, or None for none.
    dropout_rate: dropout after the position embedding and on every branch (training only).
    attention_dropout_rate: dropout on attention weights (training only).
    posemb_includes_cls: see `Encoder`: whether the learned position embedding has a slot for
      every prefix token (CLS, distillation, registers); True for vision_transformer checkpoints
      (timm's no_embed_class=False), False for big_vision ones (no_embed_class=True). Irrelevant
      without prefix tokens.
    posemb: 'learn' (a learned position embedding) or 'sincos2d' (big_vision's fixed 2-D
      sine-cosine embedding, `posemb_sincos_2d`; needs hidden_size a multiple of 4, at least 8,
      and, with prefix tokens, posemb_includes_cls=False).
    layer_scale_init: None (default) for no LayerScale; a positive float adds LayerScale to
      every block's two branches (DeiT III, DINOv2), `ls1/gamma` and `ls2/gamma` initialised to
      it.
    mlp_activation: the activation of every MlpBlock (the MAP head's included): 'gelu_tanh'
      (default; vision_transformer, big_vision), 'gelu' (exact erf GELU, timm's nn.GELU: DeiT,
      DINOv2, OpenCLIP) or 'quick_gelu' (x * sigmoid(1.702 x), OpenAI CLIP).
    layer_norm_eps: epsilon of every LayerNorm (1e-6; OpenAI CLIP 1e-5).
    patch_bias: False builds the patch embedding without `embedding/bias` (CLIP).
    pre_norm: True adds the LayerNorm `Transformer/pre_norm` of the tokens entering block 0,
      after the prefix tokens and position embedding (CLIP's ln_pre, timm's norm_pre).
    num_registers: register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR
      2024), the learned `registers` `[1, num_registers, D]` placed after CLS and the
      distillation token (DINOv2's order).
    distillation: DeiT's distillation token `dist` `[1, 1, D]`, right after CLS, and its head
      `head_dist`; the logits are the mean of the two heads' (classifier='token' and no
      representation_size only).
    remove_skips: 0-based indices of the blocks whose two skip connections are removed.
    dtype: compute dtype (float32 or bfloat16); parameters stay float32.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  classifier: str = "token"
  representation_size: int | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  posemb_includes_cls: bool = True
  posemb: str = "learn"
  layer_scale_init: float | None = None
  mlp_activation: str = "gelu_tanh"
  layer_norm_eps: float = LAYER_NORM_EPS
  patch_bias: bool = True
  pre_norm: bool = False
  num_registers: int = 0
  distillation: bool = False
  remove_skips: Sequence[int] = ()
  dtype: Any = jnp.float32

  def __post_init__(self):
    positive = {"num_classes": self.num_classes, "image_size": self.image_size,
                "patch_size": self.patch_size, "hidden_size": self.hidden_size,
                "depth": self.depth, "num_heads": self.num_heads, "mlp_dim": self.mlp_dim}
    if self.representation_size is not None:
      positive["representation_size"] = self.representation_size
    bad = {k: v for k, v in positive.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
      raise ValueError(f"ViT fields {sorted(bad)} must be positive integers; got {bad}.")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier must be one of {CLASSIFIERS}; got {self.classifier!r}.")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb must be one of {POSEMBS}; got {self.posemb!r}.")
    if self.posemb == "sincos2d" and (self.hidden_size % 4 or self.hidden_size < 8):
      raise ValueError(f"posemb='sincos2d' needs hidden_size a multiple of 4 and at least 8 (four "
                       f"sine-cosine groups of at least 2 frequencies); got hidden_size="
                       f"{self.hidden_size}. Choose such a width or posemb='learn'.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS} ('gelu_tanh': "
                       f"vision_transformer, big_vision; 'gelu': timm's nn.GELU; 'quick_gelu': "
                       f"OpenAI CLIP); got {self.mlp_activation!r}.")
    if (not isinstance(self.layer_norm_eps, (float, int, np.floating, np.integer))
        or isinstance(self.layer_norm_eps, bool) or not self.layer_norm_eps > 0):
      raise ValueError(f"layer_norm_eps must be a positive float such as 1e-6 (vision_transformer,"
                       f" timm) or 1e-5 (OpenAI CLIP); got {self.layer_norm_eps!r}.")
    if (not isinstance(self.num_registers, (int, np.integer))
        or isinstance(self.num_registers, bool) or self.num_registers < 0):
      raise ValueError(f"num_registers must be a non-negative integer (0: no registers; 4: "
                       f"DINOv2 with registers); got {self.num_registers!r}.")
    flags = {k: getattr(self, k) for k in ("patch_bias", "pre_norm", "distillation")}
    bad = {k: v for k, v in flags.items() if not isinstance(v, (bool, np.bool_))}
    if bad:
      raise ValueError(f"ViT fields {sorted(bad)} must be True or False; got {bad}.")
    if self.distillation and self.classifier != "token":
      raise ValueError(f"distillation=True (DeiT's distillation token, pooled beside the CLS "
                       f"token) needs classifier='token'; got classifier={self.classifier!r}.")
    if self.distillation and self.representation_size is not None:
      raise ValueError("distillation=True has no pre-logits layer (DeiT's heads read the tokens "
                       "directly); build the model with representation_size=None.")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size="
                       f"{self.patch_size}; choose an image_size divisible by the patch size.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size="
                       f"{self.hidden_size}; choose a divisor.")
    if (self.posemb == "sincos2d" and self.posemb_includes_cls
        and self.token_layout().num_prefix_tokens):
      raise ValueError("posemb='sincos2d' (big_vision's) is added to the patches before the "
                       "prefix tokens (CLS, distillation, registers) are concatenated and has no "
                       "slot for them; build the model with posemb_includes_cls=False.")
    if self.layer_scale_init is not None and not (
        isinstance(self.layer_scale_init, (float, int, np.floating, np.integer))
        and not isinstance(self.layer_scale_init, bool) and self.layer_scale_init > 0):
      raise ValueError(f"layer_scale_init must be None (no LayerScale) or a positive float such "
                       f"as 1e-5 (DINOv2) or 1e-6 (DeiT III); got {self.layer_scale_init!r}.")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
    variants.check_remove_skips(self.remove_skips, self.depth)
    variants.check_dtype(self.dtype)
    super().__post_init__()

  @nn.nowrap
  def token_layout(self) -> layout.TokenLayout:
    """The tokens `[T, D]` of every block: the prefix tokens in order (CLS for the 'token'
    classifier, the distillation token, the registers), then the `image_size / patch_size`
    square grid of patches, row-major."""
    side = int(self.image_size // self.patch_size)
    prefix = (("cls",) * (self.classifier == "token") + ("distillation",) * self.distillation
              + ("register",) * int(self.num_registers))
    return layout.TokenLayout(grid=(side, side), patch_size=int(self.patch_size), prefix=prefix)

  @nn.nowrap
  def attention_layers(self) -> tuple[layout.AttentionLayer, ...]:
    """Every block's self-attention: 'Transformer/encoderblock_{i}/attn_probs' and
    '.../head_outputs'."""
    return tuple(layout.AttentionLayer(i, f"Transformer/encoderblock_{i}/attn_probs",
                                       f"Transformer/encoderblock_{i}/head_outputs")
                 for i in range(self.depth))

  @nn.nowrap
  def residual_sublayers(self) -> tuple[layout.SubLayer, ...]:
    """The residual sub-layers in computation order: per block i (but those of
    `remove_skips`) 'Transformer/encoderblock_{i}/attn' (z = '.../in', f = '.../attn_branch')
    and '.../mlp' (z = '.../mid', f = '.../mlp_branch')."""
    removed = set(self.remove_skips)
    found = []
    for i in range(self.depth):
      if i in removed:
        continue
      block = f"Transformer/encoderblock_{i}"
      found.append(layout.SubLayer(f"{block}/attn", f"{block}/in", f"{block}/attn_branch", i))
      found.append(layout.SubLayer(f"{block}/mlp", f"{block}/mid", f"{block}/mlp_branch", i))
    return tuple(found)

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, *, train: bool = False) -> jax.Array:
    """Classifies `images`.

    Args:
      images: `[batch, image_size, image_size, 3]`, typically in [-1, 1].
      train: enables dropout (needs a 'dropout' rng when a rate is non-zero).

    Returns:
      Logits `[batch, num_classes]`, float32.

    Raises:
      ValueError: `images` is not `[batch, image_size, image_size, 3]`.
    """
    images = jnp.asarray(images)
    variants.check_images(images, self.image_size, "ViT")
    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                use_bias=self.patch_bias, dtype=self.dtype, name="embedding")(images)
    channels = x.shape[-1]
    prefix = []
    if self.classifier == "token":
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, channels), jnp.float32))
    if self.distillation:
      prefix.append(self.param("dist", nn.initializers.normal(stddev=0.02), (1, 1, channels),
                               jnp.float32))
    if self.num_registers:
      prefix.append(self.param("registers", nn.initializers.normal(stddev=1e-6),
                               (1, self.num_registers, channels), jnp.float32))
    tokens = Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout_rate,
                     self.attention_dropout_rate, self.posemb_includes_cls, self.remove_skips,
                     self.dtype, self.posemb, self.layer_scale_init, self.mlp_activation,
                     self.layer_norm_eps, self.pre_norm, name="Transformer")(
                         x, jnp.concatenate(prefix, axis=1) if prefix else None, train=train)
    if self.classifier == "token":
      x = tokens[:, 0]
    elif self.classifier == "gap":  # the patch tokens only, as timm's global_pool='avg'.
      x = jnp.mean(tokens[:, self.token_layout().num_prefix_tokens:], axis=1)
    else:
      x = MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.mlp_activation,
                  self.layer_norm_eps, name="MAPHead_0")(tokens)
    if self.representation_size is not None:
      pre = self.param("pre_logits", dense_tanh_params, channels, self.representation_size)
      x = jnp.tanh(x @ pre["kernel"].astype(self.dtype) + pre["bias"].astype(self.dtype))
    self.sow("intermediates", "pre_logits", x)
    head = dict(dtype=self.dtype, kernel_init=nn.initializers.zeros)
    logits = nn.Dense(self.num_classes, name="head", **head)(x).astype(jnp.float32)
    if self.distillation:
      self.sow("intermediates", "pre_logits_dist", tokens[:, 1])
      logits_dist = nn.Dense(self.num_classes, name="head_dist", **head)(tokens[:, 1])
      logits = (logits + logits_dist.astype(jnp.float32)) / 2
    self.sow("intermediates", "logits", logits)
    return logits


def from_variant(variant: str, **overrides) -> VisionTransformer:
  """Builds the ViT `variant` ('B/16', 'L/16', 'So400m/14', ..., see `VARIANTS`).

  Args:
    variant: a key of `VARIANTS`.
    **overrides: replace the variant's defaults; any constructor field (num_classes, image_size,
      patch_size, hidden_size, depth, num_heads, mlp_dim, classifier, representation_size,
      dropout_rate, attention_dropout_rate, posemb_includes_cls, posemb, layer_scale_init,
      mlp_activation, layer_norm_eps, patch_bias, pre_norm, num_registers, distillation,
      remove_skips, dtype).

  Returns:
    An unbound `VisionTransformer`.

  Raises:
    ValueError: unknown variant or override (the message lists the accepted ones), or an
      invalid field value.
  """
  return variants.build(VisionTransformer, "ViT", VARIANTS, variant, overrides)
