"""Tests for vit_repr.checkpoints: original .npz layouts, repairs, errors and orbax round trips.

Checkpoints are written here in the original key layouts and shapes (np.savez with '/'-joined
keys) and checked against NumPy float64 forward passes written directly from the flat dicts.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import special

from vit_repr import checkpoints
from vit_repr.models import create, flatten_intermediates

WIDTH, HEADS, MLP, PATCH, CLASSES = 32, 4, 64, 8, 10
POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"


# --- Checkpoints in the original layouts -------------------------------------------------------

def _dense(rng, shape, fan_in):
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _vector(rng, n, mean=0.0):
  return (mean + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _attention_weights(rng, prefix):
  """Random `{prefix}{query, key, value, out}/{kernel, bias}` in the original layout."""
  d, hd = WIDTH, WIDTH // HEADS
  w = {}
  for name in ("query", "key", "value"):
    w[f"{prefix}{name}/kernel"] = _dense(rng, (d, HEADS, hd), d)
    w[f"{prefix}{name}/bias"] = _vector(rng, (HEADS, hd))
  w[f"{prefix}out/kernel"] = _dense(rng, (HEADS, hd, d), d)
  w[f"{prefix}out/bias"] = _vector(rng, d)
  return w


def _mlp_weights(rng, prefix):
  """Random `{prefix}Dense_{0,1}/{kernel, bias}` of width MLP."""
  d = WIDTH
  return {f"{prefix}Dense_0/kernel": _dense(rng, (d, MLP), d),
          f"{prefix}Dense_0/bias": _vector(rng, MLP),
          f"{prefix}Dense_1/kernel": _dense(rng, (MLP, d), MLP),
          f"{prefix}Dense_1/bias": _vector(rng, d)}


def vit_checkpoint(seed=0, *, depth=2, grid=4, patch=PATCH, classifier="token",
                   posemb="learn", layer_scale=False, representation_size=None,
                   num_classes=CLASSES, registers=0, distillation=False, posemb_slots=True,
                   pre_norm=False, patch_bias=True):
  """A random ViT in the vision_transformer layout (pos embedding with the prefix slots).

  classifier='map' adds big_vision's MAPHead_0 weights; posemb='sincos2d' has no position
  embedding; layer_scale adds every block's LayerScale `ls1/gamma` and `ls2/gamma`; registers
  adds `registers` [1, registers, D]; distillation adds `dist` and `head_dist`; posemb_slots=False
  gives the position embedding no slot for the prefix tokens (CLS, dist, registers); pre_norm adds
  `Transformer/pre_norm`; patch_bias=False drops `embedding/bias`.
  """
  rng = np.random.default_rng(seed)
  d = WIDTH
  w = {"embedding/kernel": _dense(rng, (patch, patch, 3, d), patch * patch * 3)}
  if patch_bias:
    w["embedding/bias"] = _vector(rng, d)
  if classifier == "token":
    w["cls"] = _vector(rng, (1, 1, d))
  if distillation:
    w["dist"] = _vector(rng, (1, 1, d))
  if registers:
    w["registers"] = _vector(rng, (1, registers, d))
  slots = (classifier == "token") + distillation + registers if posemb_slots else 0
  if posemb == "learn":
    w[POS_EMBEDDING] = _vector(rng, (1, slots + grid * grid, d))
  if pre_norm:
    w["Transformer/pre_norm/scale"] = _vector(rng, d, 1.0)
    w["Transformer/pre_norm/bias"] = _vector(rng, d)
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = _vector(rng, d, 1.0), _vector(rng, d)
    w.update(_attention_weights(rng, f"{b}MultiHeadDotProductAttention_1/"))
    w.update(_mlp_weights(rng, f"{b}MlpBlock_3/"))
    if layer_scale:
      w[f"{b}ls1/gamma"], w[f"{b}ls2/gamma"] = _vector(rng, d, 0.5), _vector(rng, d, 0.5)
  w["Transformer/encoder_norm/scale"] = _vector(rng, d, 1.0)
  w["Transformer/encoder_norm/bias"] = _vector(rng, d)
  if classifier == "map":
    w["MAPHead_0/probe"] = _vector(rng, (1, 1, d))
    w.update(_attention_weights(rng, "MAPHead_0/MultiHeadDotProductAttention_0/"))
    w["MAPHead_0/LayerNorm_0/scale"] = _vector(rng, d, 1.0)
    w["MAPHead_0/LayerNorm_0/bias"] = _vector(rng, d)
    w.update(_mlp_weights(rng, "MAPHead_0/MlpBlock_0/"))
  head_in = d
  if representation_size:
    w["pre_logits/kernel"] = _dense(rng, (d, representation_size), d)
    w["pre_logits/bias"] = _vector(rng, representation_size)
    head_in = representation_size
  w["head/kernel"] = _dense(rng, (head_in, num_classes), head_in)
  w["head/bias"] = _vector(rng, num_classes)
  if distillation:
    w["head_dist/kernel"] = _dense(rng, (d, num_classes), d)
    w["head_dist/bias"] = _vector(rng, num_classes)
  return w


def mixer_checkpoint(seed=0, *, depth=2, grid=4, tokens_mlp=12, channels_mlp=48):
  """A random MLP-Mixer in the vision_transformer layout."""
  rng = np.random.default_rng(seed)
  d, n = WIDTH, grid * grid
  w = {"stem/kernel": _dense(rng, (PATCH, PATCH, 3, d), PATCH * PATCH * 3),
       "stem/bias": _vector(rng, d)}
  for i in range(depth):
    b = f"MixerBlock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = _vector(rng, d, 1.0), _vector(rng, d)
    for mlp, outer, inner in (("token_mixing", n, tokens_mlp), ("channel_mixing", d, channels_mlp)):
      w[f"{b}{mlp}/Dense_0/kernel"] = _dense(rng, (outer, inner), outer)
      w[f"{b}{mlp}/Dense_0/bias"] = _vector(rng, inner)
      w[f"{b}{mlp}/Dense_1/kernel"] = _dense(rng, (inner, outer), inner)
      w[f"{b}{mlp}/Dense_1/bias"] = _vector(rng, outer)
  w["pre_head_layer_norm/scale"] = _vector(rng, d, 1.0)
  w["pre_head_layer_norm/bias"] = _vector(rng, d)
  w["head/kernel"], w["head/bias"] = _dense(rng, (d, CLASSES), d), _vector(rng, CLASSES)
  return w


_BV_NAMES = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_1":
             "MultiHeadDotProductAttention_0", "LayerNorm_2": "LayerNorm_1",
             "MlpBlock_3": "MlpBlock_0"}


def to_big_vision(w, *, depth, scanned=False, prefix="params/"):
  """The same function in big_vision's layout: CLS + its pos-embedding slot folded together."""
  out = {}
  blocks = {}
  for key, value in w.items():
    if key == POS_EMBEDDING and "cls" not in w:
      out["pos_embedding"] = value
    elif key == POS_EMBEDDING:
      out["pos_embedding"] = value[:, 1:]
      out["cls"] = w["cls"] + value[:, :1]
    elif key.startswith("Transformer/encoderblock_"):
      _, block, module, rest = key.split("/", 3)
      blocks[(int(block.rsplit("_", 1)[1]), f"{_BV_NAMES[module]}/{rest}")] = value
    elif key != "cls":
      out[key] = value
  names = sorted({name for _, name in blocks})
  for name in names:
    if scanned:
      out[f"Transformer/encoderblock/{name}"] = np.stack([blocks[i, name] for i in range(depth)])
    else:
      out.update({f"Transformer/encoderblock_{i}/{name}": blocks[i, name] for i in range(depth)})
  return {prefix + k: v for k, v in out.items()}


def write(tmp_path, name, arrays):
  path = os.path.join(tmp_path, name)
  np.savez(path, **arrays)
  return path


# --- Independent NumPy float64 forward passes --------------------------------------------------

def np_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x):  # Flax's default GELU: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_activation(x, name):
  """'gelu_tanh' (np_gelu), 'gelu' (exact: x Phi(x), with erf) or 'quick_gelu' (CLIP's
  x * sigmoid(1.702 x))."""
  if name == "gelu_tanh":
    return np_gelu(x)
  if name == "gelu":
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))
  assert name == "quick_gelu", name
  return x / (1 + np.exp(-1.702 * x))


def np_patches(images, kernel, bias=0.0):
  b, h, wd, c = images.shape
  p = kernel.shape[0]
  x = images.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (wd // p), p * p * c) @ kernel.reshape(p * p * c, -1) + bias


def np_sincos_2d(rows, columns, width):
  """big_vision's posemb_sincos_2d, entry by entry: token r * columns + c gets, for
  omega_k = 10000^(-k / (width/4 - 1)), [sin(c omega), cos(c omega), sin(r omega), cos(r omega)].
  """
  omega = 10_000.0 ** (-np.arange(width // 4) / (width // 4 - 1))
  row, column = np.divmod(np.arange(rows * columns), columns)
  return np.concatenate([np.sin(np.outer(column, omega)), np.cos(np.outer(column, omega)),
                         np.sin(np.outer(row, omega)), np.cos(np.outer(row, omega))], axis=1)[None]


def np_attention(x, tokens, w, prefix):
  """Multi-head attention of queries from `x` [b, Q, D] over `tokens` [b, T, D]:
  (output [b, Q, D], probabilities [b, H, Q, T])."""
  q = np.einsum("btd,dhe->bthe", x, w[prefix + "query/kernel"]) + w[prefix + "query/bias"]
  k, v = (np.einsum("btd,dhe->bthe", tokens, w[f"{prefix}{n}/kernel"]) + w[f"{prefix}{n}/bias"]
          for n in ("key", "value"))
  scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhe->bqhe", probs, v)
  return np.einsum("bqhe,hed->bqd", heads, w[prefix + "out/kernel"]) + w[prefix + "out/bias"], probs


def np_mlp(x, w, prefix, activation="gelu_tanh"):
  """Dense_0, the activation (`np_activation`), Dense_1."""
  y = np_activation(x @ w[prefix + "Dense_0/kernel"] + w[prefix + "Dense_0/bias"], activation)
  return y @ w[prefix + "Dense_1/kernel"] + w[prefix + "Dense_1/bias"]


def np_vit(w, images, *, activation="gelu_tanh", eps=1e-6):
  """A ViT's forward pass from a vision_transformer-layout dict, in float64.

  Prefix tokens in the order CLS (`cls`), distillation token (`dist`), registers (`registers`),
  each present if the dict has it; 'token' if it has `cls` (with `head_dist`: the mean of the
  CLS head's and the distillation head's logits), 'map' if it has `MAPHead_0/...`, else 'gap'
  (the mean of the patch tokens, prefix tokens excluded). A position embedding with one slot per
  prefix token is added after they are concatenated, one over the patches only before; the fixed
  sincos2d embedding (added before the prefix tokens) when it has none. No patch bias without
  `embedding/bias`; `Transformer/pre_norm` if present; LayerScale where a block has `ls1/gamma`,
  `ls2/gamma`. `activation` (`np_activation`) in every MLP and `eps` in every LayerNorm.

  Returns:
    {'Transformer/in', 'Transformer/encoderblock_{i}/{attn_probs, out}', 'MAPHead_0/attn_probs'
    ('map' only), 'pre_logits', 'pre_logits_dist' (`head_dist` only), 'logits'}: float64 arrays.
  """
  w = {k: v.astype(np.float64) for k, v in w.items()}
  inter = {}
  x = np_patches(images.astype(np.float64), w["embedding/kernel"], w.get("embedding/bias", 0.0))
  batch, patches, width = x.shape
  prefix = np.concatenate([w[k] for k in ("cls", "dist", "registers") if k in w]
                          or [np.zeros((1, 0, width))], axis=1)
  slots = w[POS_EMBEDDING].shape[1] - patches if POS_EMBEDDING in w else 0
  assert slots in (0, prefix.shape[1]), (slots, prefix.shape)
  if POS_EMBEDDING not in w:
    side = int(round(np.sqrt(patches)))  # square images
    x = x + np_sincos_2d(side, side, width)
  elif not slots:
    x = x + w[POS_EMBEDDING]
  x = np.concatenate([np.repeat(prefix, batch, axis=0), x], axis=1)
  if slots:
    x = x + w[POS_EMBEDDING]
  if "Transformer/pre_norm/scale" in w:
    x = np_layer_norm(x, w["Transformer/pre_norm/scale"], w["Transformer/pre_norm/bias"], eps)
  inter["Transformer/in"] = x
  depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    y = np_layer_norm(x, w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"], eps)
    attn, inter[b + "attn_probs"] = np_attention(y, y, w, b + "MultiHeadDotProductAttention_1/")
    x = x + attn * w.get(b + "ls1/gamma", 1.0)
    y = np_layer_norm(x, w[b + "LayerNorm_2/scale"], w[b + "LayerNorm_2/bias"], eps)
    x = inter[b + "out"] = x + np_mlp(y, w, b + "MlpBlock_3/", activation) * w.get(
        b + "ls2/gamma", 1.0)
  tokens = np_layer_norm(x, w["Transformer/encoder_norm/scale"],
                         w["Transformer/encoder_norm/bias"], eps)
  if "cls" in w:
    x = tokens[:, 0]
  elif "MAPHead_0/probe" in w:
    m = "MAPHead_0/"
    probe = np.repeat(w[m + "probe"], batch, axis=0)
    pooled, inter[m + "attn_probs"] = np_attention(probe, tokens, w,
                                                   m + "MultiHeadDotProductAttention_0/")
    y = np_layer_norm(pooled, w[m + "LayerNorm_0/scale"], w[m + "LayerNorm_0/bias"], eps)
    x = (pooled + np_mlp(y, w, m + "MlpBlock_0/", activation))[:, 0]
  else:
    x = tokens[:, prefix.shape[1]:].mean(1)
  if "pre_logits/kernel" in w:
    x = np.tanh(x @ w["pre_logits/kernel"] + w["pre_logits/bias"])
  inter["pre_logits"] = x
  inter["logits"] = x @ w["head/kernel"] + w["head/bias"]
  if "head_dist/kernel" in w:
    inter["pre_logits_dist"] = tokens[:, 1]
    dist_logits = tokens[:, 1] @ w["head_dist/kernel"] + w["head_dist/bias"]
    inter["logits"] = (inter["logits"] + dist_logits) / 2
  return inter


def np_mixer(w, images):
  """Mixer logits from a vision_transformer-layout dict, in float64."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  x = np_patches(images.astype(np.float64), w["stem/kernel"], w["stem/bias"])
  depth = len({k.split("/")[0] for k in w if k.startswith("MixerBlock_")})
  for i in range(depth):
    b = f"MixerBlock_{i}/"
    y = np_layer_norm(x, w[b + "LayerNorm_0/scale"], w[b + "LayerNorm_0/bias"]).transpose(0, 2, 1)
    t = b + "token_mixing/"
    y = np_gelu(y @ w[t + "Dense_0/kernel"] + w[t + "Dense_0/bias"])
    x = x + (y @ w[t + "Dense_1/kernel"] + w[t + "Dense_1/bias"]).transpose(0, 2, 1)
    y = np_layer_norm(x, w[b + "LayerNorm_1/scale"], w[b + "LayerNorm_1/bias"])
    c = b + "channel_mixing/"
    y = np_gelu(y @ w[c + "Dense_0/kernel"] + w[c + "Dense_0/bias"])
    x = x + y @ w[c + "Dense_1/kernel"] + w[c + "Dense_1/bias"]
  x = np_layer_norm(x, w["pre_head_layer_norm/scale"], w["pre_head_layer_norm/bias"]).mean(1)
  return x @ w["head/kernel"] + w["head/bias"]


def images(n=3, size=32, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def tiny_vit(**overrides):
  fields = dict(image_size=32, patch_size=PATCH, hidden_size=WIDTH, num_heads=HEADS,
                mlp_dim=MLP, depth=2, num_classes=CLASSES)
  return create("ViT-Ti/16", **{**fields, **overrides})


def tiny_mixer(**overrides):
  fields = dict(image_size=32, patch_size=PATCH, hidden_size=WIDTH, depth=2,
                tokens_mlp_dim=12, channels_mlp_dim=48, num_classes=CLASSES)
  return create("Mixer-S/32", **{**fields, **overrides})


def logits(model, params, x):
  return np.asarray(jax.jit(model.apply)({"params": params}, x))


# --- Tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("classifier,representation_size", [
    ("token", None), ("token", 24), ("gap", None)], ids=["token", "token-prelogits", "gap"])
def test_vit_logits_match_numpy_float64(tmp_path, classifier, representation_size):
  w = vit_checkpoint(classifier=classifier, representation_size=representation_size)
  model = tiny_vit(classifier=classifier, representation_size=representation_size)
  params = checkpoints.load(write(tmp_path, "vit.npz", w), model)
  x = images()
  np.testing.assert_allclose(logits(model, params, x), np_vit(w, x)["logits"], rtol=1e-5,
                             atol=1e-5)


def test_mixer_logits_match_numpy_float64(tmp_path):
  w = mixer_checkpoint()
  model = tiny_mixer()
  params = checkpoints.load(write(tmp_path, "mixer.npz", w), model)
  x = images()
  np.testing.assert_allclose(logits(model, params, x), np_mixer(w, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "mixer"])
def test_load_round_trips_every_array(tmp_path, kind):
  w = vit_checkpoint(representation_size=24) if kind == "vit" else mixer_checkpoint()
  model = tiny_vit(representation_size=24) if kind == "vit" else tiny_mixer()
  params = checkpoints.load(write(tmp_path, "c.npz", w), model)
  flat = traverse_util.flatten_dict(params, sep="/")
  assert flat.keys() == w.keys()
  for key, value in w.items():
    assert flat[key].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)


@pytest.mark.parametrize("scanned,prefix", [
    (False, "params/"), (True, "params/"), (False, "params/img/")],
    ids=["unrolled", "scanned", "img-tower"])
def test_big_vision_layout_gives_the_same_logits(tmp_path, scanned, prefix):
  w = vit_checkpoint()
  bv = to_big_vision(w, depth=2, scanned=scanned, prefix=prefix)
  if prefix == "params/img/":  # a two-tower checkpoint: the text tower is ignored
    bv["params/txt/Embed_0/embedding"] = np.zeros((5, 3), np.float32)
  model = tiny_vit(posemb_includes_cls=False)
  params = checkpoints.load(write(tmp_path, "bv.npz", bv), model)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, WIDTH)
  x = images()
  np.testing.assert_allclose(logits(model, params, x), np_vit(w, x)["logits"], rtol=1e-5,
                             atol=1e-5)


def test_big_vision_pos_embedding_needs_the_matching_model(tmp_path):
  path = write(tmp_path, "bv.npz", to_big_vision(vit_checkpoint(), depth=2))
  with pytest.raises(ValueError, match="posemb_includes_cls=False"):
    checkpoints.load(path, tiny_vit())
  with pytest.raises(ValueError, match="posemb_includes_cls=True"):
    checkpoints.load(write(tmp_path, "vt.npz", vit_checkpoint()),
                     tiny_vit(posemb_includes_cls=False))


def siglip_image_tower(posemb):
  """A SigLIP-style two-tower checkpoint in big_vision's layout, image tower at full depth 12
  and a 14x14 grid (224px, patch 16), narrow width: (our-layout dict, big_vision `.npz` dict)."""
  w = vit_checkpoint(depth=12, grid=14, patch=16, classifier="map", posemb=posemb)
  bv = to_big_vision(w, depth=12, scanned=True, prefix="params/img/")
  assert "params/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel" in bv
  assert ("params/img/pos_embedding" in bv) == (posemb == "learn")
  rng = np.random.default_rng(7)  # the text tower and the loss's temperature and bias: ignored
  bv.update({"params/txt/Embed_0/embedding": _dense(rng, (50, 12), 12),
             "params/txt/Transformer/encoderblock/LayerNorm_0/scale": _vector(rng, (12, 12)),
             "params/txt/head/kernel": _dense(rng, (12, CLASSES), 12),
             "params/t": _vector(rng, 1), "params/b": _vector(rng, 1)})
  return w, bv


def siglip_vit(**overrides):
  return create("ViT-B/16", **{**dict(image_size=224, hidden_size=WIDTH, num_heads=HEADS,
                                      mlp_dim=MLP, depth=12, num_classes=CLASSES,
                                      classifier="map"), **overrides})


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_siglip_image_tower_matches_numpy_float64(tmp_path, posemb):
  w, bv = siglip_image_tower(posemb)
  model = siglip_vit(posemb=posemb)
  params = checkpoints.load(write(tmp_path, "siglip.npz", bv), model)
  assert ("posembed_input" in params["Transformer"]) == (posemb == "learn")
  x = images(n=2, size=224)
  got, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  inter = flatten_intermediates(state)
  want = np_vit(w, x)
  assert inter["MAPHead_0/attn_probs"].shape == (2, HEADS, 1, 196)
  assert sum(k.endswith("/out") for k in want) == 12
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(inter[name], np.float64), value, rtol=1e-4, atol=1e-4,
                               err_msg=name)
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,model_overrides,match", [
    ("drop-map", {}, r"missing from the checkpoint.*\n    MAPHead_0/LayerNorm_0/bias \(32,\)"),
    ("drop-posemb", {}, r"1 missing from the checkpoint:\n    "
                        r"Transformer/posembed_input/pos_embedding \(1, 196, 32\)"),
    ("keep", {"posemb": "sincos2d"}, r"1 unexpected in the checkpoint:\n    "
                                     r"Transformer/posembed_input/pos_embedding \(1, 196, 32\)"),
    ("keep", {"classifier": "gap"}, r"15 unexpected in the checkpoint \(first 8\):\n    "
                                    r"MAPHead_0/"),
], ids=["map-weights-missing", "learned-posemb-missing", "posemb-for-sincos-model",
        "map-weights-for-gap-model"])
def test_big_vision_map_and_posemb_mismatches_are_clear_errors(tmp_path, change, model_overrides,
                                                               match):
  _, bv = siglip_image_tower("learn")
  dropped = {"drop-map": "params/img/MAPHead_0/", "drop-posemb": "params/img/pos_embedding",
             "keep": None}[change]
  if dropped:
    bv = {k: v for k, v in bv.items() if not k.startswith(dropped)}
  with pytest.raises(ValueError, match=match):
    checkpoints.load(write(tmp_path, "bad.npz", bv), siglip_vit(**model_overrides))


def test_layer_scale_blocks_match_numpy_float64(tmp_path):
  w = vit_checkpoint(layer_scale=True)
  model = tiny_vit(layer_scale_init=1e-5)
  params = checkpoints.load(write(tmp_path, "ls.npz", w), model)
  x = images()
  got, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  inter = {k: np.asarray(v, np.float64) for k, v in flatten_intermediates(state).items()}
  want = np_vit(w, x)
  for name, value in want.items():
    np.testing.assert_allclose(inter[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=1e-5, atol=1e-5)
  for i in range(2):  # the sown branches are the scaled ones that the stream adds
    b = f"Transformer/encoderblock_{i}/"
    np.testing.assert_allclose(inter[b + "mid"], inter[b + "in"] + inter[b + "attn_branch"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inter[b + "out"], inter[b + "mid"] + inter[b + "mlp_branch"],
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"2 missing from the checkpoint:\n    "
                                       r"Transformer/encoderblock_0/ls1/gamma \(32,\)"):
    checkpoints.load(write(tmp_path, "plain.npz", vit_checkpoint(depth=1)),
                     tiny_vit(depth=1, layer_scale_init=1e-5))


# (checkpoint options, model overrides, np_vit options) of timm's ViT families, narrow.
TIMM_FAMILIES = {
    "dinov2-reg4-posemb-slots": (
        dict(registers=4, layer_scale=True),
        dict(num_registers=4, layer_scale_init=1e-5, mlp_activation="gelu"),
        dict(activation="gelu")),
    "dinov2-reg4-posemb-no-slots": (
        dict(registers=4, layer_scale=True, posemb_slots=False),
        dict(num_registers=4, layer_scale_init=1e-5, mlp_activation="gelu",
             posemb_includes_cls=False),
        dict(activation="gelu")),
    "deit-distilled": (
        dict(distillation=True),
        dict(distillation=True, mlp_activation="gelu"),
        dict(activation="gelu")),
    "openai-clip": (
        dict(pre_norm=True, patch_bias=False),
        dict(pre_norm=True, layer_norm_eps=1e-5, mlp_activation="quick_gelu", patch_bias=False),
        dict(activation="quick_gelu", eps=1e-5)),
}


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_timm_family_towers_match_numpy_float64_at_full_depth(tmp_path, family):
  """DINOv2 (registers, LayerScale, exact GELU), DeiT distilled, OpenAI CLIP (ln_pre, eps 1e-5,
  quick GELU, no patch bias): 12 blocks, a 14x14 grid (224px, patch 16), narrow width."""
  checkpoint, overrides, reference = TIMM_FAMILIES[family]
  w = vit_checkpoint(depth=12, grid=14, patch=16, **checkpoint)
  model = siglip_vit(classifier="token", **overrides)
  params = checkpoints.load(write(tmp_path, f"{family}.npz", w), model)
  x = images(n=2, size=224)
  got, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  inter = flatten_intermediates(state)
  want = np_vit(w, x, **reference)
  tokens = model.token_layout().num_tokens
  assert tokens == {"deit-distilled": 198, "openai-clip": 197}.get(family, 201)
  assert inter["Transformer/in"].shape == (2, tokens, WIDTH)
  assert sum(k.endswith("/out") for k in want) == 12
  assert ("pre_logits_dist" in want) == (family == "deit-distilled")
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(inter[name], np.float64), value, rtol=1e-4, atol=1e-4,
                               err_msg=name)
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpoint,overrides,reference", [
    (dict(classifier="gap", registers=3), dict(classifier="gap", num_registers=3), {}),
    (dict(classifier="gap", registers=3, posemb_slots=False),
     dict(classifier="gap", num_registers=3, posemb_includes_cls=False), {}),
    (dict(classifier="map", registers=2, pre_norm=True),
     dict(classifier="map", num_registers=2, pre_norm=True, layer_norm_eps=0.1,
          mlp_activation="quick_gelu"), dict(eps=0.1, activation="quick_gelu")),
    (dict(distillation=True, registers=2),
     dict(distillation=True, num_registers=2, mlp_activation="gelu"), dict(activation="gelu")),
    (dict(pre_norm=True, patch_bias=False),
     dict(pre_norm=True, patch_bias=False, layer_norm_eps=0.1), dict(eps=0.1)),
], ids=["gap-registers", "gap-registers-no-slots", "map-registers-prenorm-eps-quickgelu",
        "cls-dist-registers", "prenorm-nobias-eps"])
def test_prefix_tokens_poolings_and_norms_match_numpy_float64(tmp_path, checkpoint, overrides,
                                                              reference):
  """GAP over the patch tokens only, MAP over every token, CLS + dist + registers, and a large
  LayerNorm epsilon (0.1), which would show in every LayerNorm (pre_norm, the blocks',
  encoder_norm, the MAP head's) were it not applied there."""
  w = vit_checkpoint(**checkpoint)
  model = tiny_vit(**overrides)
  params = checkpoints.load(write(tmp_path, "c.npz", w), model)
  x = images()
  got, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  inter = flatten_intermediates(state)
  want = np_vit(w, x, **reference)
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(inter[name], np.float64), value, rtol=1e-5, atol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose(np.asarray(got), want["logits"], rtol=1e-5, atol=1e-5)
  with_default_eps = np_vit(w, x, activation=reference.get("activation", "gelu_tanh"))["logits"]
  if "eps" in reference:  # the epsilon changes the logits measurably
    assert np.max(np.abs(with_default_eps - want["logits"])) > 1e-3


@pytest.mark.parametrize("checkpoint,kept_slots,overrides,match", [
    (dict(registers=4), None, dict(num_registers=4, posemb_includes_cls=False),
     r"has 5 prefix slot\(s\).*\(prefix tokens: cls, register, register, register, register; "
     r"posemb_includes_cls=False\).*Build it with posemb_includes_cls=True\."),
    (dict(registers=4, posemb_slots=False), None, dict(num_registers=4),
     r"\(1, 16, 32\) has no prefix slot.*expects 5 \(cls, register, register, register, "
     r"register\)\. Build it with posemb_includes_cls=False\."),
    (dict(registers=4), 1, dict(num_registers=4),
     r"\(1, 17, 32\) has 1 prefix slot\(s\), but the model has 5 prefix tokens with slots"),
    (dict(registers=4), None, dict(distillation=True),
     r"\(1, 21, 32\) holds no square patch grid after 0 or 1 or 2 prefix slots \(the model's "
     r"prefix tokens: cls, distillation\)"),
    (dict(distillation=True), None, dict(classifier="gap"),
     r"\(1, 18, 32\) holds no square patch grid after 0 or 1 prefix slots \(the model's "
     r"prefix tokens: none\)"),
], ids=["slots-for-model-without", "no-slots-for-model-with", "dinov2-own-cls-slot-only",
        "neither", "dist-slots-for-gap"])
def test_prefix_slot_mismatches_are_clear_errors(tmp_path, checkpoint, kept_slots, overrides,
                                                 match):
  w = vit_checkpoint(**checkpoint)
  if kept_slots is not None:  # DINOv2's own files: a CLS slot only, registers without slots
    slots = w[POS_EMBEDDING].shape[1] - 16
    w[POS_EMBEDDING] = np.concatenate([w[POS_EMBEDDING][:, :kept_slots],
                                       w[POS_EMBEDDING][:, slots:]], axis=1)
  with pytest.raises(ValueError, match=match):
    checkpoints.load(write(tmp_path, "c.npz", w), tiny_vit(**overrides))


def _align_corners_bilinear(grid, new):
  """Direct formula: output i samples input i * (old - 1) / (new - 1), bilinearly."""
  old = grid.shape[0]
  pos = np.arange(new) * (old - 1) / (new - 1)
  lo = np.minimum(np.floor(pos).astype(int), old - 2)
  frac = pos - lo
  rows = grid[lo] * (1 - frac)[:, None, None] + grid[lo + 1] * frac[:, None, None]
  return rows[:, lo] * (1 - frac)[None, :, None] + rows[:, lo + 1] * frac[None, :, None]


@pytest.mark.parametrize("prefix,image_size,slot", [
    ({}, 48, 1), ({}, 24, 1), ({"classifier": "gap"}, 56, 0), ({"distillation": True}, 48, 2),
    ({"num_registers": 4}, 24, 5), ({"num_registers": 4}, 56, 5)],
    ids=["token-4to6", "token-4to3", "gap-4to7", "cls-dist-4to6", "cls-reg4-4to3",
         "cls-reg4-4to7"])
def test_pos_embedding_is_resized_bilinearly(tmp_path, caplog, prefix, image_size, slot):
  w = vit_checkpoint(classifier=prefix.get("classifier", "token"),
                     distillation=prefix.get("distillation", False),
                     registers=prefix.get("num_registers", 0))
  model = tiny_vit(image_size=image_size, **prefix)
  assert model.token_layout().num_prefix_tokens == slot
  with caplog.at_level(logging.INFO):
    params = checkpoints.load(write(tmp_path, "c.npz", w), model)
  assert "resizing the position embedding" in caplog.text
  got = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  old = w["Transformer/posembed_input/pos_embedding"].astype(np.float64)
  assert old.shape == (1, slot + 16, WIDTH)
  new = image_size // PATCH
  want_grid = _align_corners_bilinear(old[0, slot:].reshape(4, 4, WIDTH), new)
  np.testing.assert_allclose(got[0, slot:], want_grid.reshape(new * new, WIDTH), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(got[:, :slot], old[:, :slot])
  logits(model, params, images(size=image_size))  # the resized tree runs


@pytest.mark.parametrize("distillation", [False, True], ids=["head", "head-and-head_dist"])
def test_head_is_replaced_by_zeros_when_classes_differ(tmp_path, caplog, distillation):
  path = write(tmp_path, "c.npz", vit_checkpoint(num_classes=7, distillation=distillation))
  model = tiny_vit(num_classes=5, distillation=distillation)
  with caplog.at_level(logging.INFO):
    params = checkpoints.load(path, model)
  assert "zero-initialised" in caplog.text
  for head in ("head", "head_dist") if distillation else ("head",):
    assert params[head]["kernel"].shape == (WIDTH, 5)
    assert not np.any(np.asarray(params[head]["kernel"]))
    assert not np.any(np.asarray(params[head]["bias"]))
  np.testing.assert_array_equal(logits(model, params, images()), 0.0)


def test_pre_logits_are_dropped_when_the_model_has_none(tmp_path, caplog):
  w = vit_checkpoint(representation_size=24)
  with caplog.at_level(logging.INFO):
    params = checkpoints.load(write(tmp_path, "c.npz", w), tiny_vit())
  assert "dropping pre_logits" in caplog.text
  assert "pre_logits" not in params
  assert params["head"]["kernel"].shape == (WIDTH, CLASSES)  # [24, C] -> zeros [D, C]


def test_mismatch_raises_one_error_listing_every_kind(tmp_path):
  w = vit_checkpoint(depth=3)
  del w["Transformer/encoder_norm/scale"]
  w["embedding/bias"] = np.zeros(WIDTH + 1, np.float32)
  with pytest.raises(ValueError) as error:
    checkpoints.load(write(tmp_path, "c.npz", w), tiny_vit())
  message = str(error.value)
  assert "1 missing from the checkpoint:\n    Transformer/encoder_norm/scale (32,)" in message
  assert "16 unexpected in the checkpoint (first 8):" in message
  assert "Transformer/encoderblock_2/LayerNorm_0/bias (32,)" in message
  assert "1 with mismatched shapes:\n    embedding/bias: checkpoint (33,), model (32,)" in message
  assert "Build the model that matches the checkpoint" in message


def test_wrong_family_is_a_mismatch(tmp_path):
  with pytest.raises(ValueError, match="missing from the checkpoint"):
    checkpoints.load(write(tmp_path, "m.npz", mixer_checkpoint()), tiny_vit())


def test_pickled_arrays_are_refused(tmp_path):
  path = os.path.join(tmp_path, "evil.npz")
  np.savez(path, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="allow_pickle"):
    checkpoints.load(path, tiny_vit())


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    checkpoints.load(os.path.join(tmp_path, "nope.npz"), tiny_vit())


def test_raw_bfloat16_arrays_are_decoded(tmp_path):
  w = mixer_checkpoint()
  w["head/kernel"] = w["head/kernel"].astype(jnp.bfloat16)
  raw = dict(w, **{"head/kernel": w["head/kernel"].view(np.dtype("V2"))})
  params = checkpoints.load(write(tmp_path, "c.npz", raw), tiny_mixer())
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]),
                                w["head/kernel"].astype(np.float32))


def test_bit_layout_strips_the_resnet_prefix(tmp_path):
  model = create("BiT-R50x1", image_size=32, num_classes=CLASSES, units_per_stage=(1, 1, 1, 1),
                 width_factor=0.5)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  rng = np.random.default_rng(0)
  w = {f"resnet/{k}": rng.standard_normal(s.shape).astype(np.float32)
       for k, s in traverse_util.flatten_dict(shapes, sep="/").items()}
  assert "resnet/block1/unit01/a/proj/standardized_conv2d/kernel" in w
  params = checkpoints.load(write(tmp_path, "bit.npz", w), model)
  for key, value in traverse_util.flatten_dict(params, sep="/").items():
    np.testing.assert_array_equal(np.asarray(value), w[f"resnet/{key}"], err_msg=key)


def test_orbax_save_restore_round_trip(tmp_path):
  model = tiny_vit(representation_size=24)
  params = checkpoints.load(write(tmp_path, "c.npz", vit_checkpoint(representation_size=24)),
                            model)
  directory = os.path.join(tmp_path, "ours")
  checkpoints.save(directory, params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    checkpoints.save(directory, params)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  for target in (None, abstract, params):
    restored = checkpoints.restore(directory, target)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  checkpoints.save(directory, zeros, overwrite=True)
  assert not any(np.any(np.asarray(a)) for a in jax.tree.leaves(checkpoints.restore(directory)))


# --- FlexiViT's patch-embedding resize ---------------------------------------------------------

def _tf_resize(patches, size):
  """`tf.image.resize(..., 'bilinear')` of `[n, p, p, c]` patches: the resize FlexiViT inverts."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.image.resize(patches, (size, size), method="bilinear").numpy().astype(np.float64)


@pytest.mark.parametrize("old,new", [(8, 16), (16, 32), (16, 14), (14, 16), (16, 8)])
def test_patch_resize_matrix_is_tf_bilinear(old, new):
  """The resize the pseudo-inverse is taken of equals TensorFlow's bilinear resize (big_vision
  builds it by resizing basis patches with tf.image.resize)."""
  basis = np.eye(old * old).reshape(old * old, old, old, 1)
  expected = _tf_resize(basis, new).reshape(old * old, new * new).T  # [new^2, old^2]
  axis = checkpoints._bilinear_matrix(old, new)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.kron(axis, axis), expected, atol=1e-5)  # TF: float32.


@pytest.mark.parametrize("old,new", [(8, 16), (16, 32), (14, 16)])
def test_resized_patch_embedding_sees_upsampled_patches_as_the_original(old, new):
  """<resize(x), w'> = <x, w> for every patch x when the patch grows (FlexiViT's property)."""
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((old, old, 3, 5)).astype(np.float32)
  patches = rng.uniform(-1, 1, (7, old, old, 3))
  resized = checkpoints.resize_patch_embedding(kernel, new)
  assert resized.shape == (new, new, 3, 5) and resized.dtype == np.float32
  np.testing.assert_allclose(np.einsum("nhwc,hwcd->nd", _tf_resize(patches, new), resized),
                             np.einsum("nhwc,hwcd->nd", patches, kernel), atol=1e-4)


@pytest.mark.slow
def test_flexivit_file_loads_into_another_patch_size(tmp_path, caplog):
  """A patch-16 ViT-B/16 file (12 blocks, 14 x 14 grid) loaded into a patch-32 model at 448 px
  (the same grid): on images whose every patch is upsampled 2x it gives the original model's
  logits."""
  w = vit_checkpoint(depth=12, grid=14, patch=16)
  path = write(tmp_path, "vit_p16.npz", w)
  original = create("ViT-B/16", image_size=224, hidden_size=WIDTH, num_heads=HEADS,
                    mlp_dim=MLP, num_classes=CLASSES)
  flexible = create("ViT-B/16", image_size=448, patch_size=32, hidden_size=WIDTH,
                    num_heads=HEADS, mlp_dim=MLP, num_classes=CLASSES)
  with caplog.at_level(logging.INFO):
    params = checkpoints.load(path, flexible)
  assert "pseudo-inverse resize" in caplog.text
  x = np.random.default_rng(3).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  patches = x.reshape(2, 14, 16, 14, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 16, 16, 3)
  upsampled = _tf_resize(patches, 32).reshape(2, 14, 14, 32, 32, 3).transpose(0, 1, 3, 2, 4, 5)
  upsampled = upsampled.reshape(2, 448, 448, 3).astype(np.float32)
  np.testing.assert_allclose(logits(flexible, params, upsampled),
                             logits(original, checkpoints.load(path, original), x),
                             rtol=1e-4, atol=1e-4)
