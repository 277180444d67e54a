"""Throughput of study 1 (CKA heatmaps, paper Figs 1-2): forward passes plus minibatch CKA.

For ViT-B/16 against BiT-R50x1 at 224x224 (the paper's layers: ViT sub-layer outputs, ResNet
unit outputs, all tokens / locations flattened), times per minibatch the feature extraction of
each model and the joint CKA update of all (24 + 16) layers, and reports examples/s, the share
of time in forward vs CKA, and achieved GFLOP/s against the float32 GEMM peak measured in the
same run. Forward FLOPs come from XLA's cost analysis; CKA FLOPs are the minimal count
(2·b²·p per layer for the Grams plus 2·L²·b² for all pairs).

With the peers interpreter present, the same study runs as the PyTorch stack would run it
(timm's vit_base_patch16_224 and resnetv2_50x1_bit, random weights, the same 24 + 16 layers
hooked: ViT block outputs and the LayerNorm of each block's mid-point, ResNet unit outputs;
pytorch-cka's `compute_cka` over a DataLoader of the same number of minibatches of random
images) in a separate process, and the end-to-end ratio is printed, with the peer's parts
(each model's forward pass timed alone; the rest is its CKA) beside vit_repr's.

  python -m benchmarks.study_bench                     # minibatch 32
  python -m benchmarks.study_bench --minibatch=64 --steps=3
"""

import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from vit_repr import cka, features
from vit_repr.models import create

_MINIBATCH = flags.DEFINE_integer("minibatch", 32, "Examples per minibatch (the paper's: 256).")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed minibatches after one warm-up.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Input resolution.")
_PEERS_PYTHON = flags.DEFINE_string("peers_python", "/root/.cache/vit_repr_peers/bin/python",
                                    "Python with torch, timm and pytorch-cka ('' to skip).")
_MODELS = {"ViT-B/16": r"Transformer/encoderblock_\d+/(mid|out)",
           "BiT-R50x1": r"block\d/unit\d+/out"}

# Runs in the peers interpreter: argv = minibatch, image size, steps; prints one JSON line.
_PEER_SCRIPT = r"""
import json, sys, time
import timm, torch
from cka import compute_cka
from torch.utils.data import DataLoader, TensorDataset
b, size, steps = (int(a) for a in sys.argv[1:4])
torch.manual_seed(0)
vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size).eval()
bit = timm.create_model("resnetv2_50x1_bit", pretrained=False).eval()
vit_layers = [name for i in range(12) for name in (f"blocks.{i}.norm2", f"blocks.{i}")]
bit_layers = [f"stages.{s}.blocks.{j}" for s, n in enumerate((3, 4, 6, 3)) for j in range(n)]
images = torch.rand(b * steps, 3, size, size) * 2 - 1
def run(num):
  loader = DataLoader(TensorDataset(images[:b * num]), batch_size=b)
  with torch.inference_mode():
    return compute_cka(vit, bit, loader, layers=vit_layers, model2_layers=bit_layers,
                       device="cpu", progress=False)
def forward_seconds(model):
  with torch.inference_mode():
    start = time.perf_counter()
    for step in range(steps):
      model(images[b * step:b * (step + 1)])
  return (time.perf_counter() - start) / steps
run(1)
start, cpu = time.perf_counter(), time.process_time()
run(steps)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds / steps, "cpu_seconds": cpu_seconds / steps,
                  "forward_seconds": {"ViT-B/16": forward_seconds(vit),
                                      "BiT-R50x1": forward_seconds(bit)},
                  "layers": [len(vit_layers), len(bit_layers)],
                  "versions": [timm.__version__, torch.__version__]}))
"""


def _peer_seconds(b: int, size: int, steps: int) -> dict | None:
  """The timm + pytorch-cka pipeline's seconds per minibatch, in a separate process."""
  if not _PEERS_PYTHON.value or not os.path.exists(_PEERS_PYTHON.value):
    return None
  proc = subprocess.run([_PEERS_PYTHON.value, "-c", _PEER_SCRIPT, str(b), str(size),
                         str(steps)], capture_output=True, text=True)
  if proc.returncode:
    print(f"timm + pytorch-cka comparison failed:\n{proc.stderr[-2000:]}")
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward_flops(model, params, images) -> float:
  def apply(p, x):
    return model.apply({"params": p}, x)
  analysis = jax.jit(apply).lower(params, images).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get("flops", float("nan")))


def main(argv):
  del argv
  b, size = _MINIBATCH.value, _SIZE.value
  gemm = timing.gemm_peaks()
  images = jax.random.uniform(jax.random.key(0), (b, size, size, 3), minval=-1.0, maxval=1.0)
  extractors, params, forward_flops = {}, {}, {}
  for name, pattern in _MODELS.items():
    model = create(name, num_classes=1000, image_size=size)
    params[name] = timing.random_variables(
        model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
    extractors[name] = features.FeatureExtractor(model, pattern, image_size=size)
    forward_flops[name] = _forward_flops(model, params[name], images)
  sizes = [p for e in extractors.values() for p in e.feature_sizes.values()]
  cka_flops = sum(2.0 * b * b * p for p in sizes) + 2.0 * len(sizes) ** 2 * b * b
  estimator = cka.MinibatchCKA()

  def minibatch(state):
    times, feats = {}, {}
    for name, extractor in extractors.items():
      start = time.perf_counter()
      out = jax.block_until_ready(extractor(params[name], images))
      times[name] = time.perf_counter() - start
      feats.update({f"{name}:{k}": v for k, v in out.items()})
    if state is None:
      state = estimator.init(feats)
    start = time.perf_counter()
    state = jax.block_until_ready(estimator.update(state, feats))
    times["CKA"] = time.perf_counter() - start
    return state, times

  state, _ = minibatch(None)  # Warm-up: compiles everything.
  runs = []
  for _ in range(_STEPS.value):
    state, times = minibatch(state)
    runs.append(times)
  median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
  total = sum(median.values())
  flops = {**forward_flops, "CKA": cka_flops}
  print(f"Study 1 on {jax.devices()[0].device_kind}: ViT-B/16 vs BiT-R50x1 at {size}px, "
        f"minibatch {b}, {len(sizes)} layers; float32 GEMM peak: numpy "
        f"{gemm['numpy']:.0f}, XLA {gemm['xla']:.0f} GFLOP/s")
  header = f"{'part':>10} {'s/minibatch':>12} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} " \
           f"{'of XLA peak':>11}"
  print(header)
  print("-" * len(header))
  for part, seconds in median.items():
    rate = flops[part] / seconds / 1e9
    print(f"{part:>10} {seconds:>12.2f} {seconds / total:>6.0%} {flops[part] / 1e9:>8.1f} "
          f"{rate:>8.1f} {rate / gemm['xla']:>11.0%}")
  print(f"{'total':>10} {total:>12.2f} {'':>6} {sum(flops.values()) / 1e9:>8.1f} "
        f"{sum(flops.values()) / total / 1e9:>8.1f}   -> {b / total:.2f} examples/s")
  peer = _peer_seconds(b, size, _STEPS.value)
  if peer is not None:
    print(f"timm {peer['versions'][0]} + pytorch-cka (torch {peer['versions'][1]}), "
          f"{peer['layers'][0]} + {peer['layers'][1]} layers: {peer['seconds']:.2f} s per "
          f"minibatch ({b / peer['seconds']:.2f} examples/s); peer / vit_repr: "
          f"{peer['seconds'] / total:.2f}x")
    # The peer's parts: each model's forward pass timed alone (no hooks), the rest is its CKA
    # (hooks, feature copies and HSIC).
    peer_parts = dict(peer["forward_seconds"])
    peer_parts["CKA"] = peer["seconds"] - sum(peer_parts.values())
    print(f"{'part':>10} {'vit_repr s':>11} {'peer s':>8} {'peer / vit_repr':>16}")
    for part, seconds in median.items():
      print(f"{part:>10} {seconds:>11.2f} {peer_parts[part]:>8.2f} "
            f"{peer_parts[part] / seconds:>15.2f}x")


if __name__ == "__main__":
  app.run(main)
