"""Parity with timm of the ViT families loaded from timm `.safetensors` files, on random weights.

A reference check, not a test (timm lives in a separate PyTorch environment). Two stages:

1. `--stage=timm`, run with the PyTorch env's python: builds each family's full-size timm model
   (DeiT III, DeiT distilled, DINOv2 with registers, OpenAI CLIP with timm's exact and
   OpenAI's quick GELU, MAE, SigLIP, a plain ViT), replaces every parameter by random values
   (timm's own initialisation leaves LayerScale at 1e-5 and heads at zero, which would hide a
   wrong mapping), saves its state dict as
   `.safetensors`, and saves timm's logits and pre-logits (`forward_head(pre_logits=True)`)
   for one batch of images. Models timm builds without a head (MAE, SigLIP) get a 1000-class
   one, so their logits are compared too. The row `...dinov2@518` saves DINOv2 at timm's
   default 518 px (a 37 x 37 position-embedding grid) and takes the reference from timm's own
   224-px model loaded from that file (`pretrained_cfg_overlay=dict(file=...)`: timm resizes
   the grid with its antialiased bicubic), so it checks our resize of a timm file too.
2. `--stage=ours` (default: both, the first in a subprocess), run with this repo's venv: loads
   each file with `vit_repr.checkpoints.load` into the model `FAMILIES` names, and prints
   max |ours - timm| of the pre-logits and logits, beside the largest |timm| value.

  /work/main/.venv/bin/python benchmarks/timm_families.py \
      --peers_python=/root/.cache/vit_repr_peers/bin/python --workdir=/tmp/timm_families
"""

import argparse
import functools
import os
import subprocess
import sys

import numpy as np

IMAGE = 224
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# row (a timm model name, '@<size>' for a file saved at another image size) -> (our registered
# model, our overrides, timm create_model kwargs of the reference model).
FAMILIES = {
    "vit_base_patch16_224": (
        "ViT-B/16", dict(mlp_activation="gelu", num_classes=1000), {}),
    "deit3_base_patch16_224": (
        "ViT-B/16", dict(mlp_activation="gelu", layer_scale_init=1e-6,
                         posemb_includes_cls=False, num_classes=1000), {}),
    "deit_base_distilled_patch16_224": (
        "ViT-B/16", dict(mlp_activation="gelu", distillation=True, num_classes=1000), {}),
    "vit_base_patch14_reg4_dinov2": (
        "ViT-B/16", dict(patch_size=14, mlp_activation="gelu", layer_scale_init=1e-5,
                         num_registers=4, posemb_includes_cls=False, num_classes=1000),
        dict(img_size=IMAGE, num_classes=1000)),
    "vit_base_patch14_reg4_dinov2@518": (
        "ViT-B/16", dict(patch_size=14, mlp_activation="gelu", layer_scale_init=1e-5,
                         num_registers=4, posemb_includes_cls=False, num_classes=1000),
        dict(img_size=IMAGE, num_classes=1000)),
    "vit_base_patch16_clip_224.openai": (
        "ViT-B/16", dict(mlp_activation="gelu", pre_norm=True, layer_norm_eps=1e-5,
                         patch_bias=False, num_classes=512), {}),
    "vit_base_patch16_clip_quickgelu_224.openai": (
        "ViT-B/16", dict(mlp_activation="quick_gelu", pre_norm=True, layer_norm_eps=1e-5,
                         patch_bias=False, num_classes=512), {}),
    "vit_base_patch16_224.mae": (
        "ViT-B/16", dict(mlp_activation="gelu", num_classes=1000), dict(num_classes=1000)),
    "vit_base_patch16_siglip_224": (
        "ViT-B/16", dict(mlp_activation="gelu", classifier="map", num_classes=1000),
        dict(num_classes=1000)),
}


def _file(workdir: str, name: str) -> str:
  return os.path.join(workdir, name.replace("/", "_") + ".safetensors")


def stage_timm(workdir: str, batch: int) -> None:
  """Writes each family's randomised state dict, the images and timm's outputs."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(2)
  torch.manual_seed(0)
  os.makedirs(workdir, exist_ok=True)
  images = np.random.default_rng(2).uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)
  np.save(os.path.join(workdir, "images.npy"), images)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  outputs = {}
  for name, (_, _, kwargs) in FAMILIES.items():
    timm_name, _, file_size = name.partition("@")
    file_kwargs = {**kwargs, "img_size": int(file_size)} if file_size else kwargs
    model = timm.create_model(timm_name, pretrained=False, **file_kwargs).eval()
    with torch.no_grad():
      for key, value in model.state_dict().items():
        if key.endswith("gamma"):
          value.uniform_(0.1, 1.0)
        elif value.ndim == 1 and "norm" in key and key.endswith("weight"):
          value.normal_(1.0, 0.1)
        elif value.ndim >= 2 and key.endswith("weight"):
          value.normal_(0.0, 1.0 / np.sqrt(np.prod(value.shape[1:])))
        else:
          value.normal_(0.0, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, _file(workdir, name))
    if file_size:
      model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(
          file=_file(workdir, name), num_classes=kwargs["num_classes"]), **kwargs).eval()
    with torch.no_grad():
      features = model.forward_features(x)
      outputs[f"{name}/pre_logits"] = model.forward_head(features, pre_logits=True).numpy()
      outputs[f"{name}/logits"] = model(x).numpy()
    print(f"timm: {name} written.", flush=True)
  np.savez(os.path.join(workdir, "timm_outputs.npz"), **outputs)


def stage_ours(workdir: str) -> None:
  """Loads every family's file into our ViT and prints the differences to timm."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  from vit_repr import checkpoints, models  # pylint: disable=import-outside-toplevel

  images = np.load(os.path.join(workdir, "images.npy"))
  reference = np.load(os.path.join(workdir, "timm_outputs.npz"))
  print(f"batch={len(images)}, {IMAGE}x{IMAGE}, float32, jax {jax.__version__} on "
        f"{jax.default_backend()}")
  print(f"{'timm model':<44}{'output':<12}{'max |ours - timm|':>19}{'max |timm|':>12}")
  for name, (model_name, overrides, _) in FAMILIES.items():
    model = models.create(model_name, image_size=IMAGE, **overrides)
    params = checkpoints.load(_file(workdir, name), model)
    logits, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
        {"params": params}, images)
    ours = {"pre_logits": models.flatten_intermediates(state)["pre_logits"], "logits": logits}
    for output in ("pre_logits", "logits"):
      theirs = reference[f"{name}/{output}"]
      if output == "pre_logits" and overrides.get("distillation"):
        continue  # timm's distilled pre-logits average the CLS and dist outputs; ours is CLS's.
      print(f"{name:<44}{output:<12}{np.max(np.abs(np.asarray(ours[output]) - theirs)):>19.3e}"
            f"{np.max(np.abs(theirs)):>12.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=("all", "timm", "ours"), default="all")
  parser.add_argument("--workdir", default="/tmp/vit_repr_timm_families")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--peers_python", default="/root/.cache/vit_repr_peers/bin/python",
                      help="python of the PyTorch env with timm (for --stage=all)")
  args = parser.parse_args()
  if args.stage in ("all", "timm"):
    if args.stage == "all":
      subprocess.run([args.peers_python, os.path.abspath(__file__), "--stage=timm",
                      f"--workdir={args.workdir}", f"--batch={args.batch}"], check=True)
    else:
      stage_timm(args.workdir, args.batch)
  if args.stage in ("all", "ours"):
    stage_ours(args.workdir)


if __name__ == "__main__":
  main()
