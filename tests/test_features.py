"""Tests for vit_repr.features: selection, model order and token treatments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr import features
from vit_repr.models import TokenLayout, create, flatten_intermediates

IMAGE_SIZE = 32


def tiny_vit(classifier="token"):
  return create("ViT-Ti/16", image_size=IMAGE_SIZE, patch_size=8, depth=2, num_classes=10,
                classifier=classifier)


def tiny_resnet():
  return create("BiT-R50x1", image_size=IMAGE_SIZE, num_classes=10, units_per_stage=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def vit_and_params():
  model = tiny_vit()
  zeros = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  params = jax.jit(model.init)(jax.random.key(0), zeros)["params"]
  # A non-zero head so logits are informative.
  params = jax.tree.map(lambda p: p + 0.01 * jnp.ones_like(p), params)
  return model, params


def images(n=4, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, IMAGE_SIZE, IMAGE_SIZE, 3), minval=-1,
                            maxval=1)


def eager_intermediates(model, params, x):
  """Every intermediate of a full apply (jitted as a whole: op-by-op dispatch is slow)."""
  apply = jax.jit(lambda p, x: flatten_intermediates(
      model.apply({"params": p}, x, mutable=["intermediates"])[1]))
  return {k: np.asarray(v) for k, v in apply(params, x).items()}


def test_names_follow_the_models_computation_order():
  names = list(features.intermediate_shapes(tiny_vit(), IMAGE_SIZE))
  block0 = [n for n in names if n.startswith("Transformer/encoderblock_0/")]
  assert names[0] == "Transformer/in"
  assert block0 == [f"Transformer/encoderblock_0/{t}" for t in
                    ("in", "attn_probs", "head_outputs", "attn_branch", "mid", "mlp_branch", "out")]
  assert (names.index("Transformer/encoderblock_1/in")
          > names.index("Transformer/encoderblock_0/out"))
  assert names[-1] == "logits"


def test_twelve_blocks_sort_numerically_not_alphabetically():
  model = create("ViT-Ti/16", image_size=IMAGE_SIZE, patch_size=16, depth=12, num_classes=10)
  outs = features.select_names(list(features.intermediate_shapes(model, IMAGE_SIZE)),
                               r"Transformer/encoderblock_\d+/out")
  assert outs == [f"Transformer/encoderblock_{i}/out" for i in range(12)]


def test_resnet_shapes():
  shapes = features.intermediate_shapes(tiny_resnet(), IMAGE_SIZE)
  assert shapes["root_block/out"] == (1, 8, 8, 64)
  assert shapes["block1/out"] == (1, 8, 8, 256)
  assert shapes["block4/out"] == (1, 1, 1, 2048)
  assert list(shapes)[0] == "root_block/out"


def test_pattern_matching_nothing_lists_available_names():
  with pytest.raises(ValueError, match=r"matches no intermediate.*Transformer/encoderblock_0/out"):
    features.FeatureExtractor(tiny_vit(), "block9/out", image_size=IMAGE_SIZE)


def test_invalid_regex_and_unknown_mode_are_reported():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    features.select_names(["a"], "(")
  with pytest.raises(ValueError, match="token_mode"):
    features.FeatureExtractor(tiny_vit(), ".*/out", image_size=IMAGE_SIZE, token_mode="first")


@pytest.mark.parametrize("mode", features.TOKEN_MODES)
def test_token_modes_match_numpy_on_eager_intermediates(vit_and_params, mode):
  model, params = vit_and_params
  x = images()
  extractor = features.FeatureExtractor(model, [r"Transformer/encoderblock_\d+/out"],
                                        image_size=IMAGE_SIZE, token_mode=mode)
  got = extractor(params, x)
  eager = eager_intermediates(model, params, x)
  for name in extractor.names:
    tokens = eager[name]  # [b, 17, 192]: CLS + 4x4 patches.
    expected = {"all": tokens.reshape(4, -1), "cls": tokens[:, 0],
                "spatial": tokens[:, 1:].reshape(4, -1), "mean": tokens[:, 1:].mean(1)}[mode]
    np.testing.assert_allclose(np.asarray(got[name]), expected, rtol=1e-5, atol=1e-5)
    assert extractor.feature_sizes[name] == expected.shape[1]


def test_gap_model_has_no_cls_token():
  with pytest.raises(ValueError, match="no CLS token"):
    features.FeatureExtractor(tiny_vit("gap"), r".*/out", image_size=IMAGE_SIZE,
                              token_mode="cls")
  extractor = features.FeatureExtractor(tiny_vit("gap"), r"Transformer/encoderblock_0/out",
                                        image_size=IMAGE_SIZE, token_mode="spatial")
  assert extractor.feature_sizes == {"Transformer/encoderblock_0/out": 16 * 192}


def test_reduce_tokens_follows_the_token_layout():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  tokens = TokenLayout(grid=(2, 2), patch_size=8, prefix=("cls",))
  np.testing.assert_array_equal(features.reduce_tokens(x, "cls", token_layout=tokens), x[:, 0])
  np.testing.assert_array_equal(features.reduce_tokens(x, "spatial", token_layout=tokens),
                                x[:, 1:].reshape(2, 12))
  np.testing.assert_allclose(features.reduce_tokens(x, "mean", token_layout=tokens),
                             x[:, 1:].mean(1))
  for wrong in (None, TokenLayout(grid=(2, 2), patch_size=8)):
    with pytest.raises(ValueError, match="token layout"):
      features.reduce_tokens(x, "mean", token_layout=wrong)


def test_feature_maps_mean_over_locations():
  model = tiny_resnet()
  params = jax.jit(model.init)(jax.random.key(0), images(1))["params"]
  x = images()
  extractor = features.FeatureExtractor(model, ["root_block/out", "block2/out"],
                                        image_size=IMAGE_SIZE, token_mode="mean")
  got = extractor(params, x)
  eager = eager_intermediates(model, params, x)
  for name in ("root_block/out", "block2/out"):
    np.testing.assert_allclose(np.asarray(got[name]), eager[name].mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not apply"):
    features.FeatureExtractor(model, "pre_logits", image_size=IMAGE_SIZE, token_mode="mean")


def test_stream_yields_features_per_batch(vit_and_params):
  model, params = vit_and_params
  extractor = features.FeatureExtractor(model, "pre_logits", image_size=IMAGE_SIZE)
  batches = [{"image": images(seed=s), "label": jnp.zeros(4, jnp.int32)} for s in (1, 2)]
  out = list(extractor.stream(params, batches))
  assert len(out) == 2
  np.testing.assert_allclose(np.asarray(out[1][1]["pre_logits"]),
                             eager_intermediates(model, params, images(seed=2))["pre_logits"],
                             rtol=1e-5, atol=1e-5)
