"""Flax Linen ViT, BiT ResNet-v2 and MLP-Mixer that sow their intermediate representations and
describe them (`layout`: token layout, residual sub-layers, attention layers, figure labels)."""

from vit_repr.models.intermediates import flatten_intermediates
from vit_repr.models.layout import (AttentionLayer, SubLayer, TokenLayout, display_name,
                                    streams_and_branches)
from vit_repr.models.registry import create, create_from_config, known_names

__all__ = ["AttentionLayer", "SubLayer", "TokenLayout", "create", "create_from_config",
           "display_name", "flatten_intermediates", "known_names", "streams_and_branches"]
