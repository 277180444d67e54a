"""Flax Linen ViT, BiT ResNet-v2 and MLP-Mixer that sow their intermediate representations."""

from vit_repr.models.intermediates import flatten_intermediates
from vit_repr.models.registry import create, create_from_config, known_names

__all__ = ["create", "create_from_config", "flatten_intermediates", "known_names"]
