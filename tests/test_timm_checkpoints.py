"""timm `.safetensors` ViTs (vit_repr.timm_checkpoints): written by the test from random arrays
in timm's genuine names and PyTorch layouts, loaded without torch, and checked against a NumPy
float64 forward pass written directly from the timm dict (PyTorch conventions: `x @ W.T`, one
fused qkv projection, exact-erf GELU, LayerNorm eps 1e-6)."""

import numpy as np
import pytest
import scipy.special
from safetensors import numpy as safetensors_numpy

from tests.test_checkpoints import np_layer_norm
from vit_repr import checkpoints, models, timm_checkpoints

# ViT-B/16's depth and 14 x 14 grid at 224 px, narrow.
DEPTH, WIDTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 12, 32, 2, 64, 16, 224, 10


def timm_vit(seed=0, *, depth=DEPTH, width=WIDTH, mlp=MLP, classes=CLASSES, cls_slot=True):
  """A timm `VisionTransformer` state dict (float32) with timm's names and shapes."""
  rng = np.random.default_rng(seed)
  grid = (IMAGE // PATCH) ** 2

  def draw(*shape, scale=None):
    scale = 1.0 / np.sqrt(shape[-1]) if scale is None else scale
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  w = {"patch_embed.proj.weight": draw(width, 3, PATCH, PATCH, scale=0.05),
       "patch_embed.proj.bias": draw(width, scale=0.1),
       "cls_token": draw(1, 1, width, scale=0.5),
       "pos_embed": draw(1, grid + int(cls_slot), width, scale=0.5),
       "norm.weight": 1 + draw(width, scale=0.1), "norm.bias": draw(width, scale=0.1),
       "head.weight": draw(classes, width), "head.bias": draw(classes, scale=0.1)}
  for i in range(depth):
    b = f"blocks.{i}."
    w.update({b + "norm1.weight": 1 + draw(width, scale=0.1), b + "norm1.bias": draw(width),
              b + "attn.qkv.weight": draw(3 * width, width),
              b + "attn.qkv.bias": draw(3 * width, scale=0.1),
              b + "attn.proj.weight": draw(width, width), b + "attn.proj.bias": draw(width),
              b + "norm2.weight": 1 + draw(width, scale=0.1), b + "norm2.bias": draw(width),
              b + "mlp.fc1.weight": draw(mlp, width), b + "mlp.fc1.bias": draw(mlp, scale=0.1),
              b + "mlp.fc2.weight": draw(width, mlp), b + "mlp.fc2.bias": draw(width)})
  return w


def np_timm_vit(w, images, *, heads=HEADS, gelu="erf"):
  """Logits and every block output of a timm ViT (CLS token, CLS slot in pos_embed), float64.

  Args:
    w: the timm state dict.
    images: `[b, H, W, 3]`.
    heads: attention heads.
    gelu: 'erf' (timm's nn.GELU) or 'tanh'.

  Returns:
    (logits `[b, C]`, block outputs `[depth, b, T, D]`).
  """
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  b, size = images.shape[0], images.shape[1]
  side = size // PATCH
  # NCHW patches flattened (channel, row, column), as PyTorch's convolution weight is.
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
  x = x.reshape(b, 3, side, PATCH, side, PATCH).transpose(0, 2, 4, 1, 3, 5)
  kernel = w["patch_embed.proj.weight"]
  x = x.reshape(b, side * side, -1) @ kernel.reshape(kernel.shape[0], -1).T
  x = x + w["patch_embed.proj.bias"]
  x = np.concatenate([np.repeat(w["cls_token"], b, axis=0), x], axis=1) + w["pos_embed"]
  width = x.shape[-1]
  d = width // heads

  def activation(y):
    if gelu == "erf":
      return 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))

  outputs = []
  depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
  for i in range(depth):
    p = f"blocks.{i}."
    y = np_layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"])
    qkv = y @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]  # [b, T, 3D]
    q, k, v = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3)
               for t in np.split(qkv, 3, axis=-1))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = (probs @ v).transpose(0, 2, 1, 3).reshape(b, -1, width)
    x = x + attended @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
    y = np_layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
    y = activation(y @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
    x = x + y @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    outputs.append(x)
  x = np_layer_norm(x, w["norm.weight"], w["norm.bias"])
  return x[:, 0] @ w["head.weight"].T + w["head.bias"], np.stack(outputs)


def write(tmp_path, arrays, name="model.safetensors"):
  path = str(tmp_path / name)
  safetensors_numpy.save_file(arrays, path)
  return path


def vit(**overrides):
  """timm's plain ViT: exact GELU (its nn.GELU), LayerNorm eps 1e-6, a CLS slot."""
  return models.create("ViT-B/16", **{
      "hidden_size": WIDTH, "num_heads": HEADS, "mlp_dim": MLP, "num_classes": CLASSES,
      "image_size": IMAGE, "mlp_activation": "gelu", **overrides})


def random_images(n=2, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (n, IMAGE, IMAGE, 3)).astype(np.float32)


def test_renamed_keys_are_our_parameter_paths():
  converted = timm_checkpoints.to_model_keys(timm_vit(depth=1), num_heads=HEADS)
  assert converted["embedding/kernel"].shape == (PATCH, PATCH, 3, WIDTH)
  attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  assert converted[f"{attention}/query/kernel"].shape == (WIDTH, HEADS, WIDTH // HEADS)
  assert converted[f"{attention}/value/bias"].shape == (HEADS, WIDTH // HEADS)
  assert converted[f"{attention}/out/kernel"].shape == (HEADS, WIDTH // HEADS, WIDTH)
  assert converted["head/kernel"].shape == (WIDTH, CLASSES)


@pytest.mark.slow
def test_full_depth_timm_vit_matches_numpy_float64(tmp_path):
  """ViT-B/16's 12 blocks and 14 x 14 grid: logits and every block output."""
  w = timm_vit()
  model = vit()
  params = checkpoints.load(write(tmp_path, w), model)
  x = random_images()
  logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
  flat = models.flatten_intermediates(state)
  expected_logits, expected_blocks = np_timm_vit(w, x)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
  for i, expected in enumerate(expected_blocks):
    np.testing.assert_allclose(flat[f"Transformer/encoderblock_{i}/out"], expected,
                               rtol=1e-5, atol=1e-5, err_msg=f"block {i}")


def test_unknown_and_missing_keys_are_listed(tmp_path):
  w = timm_vit(depth=2)
  w["blocks.0.attn.q_norm.weight"] = np.ones(WIDTH, np.float32)
  del w["blocks.1.mlp.fc2.bias"]
  with pytest.raises(ValueError) as error:
    checkpoints.load(write(tmp_path, w), vit(depth=2))
  message = str(error.value)
  assert "blocks.0.attn.q_norm.weight" in message and "unexpected" in message
  assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias" in message and "missing" in message


def test_qkv_of_another_head_count_is_refused():
  with pytest.raises(ValueError, match="attn.qkv.weight .* not 3 x 5 heads wide"):
    timm_checkpoints.to_model_keys(timm_vit(depth=1), num_heads=5)


def test_not_a_safetensors_file_is_a_clear_error(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="not a readable .safetensors file"):
    timm_checkpoints.read_safetensors(str(path))
  with pytest.raises(FileNotFoundError, match="No checkpoint at"):
    timm_checkpoints.read_safetensors(str(tmp_path / "absent.safetensors"))


def _keys_cubic(t, a=-0.5):
  """Keys' cubic convolution kernel (a = -0.5, as PIL and PyTorch's antialiased bicubic)."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = (((t - 5) * t + 8) * t - 4) * a
  return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def _antialiased_bicubic(grid, new):
  """`F.interpolate(grid, new, mode='bicubic', antialias=True)` written out in float64: output i
  is centred at (i + 0.5) * s in input coordinates (s = old / new), input j at j + 0.5; the
  kernel is stretched by max(s, 1) and its weights renormalised to sum to one. (Checked once
  against PyTorch 2.14 on 37->16, 16->14, 14->24 grids: equal within 6e-15.)"""
  old = grid.shape[0]
  scale = old / new
  weights = _keys_cubic(((np.arange(old) + 0.5)[None, :] - (np.arange(new) + 0.5)[:, None] * scale)
                        / max(scale, 1.0))
  weights /= weights.sum(axis=1, keepdims=True)  # [new, old]
  return np.einsum("ia,abd,jb->ijd", weights, grid, weights)


@pytest.mark.parametrize("old_side,image", [(37, IMAGE), (10, 304)],
                         ids=["dinov2-37-to-14", "grow-10-to-19"])
def test_timm_pos_embedding_is_resized_like_timm(tmp_path, caplog, old_side, image):
  """A timm file's grid (DINOv2's is 37 x 37, made at 518 px; no prefix slots, timm's
  no_embed_class) is resized with timm's antialiased bicubic, and the model runs."""
  w = timm_vit(depth=1)
  rng = np.random.default_rng(3)
  w["pos_embed"] = rng.standard_normal((1, old_side**2, WIDTH)).astype(np.float32)
  w["reg_token"] = rng.standard_normal((1, 4, WIDTH)).astype(np.float32)
  model = vit(depth=1, image_size=image, num_registers=4, posemb_includes_cls=False)
  with caplog.at_level("INFO"):
    params = checkpoints.load(write(tmp_path, w), model)
  assert "bicubic" in caplog.text
  new = image // PATCH
  got = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  old = w["pos_embed"][0].astype(np.float64).reshape(old_side, old_side, WIDTH)
  want = _antialiased_bicubic(old, new).reshape(1, new * new, WIDTH)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  logits = model.apply({"params": params}, np.zeros((1, image, image, 3), np.float32))
  assert np.isfinite(logits).all()


def test_unknown_pos_embedding_interpolation_is_refused():
  with pytest.raises(ValueError, match="Unknown position-embedding interpolation 'nearest'"):
    checkpoints.resize_pos_embedding(np.zeros((1, 17, 4)), 5, 1, "nearest")
