"""Tests for vit_repr.models.vit: sown intermediates, skip removal, dtypes, input checks,
big_vision's layouts (MAP head, sincos2d position embedding, So400m sizes) and the options of
timm's families (registers, distillation token, pre_norm, activations, LayerNorm epsilon, patch
bias). Their forward passes are checked against a NumPy float64 reference in
tests/test_checkpoints.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr.models import create, flatten_intermediates
from vit_repr.models import vit

B, SIZE, PATCH, D, HEADS, MLP, DEPTH, C = 2, 32, 8, 24, 3, 40, 2, 5
N = (SIZE // PATCH) ** 2


def tiny(**overrides):
  fields = dict(image_size=SIZE, patch_size=PATCH, hidden_size=D, num_heads=HEADS, mlp_dim=MLP,
                depth=DEPTH, num_classes=C)
  return create("ViT-Ti/16", **{**fields, **overrides})


def random_params(model, seed=0):
  """Random float32 parameters of `model` (no zero head), drawn in NumPy from the init shapes."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3),
                                               jnp.float32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape)
    if name == "kernel":
      noise /= np.sqrt(leaf.size / leaf.shape[-1])
    elif name == "scale":
      noise = 1 + 0.1 * noise
    else:
      noise *= 0.2
    return jnp.asarray(noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(seed=0, size=SIZE):
  return jax.random.uniform(jax.random.key(seed), (B, size, size, 3), minval=-1, maxval=1)


def run(model, params, x):
  """Jitted forward pass: (logits, {name: float64 intermediate})."""
  out, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  return out, {k: np.asarray(v, np.float64) for k, v in flatten_intermediates(state).items()}


def expected_shapes(tokens, pre_logits_width, classifier="token", distillation=False):
  shapes = {"Transformer/in": (B, tokens, D)}
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}/"
    shapes.update({b + "in": (B, tokens, D), b + "attn_probs": (B, HEADS, tokens, tokens),
                   b + "head_outputs": (B, tokens, HEADS, D // HEADS),
                   b + "attn_branch": (B, tokens, D), b + "mid": (B, tokens, D),
                   b + "mlp_branch": (B, tokens, D), b + "out": (B, tokens, D)})
  shapes["Transformer/encoder_norm_out"] = (B, tokens, D)
  if classifier == "map":
    shapes["MAPHead_0/attn_probs"] = (B, HEADS, 1, tokens)
  shapes.update({"pre_logits": (B, pre_logits_width), "logits": (B, C)})
  if distillation:
    shapes["pre_logits_dist"] = (B, D)
  return shapes


@pytest.mark.parametrize("overrides,tokens,width", [
    ({}, N + 1, D),
    ({"classifier": "gap"}, N, D),
    ({"representation_size": 7}, N + 1, 7),
    ({"posemb_includes_cls": False}, N + 1, D),
    ({"classifier": "map"}, N, D),
    ({"classifier": "map", "posemb": "sincos2d", "representation_size": 7}, N, 7),
    ({"posemb": "sincos2d", "posemb_includes_cls": False}, N + 1, D),
    ({"layer_scale_init": 1e-5}, N + 1, D),
    ({"num_registers": 4, "layer_scale_init": 1e-5, "mlp_activation": "gelu"}, N + 5, D),
    ({"num_registers": 4, "classifier": "gap", "posemb_includes_cls": False}, N + 4, D),
    ({"num_registers": 2, "classifier": "map", "posemb": "sincos2d",
      "posemb_includes_cls": False}, N + 2, D),
    ({"distillation": True}, N + 2, D),
    ({"distillation": True, "num_registers": 3}, N + 5, D),
    ({"pre_norm": True, "layer_norm_eps": 1e-5, "mlp_activation": "quick_gelu",
      "patch_bias": False}, N + 1, D),
], ids=["token", "gap", "token-prelogits", "token-bigvision-posemb", "map", "map-sincos2d",
        "token-sincos2d", "token-layerscale", "dinov2-registers", "gap-registers",
        "map-registers-sincos2d", "deit-distilled", "distilled-registers", "clip"])
def test_every_intermediate_has_the_documented_name_and_shape(overrides, tokens, width):
  model = tiny(**overrides)
  want = expected_shapes(tokens, width, model.classifier, model.distillation)
  _, inter = run(model, random_params(model), images())
  assert {k: v.shape for k, v in inter.items()} == want
  for name in want:  # every name is documented
    generic = name.replace("encoderblock_0", "encoderblock_{i}").replace(
        "encoderblock_1", "encoderblock_{i}")
    assert generic in vit.__doc__, generic


def np_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_intermediates_satisfy_the_block_equations(classifier):
  model = tiny(classifier=classifier, representation_size=7)
  params = random_params(model)
  logits, inter = run(model, params, images())
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  close = dict(rtol=1e-5, atol=1e-5)
  for i in range(DEPTH):
    b = f"Transformer/encoderblock_{i}/"
    attn = p["Transformer"][f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]
    ln = p["Transformer"][f"encoderblock_{i}"]["LayerNorm_0"]
    # Attention probabilities [b, heads, queries, keys] and per-head outputs, from z directly.
    y = np_layer_norm(inter[b + "in"], ln["scale"], ln["bias"])
    q, k, v = (np.einsum("btd,dhe->bthe", y, attn[n]["kernel"]) + attn[n]["bias"]
               for n in ("query", "key", "value"))
    scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(D // HEADS)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(inter[b + "attn_probs"], probs, **close)
    np.testing.assert_allclose(inter[b + "head_outputs"],
                               np.einsum("bhqk,bkhe->bqhe", probs, v), **close)
    np.testing.assert_allclose(
        inter[b + "attn_branch"],
        np.einsum("bqhe,hed->bqd", inter[b + "head_outputs"], attn["out"]["kernel"])
        + attn["out"]["bias"], **close)
    np.testing.assert_allclose(inter[b + "mid"], inter[b + "in"] + inter[b + "attn_branch"],
                               **close)
    np.testing.assert_allclose(inter[b + "out"], inter[b + "mid"] + inter[b + "mlp_branch"],
                               **close)
  np.testing.assert_array_equal(inter["Transformer/encoderblock_1/in"],
                                inter["Transformer/encoderblock_0/out"])
  np.testing.assert_array_equal(inter["Transformer/encoderblock_0/in"], inter["Transformer/in"])
  norm = p["Transformer"]["encoder_norm"]
  encoded = np_layer_norm(inter[f"Transformer/encoderblock_{DEPTH - 1}/out"], norm["scale"],
                          norm["bias"])
  np.testing.assert_allclose(inter["Transformer/encoder_norm_out"], encoded, **close)
  pooled = encoded[:, 0] if classifier == "token" else encoded.mean(1)
  pre = np.tanh(pooled @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"])
  np.testing.assert_allclose(inter["pre_logits"], pre, **close)
  np.testing.assert_allclose(logits, pre @ p["head"]["kernel"] + p["head"]["bias"], **close)
  np.testing.assert_array_equal(inter["logits"], np.asarray(logits))


@pytest.mark.parametrize("posemb_includes_cls", [True, False], ids=["vit-cls-slot", "big-vision"])
def test_cls_token_and_position_embedding_order(posemb_includes_cls):
  model = tiny(posemb_includes_cls=posemb_includes_cls)
  params = random_params(model)
  x = images()
  _, inter = run(model, params, x)
  pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"], np.float64)
  cls = np.asarray(params["cls"], np.float64)[0, 0]
  kernel = np.asarray(params["embedding"]["kernel"], np.float64)
  patches = np.asarray(x, np.float64).reshape(B, 4, PATCH, 4, PATCH, 3).transpose(
      0, 1, 3, 2, 4, 5).reshape(B, N, -1) @ kernel.reshape(-1, D) + np.asarray(
          params["embedding"]["bias"])
  assert pe.shape == ((1, N + 1, D) if posemb_includes_cls else (1, N, D))
  want_cls = cls + pe[0, 0] if posemb_includes_cls else cls
  want_patches = patches + (pe[0, 1:] if posemb_includes_cls else pe[0])
  np.testing.assert_allclose(inter["Transformer/in"][:, 0], np.tile(want_cls, (B, 1)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(inter["Transformer/in"][:, 1:], want_patches, rtol=1e-5, atol=1e-5)


def test_remove_skips_drops_both_residual_additions():
  model, cut = tiny(), tiny(remove_skips=(1,))
  params = random_params(model)
  x = images()
  full_logits, full = run(model, params, x)
  cut_logits, inter = run(cut, params, x)
  b = "Transformer/encoderblock_1/"
  np.testing.assert_array_equal(inter[b + "mid"], inter[b + "attn_branch"])
  np.testing.assert_array_equal(inter[b + "out"], inter[b + "mlp_branch"])
  for name in full:  # block 0 is untouched
    if "encoderblock_0" in name:
      np.testing.assert_array_equal(inter[name], full[name])
  assert np.max(np.abs(np.asarray(cut_logits) - np.asarray(full_logits))) > 1e-3


def test_selecting_an_intermediate_under_jit_matches_eager():
  model = tiny()
  params = random_params(model)
  x = images()
  name = "Transformer/encoderblock_1/attn_probs"

  @jax.jit
  def select(params, x):
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    return flatten_intermediates(state)[name]

  _, state = model.apply({"params": params}, x, mutable=["intermediates"])
  eager = np.asarray(flatten_intermediates(state)[name])
  np.testing.assert_allclose(np.asarray(select(params, x)), eager, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, model16 = tiny(), tiny(dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
  assert all(a.dtype == jnp.float32
             for a in jax.tree.leaves(jax.eval_shape(model16.init, jax.random.key(0), x)))
  params = random_params(model)
  logits32, _ = run(model, params, images())
  logits16, state = jax.jit(
      lambda p, x: model16.apply({"params": p}, x, mutable=["intermediates"]))(params, images())
  inter = flatten_intermediates(state)
  assert logits16.dtype == jnp.float32
  assert inter["Transformer/encoderblock_0/out"].dtype == jnp.bfloat16
  assert inter["Transformer/encoderblock_0/attn_probs"].dtype == jnp.bfloat16
  scale = np.max(np.abs(np.asarray(logits32)))
  np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.05 * scale)


def test_dropout_only_in_training():
  model = tiny(dropout_rate=0.3, attention_dropout_rate=0.3)
  params = random_params(model)
  x = images()
  evaluated = jax.jit(model.apply)({"params": params}, x)
  np.testing.assert_array_equal(np.asarray(evaluated),
                                np.asarray(jax.jit(tiny().apply)({"params": params}, x)))
  train = jax.jit(lambda p, x, key: model.apply(p, x, train=True, rngs={"dropout": key}))
  trained = [train({"params": params}, x, jax.random.key(s)) for s in (0, 1)]
  assert np.max(np.abs(np.asarray(trained[0]) - np.asarray(evaluated))) > 1e-3
  assert np.max(np.abs(np.asarray(trained[0]) - np.asarray(trained[1]))) > 1e-3


@pytest.mark.parametrize("shape", [(B, 16, 16, 3), (B, SIZE, SIZE, 1), (SIZE, SIZE, 3)],
                         ids=["wrong-size", "wrong-channels", "no-batch"])
def test_wrong_images_raise_a_clear_error(shape):
  model = tiny()
  params = random_params(model)
  with pytest.raises(ValueError, match=r"expects images \[batch, 32, 32, 3\].*got shape.*"
                                       r"Resize.*image_size="):
    model.apply({"params": params}, jnp.zeros(shape))


@pytest.mark.parametrize("overrides,match", [
    ({"hidden": 3}, r"Unknown override\(s\) \['hidden'\].*accepted fields: num_classes, "
                    r"image_size, patch_size, hidden_size"),
    ({"classifier": "tok"}, r"classifier must be one of \('token', 'gap', 'map'\)"),
    ({"posemb": "sincos"}, r"posemb must be one of \('learn', 'sincos2d'\); got 'sincos'"),
    ({"posemb": "sincos2d", "classifier": "gap", "hidden_size": 6, "num_heads": 3},
     r"posemb='sincos2d' needs hidden_size a multiple of 4.*got hidden_size=6"),
    ({"posemb": "sincos2d"}, "posemb_includes_cls=False"),
    ({"layer_scale_init": 0.0}, r"layer_scale_init must be None \(no LayerScale\) or a positive "
                                r"float.*got 0.0"),
    ({"remove_skips": (2,)}, r"block indices in \[0, 2\)"),
    ({"remove_skips": (0, 0)}, "distinct"),
    ({"image_size": 36}, "not a multiple of patch_size"),
    ({"num_heads": 5}, "does not divide hidden_size"),
    ({"depth": 0}, "positive integers"),
    ({"dtype": jnp.int32}, "floating-point"),
    ({"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ({"mlp_activation": "relu"}, r"mlp_activation must be one of \('gelu_tanh', 'gelu', "
                                 r"'quick_gelu'\).*got 'relu'"),
    ({"layer_norm_eps": 0.0}, r"layer_norm_eps must be a positive float.*got 0.0"),
    ({"layer_norm_eps": -1e-6}, r"layer_norm_eps must be a positive float.*got -1e-06"),
    ({"num_registers": -1}, r"num_registers must be a non-negative integer.*got -1"),
    ({"num_registers": 2.0}, r"num_registers must be a non-negative integer.*got 2.0"),
    ({"distillation": 1, "pre_norm": "yes"},
     r"ViT fields \['distillation', 'pre_norm'\] must be True or False"),
    ({"distillation": True, "classifier": "gap"},
     r"distillation=True .* needs classifier='token'; got classifier='gap'"),
    ({"distillation": True, "representation_size": 7},
     r"distillation=True has no pre-logits layer.*representation_size=None"),
    ({"posemb": "sincos2d", "classifier": "gap", "num_registers": 4},
     r"before the prefix tokens \(CLS, distillation, registers\).*posemb_includes_cls=False"),
], ids=["unknown", "classifier", "posemb", "sincos-width", "sincos-cls-slot", "layer-scale",
        "skip-range", "skip-dup", "image-size", "heads", "depth", "dtype", "dropout",
        "activation", "eps-zero", "eps-negative", "registers-negative", "registers-float",
        "flags-not-bool", "distillation-gap", "distillation-prelogits", "sincos-register-slots"])
def test_bad_fields_raise_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny(**overrides)


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="known: Ti/16, S/16, S/32, B/8, B/16"):
    vit.from_variant("B/4")


def test_flatten_intermediates_accepts_both_forms_and_rejects_repeated_sows():
  state = {"intermediates": {"a": {"b": (jnp.ones(2),)}, "c": (jnp.zeros(1),)}}
  for collection in (state, state["intermediates"]):
    flat = flatten_intermediates(collection)
    assert list(flat) == ["a/b", "c"]
    np.testing.assert_array_equal(flat["a/b"], np.ones(2))
  with pytest.raises(ValueError, match="'a/b' was sown 2 times"):
    flatten_intermediates({"a": {"b": (jnp.ones(2), jnp.ones(2))}})


def test_map_and_gap_models_have_no_prefix_token():
  for classifier, prefix in [("token", ("cls",)), ("gap", ()), ("map", ())]:
    token_layout = tiny(classifier=classifier).token_layout()
    assert token_layout.prefix == prefix
    assert token_layout.grid == (SIZE // PATCH, SIZE // PATCH)


@pytest.mark.parametrize("overrides,prefix", [
    ({"num_registers": 4}, ("cls",) + ("register",) * 4),
    ({"num_registers": 2, "classifier": "gap"}, ("register",) * 2),
    ({"num_registers": 1, "classifier": "map"}, ("register",)),
    ({"distillation": True}, ("cls", "distillation")),
    ({"distillation": True, "num_registers": 2}, ("cls", "distillation", "register", "register")),
    ({"pre_norm": True, "patch_bias": False}, ("cls",)),
], ids=["dinov2", "gap-registers", "map-register", "deit-distilled", "distilled-registers",
        "clip"])
def test_token_layout_lists_the_prefix_tokens_in_token_order(overrides, prefix):
  model = tiny(**overrides)
  assert model.token_layout().prefix == prefix
  assert model.token_layout().num_tokens == len(prefix) + N


def test_prefix_token_parameters_and_their_order_in_the_sequence():
  """CLS, dist, registers, then the patches; a position-embedding slot per prefix token."""
  model = tiny(distillation=True, num_registers=3)
  params = random_params(model)
  assert {k: params[k].shape for k in ("cls", "dist", "registers")} == {
      "cls": (1, 1, D), "dist": (1, 1, D), "registers": (1, 3, D)}
  assert {k: v.shape for k, v in params["head_dist"].items()} == {"kernel": (D, C), "bias": (C,)}
  pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"], np.float64)
  assert pe.shape == (1, 5 + N, D)
  _, inter = run(model, params, images())
  prefix = np.concatenate([np.asarray(params[k], np.float64) for k in ("cls", "dist", "registers")],
                          axis=1)
  np.testing.assert_allclose(inter["Transformer/in"][:, :5], np.tile(prefix + pe[:, :5], (B, 1, 1)),
                             rtol=1e-6, atol=1e-6)


def test_pre_norm_and_patch_bias_change_only_their_parameters():
  params = random_params(tiny(pre_norm=True, patch_bias=False))
  plain = random_params(tiny())
  assert set(params["embedding"]) == {"kernel"}
  assert set(params["Transformer"]) - set(plain["Transformer"]) == {"pre_norm"}
  assert {k: v.shape for k, v in params["Transformer"]["pre_norm"].items()} == {
      "scale": (D,), "bias": (D,)}


@pytest.mark.parametrize("name", vit.MLP_ACTIVATIONS)
def test_mlp_activations_are_the_documented_formulas(name):
  x = np.linspace(-6, 6, 241)
  want = {"gelu_tanh": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
          "gelu": np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]),
          "quick_gelu": x / (1 + np.exp(-1.702 * x))}[name]
  block = vit.MlpBlock(1, activation=name)
  identity = {"Dense_0": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)},
              "Dense_1": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}}
  got = block.apply({"params": identity}, jnp.asarray(x, jnp.float32)[:, None])[:, 0]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)


def test_sincos2d_model_has_no_position_embedding_parameter():
  model = tiny(classifier="map", posemb="sincos2d")
  params = random_params(model)
  assert "posembed_input" not in params["Transformer"]
  assert {"probe", "MultiHeadDotProductAttention_0", "LayerNorm_0", "MlpBlock_0"} == set(
      params["MAPHead_0"])


def test_so400m_sizes_are_big_visions():
  for patch in (14, 16):  # big_vision's decode_variant('So400m/14'), ('So400m/16')
    assert vit.VARIANTS[f"So400m/{patch}"] == {"hidden_size": 1152, "depth": 27, "mlp_dim": 4304,
                                               "num_heads": 16, "patch_size": patch}


def parameters_by_hand(width, depth, mlp, patch, grid, classes, classifier, posemb):
  """A ViT's parameter count summed from the shapes of the module docstring's layout."""
  attention = 3 * (width * width + width) + width * width + width  # q, k, v; out
  mlp_block = width * mlp + mlp + mlp * width + width
  block = 2 * (2 * width) + attention + mlp_block  # two LayerNorms
  total = patch * patch * 3 * width + width + depth * block + 2 * width + classes * width + classes
  prefix = 1 if classifier == "token" else 0
  total += prefix * width  # cls
  if posemb == "learn":  # with a CLS slot for 'token' (posemb_includes_cls=True)
    total += (prefix + grid * grid) * width
  if classifier == "map":  # probe, attention, LayerNorm, MLP
    total += width + attention + 2 * width + mlp_block
  return total


@pytest.mark.parametrize("name,classifier,posemb,pinned", [
    ("ViT-So400m/14", "map", "learn", 428_833_704),  # SigLIP So400m/14 224px tower + head
    ("ViT-So400m/16", "map", "sincos2d", 428_746_152),
    ("ViT-So400m/14", "token", "learn", 413_597_656),  # the registry's pinned counts
    ("ViT-So400m/16", "token", "learn", 413_735_896),
], ids=["so400m14-map", "so400m16-map-sincos2d", "so400m14-token", "so400m16-token"])
def test_so400m_parameter_count_matches_the_layout_by_hand(name, classifier, posemb, pinned):
  model = create(name, num_classes=1000, image_size=224, classifier=classifier, posemb=posemb)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  size = vit.VARIANTS[name.removeprefix("ViT-")]
  assert counted == parameters_by_hand(size["hidden_size"], size["depth"], size["mlp_dim"],
                                       size["patch_size"], 224 // size["patch_size"], 1000,
                                       classifier, posemb)
  assert counted == pinned


def test_layer_scale_parameters_start_at_the_init_value():
  model = tiny(layer_scale_init=1e-5)
  params = model.init(jax.random.key(0), images())["params"]
  plain = tiny().init(jax.random.key(0), images())["params"]
  for i in range(DEPTH):
    block = params["Transformer"][f"encoderblock_{i}"]
    for name in ("ls1", "ls2"):
      np.testing.assert_array_equal(np.asarray(block[name]["gamma"]), np.full(D, 1e-5, np.float32))
    assert set(block) - set(plain["Transformer"][f"encoderblock_{i}"]) == {"ls1", "ls2"}
