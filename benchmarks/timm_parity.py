"""Parity of our ViT-B/16 and Mixer-B/16 with timm's, on random weights in the original .npz layout.

A reference check, not a test (timm lives in a separate PyTorch environment). Two stages:

1. `--stage=timm`, run with the PyTorch env's python: writes random-valued ViT-B/16 and
   Mixer-B/16 checkpoints in the google-research/vision_transformer `.npz` layout plus a batch of
   images, loads them into timm (ViT through timm's own `.npz` reader `_load_weights`; timm's
   MLP-Mixer has no `.npz` reader, so its state dict is filled from the same arrays here) and
   saves timm's logits. timm's ViT and Mixer use exact (erf) GELU by default, the original JAX
   code Flax's tanh approximation, so timm runs both ways: default and act_layer='gelu_tanh'.
2. `--stage=ours` (default: both stages, the first in a subprocess), run with this repo's venv:
   loads the same files with `vit_repr.checkpoints.load`, runs our models and prints a table of
   max |ours - timm| per model and GELU setting.

  /work/main/.venv/bin/python benchmarks/timm_parity.py \
      --peers_python=/root/.cache/vit_repr_peers/bin/python --depth=12 --workdir=/tmp/parity
"""

import argparse
import os
import subprocess
import sys

import numpy as np

WIDTH, HEADS, MLP, PATCH, IMAGE, CLASSES = 768, 12, 3072, 16, 224, 1000
TOKENS_MLP, CHANNELS_MLP = 384, 3072
GRID = IMAGE // PATCH
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random(rng, shape, fan_in=None, mean=0.0, std=0.1):
  scale = 1 / np.sqrt(fan_in) if fan_in else std
  return (mean + scale * rng.standard_normal(shape)).astype(np.float32)


def vit_arrays(depth: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random ViT-B/16 arrays under the vision_transformer keys (CLS slot in the pos embedding)."""
  rng = np.random.default_rng(seed)
  d, hd = WIDTH, WIDTH // HEADS
  w = {"embedding/kernel": _random(rng, (PATCH, PATCH, 3, d), PATCH * PATCH * 3),
       "embedding/bias": _random(rng, d), "cls": _random(rng, (1, 1, d)),
       "Transformer/posembed_input/pos_embedding": _random(rng, (1, 1 + GRID * GRID, d))}
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = _random(rng, d, mean=1.0), _random(rng, d)
    a = f"{b}MultiHeadDotProductAttention_1/"
    for name in ("query", "key", "value"):
      w[f"{a}{name}/kernel"] = _random(rng, (d, HEADS, hd), d)
      w[f"{a}{name}/bias"] = _random(rng, (HEADS, hd))
    w[f"{a}out/kernel"], w[f"{a}out/bias"] = _random(rng, (HEADS, hd, d), d), _random(rng, d)
    for j, (n_in, n_out) in enumerate(((d, MLP), (MLP, d))):
      w[f"{b}MlpBlock_3/Dense_{j}/kernel"] = _random(rng, (n_in, n_out), n_in)
      w[f"{b}MlpBlock_3/Dense_{j}/bias"] = _random(rng, n_out)
  w["Transformer/encoder_norm/scale"] = _random(rng, d, mean=1.0)
  w["Transformer/encoder_norm/bias"] = _random(rng, d)
  w["head/kernel"], w["head/bias"] = _random(rng, (d, CLASSES), d), _random(rng, CLASSES)
  return w


def mixer_arrays(depth: int, seed: int = 1) -> dict[str, np.ndarray]:
  """Random Mixer-B/16 arrays under the vision_transformer keys."""
  rng = np.random.default_rng(seed)
  d, n = WIDTH, GRID * GRID
  w = {"stem/kernel": _random(rng, (PATCH, PATCH, 3, d), PATCH * PATCH * 3),
       "stem/bias": _random(rng, d)}
  for i in range(depth):
    b = f"MixerBlock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = _random(rng, d, mean=1.0), _random(rng, d)
    for mlp, outer, inner in (("token_mixing", n, TOKENS_MLP),
                              ("channel_mixing", d, CHANNELS_MLP)):
      w[f"{b}{mlp}/Dense_0/kernel"] = _random(rng, (outer, inner), outer)
      w[f"{b}{mlp}/Dense_0/bias"] = _random(rng, inner)
      w[f"{b}{mlp}/Dense_1/kernel"] = _random(rng, (inner, outer), inner)
      w[f"{b}{mlp}/Dense_1/bias"] = _random(rng, outer)
  w["pre_head_layer_norm/scale"] = _random(rng, d, mean=1.0)
  w["pre_head_layer_norm/bias"] = _random(rng, d)
  w["head/kernel"], w["head/bias"] = _random(rng, (d, CLASSES), d), _random(rng, CLASSES)
  return w


def timm_mixer_state_dict(w: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """The Mixer arrays under timm's MlpMixer names (torch Linear weights are [out, in])."""
  sd = {"stem.proj.weight": w["stem/kernel"].transpose(3, 2, 0, 1),
        "stem.proj.bias": w["stem/bias"], "norm.weight": w["pre_head_layer_norm/scale"],
        "norm.bias": w["pre_head_layer_norm/bias"],
        "head.weight": w["head/kernel"].T, "head.bias": w["head/bias"]}
  for i in range(depth):
    b, t = f"MixerBlock_{i}/", f"blocks.{i}."
    for j in range(2):
      sd[f"{t}norm{j + 1}.weight"] = w[f"{b}LayerNorm_{j}/scale"]
      sd[f"{t}norm{j + 1}.bias"] = w[f"{b}LayerNorm_{j}/bias"]
    for ours, theirs in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
      for j in range(2):
        sd[f"{t}{theirs}.fc{j + 1}.weight"] = w[f"{b}{ours}/Dense_{j}/kernel"].T
        sd[f"{t}{theirs}.fc{j + 1}.bias"] = w[f"{b}{ours}/Dense_{j}/bias"]
  return sd


def stage_timm(workdir: str, depth: int, batch: int) -> None:
  """Writes the checkpoints and images, and timm's logits for both GELU settings."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from timm.layers import get_act_layer  # pylint: disable=import-outside-toplevel
  from timm.models import mlp_mixer, vision_transformer  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(2)
  os.makedirs(workdir, exist_ok=True)
  vit_w, mixer_w = vit_arrays(depth), mixer_arrays(depth)
  np.savez(os.path.join(workdir, "vit_b16.npz"), **vit_w)
  np.savez(os.path.join(workdir, "mixer_b16.npz"), **mixer_w)
  images = np.random.default_rng(2).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)
  np.save(os.path.join(workdir, "images.npy"), images)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  results = {}
  for act in ("gelu", "gelu_tanh"):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=CLASSES,
                            depth=depth, act_layer=act).eval()
    # timm's own reader of the original .npz files.
    vision_transformer._load_weights(  # pylint: disable=protected-access
        vit, os.path.join(workdir, "vit_b16.npz"))
    mixer = mlp_mixer.MlpMixer(num_classes=CLASSES, img_size=IMAGE, patch_size=PATCH,
                               num_blocks=depth, embed_dim=WIDTH, mlp_ratio=(0.5, 4.0),
                               act_layer=get_act_layer(act)).eval()
    mixer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in timm_mixer_state_dict(mixer_w, depth).items()})
    with torch.no_grad():
      results[f"vit_{act}"] = vit(x).numpy()
      results[f"mixer_{act}"] = mixer(x).numpy()
  np.savez(os.path.join(workdir, "timm_logits.npz"), **results)


def stage_ours(workdir: str, depth: int) -> None:
  """Loads the same checkpoints into our models and prints the differences to timm."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  from vit_repr import checkpoints  # pylint: disable=import-outside-toplevel
  from vit_repr.models import create  # pylint: disable=import-outside-toplevel

  images = np.load(os.path.join(workdir, "images.npy"))
  reference = np.load(os.path.join(workdir, "timm_logits.npz"))
  print(f"depth={depth}, batch={len(images)}, {IMAGE}x{IMAGE}, {CLASSES} classes, float32, "
        f"jax {jax.__version__} on {jax.default_backend()}")
  print(f"{'model':<12}{'timm GELU':<12}{'max |ours - timm|':>20}{'max |logit|':>14}")
  for name, model_name, file in (("ViT-B/16", "ViT-B/16", "vit_b16.npz"),
                                 ("Mixer-B/16", "Mixer-B/16", "mixer_b16.npz")):
    model = create(model_name, depth=depth, num_classes=CLASSES)
    params = checkpoints.load(os.path.join(workdir, file), model)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, images))
    for act in ("gelu", "gelu_tanh"):
      theirs = reference[f"{name.split('-')[0].lower()}_{act}"]
      label = "erf" if act == "gelu" else "tanh"
      print(f"{name:<12}{label:<12}{np.max(np.abs(ours - theirs)):>20.3e}"
            f"{np.max(np.abs(theirs)):>14.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=("all", "timm", "ours"), default="all")
  parser.add_argument("--workdir", default="/tmp/vit_repr_timm_parity")
  parser.add_argument("--depth", type=int, default=12, help="blocks (12 = full size)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--peers_python", default="/root/.cache/vit_repr_peers/bin/python",
                      help="python of the PyTorch env with timm (for --stage=all)")
  args = parser.parse_args()
  if args.stage in ("all", "timm"):
    if args.stage == "all":
      subprocess.run([args.peers_python, os.path.abspath(__file__), "--stage=timm",
                      f"--workdir={args.workdir}", f"--depth={args.depth}",
                      f"--batch={args.batch}"], check=True)
    else:
      stage_timm(args.workdir, args.depth, args.batch)
  if args.stage in ("all", "ours"):
    stage_ours(args.workdir, args.depth)


if __name__ == "__main__":
  main()
