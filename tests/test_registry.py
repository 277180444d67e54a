"""Tests for vit_repr.models.registry: names, overrides and pinned parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr.models import create, known_names

# Exact parameter counts with 1000 classes at 224x224 (no pre-logits), computed with
# jax.eval_shape. Each equals timm's count for the same architecture,
# sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=1000)
# .parameters()), timm 1.0.31; the timm name is given in each comment.
VIT_MIXER_PARAM_COUNTS = {
    "ViT-Ti/16": 5_717_416,  # vit_tiny_patch16_224
    "ViT-S/16": 22_050_664,  # vit_small_patch16_224
    "ViT-S/32": 22_878_952,  # vit_small_patch32_224
    "ViT-B/8": 86_576_872,  # vit_base_patch8_224
    "ViT-B/16": 86_567_656,  # vit_base_patch16_224
    "ViT-B/32": 88_224_232,  # vit_base_patch32_224
    "ViT-L/16": 304_326_632,  # vit_large_patch16_224
    "ViT-L/32": 306_535_400,  # vit_large_patch32_224
    "ViT-H/14": 632_045_800,  # vit_huge_patch14_224
    "Mixer-S/32": 19_104_624,  # mixer_s32_224
    "Mixer-S/16": 18_528_264,  # mixer_s16_224
    "Mixer-B/32": 60_293_428,  # mixer_b32_224
    "Mixer-B/16": 59_880_472,  # mixer_b16_224
    "Mixer-L/32": 206_939_264,  # mixer_l32_224
    "Mixer-L/16": 208_196_168,  # mixer_l16_224
}
# BiT ResNet-v2 (vit_repr/models/resnet.py): extend here when a BiT variant is added.
BIT_PARAM_COUNTS = {
    "BiT-R50x1": 25_549_352,  # resnetv2_50x1_bit
    "BiT-R50x3": 217_319_080,  # resnetv2_50x3_bit
    "BiT-R101x1": 44_541_480,  # resnetv2_101x1_bit
    "BiT-R101x3": 387_934_888,  # resnetv2_101x3_bit
    "BiT-R152x2": 236_335_208,  # resnetv2_152x2_bit
    "BiT-R152x4": 936_533_224,  # resnetv2_152x4_bit
}
# big_vision's So400m sizes with the registered defaults (CLS token, learned position embedding):
# timm has no such model (its SigLIP So400m is MAP-pooled); the by-hand sum of the layout's
# shapes is checked in tests/test_vit.py.
SO400M_PARAM_COUNTS = {
    "ViT-So400m/14": 413_597_656,
    "ViT-So400m/16": 413_735_896,
}
PARAM_COUNTS = {**VIT_MIXER_PARAM_COUNTS, **BIT_PARAM_COUNTS, **SO400M_PARAM_COUNTS}


def test_every_registered_model_has_a_pinned_parameter_count():
  assert sorted(PARAM_COUNTS) == known_names()


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
  model = create(name, num_classes=1000, image_size=224)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PARAM_COUNTS[name]


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown model 'ViT-X/16'\. Known models: .*ViT-B/16"):
    create("ViT-X/16")
  with pytest.raises(ValueError, match=r"Known models: .*Mixer-B/16.*ViT-Ti/16"):
    create("DeiT-B/16")


@pytest.mark.parametrize("name", ["ViT-B/16", "Mixer-B/16", "BiT-R50x1"])
def test_unknown_override_lists_the_accepted_fields(name):
  with pytest.raises(ValueError, match=r"Unknown override\(s\) \['widht'\].*accepted fields: "
                                       r"num_classes, image_size"):
    create(name, widht=3)


@pytest.mark.parametrize("name,overrides", [
    ("ViT-L/16", {"depth": 3, "classifier": "gap", "num_classes": 7}),
    ("Mixer-S/16", {"depth": 2, "image_size": 64, "remove_skips": (1,)}),
], ids=["vit", "mixer"])
def test_overrides_replace_the_variant_defaults(name, overrides):
  model = create(name, **overrides)
  for key, value in overrides.items():
    assert getattr(model, key) == value
