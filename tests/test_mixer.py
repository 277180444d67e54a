"""Tests for vit_repr.models.mixer: sown intermediates, skip removal, dtypes and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_repr.models import create, flatten_intermediates
from vit_repr.models import mixer

B, SIZE, PATCH, D, S, F, DEPTH, C = 2, 32, 8, 16, 12, 24, 2, 5
N = (SIZE // PATCH) ** 2


def tiny(**overrides):
  fields = dict(image_size=SIZE, patch_size=PATCH, hidden_size=D, tokens_mlp_dim=S,
                channels_mlp_dim=F, depth=DEPTH, num_classes=C)
  return create("Mixer-B/16", **{**fields, **overrides})


def random_params(model, seed=0):
  """Random float32 parameters of `model` (no zero head), drawn in NumPy from the init shapes."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape)
    if path[-1].key == "kernel":
      noise /= np.sqrt(leaf.size / leaf.shape[-1])
    elif path[-1].key == "scale":
      noise = 1 + 0.1 * noise
    else:
      noise *= 0.2
    return jnp.asarray(noise, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(seed=0):
  return jax.random.uniform(jax.random.key(seed), (B, SIZE, SIZE, 3), minval=-1, maxval=1)


def run(model, params, x):
  """Jitted forward pass: (logits, {name: float64 intermediate})."""
  out, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, x)
  return out, {k: np.asarray(v, np.float64) for k, v in flatten_intermediates(state).items()}


def np_layer_norm(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_every_intermediate_has_the_documented_name_and_shape():
  model = tiny()
  _, inter = run(model, random_params(model), images())
  want = {"stem_tokens": (B, N, D)}
  for i in range(DEPTH):
    want.update({f"MixerBlock_{i}/{tag}": (B, N, D) for tag in (
        "in", "token_mixing_branch", "mid", "channel_mixing_branch", "out")})
  want.update({"pre_head_layer_norm_out": (B, N, D), "pre_logits": (B, D), "logits": (B, C)})
  assert {k: v.shape for k, v in inter.items()} == want
  for name in want:
    assert name.replace("MixerBlock_0", "MixerBlock_{i}").replace(
        "MixerBlock_1", "MixerBlock_{i}") in mixer.__doc__, name


def test_intermediates_satisfy_the_block_equations():
  model = tiny()
  params = random_params(model)
  logits, inter = run(model, params, images())
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  close = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(inter["MixerBlock_0/in"], inter["stem_tokens"])
  for i in range(DEPTH):
    b, w = f"MixerBlock_{i}/", p[f"MixerBlock_{i}"]
    # Token mixing acts across tokens: an MLP over axis 1 of LN(z), [b, N, D].
    y = np_layer_norm(inter[b + "in"], w["LayerNorm_0"]["scale"], w["LayerNorm_0"]["bias"])
    t = w["token_mixing"]
    y = np.einsum("bnd,ns->bsd", y, t["Dense_0"]["kernel"]) + t["Dense_0"]["bias"][:, None]
    y = np.einsum("bsd,sn->bnd", np_gelu(y), t["Dense_1"]["kernel"]) + t["Dense_1"]["bias"][:, None]
    np.testing.assert_allclose(inter[b + "token_mixing_branch"], y, **close)
    np.testing.assert_allclose(inter[b + "mid"], inter[b + "in"] + y, **close)
    y = np_layer_norm(inter[b + "mid"], w["LayerNorm_1"]["scale"], w["LayerNorm_1"]["bias"])
    c = w["channel_mixing"]
    y = np_gelu(y @ c["Dense_0"]["kernel"] + c["Dense_0"]["bias"])
    y = y @ c["Dense_1"]["kernel"] + c["Dense_1"]["bias"]
    np.testing.assert_allclose(inter[b + "channel_mixing_branch"], y, **close)
    np.testing.assert_allclose(inter[b + "out"], inter[b + "mid"] + y, **close)
  norm = p["pre_head_layer_norm"]
  normed = np_layer_norm(inter[f"MixerBlock_{DEPTH - 1}/out"], norm["scale"], norm["bias"])
  np.testing.assert_allclose(inter["pre_head_layer_norm_out"], normed, **close)
  np.testing.assert_allclose(inter["pre_logits"], normed.mean(1), **close)
  np.testing.assert_allclose(logits, normed.mean(1) @ p["head"]["kernel"] + p["head"]["bias"],
                             **close)


def test_remove_skips_drops_both_residual_additions():
  model, cut = tiny(), tiny(remove_skips=[0])
  assert cut.remove_skips == (0,)
  params = random_params(model)
  full_logits, _ = run(model, params, images())
  cut_logits, inter = run(cut, params, images())
  np.testing.assert_array_equal(inter["MixerBlock_0/mid"],
                                inter["MixerBlock_0/token_mixing_branch"])
  np.testing.assert_array_equal(inter["MixerBlock_0/out"],
                                inter["MixerBlock_0/channel_mixing_branch"])
  np.testing.assert_allclose(inter["MixerBlock_1/mid"],
                             inter["MixerBlock_1/in"] + inter["MixerBlock_1/token_mixing_branch"],
                             rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(cut_logits) - np.asarray(full_logits))) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, model16 = tiny(), tiny(dtype="bfloat16")
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(
      model16.init, jax.random.key(0), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))))
  params = random_params(model)
  logits32, _ = run(model, params, images())
  logits16, state = jax.jit(
      lambda p, x: model16.apply({"params": p}, x, mutable=["intermediates"]))(params, images())
  assert logits16.dtype == jnp.float32
  assert flatten_intermediates(state)["MixerBlock_1/out"].dtype == jnp.bfloat16
  scale = np.max(np.abs(np.asarray(logits32)))
  np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.05 * scale)


@pytest.mark.parametrize("shape", [(B, 24, 24, 3), (B, SIZE, SIZE, 4)],
                         ids=["wrong-size", "wrong-channels"])
def test_wrong_images_raise_a_clear_error(shape):
  model = tiny()
  with pytest.raises(ValueError, match=r"MLP-Mixer expects images \[batch, 32, 32, 3\].*"
                                       r"got shape.*image_size="):
    model.apply({"params": random_params(model)}, jnp.zeros(shape))


@pytest.mark.parametrize("overrides,match", [
    ({"classifier": "token"}, r"Unknown override\(s\) \['classifier'\].*accepted fields: "
                              r"num_classes, image_size"),
    ({"remove_skips": (-1,)}, r"block indices in \[0, 2\)"),
    ({"image_size": 30}, "not a multiple of patch_size"),
    ({"tokens_mlp_dim": 0}, "positive integers"),
], ids=["unknown", "skip-range", "image-size", "mlp-dim"])
def test_bad_fields_raise_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny(**overrides)


def test_variants_follow_the_mixer_paper():
  assert mixer.VARIANTS["S/32"] == {"hidden_size": 512, "depth": 8, "tokens_mlp_dim": 256,
                                    "channels_mlp_dim": 2048, "patch_size": 32}
  assert mixer.VARIANTS["L/16"] == {"hidden_size": 1024, "depth": 24, "tokens_mlp_dim": 512,
                                    "channels_mlp_dim": 4096, "patch_size": 16}
  with pytest.raises(ValueError, match="known: S/32, S/16, B/32, B/16, L/32, L/16"):
    mixer.from_variant("H/14")
