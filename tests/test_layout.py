"""What the models say about themselves (vit_repr.models.layout), at full depth and grid.

Expected sub-layer lists are written out here by explicit loops over blocks, stages and units,
and checked against the names and parameters the models really have (`jax.eval_shape`, no
FLOPs, narrow widths).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr import features
from vit_repr.models import AttentionLayer, SubLayer, TokenLayout, create, display_name

IMAGE_SIZE = 224
NARROW = {
    "ViT-B/16": dict(hidden_size=24, mlp_dim=8),
    "Mixer-B/16": dict(hidden_size=8, tokens_mlp_dim=4, channels_mlp_dim=8),
    "BiT-R50x1": dict(width_factor=0.5),
}


def narrow(name, **overrides):
  return create(name, num_classes=10, image_size=IMAGE_SIZE, **NARROW[name], **overrides)


def param_paths(model) -> set[str]:
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  return {"/".join(k.key for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params["params"])[0]}


@pytest.mark.parametrize("classifier,prefix", [("token", ("cls",)), ("gap", ())],
                         ids=["token", "gap"])
def test_vit_b16_token_layout(classifier, prefix):
  tokens = create("ViT-B/16", classifier=classifier).token_layout()
  assert tokens == TokenLayout(grid=(14, 14), patch_size=16, prefix=prefix)
  assert tokens.num_prefix_tokens == len(prefix)
  assert tokens.num_spatial_tokens == 196
  assert tokens.num_tokens == 196 + len(prefix)
  assert tokens.has_cls == (classifier == "token")
  shapes = features.intermediate_shapes(narrow("ViT-B/16", classifier=classifier), IMAGE_SIZE)
  assert shapes["Transformer/encoderblock_11/out"][1] == tokens.num_tokens
  assert shapes["Transformer/encoderblock_11/attn_probs"][2:] == (tokens.num_tokens,) * 2


@pytest.mark.parametrize("overrides,prefix", [
    ({"num_registers": 4}, ("cls", "register", "register", "register", "register")),
    ({"distillation": True}, ("cls", "distillation")),
    ({"classifier": "gap", "num_registers": 4}, ("register",) * 4),
    ({"classifier": "map", "num_registers": 4}, ("register",) * 4),
], ids=["dinov2-reg4", "deit-distilled", "gap-reg4", "map-reg4"])
def test_vit_b16_prefix_tokens_layout(overrides, prefix):
  tokens = create("ViT-B/16", **overrides).token_layout()
  assert tokens == TokenLayout(grid=(14, 14), patch_size=16, prefix=prefix)
  assert (tokens.num_prefix_tokens, tokens.num_spatial_tokens) == (len(prefix), 196)
  assert tokens.has_cls == ("cls" in prefix)
  shapes = features.intermediate_shapes(narrow("ViT-B/16", **overrides), IMAGE_SIZE)
  assert shapes["Transformer/encoderblock_11/out"][1] == tokens.num_tokens == 196 + len(prefix)


def test_reduce_tokens_takes_cls_and_drops_every_prefix_token():
  """Token 0 is CLS; 'spatial' and 'mean' keep only the patches after CLS, dist and registers."""
  tokens = TokenLayout(grid=(2, 3), patch_size=16,
                       prefix=("cls", "distillation", "register", "register"))
  x = np.arange(2 * 10 * 3, dtype=np.float32).reshape(2, 10, 3)
  np.testing.assert_array_equal(features.reduce_tokens(x, "cls", token_layout=tokens), x[:, 0])
  np.testing.assert_array_equal(features.reduce_tokens(x, "spatial", token_layout=tokens),
                                x[:, 4:].reshape(2, 18))
  np.testing.assert_allclose(features.reduce_tokens(x, "mean", token_layout=tokens),
                             x[:, 4:].mean(1), rtol=1e-6)
  with pytest.raises(ValueError, match="has 9 tokens, but the model's token layout"):
    features.reduce_tokens(x[:, 1:], "mean", token_layout=tokens)


def test_mixer_b16_and_bit_r50_token_layouts():
  tokens = create("Mixer-B/16").token_layout()
  assert tokens == TokenLayout(grid=(14, 14), patch_size=16)
  assert (tokens.num_prefix_tokens, tokens.num_tokens, tokens.has_cls) == (0, 196, False)
  assert features.intermediate_shapes(narrow("Mixer-B/16"), IMAGE_SIZE)[
      "MixerBlock_11/out"][1] == 196
  assert create("BiT-R50x1").token_layout() is None


def vit_expected(depth, removed=()):
  expected = []
  for i in range(depth):
    if i in removed:
      continue
    block = "Transformer/encoderblock_" + str(i)
    expected.append(SubLayer(block + "/attn", block + "/in", block + "/attn_branch", i))
    expected.append(SubLayer(block + "/mlp", block + "/mid", block + "/mlp_branch", i))
  return expected


def mixer_expected(depth):
  expected = []
  for i in range(depth):
    block = "MixerBlock_" + str(i)
    expected.append(SubLayer(block + "/token_mixing", block + "/in",
                             block + "/token_mixing_branch", i))
    expected.append(SubLayer(block + "/channel_mixing", block + "/mid",
                             block + "/channel_mixing_branch", i))
  return expected


def resnet_expected(units_per_stage, removed=()):
  """BiT: the first unit of every stage projects its shortcut (width or stride changes)."""
  expected, previous, index = [], "root_block/out", 0
  for stage, units in enumerate(units_per_stage, start=1):
    for unit in range(1, units + 1):
      name = "block%d/unit%02d" % (stage, unit)
      if index not in removed:
        if unit == 1:
          expected.append(SubLayer(name, name + "/out", name + "/branch", index,
                                   stream_minus_branch=True))
        else:
          expected.append(SubLayer(name, previous, name + "/branch", index))
      previous = name + "/out"
      index += 1
  return expected


def check_names_exist(model, layers):
  shapes = features.intermediate_shapes(model, IMAGE_SIZE)
  for layer in layers:
    assert layer.stream in shapes and layer.branch in shapes, layer
    if layer.identity_shortcut:  # z and f(z) are added: same shape.
      assert shapes[layer.stream] == shapes[layer.branch], layer


@pytest.mark.parametrize("removed", [(), (3, 10)], ids=["all_skips", "skips_removed_3_10"])
def test_vit_b16_residual_sublayers(removed):
  layers = create("ViT-B/16", remove_skips=removed).residual_sublayers()
  assert list(layers) == vit_expected(12, removed)
  assert len(layers) == 2 * (12 - len(removed))
  check_names_exist(narrow("ViT-B/16", remove_skips=removed), layers)


def test_mixer_b16_residual_sublayers():
  layers = create("Mixer-B/16").residual_sublayers()
  assert list(layers) == mixer_expected(12)
  check_names_exist(narrow("Mixer-B/16"), layers)


@pytest.mark.parametrize("removed", [(), (0, 3, 4, 15)], ids=["all_skips", "skips_removed"])
def test_bit_r50x1_residual_sublayers_and_projection_shortcuts(removed):
  model = narrow("BiT-R50x1", remove_skips=removed)
  layers = model.residual_sublayers()
  assert list(layers) == resnet_expected((3, 4, 6, 3), removed)
  assert len(layers) == 16 - len(removed)
  check_names_exist(model, layers)
  # A projected shortcut is exactly a unit with projection parameters `a/proj`.
  projected = {p.split("/a/proj/")[0] for p in param_paths(model) if "/a/proj/" in p}
  assert projected == {layer.name for layer in layers if layer.stream_minus_branch}


@pytest.mark.parametrize("name", ["ViT-B/16", "ViT-H/14"])
def test_vit_attention_layers_at_full_depth(name):
  model = create(name, num_classes=10, image_size=IMAGE_SIZE, hidden_size=32, mlp_dim=8,
                 num_heads=4)
  depth = {"ViT-B/16": 12, "ViT-H/14": 32}[name]
  expected = [AttentionLayer(i, f"Transformer/encoderblock_{i}/attn_probs",
                             f"Transformer/encoderblock_{i}/head_outputs") for i in range(depth)]
  assert list(model.attention_layers()) == expected
  shapes = features.intermediate_shapes(model, IMAGE_SIZE)
  tokens = model.token_layout().num_tokens
  for layer in expected:  # [b, heads, queries, keys] and [b, T, heads, head_dim].
    assert shapes[layer.probs] == (1, 4, tokens, tokens), layer
    assert shapes[layer.heads] == (1, tokens, 4, 8), layer


@pytest.mark.parametrize("name", ["Mixer-B/16", "BiT-R50x1"])
def test_models_without_self_attention_have_no_attention_layers(name):
  assert narrow(name).attention_layers() == ()


DISPLAY_NAMES = {
    "Transformer/encoderblock_0/in": "0/in",
    "Transformer/encoderblock_3/mid": "3/mid",
    "Transformer/encoderblock_11/attn_probs": "11/attn_probs",
    "Transformer/encoderblock_10/attn": "10/attn",
    "Transformer/in": "Transformer/in",
    "Transformer/encoder_norm_out": "Transformer/encoder_norm_out",
    "MixerBlock_3/out": "3/out",
    "MixerBlock_11/token_mixing": "11/token_mixing",
    "stem_tokens": "stem_tokens",
    "block2/unit03/out": "2.03",
    "block3/unit06/out": "3.06",
    "block1/unit01/branch": "block1/unit01/branch",
    "block2/unit03": "block2/unit03",
    "block2/out": "block2/out",
    "root_block/out": "root_block/out",
    "block1/head11": "block1/head11",
    "pre_logits": "pre_logits",
}


@pytest.mark.parametrize("name,label", DISPLAY_NAMES.items(), ids=DISPLAY_NAMES)
def test_display_name(name, label):
  assert display_name(name) == label


@pytest.mark.parametrize("name", NARROW)
def test_display_names_of_every_sown_name_are_distinct(name):
  names = list(features.intermediate_shapes(narrow(name), IMAGE_SIZE))
  labels = [display_name(n) for n in names]
  assert len(set(labels)) == len(names)
  assert labels != names  # Each family's rule applies to its own names.


@pytest.mark.parametrize("fields,match", [
    (dict(grid=(14,), patch_size=16), "grid"),
    (dict(grid=(14, 0), patch_size=16), "grid"),
    (dict(grid=(14, 14), patch_size=0), "patch_size"),
    (dict(grid=(14, 14), patch_size=16, prefix=("mask",)), "prefix"),
    (dict(grid=(14, 14), patch_size=16, prefix=("cls", "cls")), "distinct"),
    (dict(grid=(14, 14), patch_size=16, prefix=("cls", "distillation", "distillation")),
     r"distinct \(only 'register' may repeat\)"),
], ids=["grid_rank", "empty_grid", "patch_size", "unknown_kind", "repeated_kind",
        "repeated_distillation"])
def test_bad_token_layouts_are_refused(fields, match):
  with pytest.raises(ValueError, match=match):
    TokenLayout(**fields)
