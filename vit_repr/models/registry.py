"""`create(name, **overrides)`: build any registered model from its public name.

Names are `<family>-<variant>`: 'ViT-B/16', 'BiT-R50x1', 'Mixer-B/16'. Each family module owns
its own size table (`VARIANTS`) and a `from_variant(variant, **overrides)` constructor, so a new
size is one table row in its family's file; a new family is one line here.
"""

import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from vit_repr.models import mixer, resnet, vit

_FAMILIES: dict[str, types.ModuleType] = {"ViT": vit, "BiT": resnet, "Mixer": mixer}


def known_names() -> list[str]:
  """Every registered model name, e.g. ['BiT-R101x1', ..., 'ViT-B/16', ...]."""
  return sorted(f"{family}-{variant}"
                for family, module in _FAMILIES.items() for variant in module.VARIANTS)


def create(name: str, **overrides) -> nn.Module:
  """Builds the Flax module registered as `name`.

  Args:
    name: e.g. 'ViT-B/16', 'ViT-Ti/16', 'BiT-R50x1', 'Mixer-B/16'.
    **overrides: constructor fields of the family's module that replace the variant's
      defaults, e.g. num_classes, classifier, depth, image_size, dtype, remove_skips.

  Returns:
    An unbound `flax.linen.Module`.

  Raises:
    ValueError: unknown name (the message lists the known ones) or unknown override.
  """
  family, _, variant = name.partition("-")
  module = _FAMILIES.get(family)
  if module is None or variant not in module.VARIANTS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(known_names())}.")
  return module.from_variant(variant, **overrides)


def create_from_config(name: str, overrides: Mapping[str, Any], **defaults) -> nn.Module:
  """`create(name, **defaults, **overrides)` for overrides read from a config.

  An override that is None (a config placeholder left unset, e.g. a width field) keeps the
  value of `defaults` or the registered one.

  Args:
    name: registered model name.
    overrides: constructor fields from a config, e.g. `spec.overrides.to_dict()`.
    **defaults: values the config's overrides may replace (e.g. num_classes, image_size).

  Returns:
    An unbound `flax.linen.Module`.
  """
  return create(name, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})
