"""timm `.safetensors` files of Vision Transformers, read without torch.

timm (huggingface/pytorch-image-models) stores a ViT as a flat dict of PyTorch tensors named
by module path ('blocks.3.attn.qkv.weight'); its `.safetensors` files are read here with
`safetensors.numpy` (no torch, nothing executed) and renamed to the parameter paths of
`vit_repr.models.vit` (the vision_transformer layout), so `vit_repr.checkpoints.convert` then
checks and repairs them as any other checkpoint. With D = width, H heads of d = D / H, F = MLP
width, p = patch size and C = classes:

  timm key                        shape          vit_repr parameter (E = Transformer/encoderblock)
  patch_embed.proj.weight         [D, 3, p, p]   embedding/kernel [p, p, 3, D]
  patch_embed.proj.bias           [D]            embedding/bias
  cls_token, pos_embed            [1, 1 | T, D]  cls, Transformer/posembed_input/pos_embedding
  blocks.{i}.norm{1,2}.*          [D]            E_{i}/LayerNorm_{0,2}/{scale, bias}
  blocks.{i}.attn.qkv.weight      [3D, D]        E_{i}/MultiHeadDotProductAttention_1/
                                                   {query, key, value}/kernel [D, H, d]
  blocks.{i}.attn.qkv.bias        [3D]             {query, key, value}/bias [H, d]
  blocks.{i}.attn.proj.*          [D, D], [D]      out/kernel [H, d, D], out/bias
  blocks.{i}.mlp.fc{1,2}.*        [F, D], ...    E_{i}/MlpBlock_3/Dense_{0,1}/{kernel, bias}
  blocks.{i}.ls{1,2}.gamma        [D]            E_{i}/ls{1,2}/gamma (LayerScale)
  norm_pre.*, norm.*              [D]            Transformer/pre_norm/*, Transformer/encoder_norm/*
  head.*, head_dist.*             [C, D], [C]    head/*, head_dist/* (kernels [D, C])
  reg_token, dist_token           [1, R | 1, D]  registers (DINOv2), dist (DeiT, distilled)
  attn_pool.latent                [1, 1, D]      MAPHead_0/probe (SigLIP)
  attn_pool.{q, kv, proj}.*       [D | 2D, D]    MAPHead_0/MultiHeadDotProductAttention_0/
                                                   query / key, value / out
  attn_pool.norm.*, .mlp.fc{1,2}.*               MAPHead_0/LayerNorm_0/*, MlpBlock_0/Dense_*

PyTorch's `Linear` stores `[out, in]` (transposed here) and its convolution `[out, in, h, w]`.
A key this table does not know is kept under its timm name, so the checkpoint's mismatch error
lists it as unexpected instead of it being dropped silently.
"""

import re
from collections.abc import Mapping

import numpy as np
from etils import epath
from safetensors import SafetensorError
from safetensors import numpy as safetensors_numpy

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# timm block sub-module -> (our sub-module path, whether the tensor is a Linear weight).
_BLOCK_NAMES = {
    "ls1.gamma": ("ls1/gamma", False), "ls2.gamma": ("ls2/gamma", False),
    "norm1.weight": ("LayerNorm_0/scale", False), "norm1.bias": ("LayerNorm_0/bias", False),
    "norm2.weight": ("LayerNorm_2/scale", False), "norm2.bias": ("LayerNorm_2/bias", False),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", True),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", False),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", True),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", False),
}
_TOP_NAMES = {
    "cls_token": ("cls", False), "pos_embed": ("Transformer/posembed_input/pos_embedding", False),
    "patch_embed.proj.bias": ("embedding/bias", False),
    "norm.weight": ("Transformer/encoder_norm/scale", False),
    "norm.bias": ("Transformer/encoder_norm/bias", False),
    "head.weight": ("head/kernel", True), "head.bias": ("head/bias", False),
    "reg_token": ("registers", False), "dist_token": ("dist", False),
    "head_dist.weight": ("head_dist/kernel", True), "head_dist.bias": ("head_dist/bias", False),
    "norm_pre.weight": ("Transformer/pre_norm/scale", False),
    "norm_pre.bias": ("Transformer/pre_norm/bias", False),
    "attn_pool.latent": ("MAPHead_0/probe", False),
    "attn_pool.norm.weight": ("MAPHead_0/LayerNorm_0/scale", False),
    "attn_pool.norm.bias": ("MAPHead_0/LayerNorm_0/bias", False),
    "attn_pool.mlp.fc1.weight": ("MAPHead_0/MlpBlock_0/Dense_0/kernel", True),
    "attn_pool.mlp.fc1.bias": ("MAPHead_0/MlpBlock_0/Dense_0/bias", False),
    "attn_pool.mlp.fc2.weight": ("MAPHead_0/MlpBlock_0/Dense_1/kernel", True),
    "attn_pool.mlp.fc2.bias": ("MAPHead_0/MlpBlock_0/Dense_1/bias", False),
}
# timm attention tensor -> (our projections it holds, in order along its output axis): a block's
# self-attention and SigLIP's attention pool.
_BLOCK_ATTENTION = {"attn.qkv": ("query", "key", "value"), "attn.proj": ("out",)}
_POOL_ATTENTION = {"attn_pool.q": ("query",), "attn_pool.kv": ("key", "value"),
                   "attn_pool.proj": ("out",)}
_ATTENTION = "MultiHeadDotProductAttention_1"


def is_timm_layout(flat: Mapping[str, np.ndarray]) -> bool:
  """Whether `flat` holds a timm ViT's state dict (its patch embedding is named timm's way)."""
  return "patch_embed.proj.weight" in flat


def read_safetensors(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """`{name: array}` of a `.safetensors` file at a local path or URI, read with
  `safetensors.numpy` (no torch).

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: the file is not a safetensors file.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path}.")
  try:
    return safetensors_numpy.load(path.read_bytes())
  except SafetensorError as error:
    raise ValueError(f"{path} is not a readable .safetensors file ({error}).") from error


def _attention(module: str, tensor: str, kind: str, value: np.ndarray, num_heads: int
               ) -> dict[str, np.ndarray]:
  """Our projection parameters of one timm attention tensor.

  Args:
    module: our attention module's path, e.g. '.../MultiHeadDotProductAttention_1'.
    tensor: the timm tensor's module ('attn.qkv', 'attn_pool.kv', ...).
    kind: 'weight' (a Linear `[parts * D, D]`) or 'bias' (`[parts * D]`).
    value: the tensor.
    num_heads: H.

  Returns:
    `{'<module>/<query|key|value|out>/<kernel|bias>': array}`: input projections' kernels
    `[D, H, d]` and biases `[H, d]`; the output projection's kernel `[H, d, D]`, bias `[D]`.

  Raises:
    ValueError: the tensor's width is not a multiple of `num_heads` per projection.
  """
  parts = {**_BLOCK_ATTENTION, **_POOL_ATTENTION}[tensor]
  if value.shape[0] % (len(parts) * num_heads):
    raise ValueError(f"{tensor}.{kind} {value.shape} is not {len(parts)} x {num_heads} heads "
                     "wide: build the model with the checkpoint's num_heads.")
  out = {}
  for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
    name = f"{module}/{part}/{'kernel' if kind == 'weight' else 'bias'}"
    if part == "out":
      out[name] = (piece.T.reshape(num_heads, piece.shape[1] // num_heads, piece.shape[0])
                   if kind == "weight" else piece)
    elif kind == "weight":
      out[name] = piece.T.reshape(piece.shape[1], num_heads, piece.shape[0] // num_heads)
    else:
      out[name] = piece.reshape(num_heads, -1)
  return out


def to_model_keys(flat: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """Renames and reshapes a timm ViT state dict to our parameter paths (module docstring).

  Args:
    flat: `{timm name: array}`, e.g. from `read_safetensors`.
    num_heads: the model's attention heads H (the fused qkv projection does not record them).

  Returns:
    `{our '/'-joined parameter path: array}`; unknown timm names are kept as they are.

  Raises:
    ValueError: an attention projection whose width is not a multiple of `num_heads` per
      projection.
  """
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    match = _BLOCK.match(key)
    tensor, _, kind = key.rpartition(".")
    if key == "patch_embed.proj.weight":
      out["embedding/kernel"] = value.transpose(2, 3, 1, 0)
    elif key in _TOP_NAMES:
      name, linear = _TOP_NAMES[key]
      out[name] = value.T if linear else value
    elif tensor in _POOL_ATTENTION:
      out.update(_attention("MAPHead_0/MultiHeadDotProductAttention_0", tensor, kind, value,
                            num_heads))
    elif match and match.group(2).rpartition(".")[0] in _BLOCK_ATTENTION:
      out.update(_attention(
          f"Transformer/encoderblock_{match.group(1)}/{_ATTENTION}",
          match.group(2).rpartition(".")[0], kind, value, num_heads))
    elif match and match.group(2) in _BLOCK_NAMES:
      name, linear = _BLOCK_NAMES[match.group(2)]
      out[f"Transformer/encoderblock_{match.group(1)}/{name}"] = value.T if linear else value
    else:
      out[key] = value
  return out
