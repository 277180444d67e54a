"""Throughput of study 1 (CKA heatmaps, paper Figs 1-2): forward passes plus minibatch CKA.

For ViT-B/16 against BiT-R50x1 at 224x224 (the paper's layers: ViT sub-layer outputs, ResNet
unit outputs, all tokens / locations flattened), times per minibatch the feature extraction of
each model and the joint CKA update of all (24 + 16) layers, and reports examples/s, the share
of time in forward vs CKA, and achieved GFLOP/s against the float32 GEMM peak measured in the
same run. Forward FLOPs come from XLA's cost analysis; CKA FLOPs are the minimal count
(2·b²·p per layer for the Grams plus 2·L²·b² for all pairs).

  python -m benchmarks.study_bench                     # minibatch 32
  python -m benchmarks.study_bench --minibatch=64 --steps=3
"""

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
_MODELS = {"ViT-B/16": r"Transformer/encoderblock_\d+/(mid|out)",
           "BiT-R50x1": r"block\d/unit\d+/out"}


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


if __name__ == "__main__":
  app.run(main)
