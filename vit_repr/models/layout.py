"""What a model says about its own representations: token layout, residual sub-layers, labels.

The analyses of Raghu et al., "Do Vision Transformers See Like Convolutional Neural Networks?"
(NeurIPS 2021) need to know where a model's CLS token sits, how its patch tokens tile the image
and which sown intermediates are the stream z and the branch f(z) of each residual sub-layer
(Section 6). Only the model family that names its modules knows these things, so every model
of `vit_repr.models` describes itself with the plain values of this module:

  `model.token_layout()`        a `TokenLayout`, or None for a model without a token sequence
                                (a ResNet, whose representations are feature maps `[h, w, C]`
                                with a different grid per stage, read from their shapes);
  `model.residual_sublayers()`  its `SubLayer`s in computation order;
  `model.attention_layers()`    its self-attention `AttentionLayer`s (none for ResNet, Mixer);
  `display_name(name)`          the short figure label of any family's sown name.

The display rules live here, keyed by family, rather than beside each family's modules: a
figure is redrawn from saved names with no model at hand, and this module imports nothing (no
flax, no jax), so `vit_repr.plotting` can use it. The family modules' docstrings list the names
the rules read.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

# The kinds of non-spatial tokens a sequence may start with: the CLS token, DeiT's distillation
# token, register tokens (DINOv2's; there may be several). A family with other prefix tokens adds
# its kind here.
PREFIX_KINDS = ("cls", "distillation", "register")
# The kinds a sequence holds at most once.
_SINGLE_KINDS = ("cls", "distillation")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """How a token sequence `[T, D]` is laid out: prefix tokens, then a row-major patch grid.

  Token t < `num_prefix_tokens` is the prefix token of kind `prefix[t]`; token
  `num_prefix_tokens + r * grid[1] + c` is the patch at grid row r, column c.

  Attributes:
    grid: `(rows, columns)` of patch tokens.
    patch_size: side in input pixels of the square patch behind each grid cell.
    prefix: kinds (`PREFIX_KINDS`) of the tokens before the patches, in order, e.g. ('cls',),
      or ('cls', 'register', 'register', 'register', 'register') for DINOv2 with 4 registers;
      'cls' and 'distillation' at most once each.
  """
  grid: tuple[int, int]
  patch_size: int
  prefix: tuple[str, ...] = ()

  def __post_init__(self):
    if (len(self.grid) != 2 or not all(isinstance(n, int) and n > 0 for n in self.grid)
        or not isinstance(self.patch_size, int) or self.patch_size < 1):
      raise ValueError(f"TokenLayout needs grid = (rows, columns) and patch_size, positive ints; "
                       f"got grid={self.grid!r}, patch_size={self.patch_size!r}.")
    unknown = [k for k in self.prefix if k not in PREFIX_KINDS]
    repeated = [k for k in _SINGLE_KINDS if self.prefix.count(k) > 1]
    if unknown or repeated:
      raise ValueError(f"TokenLayout prefix must hold kinds of {PREFIX_KINDS}, {_SINGLE_KINDS} "
                       f"distinct (only 'register' may repeat); got {self.prefix!r}.")

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches (CLS, distillation, registers): excluded from the spatial ones."""
    return len(self.prefix)

  @property
  def num_spatial_tokens(self) -> int:
    """Patch tokens: rows * columns."""
    return self.grid[0] * self.grid[1]

  @property
  def num_tokens(self) -> int:
    """T = prefix tokens + patch tokens."""
    return self.num_prefix_tokens + self.num_spatial_tokens

  @property
  def has_cls(self) -> bool:
    """Whether the sequence holds a CLS token (at index `prefix.index('cls')`)."""
    return "cls" in self.prefix


def num_prefix_tokens(token_layout: TokenLayout | None) -> int:
  """Tokens before the patches; 0 for a model without token sequences (`token_layout` None)."""
  return 0 if token_layout is None else token_layout.num_prefix_tokens


def prefix_kinds(token_layout: TokenLayout | None) -> tuple[str, ...]:
  """The kinds of the tokens before the patches, in order; () for a model without token
  sequences (`token_layout` None)."""
  return () if token_layout is None else token_layout.prefix


def token_grid(token_layout: TokenLayout | None) -> tuple[int, int] | None:
  """The patch grid `(rows, columns)`; None for a model without token sequences."""
  return None if token_layout is None else token_layout.grid


def has_cls(token_layout: TokenLayout | None) -> bool:
  """Whether the token sequences hold a CLS token; False for a model without them."""
  return token_layout is not None and token_layout.has_cls


@dataclasses.dataclass(frozen=True)
class SubLayer:
  """One residual sub-layer of a model: out = z + f(z).

  Attributes:
    name: e.g. 'Transformer/encoderblock_3/attn', 'MixerBlock_0/channel_mixing', 'block2/unit02'.
    stream: intermediate name of z; or, with `stream_minus_branch`, of the sub-layer output.
    branch: intermediate name of f(z).
    block: 0-based index of the block (ResNet: of the unit, over all stages) it belongs to.
    stream_minus_branch: z = intermediates[stream] - intermediates[branch] (ResNet projection
      shortcuts, whose z is the projected input, which is not sown).
  """
  name: str
  stream: str
  branch: str
  block: int
  stream_minus_branch: bool = False

  @property
  def identity_shortcut(self) -> bool:
    """Whether z is the sub-layer's input itself (not a projection of it)."""
    return not self.stream_minus_branch


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
  """One self-attention layer of a model and the names of what it sows.

  Attributes:
    block: 0-based index of the block it belongs to.
    probs: intermediate name of its attention weights `[b, heads, queries, keys]`.
    heads: intermediate name of its per-head outputs `[b, T, heads, head_dim]` (the
      attention-weighted values before the output projection).
  """
  block: int
  probs: str
  heads: str


def streams_and_branches(sublayers: Sequence[SubLayer], intermediates: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
  """`({sub-layer name: z}, {sub-layer name: f(z)})` from a model's intermediates.

  Args:
    sublayers: from the model's `residual_sublayers()`.
    intermediates: `{intermediate name: [b, ...]}` (`flatten_intermediates`) holding every
      `stream` and `branch` name; any array type (traced or not).

  Returns:
    The streams z and branches f(z), keyed by sub-layer name in the order of `sublayers`.
  """
  streams, branches = {}, {}
  for layer in sublayers:
    branch = intermediates[layer.branch]
    stream = intermediates[layer.stream]
    streams[layer.name] = stream - branch if layer.stream_minus_branch else stream
    branches[layer.name] = branch
  return streams, branches


# family -> (sown name, its figure label). First full match wins; other names stay as they are.
_DISPLAY_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "ViT": (re.compile(r"Transformer/encoderblock_(\d+)/(.+)"), r"\1/\2"),  # '3/mid'.
    "Mixer": (re.compile(r"MixerBlock_(\d+)/(.+)"), r"\1/\2"),              # '3/out'.
    "BiT": (re.compile(r"block(\d+)/unit(\d+)/out"), r"\1.\2"),             # stage.unit '2.03'.
}


def display_name(layer_name: str) -> str:
  """The short label of a sown name for figure axes and summaries.

  'Transformer/encoderblock_3/mid' -> '3/mid', 'MixerBlock_3/out' -> '3/out',
  'block2/unit03/out' -> '2.03'; any other name (stage outputs 'block2/out', 'pre_logits',
  names of other libraries' models) is returned unchanged.
  """
  for pattern, label in _DISPLAY_RULES.values():
    if pattern.fullmatch(layer_name):
      return pattern.sub(label, layer_name)
  return layer_name
