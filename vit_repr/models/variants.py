"""Building a model module from its family's size table plus validated overrides."""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

import flax.linen as nn
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
