"""Shared by the model families: building a module from its size table plus validated
overrides, and the checks of constructor fields and inputs."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def constructor_fields(module_class: type[nn.Module]) -> tuple[str, ...]:
  """The dataclass fields a caller may set (Flax's `parent` and `name` excluded)."""
  return tuple(f.name for f in dataclasses.fields(module_class)
               if f.name not in ("parent", "name"))


def build(module_class: type[ModuleT], family: str, variants: Mapping[str, Mapping[str, Any]],
          variant: str, overrides: Mapping[str, Any]) -> ModuleT:
  """`module_class(**variants[variant], **overrides)`, with readable errors.

  Sequence-valued overrides given as lists or arrays (e.g. `remove_skips` from a config file)
  become tuples of ints, so the module stays hashable.

  Raises:
    ValueError: unknown variant or override (the message lists the accepted ones).
  """
  if variant not in variants:
    raise ValueError(f"Unknown {family} variant {variant!r}; known: {', '.join(variants)}.")
  fields = constructor_fields(module_class)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"Unknown override(s) {unknown} for {family}-{variant}; accepted fields: "
                     f"{', '.join(fields)}.")
  values = {**variants[variant], **overrides}
  for key, value in values.items():
    if isinstance(value, (list, np.ndarray)):
      values[key] = tuple(int(i) for i in value)
  return module_class(**values)


def check_remove_skips(remove_skips: Sequence[int], depth: int, unit: str = "block") -> None:
  """Validates the `remove_skips` field of a model with `depth` blocks (or ResNet units).

  Args:
    remove_skips: 0-based indices of the blocks without skip connections.
    depth: number of blocks.
    unit: what an index counts, for the message ('block', or 'unit' for ResNets).

  Raises:
    ValueError: an index is not an integer in [0, depth), or repeats.
  """
  bad = [i for i in remove_skips
         if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < depth]
  if bad or len(set(remove_skips)) != len(remove_skips):
    raise ValueError(f"remove_skips must hold distinct 0-based {unit} indices in [0, {depth}); "
                     f"got {tuple(remove_skips)} (invalid: {bad}).")


def check_dtype(dtype: Any) -> None:
  """Validates a compute dtype.

  Args:
    dtype: e.g. jnp.float32, jnp.bfloat16 or 'bfloat16'.

  Raises:
    ValueError: `dtype` is not a floating-point dtype.
  """
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"dtype must be a floating dtype (a floating-point compute dtype such as "
                     f"jnp.float32 or jnp.bfloat16); got {dtype!r}.")


def check_images(images: jax.Array, image_size: int, family: str) -> None:
  """Validates a model input.

  Args:
    images: the model's input.
    image_size: the side the model was built for.
    family: model family named in the message, e.g. 'ViT'.

  Raises:
    ValueError: `images` is not `[batch, image_size, image_size, 3]`; the message says how to
      fix it (resize, or build the model with another image_size).
  """
  expected = (image_size, image_size, 3)
  if images.ndim != 4 or images.shape[1:] != expected:
    side = images.shape[1] if images.ndim == 4 else "<side>"
    raise ValueError(
        f"{family} expects images [batch, {image_size}, {image_size}, 3] (NHWC, RGB); got "
        f"shape {images.shape}. Resize the inputs to {image_size}x{image_size} with 3 channels, "
        f"or build the model with image_size={side}.")
