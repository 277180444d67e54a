"""Runs a model over data and returns the requested sown intermediates.

The representations compared by Raghu et al. (NeurIPS 2021) are the intermediates every model
of `vit_repr.models` sows (names and shapes in each model's docstring). `FeatureExtractor`
selects them by exact name or regular expression and reduces their tokens inside one jitted
function, so the intermediates nobody asked for are dead code that XLA never materialises.

Token treatments (`token_mode`), for a token sequence `[b, T, D]` (ViT, Mixer: the prefix
tokens, e.g. CLS, then N patch tokens, as the model's `token_layout()` says) or a feature map
`[b, h, w, C]` (ResNet):

  'all'      every token/location, flattened to `[b, T * D]` / `[b, h * w * C]`: the paper's
             choice for CKA (each example's representation flattened).
  'cls'      the CLS token `[b, D]` (token-classifier ViTs only).
  'spatial'  the patch tokens without prefix tokens, flattened `[b, N * D]`; for feature maps
             as 'all'.
  'mean'     the mean over patch tokens (prefix tokens excluded) / spatial locations `[b, D]` /
             `[b, C]`.

Representations that are not token sequences or feature maps (`pre_logits` `[b, D]`,
`logits`, `attn_probs` `[b, H, T, T]`, ...) are flattened per example for 'all' and rejected for
the other modes.
"""

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_repr.models import TokenLayout, flatten_intermediates

TOKEN_MODES = ("all", "cls", "spatial", "mean")


def intermediate_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, ...]]:
  """Every intermediate `model` sows, in the order the model computes them, with its shape.

  Computed with `jax.eval_shape` for one image: no FLOPs, no parameters materialised. (Pytree
  outputs come back with sorted keys, so the computation order is read from the flattened
  collection while tracing.)

  Returns:
    `{name: (1, ...)}` in model order, e.g. ViT: 'Transformer/in', then per block 'in',
    'attn_probs', 'head_outputs', 'attn_branch', 'mid', 'mlp_branch', 'out', ..., 'logits'.
  """
  order: list[str] = []

  def init_and_apply(rng, images):
    variables = model.init(rng, images)
    _, state = model.apply({"params": variables["params"]}, images,
                           mutable=["intermediates"])
    flat = flatten_intermediates(state)
    order.extend(flat)  # Static names only: the trace records the model's sow order.
    return flat

  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(init_and_apply, jax.random.key(0), images)
  return {name: tuple(shapes[name].shape) for name in order}


def select_names(available: Sequence[str], patterns: Sequence[str] | str) -> list[str]:
  """The names in `available` (model order kept) that some pattern matches in full.

  Args:
    available: every intermediate name of the model, in model order.
    patterns: exact names or regular expressions, e.g. `r'Transformer/encoderblock_\\d+/out'`.

  Returns:
    The matching names, without duplicates, in model order.

  Raises:
    ValueError: a pattern matches nothing (the message lists the available names).
  """
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  if not patterns:
    raise ValueError("No layer names or patterns given; pass at least one, e.g. '.*/out'.")
  selected = set()
  for pattern in patterns:
    try:
      matches = {n for n in available if re.fullmatch(pattern, n)}
    except re.error as e:
      raise ValueError(f"Layer pattern {pattern!r} is not a valid regular expression: {e}")
    if not matches:
      raise ValueError(f"Layer pattern {pattern!r} matches no intermediate of the model. "
                       f"Available names: {', '.join(available)}.")
    selected |= matches
  return [n for n in available if n in selected]


def reduce_tokens(x: jax.Array, mode: str, *, token_layout: TokenLayout | None,
                  name: str = "") -> jax.Array:
  """Applies a token treatment (see the module docstring) to one representation.

  Args:
    x: `[b, T, D]` tokens, `[b, h, w, C]` feature map, or any `[b, ...]` array ('all' only).
    mode: one of `TOKEN_MODES`.
    token_layout: the model's `token_layout()`, which says where the prefix (CLS) tokens of a
      `[b, T, D]` representation are; None for a model without token sequences (a ResNet).
    name: the representation's name, for error messages.

  Returns:
    `[b, features]`.

  Raises:
    ValueError: an unknown mode, a mode that does not apply to `x`, or tokens that do not
      match `token_layout`.
  """
  if mode not in TOKEN_MODES:
    raise ValueError(f"Unknown token_mode {mode!r}; use one of {TOKEN_MODES}.")
  if mode == "all":
    return x.reshape(x.shape[0], -1)
  if x.ndim == 3:  # [b, T, D] tokens.
    if token_layout is None or x.shape[1] != token_layout.num_tokens:
      raise ValueError(f"token_mode={mode!r}: {name or 'the representation'} has {x.shape[1]} "
                       f"tokens, but the model's token layout is {token_layout}; pass the "
                       "token_layout() of the model that made it, or use 'all'.")
    if mode == "cls":
      if not token_layout.has_cls:
        raise ValueError(f"token_mode='cls' but {name or 'the model'} has no CLS token "
                         "(classifier='gap' or not a ViT); use 'mean' or 'all'.")
      return x[:, token_layout.prefix.index("cls")]
    patches = x[:, token_layout.num_prefix_tokens:]
    return patches.reshape(x.shape[0], -1) if mode == "spatial" else patches.mean(axis=1)
  if x.ndim == 4 and mode in ("spatial", "mean"):  # [b, h, w, C] feature map.
    return x.reshape(x.shape[0], -1) if mode == "spatial" else x.mean(axis=(1, 2))
  raise ValueError(f"token_mode={mode!r} does not apply to {name or 'a representation'} of "
                   f"shape {x.shape}; use 'all'.")


class FeatureExtractor:
  """A jitted `(params, images) -> {name: [b, features]}` for chosen intermediates.

  Example:
    extractor = FeatureExtractor(model, r'Transformer/encoderblock_\\d+/out', image_size=224)
    for batch in batches:
      features = extractor(params, batch['image'])  # {name: [b, T * D]}

  Attributes:
    names: the selected intermediate names, in model order.
    shapes: `{name: per-example shape}` of the selected intermediates before token reduction.
    token_layout: the model's `token_layout()` (None for a ResNet).
    feature_sizes: `{name: features per example}` after the token treatment.
  """

  def __init__(self, model: nn.Module, patterns: Sequence[str] | str, *, image_size: int,
               token_mode: str = "all"):
    if token_mode not in TOKEN_MODES:
      raise ValueError(f"Unknown token_mode {token_mode!r}; use one of {TOKEN_MODES}.")
    all_shapes = intermediate_shapes(model, image_size)
    self.names = select_names(list(all_shapes), patterns)
    self.shapes = {n: all_shapes[n][1:] for n in self.names}
    self.token_mode = token_mode
    self.token_layout = model.token_layout()
    token_layout, names = self.token_layout, tuple(self.names)

    def extract(params: Any, images: jax.Array) -> dict[str, jax.Array]:
      _, state = model.apply({"params": params}, images, mutable=["intermediates"])
      flat = flatten_intermediates(state)
      return {n: reduce_tokens(flat[n], token_mode, token_layout=token_layout, name=n)
              for n in names}

    # Validates the token treatment of every selected layer once, at construction.
    reduced = jax.eval_shape(
        lambda x: {n: reduce_tokens(x[n], token_mode, token_layout=token_layout, name=n)
                   for n in names},
        {n: jax.ShapeDtypeStruct((1, *self.shapes[n]), jnp.float32) for n in names})
    self.feature_sizes = {n: int(np.prod(reduced[n].shape[1:])) for n in names}
    self._extract = jax.jit(extract)

  def __call__(self, params: Any, images: jax.Array) -> dict[str, jax.Array]:
    """Features of a batch: `{name: [b, features]}` (sharded like `images`)."""
    return self._extract(params, images)

  def stream(self, params: Any, batches: Iterable[dict[str, jax.Array]]
             ) -> Iterator[tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
    """Yields `(batch, features)` for every batch of `batches` (no host synchronisation)."""
    for batch in batches:
      yield batch, self(params, batch["image"])

