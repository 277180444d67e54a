"""Random checkpoints of the paper's models in the original public `.npz` layouts.

Full depth and token grid (ViT-B: 12 blocks, L: 24; 14x14 patches of 16 px or 7x7 of 32 px at
224 px; BiT-R50: units (3, 4, 6, 3)), narrow width (`WIDTH`), written key by key from the
layouts of PAPER.md (vision_transformer for ViT and Mixer, big_transfer for BiT), not from
our models' parameter trees. The studies load them with their width overrides (`width_flags`).
"""

import os

import numpy as np

from configs import common

# Narrow widths: what a test substitutes for the registered ones (depth and grid never change),
# those of a config's `runlocal` smoke test.
WIDTH = common.SMOKE_WIDTHS
_VIT_SIZES = {"Ti": (12, 3), "S": (12, 6), "B": (12, 12), "L": (24, 16), "H": (32, 16)}
_MIXER_DEPTH = {"S": 8, "B": 12, "L": 24}
_BIT_UNITS = {"R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3), "R152": (3, 8, 36, 3)}
IMAGE_SIZE = 224
CLASSES = 1000


def _normal(rng, shape, fan_in):
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _around(rng, shape, mean=0.0):
  return (mean + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def vit_arrays(variant: str, *, seed: int = 0, classifier: str = "token",
               representation_size: bool = True) -> dict[str, np.ndarray]:
  """ViT `variant` ('B/16', 'L/16', ...) in the vision_transformer layout, narrow width."""
  size, patch = variant.split("/")
  depth, heads = _VIT_SIZES[size]
  d, mlp = WIDTH["ViT"]["hidden_size"], WIDTH["ViT"]["mlp_dim"]
  grid = IMAGE_SIZE // int(patch)
  rng = np.random.default_rng(seed)
  p = int(patch)
  w = {"embedding/kernel": _normal(rng, (p, p, 3, d), p * p * 3),
       "embedding/bias": _around(rng, d)}
  slot = int(classifier == "token")
  if slot:
    w["cls"] = _around(rng, (1, 1, d))
  w["Transformer/posembed_input/pos_embedding"] = _around(rng, (1, slot + grid * grid, d))
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}/"
    for norm in ("LayerNorm_0", "LayerNorm_2"):
      w[f"{block}{norm}/scale"], w[f"{block}{norm}/bias"] = _around(rng, d, 1.0), _around(rng, d)
    attention = f"{block}MultiHeadDotProductAttention_1/"
    for name in ("query", "key", "value"):
      w[f"{attention}{name}/kernel"] = _normal(rng, (d, heads, d // heads), d)
      w[f"{attention}{name}/bias"] = _around(rng, (heads, d // heads))
    w[f"{attention}out/kernel"] = _normal(rng, (heads, d // heads, d), d)
    w[f"{attention}out/bias"] = _around(rng, d)
    w[f"{block}MlpBlock_3/Dense_0/kernel"] = _normal(rng, (d, mlp), d)
    w[f"{block}MlpBlock_3/Dense_0/bias"] = _around(rng, mlp)
    w[f"{block}MlpBlock_3/Dense_1/kernel"] = _normal(rng, (mlp, d), mlp)
    w[f"{block}MlpBlock_3/Dense_1/bias"] = _around(rng, d)
  w["Transformer/encoder_norm/scale"] = _around(rng, d, 1.0)
  w["Transformer/encoder_norm/bias"] = _around(rng, d)
  if representation_size:  # The ImageNet-21k files' tanh pre-logits of width D.
    w["pre_logits/kernel"], w["pre_logits/bias"] = _normal(rng, (d, d), d), _around(rng, d)
  w["head/kernel"], w["head/bias"] = _normal(rng, (d, CLASSES), d), _around(rng, CLASSES)
  return w


def mixer_arrays(variant: str, *, seed: int = 0) -> dict[str, np.ndarray]:
  """MLP-Mixer `variant` ('B/16', ...) in the vision_transformer layout, narrow width."""
  size, patch = variant.split("/")
  p, d = int(patch), WIDTH["Mixer"]["hidden_size"]
  tokens = (IMAGE_SIZE // p) ** 2
  rng = np.random.default_rng(seed)
  w = {"stem/kernel": _normal(rng, (p, p, 3, d), p * p * 3), "stem/bias": _around(rng, d)}
  for i in range(_MIXER_DEPTH[size]):
    block = f"MixerBlock_{i}/"
    for norm in ("LayerNorm_0", "LayerNorm_1"):
      w[f"{block}{norm}/scale"], w[f"{block}{norm}/bias"] = _around(rng, d, 1.0), _around(rng, d)
    for mlp, outer, inner in (("token_mixing", tokens, WIDTH["Mixer"]["tokens_mlp_dim"]),
                              ("channel_mixing", d, WIDTH["Mixer"]["channels_mlp_dim"])):
      w[f"{block}{mlp}/Dense_0/kernel"] = _normal(rng, (outer, inner), outer)
      w[f"{block}{mlp}/Dense_0/bias"] = _around(rng, inner)
      w[f"{block}{mlp}/Dense_1/kernel"] = _normal(rng, (inner, outer), inner)
      w[f"{block}{mlp}/Dense_1/bias"] = _around(rng, outer)
  w["pre_head_layer_norm/scale"] = _around(rng, d, 1.0)
  w["pre_head_layer_norm/bias"] = _around(rng, d)
  w["head/kernel"], w["head/bias"] = _normal(rng, (d, CLASSES), d), _around(rng, CLASSES)
  return w


def bit_arrays(variant: str, *, seed: int = 0) -> dict[str, np.ndarray]:
  """BiT ResNet-v2 `variant` ('R50x1', ...) in the big_transfer layout, narrow width."""
  depth, factor = variant.split("x")
  wf = int(factor) * WIDTH["BiT"]["width_factor"]
  rng = np.random.default_rng(seed)
  root = int(64 * wf)
  w = {"resnet/root_block/standardized_conv2d/kernel": _normal(rng, (7, 7, 3, root), 147)}
  cin = root
  for stage, units in enumerate(_BIT_UNITS[depth], start=1):
    mid = int(64 * 2 ** (stage - 1) * wf)
    for unit in range(1, units + 1):
      prefix = f"resnet/block{stage}/unit{unit:02d}/"
      for conv, (k, c_in, c_out) in (("a", (1, cin, mid)), ("b", (3, mid, mid)),
                                     ("c", (1, mid, 4 * mid))):
        w[f"{prefix}{conv}/group_norm/gamma"] = _around(rng, c_in, 1.0)
        w[f"{prefix}{conv}/group_norm/beta"] = _around(rng, c_in)
        w[f"{prefix}{conv}/standardized_conv2d/kernel"] = _normal(rng, (k, k, c_in, c_out),
                                                                  k * k * c_in)
      if unit == 1:
        w[f"{prefix}a/proj/standardized_conv2d/kernel"] = _normal(rng, (1, 1, cin, 4 * mid), cin)
      cin = 4 * mid
  w["resnet/group_norm/gamma"], w["resnet/group_norm/beta"] = _around(rng, cin, 1.0), \
      _around(rng, cin)
  w["resnet/head/conv2d/kernel"] = _normal(rng, (1, 1, cin, CLASSES), cin)
  w["resnet/head/conv2d/bias"] = _around(rng, CLASSES)
  return w


def write(directory: str, basename: str, model: str, seed: int = 0) -> str:
  """Writes registered `model` ('ViT-B/16', 'BiT-R50x1', 'Mixer-B/16') as `basename`."""
  family, _, variant = model.partition("-")
  arrays = {"ViT": vit_arrays, "BiT": bit_arrays, "Mixer": mixer_arrays}[family](
      variant, seed=seed)
  path = os.path.join(directory, basename)
  np.savez(path, **arrays)
  return path


def width_flags(path: str, model: str) -> list[str]:
  """`--config.<path>.overrides.<field>=<narrow width>` for model `model` at config `path`."""
  family = model.partition("-")[0]
  return [f"--config.{path}.overrides.{field}={value}"
          for field, value in WIDTH[family].items()]
