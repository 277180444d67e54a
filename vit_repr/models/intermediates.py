"""Flattens the 'intermediates' collection that the models `sow` into `{name: array}`.

Every model in `vit_repr.models` sows its representations with
`self.sow('intermediates', tag, value)` in the module that owns them, so
`model.apply(variables, images, mutable=['intermediates'])` returns a nested dict mirroring the
module tree whose leaves are 1-tuples. The analyses of Raghu et al. (NeurIPS 2021) address
representations by flat '/'-joined names such as 'Transformer/encoderblock_3/out' (the names
and shapes are listed in each model's module docstring); this module makes that translation.
"""

from collections.abc import Mapping
from typing import Any

import jax

COLLECTION = "intermediates"


def flatten_intermediates(collection: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Turns sown intermediates into a flat `{'Transformer/encoderblock_3/out': array}` dict.

  Pure and trace-safe: call it inside `jax.jit` and keep only the names you need, and the rest
  is never materialised.

  Args:
    collection: the mutable state returned by `model.apply(..., mutable=['intermediates'])`,
      either `{'intermediates': {...}}` (other collections beside it are ignored) or the inner
      nested dict itself.

  Returns:
    `{name: array}` with names the module path and the tag joined by '/', in sow order.

  Raises:
    ValueError: a value was sown more than once under one name (the module was called several
      times in one `apply`), or a leaf is not a sow tuple.
  """
  if COLLECTION in collection and isinstance(collection[COLLECTION], Mapping):
    collection = collection[COLLECTION]
  flat: dict[str, jax.Array] = {}

  def visit(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        visit(value, name + "/")
      elif isinstance(value, tuple) and len(value) == 1:
        flat[name] = value[0]
      elif isinstance(value, tuple):
        raise ValueError(
            f"Intermediate {name!r} was sown {len(value)} times in one apply (its module ran "
            f"{len(value)} times); flatten the intermediates of each call separately.")
      else:
        raise ValueError(
            f"Intermediate {name!r} is a {type(value).__name__}, not a sow tuple; pass the "
            f"collection returned by model.apply(..., mutable=['{COLLECTION}']).")

  visit(collection, "")
  return flat
