"""Computation order of layer names and figure labels, for tests that check saved outputs.

`layer_key` maps a layer name ('Transformer/encoderblock_10/mid', 'block2/unit03/out',
'MixerBlock_3/token_mixing', 'block1/head11') or its figure label ('10/mid', '2.03') to a key
that sorts in the order the model computes it, so block 2 comes before block 10 and token
mixing before channel mixing; text that is not a layer name gives None.
"""

import re

# Tags of one block, in the order a block computes them (ViT, Mixer and the residual
# sub-layers of vit_repr.residual).
TAGS = ("in", "attn_probs", "head_outputs", "attn_branch", "attn", "mid",
        "token_mixing_branch", "token_mixing", "mlp_branch", "mlp", "channel_mixing_branch",
        "channel_mixing", "out")
_BLOCK = re.compile(r"(?:[ab]:)?(?:Transformer/encoderblock_|MixerBlock_)?(\d+)/([a-z_]+)")
_UNIT = re.compile(r"(?:[ab]:)?(?:block(\d+)/unit(\d+)(?:/[a-z_]+)?|(\d)\.(\d+))")
_STAGE = re.compile(r"(?:[ab]:)?block(\d+)/out")
_HEAD = re.compile(r"block(\d+)/head(\d+)")


def layer_key(label: str) -> tuple[float, ...] | None:
  """A computation-order sort key of a layer name or label, or None if it is neither.

  A figure label may carry a model name before the last space or newline ('ViT-B/16 0/mid').
  """
  text = re.split(r"\s", label.strip())[-1] if label.strip() else ""
  if text == "root_block/out":
    return (0.0,)
  if match := _BLOCK.fullmatch(text):
    if match.group(2) in TAGS:
      return (float(match.group(1)), float(TAGS.index(match.group(2))))
    return None
  if match := _STAGE.fullmatch(text):
    return (float(match.group(1)), float("inf"))
  if match := _UNIT.fullmatch(text):
    stage, unit = (g for g in match.groups() if g is not None)
    return (float(stage), float(unit))
  if match := _HEAD.fullmatch(text):
    return (float(match.group(1)), float(match.group(2)))
  return None


def out_of_order(labels) -> list[str]:
  """The layer labels of `labels` that come after a label computed later (empty if ordered)."""
  keyed = [(key, label) for label in labels if (key := layer_key(str(label))) is not None]
  return [label for (before, _), (key, label) in zip(keyed, keyed[1:]) if key < before]
