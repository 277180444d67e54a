"""Checkpoints: the original Google `.npz` files (ViT, MLP-Mixer, BiT) and our own, via orbax.

`load(path, model)` reads a public checkpoint released with the models Raghu et al., "Do Vision
Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021) study, from a local path
or gs://, converts it to the parameter tree of a `vit_repr.models` module and checks it against
`jax.eval_shape(model.init, ...)`. Supported key layouts (flat '/'-joined `.npz` keys):

- vision_transformer (google-research/vision_transformer): ViT and Mixer keys equal our
  parameter paths; the ViT position embedding has a CLS slot (with the options of timm's
  families, a slot per prefix token: CLS, distillation token `dist`, `registers`; or none, for a
  model built with posemb_includes_cls=False). Keys under `opt/target/` (old training
  checkpoints) are read too.
- big_vision (google-research/big_vision): ViT keys under `params/` or `params/img/`; block
  sub-modules named LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
  (renamed to _0, _1, _2, _3); `pos_embedding` at the top level and without a CLS slot, since
  big_vision adds it to the patches before concatenating CLS (load into a model built with
  posemb_includes_cls=False); blocks optionally scanned, stored as `Transformer/encoderblock/...`
  with a leading depth axis (unstacked); keys outside `params/img/` of a two-tower (SigLIP,
  LiT) checkpoint (`params/txt/...`, `params/t`, `params/b`) ignored. The MAP head's keys
  (`MAPHead_0/...`, classifier='map') equal our parameter paths. A model with the fixed
  posemb='sincos2d' embedding has no position-embedding parameter, and none is expected or
  resized; a learned one missing from the file is reported as a missing key.
- big_transfer (google-research/big_transfer): BiT keys under `resnet/` (prefix stripped).
- timm (huggingface/pytorch-image-models): a ViT's `.safetensors` state dict, read without
  torch and renamed by `vit_repr.timm_checkpoints` (its docstring has the table).

Repairs, each logged, as the original fine-tuning code makes them (vision_transformer's
`checkpoint.load_pretrained`): a head whose shape differs from the model's (another number of
classes) is replaced by a zero-initialised one (so is DeiT's `head_dist`); pre-logits weights are
dropped when the model has no pre-logits layer; a ViT position embedding for another patch grid
is resized with the interpolation of the code that made the file (`resize_pos_embedding`): an
`.npz` (vision_transformer, big_vision) by order-1 (bilinear, corner-aligned)
`scipy.ndimage.zoom` of the grid, a timm file (e.g. DINOv2's 37 x 37 grid at 224 px) by timm's
antialiased bicubic, the prefix entries (one per prefix token of the model's `token_layout()`:
CLS, distillation, registers) kept as they are. The number of prefix slots a file's embedding has (none, or the model's number
of prefix tokens, or one CLS slot) is read from its shape, preferring the model's own convention
when a shape fits both. A ViT patch-embedding kernel of another patch size is resized with
FlexiViT's pseudo-inverse resize (`resize_patch_embedding`), e.g. a FlexiViT file into a model
of any patch size (build it with that patch size and the image size that keeps its grid). Anything
else that does not match raises one ValueError listing the missing, unexpected and mis-shaped
keys. Files are read with `allow_pickle=False`; nothing in them is executed.

`save(directory, params)` / `restore(directory, target)` store our own trained parameters with
orbax's StandardCheckpointer.

One module (~490 lines): the layouts' renames, the repairs and the one mismatch check are a
single conversion, read together; timm's renames, a table of their own, are
`vit_repr.timm_checkpoints`.
"""

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import scipy.ndimage
from absl import logging
from etils import epath
from flax import traverse_util

from vit_repr import files, timm_checkpoints

POS_EMBEDDING = "Transformer/posembed_input/pos_embedding"
PATCH_KERNEL = "embedding/kernel"
# big_vision's block sub-module names -> vision_transformer's (and ours).
_BIG_VISION_BLOCK_NAMES = {"LayerNorm_0": "LayerNorm_0",
                           "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                           "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_SCANNED_BLOCK = "Transformer/encoderblock/"
_SHOWN_KEYS = 8  # keys listed per category in a mismatch error


def read_npz(path: str | epath.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of a `.npz` file (local or gs://) with `allow_pickle=False`.

  Args:
    path: local path or gs:// URL of the `.npz` file.

  Returns:
    `{key: array}` in file order.

  Raises:
    FileNotFoundError: nothing at `path`, or its storage cannot be reached (e.g. gs:// without
      network access or credentials).
  """
  path = str(path)
  try:
    found = files.exists(path)
  except Exception as error:  # pylint: disable=broad-except; storage backends raise their own.
    raise FileNotFoundError(
        f"Cannot reach the checkpoint {path} ({type(error).__name__}: {error}). Download it "
        "where this machine can read it and pass the local path.") from None
  if not found:
    raise FileNotFoundError(f"No checkpoint at {path}. Check the path (local or gs://) and, "
                            "for gs://, that you are authenticated to read the bucket.")
  return files.read_npz(path)


def _decode_bfloat16(array: np.ndarray, key: str) -> np.ndarray:
  """big_vision may store bfloat16 arrays as raw 2-byte records; reinterpret those."""
  if array.dtype.kind == "V" and array.dtype.itemsize == 2:
    logging.info("checkpoints: reading %s, stored as raw 2-byte values, as bfloat16.", key)
    return array.view(jnp.bfloat16)
  return array


def _split_prefix(flat: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the keys under `prefix` (stripped); logs how many others are ignored."""
  kept = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  ignored = sorted(k for k in flat if not k.startswith(prefix))
  if ignored:
    logging.info("checkpoints: ignoring %d keys outside %r (e.g. %s).", len(ignored), prefix,
                 ", ".join(ignored[:3]))
  return kept


def _unstack_scanned_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits big_vision's scanned `Transformer/encoderblock/...` [depth, ...] into blocks."""
  scanned = {k: v for k, v in flat.items() if k.startswith(_SCANNED_BLOCK)}
  if not scanned:
    return flat
  depths = {v.shape[0] for v in scanned.values()}
  if len(depths) != 1:
    raise ValueError(f"Scanned block parameters under {_SCANNED_BLOCK!r} disagree on the "
                     f"leading depth axis ({sorted(depths)}); the checkpoint is corrupt.")
  depth = depths.pop()
  logging.info("checkpoints: unstacking %d scanned big_vision blocks into encoderblock_{i}.",
               depth)
  out = {k: v for k, v in flat.items() if not k.startswith(_SCANNED_BLOCK)}
  for key, value in scanned.items():
    rest = key[len(_SCANNED_BLOCK):]
    for i in range(depth):
      out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
  return out


def _rename_big_vision_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames big_vision block sub-modules (…_0, LayerNorm_1, MlpBlock_0) to the original's."""
  pattern = re.compile(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$")
  if not any((m := pattern.match(k)) and m.group(2) == "MultiHeadDotProductAttention_0"
             for k in flat):
    return flat
  logging.info("checkpoints: renaming big_vision block sub-modules %s.",
               ", ".join(f"{a}->{b}" for a, b in _BIG_VISION_BLOCK_NAMES.items() if a != b))
  out = {}
  for key, value in flat.items():
    m = pattern.match(key)
    if m and m.group(2) in _BIG_VISION_BLOCK_NAMES:
      key = m.group(1) + _BIG_VISION_BLOCK_NAMES[m.group(2)] + m.group(3)
    out[key] = value
  return out


def to_model_keys(flat: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
  """Detects a checkpoint's key layout and renames its keys to our parameter paths.

  Args:
    flat: `{'/'-joined key: array}` as stored in the `.npz`.

  Returns:
    (layout, converted) with layout one of 'vision_transformer', 'big_vision',
    'big_transfer'. The position embedding keeps the checkpoint's shape (CLS slot or not).
  """
  flat = {k: _decode_bfloat16(np.asarray(v), k) for k, v in flat.items()}
  if any(k.startswith("resnet/") for k in flat):
    logging.info("checkpoints: big_transfer (BiT) layout; stripping the 'resnet/' prefix.")
    return "big_transfer", _split_prefix(flat, "resnet/")
  if any(k.startswith("params/") for k in flat):
    prefix = "params/img/" if any(k.startswith("params/img/") for k in flat) else "params/"
    logging.info("checkpoints: big_vision layout under %r.", prefix)
    flat = _rename_big_vision_blocks(_unstack_scanned_blocks(_split_prefix(flat, prefix)))
    for old in ("pos_embedding", "Transformer/pos_embedding"):
      if old in flat:
        logging.info("checkpoints: moving %s to %s.", old, POS_EMBEDDING)
        flat[POS_EMBEDDING] = flat.pop(old)
    return "big_vision", flat
  if any(k.startswith("opt/target/") for k in flat):
    logging.info("checkpoints: vision_transformer training layout; using 'opt/target/'.")
    flat = _split_prefix(flat, "opt/target/")
  else:
    logging.info("checkpoints: vision_transformer layout.")
  return "vision_transformer", flat


def _grid_side(num_tokens: int) -> int | None:
  """The side of a square grid of `num_tokens` patches, or None if not a square."""
  side = int(round(np.sqrt(num_tokens)))
  return side if side * side == num_tokens else None


def _bilinear_matrix(old: int, new: int) -> np.ndarray:
  """`[new, old]`: 1-D bilinear resampling with half-pixel centres and edge clamping (what
  `tf.image.resize(..., 'bilinear')` does without antialiasing): output i samples the input at
  (i + 0.5) * old / new - 0.5."""
  position = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
  low = np.floor(position).astype(int)
  high = np.minimum(low + 1, old - 1)
  matrix = np.zeros((new, old))
  np.add.at(matrix, (np.arange(new), low), 1 - (position - low))
  np.add.at(matrix, (np.arange(new), high), position - low)
  return matrix


def resize_patch_embedding(kernel: np.ndarray, patch_size: int) -> np.ndarray:
  """FlexiViT's pseudo-inverse resize of a patch-embedding kernel to another patch size.

  With B `[p'^2, p^2]` the bilinear resize of a p x p patch to p' x p' (`_bilinear_matrix`
  along each axis), each kernel slice w `[p^2]` becomes w' = pinv(B^T) w (Beyer et al.,
  "FlexiViT", CVPR 2023; big_vision's `resample_patchemb`), so that <B x, w'> = <x, w> for
  every patch x when p' >= p: the token of an image resized by the same factor is unchanged.

  Args:
    kernel: `[p, p, channels, D]`.
    patch_size: the new side p'.

  Returns:
    `[p', p', channels, D]`, the dtype of `kernel`.
  """
  old = kernel.shape[0]
  axis = _bilinear_matrix(old, patch_size)
  resize = np.kron(axis, axis)  # [p'^2, p^2] on row-major flattened patches.
  flat = kernel.reshape(old * old, -1).astype(np.float64)
  resized = np.linalg.pinv(resize.T) @ flat
  return resized.reshape(patch_size, patch_size, *kernel.shape[2:]).astype(kernel.dtype)


POS_EMBEDDING_INTERPOLATIONS = ("bilinear", "bicubic")


def resize_pos_embedding(pos_embedding: np.ndarray, grid_side: int, num_prefix: int,
                         interpolation: str = "bilinear") -> np.ndarray:
  """Resizes a ViT position embedding to another square patch grid, as its original code does.

  The first `num_prefix` entries (the prefix slots) are kept; the square grid of the rest is
  resampled by
  - 'bilinear' (vision_transformer and big_vision): `scipy.ndimage.zoom(grid, (new/old,
    new/old, 1), order=1)`, bilinear with the corner patches aligned (output patch i samples
    input position i * (old - 1) / (new - 1));
  - 'bicubic' (timm's `resample_abs_pos_embed` when it loads a file: `F.interpolate(...,
    mode='bicubic', antialias=True)`): Keys' cubic kernel (a = -0.5) with half-pixel centres,
    stretched by old / new when shrinking (antialiasing) and renormalised at the edges;
    `jax.image.resize(..., 'bicubic', antialias=True)` computes the same resampling.

  Args:
    pos_embedding: `[1, num_prefix + old**2, D]`.
    grid_side: the new grid side `new`.
    num_prefix: leading non-grid entries: one per prefix token with a slot (CLS,
      distillation, registers), else 0.
    interpolation: one of `POS_EMBEDDING_INTERPOLATIONS`.

  Returns:
    `[1, num_prefix + new**2, D]`, same dtype.

  Raises:
    ValueError: the grid entries do not form a square, or an unknown interpolation.
  """
  if interpolation not in POS_EMBEDDING_INTERPOLATIONS:
    raise ValueError(f"Unknown position-embedding interpolation {interpolation!r}; use one of "
                     f"{POS_EMBEDDING_INTERPOLATIONS}.")
  prefix, grid = pos_embedding[:, :num_prefix], pos_embedding[0, num_prefix:]
  old = _grid_side(grid.shape[0])
  if old is None:
    raise ValueError(f"Position embedding {pos_embedding.shape} minus {num_prefix} prefix "
                     f"entries does not hold a square grid of patches; cannot resize it.")
  grid = grid.reshape(old, old, -1)
  if interpolation == "bilinear":
    grid = scipy.ndimage.zoom(grid, (grid_side / old, grid_side / old, 1), order=1)
  else:
    grid = np.asarray(jax.image.resize(grid.astype(np.float32), (grid_side, grid_side,
                                                                 grid.shape[2]),
                                       method="bicubic", antialias=True), grid.dtype)
  grid = grid.reshape(1, grid_side * grid_side, -1)
  return np.concatenate([prefix, grid], axis=1)


def _prefix_slots(tokens: int, candidates: tuple[int, ...]) -> int | None:
  """The first candidate number of prefix slots that leaves a non-empty square patch grid."""
  for slots in candidates:
    if tokens > slots and _grid_side(tokens - slots) is not None:
      return slots
  return None


def _fix_pos_embedding(flat: dict[str, np.ndarray], expected_shape: tuple[int, ...],
                       model: nn.Module, interpolation: str) -> None:
  """Checks the prefix-slot convention and resizes the grid when it differs (in place).

  The model has P prefix tokens (its `token_layout()`) and wants a slot for each when built with
  posemb_includes_cls=True, none otherwise. The file's slots are read from its shape: the
  model's count if the rest is a square grid, else none, else P, else one (a CLS slot).
  `interpolation`: see `resize_pos_embedding`.
  """
  pos_embedding = flat[POS_EMBEDDING]
  if pos_embedding.ndim != 3 or pos_embedding.shape[2] != expected_shape[2]:
    return  # reported as a shape mismatch
  token_layout = model.token_layout()
  prefix = token_layout.num_prefix_tokens
  wants = prefix if getattr(model, "posemb_includes_cls", True) else 0
  tokens = pos_embedding.shape[1]
  candidates = tuple(dict.fromkeys((wants, 0, prefix, 1)))
  found = _prefix_slots(tokens, candidates)
  kinds = ", ".join(token_layout.prefix) or "none"
  if found is None:
    raise ValueError(f"Checkpoint position embedding {pos_embedding.shape} holds no square patch "
                     f"grid after {' or '.join(map(str, sorted(candidates)))} prefix slots (the "
                     f"model's prefix tokens: {kinds}); it cannot be used.")
  if found and not wants and not prefix:
    raise ValueError(
        f"The checkpoint's position embedding {pos_embedding.shape} has {found} prefix slot(s) "
        f"(the vision_transformer convention: CLS concatenated before the embedding is added), "
        f"but the model (classifier={getattr(model, 'classifier', None)!r}) has no prefix token. "
        f"Build it with classifier='token', posemb_includes_cls=True.")
  if found and not wants:
    raise ValueError(
        f"The checkpoint's position embedding {pos_embedding.shape} has {found} prefix slot(s) "
        f"(the vision_transformer convention, timm's no_embed_class=False: prefix tokens "
        f"concatenated before the embedding is added), but the model (prefix tokens: {kinds}; "
        f"posemb_includes_cls=False) has none. Build it with posemb_includes_cls=True.")
  if wants and not found:
    fix = ("posemb_includes_cls=False" if any(k in flat for k in ("cls", "dist", "registers"))
           else "classifier='gap' (the checkpoint has no CLS token)")
    raise ValueError(
        f"The checkpoint's position embedding {pos_embedding.shape} has no prefix slot (the "
        f"big_vision convention, timm's no_embed_class=True, where the embedding is added before "
        f"the prefix tokens are concatenated, or a 'gap' model), but the model expects {wants} "
        f"({kinds}). Build it with {fix}.")
  if found != wants:
    raise ValueError(
        f"The checkpoint's position embedding {pos_embedding.shape} has {found} prefix slot(s), "
        f"but the model has {wants} prefix tokens with slots ({kinds}). Build the model with the "
        f"checkpoint's prefix tokens (classifier, distillation, num_registers), or, for a file "
        f"whose registers have no slot (DINOv2's own), fold the CLS slot into `cls` and load it "
        f"into a model built with posemb_includes_cls=False.")
  if tokens != expected_shape[1]:
    side = _grid_side(expected_shape[1] - found)
    logging.info("checkpoints: resizing the position embedding %s -> %s (patch grid %d -> %d, "
                 "%s, %d prefix entries kept).", pos_embedding.shape, expected_shape,
                 _grid_side(tokens - found), side, interpolation, found)
    flat[POS_EMBEDDING] = resize_pos_embedding(pos_embedding, side, found, interpolation)


def _mismatch_error(origin: str, model: nn.Module, missing: list[str], unexpected: list[str],
                    misshaped: list[str], flat: Mapping[str, np.ndarray],
                    expected: Mapping[str, jax.ShapeDtypeStruct]) -> ValueError:
  """One readable error listing what does not match between checkpoint and model."""
  def listing(title, keys, describe):
    if not keys:
      return []
    more = f" (first {_SHOWN_KEYS})" if len(keys) > _SHOWN_KEYS else ""
    return [f"  {len(keys)} {title}{more}:"] + [f"    {describe(k)}"
                                              for k in keys[:_SHOWN_KEYS]]
  lines = [f"Checkpoint {origin} does not match the {type(model).__name__} model:"]
  lines += listing("missing from the checkpoint", missing,
                   lambda k: f"{k} {tuple(expected[k].shape)}")
  lines += listing("unexpected in the checkpoint", unexpected,
                   lambda k: f"{k} {tuple(flat[k].shape)}")
  lines += listing("with mismatched shapes", misshaped,
                   lambda k: f"{k}: checkpoint {tuple(flat[k].shape)}, model "
                             f"{tuple(expected[k].shape)}")
  lines.append("Build the model that matches the checkpoint (model name and overrides such as "
               "depth, hidden_size, patch_size, classifier, posemb, layer_scale_init, "
               "representation_size, patch_bias, pre_norm, num_registers, distillation).")
  return ValueError("\n".join(lines))


def convert(flat: Mapping[str, np.ndarray], model: nn.Module, *, origin: str = "<arrays>"
            ) -> dict[str, Any]:
  """Converts a flat original checkpoint into `model`'s parameters; see the module docstring.

  Args:
    flat: `{'/'-joined key: array}` as stored in an original `.npz`.
    model: an unbound `vit_repr.models` module (it needs an `image_size` field).
    origin: how to name the checkpoint in log lines and errors.

  Returns:
    The 'params' collection of `model`: a nested dict of float32 `jax.Array`s.

  Raises:
    ValueError: the checkpoint does not match the model after the logged repairs (one message
      listing missing, unexpected and mis-shaped keys), or a ViT position embedding has
      another number of prefix slots than the model.
  """
  image_size = getattr(model, "image_size", None)
  if image_size is None:
    raise ValueError(f"{type(model).__name__} has no image_size field; build it with "
                     "vit_repr.models.create(...).")
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  expected = traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), images)["params"], sep="/")
  if timm_checkpoints.is_timm_layout(flat):
    if not hasattr(model, "num_heads"):
      raise ValueError(f"{origin} is a timm Vision Transformer state dict; load it into a ViT "
                       f"(vit_repr.models.create('ViT-...')), not a {type(model).__name__}.")
    layout, flat = "timm", timm_checkpoints.to_model_keys(flat, model.num_heads)
  else:
    layout, flat = to_model_keys(flat)
  logging.info("checkpoints: %s: %d arrays in the %s layout.", origin, len(flat), layout)

  if any(k.startswith("pre_logits/") for k in flat) and not any(
      k.startswith("pre_logits/") for k in expected):
    logging.info("checkpoints: dropping pre_logits %s: the model has no pre-logits layer "
                 "(the original's drop-head variant).",
                 tuple(flat.get("pre_logits/kernel", np.zeros(0)).shape))
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
  for module in ("head/", "head_dist/"):
    head = sorted(k for k in expected if k.startswith(module))
    head_ckpt = sorted(k for k in flat if k.startswith(module))
    if head and (head != head_ckpt or any(flat[k].shape != expected[k].shape for k in head)):
      logging.info("checkpoints: replacing %s %s with a zero-initialised one %s, as the "
                   "original fine-tuning code does.", module.rstrip("/"),
                   {k: tuple(flat[k].shape) for k in head_ckpt},
                   {k: tuple(expected[k].shape) for k in head})
      flat = {k: v for k, v in flat.items() if not k.startswith(module)}
      flat.update({k: np.zeros(expected[k].shape, expected[k].dtype) for k in head})
  if POS_EMBEDDING in flat and POS_EMBEDDING in expected:
    _fix_pos_embedding(flat, tuple(expected[POS_EMBEDDING].shape), model,
                       "bicubic" if layout == "timm" else "bilinear")
  kernel, wanted = flat.get(PATCH_KERNEL), expected.get(PATCH_KERNEL)
  if (kernel is not None and wanted is not None and kernel.ndim == 4 and kernel.shape[0] ==
      kernel.shape[1] and kernel.shape[2:] == tuple(wanted.shape[2:])
      and kernel.shape[:2] != tuple(wanted.shape[:2])):
    logging.info("checkpoints: resizing the patch embedding %s -> %s (FlexiViT's pseudo-inverse "
                 "resize).", kernel.shape, tuple(wanted.shape))
    flat[PATCH_KERNEL] = resize_patch_embedding(kernel, wanted.shape[0])

  missing = sorted(expected.keys() - flat.keys())
  unexpected = sorted(flat.keys() - expected.keys())
  misshaped = sorted(k for k in expected.keys() & flat.keys()
                     if tuple(flat[k].shape) != tuple(expected[k].shape))
  if missing or unexpected or misshaped:
    raise _mismatch_error(f"{origin} ({layout} layout)", model, missing, unexpected, misshaped,
                          flat, expected)
  cast = sorted(k for k in expected if flat[k].dtype != expected[k].dtype)
  if cast:
    logging.info("checkpoints: casting %d arrays (e.g. %s: %s) to %s.", len(cast), cast[0],
                 flat[cast[0]].dtype, expected[cast[0]].dtype)
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(flat[k], expected[k].dtype) for k in expected}, sep="/")


def load(path: str | epath.PathLike, model: nn.Module) -> dict[str, Any]:
  """Loads an original ViT / Mixer / BiT `.npz` or a timm ViT `.safetensors` into `model`.

  Args:
    path: local path or gs:// URL of the `.npz` or `.safetensors` file.
    model: an unbound `vit_repr.models` module, e.g. `create('ViT-B/16', num_classes=1000)`.

  Returns:
    The 'params' collection: use `model.apply({'params': params}, images)`.

  Raises:
    FileNotFoundError: nothing at `path`.
    ValueError: see `convert`.
  """
  logging.info("checkpoints: loading %s into %s.", path, type(model).__name__)
  if str(path).endswith(".safetensors"):
    return convert(timm_checkpoints.read_safetensors(path), model, origin=str(path))
  return convert(read_npz(path), model, origin=str(path))


def _absolute(directory: str | epath.PathLike) -> epath.Path:
  """orbax needs absolute paths; gs:// URLs already are."""
  path = epath.Path(directory)
  return path if str(path).startswith("gs://") else path.absolute()


def save(directory: str | epath.PathLike, params: Any, *, overwrite: bool = False) -> None:
  """Saves a parameter pytree (our own trained models) with orbax.

  Args:
    directory: checkpoint directory to create (local or gs://).
    params: pytree of arrays, e.g. the 'params' collection.
    overwrite: replace an existing checkpoint at `directory`.

  Raises:
    FileExistsError: `directory` exists and `overwrite` is False.
  """
  path = _absolute(directory)
  if path.exists() and not overwrite:
    raise FileExistsError(f"Checkpoint directory {path} already exists; pass overwrite=True to "
                          "replace it, or choose a new directory.")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=overwrite)
    checkpointer.wait_until_finished()
  logging.info("checkpoints: saved %d arrays to %s.", len(jax.tree.leaves(params)), path)


def restore(directory: str | epath.PathLike, target: Any = None) -> Any:
  """Restores a parameter pytree written by `save`.

  Args:
    directory: the checkpoint directory.
    target: optional pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from
      `jax.eval_shape(model.init, ...)['params']`) giving the structure, dtypes and shardings
      to restore into; None restores the tree as saved.

  Returns:
    The parameter pytree.

  Raises:
    FileNotFoundError: nothing at `directory`.
  """
  path = _absolute(directory)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint directory at {path}; pass the directory given to "
                            "checkpoints.save.")
  if target is not None:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)
