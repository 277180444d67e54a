"""Speed of one training step of vit_repr.training on this machine; prints a table.

Workload: the `imagenet_vit_b16` recipe of configs/train.py (ViT-B/16 at 224x224, Adam, dropout
0.1, gradient clipping; Dosovitskiy et al., ICLR 2021) with a small global batch on random
images, through `training.make_train_step` (jit over a one-device mesh, state donated). Reported
per batch size and compute dtype: seconds per step (median of the timed steps, after
compilation), images/s, the step's FLOPs as XLA's cost analysis counts them, the achieved
GFLOP/s and that rate as a fraction of the float32 GEMM peak of XLA measured in the same run
(square matmul, best of several, before and after the steps: on a shared machine the peak is
the best the machine gave during the run). As a cross-check, a ViT-B/16 training step costs
about 3 x 35.1 = 105 GFLOP per 224x224 image (forward 17.6 GMAC).

  python -m benchmarks.train_bench                      # batch 8, float32, ~3 minutes on 2 cores
  python -m benchmarks.train_bench --batch_sizes=8,16 --dtypes=float32,bfloat16
"""

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import timing
from configs import train as train_configs
from vit_repr import parallel, recipe, training

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["8"], "Global batch sizes to time.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes ('float32', 'bfloat16').")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per configuration (after one warm-up).")
_RECIPE = flags.DEFINE_string("recipe", "imagenet_vit_b16", "configs/train.py recipe to time.")
_GEMM_SIZE = flags.DEFINE_integer("gemm_size", 2048, "Side of the square GEMM for the peak.")


def time_train_step(recipe_name: str, batch_size: int, dtype: str,
                    steps: int) -> dict[str, float]:
  """Compiles and times the recipe's train step; returns seconds, images/s and FLOPs."""
  config = train_configs.get_config(recipe_name)
  config.train.update(dict(global_batch_size=batch_size, accum_steps=1, dtype=dtype))
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = training.build_model(config, 1000)
  tx, schedule = recipe.make_optimizer(config.train)
  state = jax.jit(lambda: training.init_state(model, tx, config),
                  out_shardings=parallel.replicated(mesh))()
  side = config.data.image_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
      {"image": rng.uniform(-1, 1, (batch_size, side, side, 3)).astype(np.float32),
       "label": rng.integers(0, 1000, batch_size).astype(np.int32)}, mesh)
  step = training.make_train_step(model, tx, schedule, config.train, mesh)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, metrics = step(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"seconds": seconds, "images_per_second": batch_size / seconds, "flops": flops}


def main(argv):
  del argv
  peak_before = timing.gemm_peaks(_GEMM_SIZE.value)["xla"]
  results = []
  for dtype in _DTYPES.value:
    for batch_size in (int(b) for b in _BATCH_SIZES.value):
      results.append((batch_size, dtype,
                      time_train_step(_RECIPE.value, batch_size, dtype, _STEPS.value)))
  gemm_peak = max(peak_before, timing.gemm_peaks(_GEMM_SIZE.value)["xla"])
  print(f"{_RECIPE.value} training step on {jax.devices()[0].device_kind} "
        f"({jax.local_device_count()} device); XLA float32 GEMM peak "
        f"({_GEMM_SIZE.value}^3): {gemm_peak:.1f} GFLOP/s")
  header = f"{'batch':>6} {'dtype':>9} {'s/step':>8} {'images/s':>9} {'GFLOP/step':>11} " \
           f"{'GFLOP/s':>8} {'of peak':>8}"
  print(header)
  print("-" * len(header))
  for batch_size, dtype, r in results:
    rate = r["flops"] / r["seconds"] / 1e9
    print(f"{batch_size:>6} {dtype:>9} {r['seconds']:>8.2f} {r['images_per_second']:>9.2f} "
          f"{r['flops'] / 1e9:>11.1f} {rate:>8.1f} {rate / gemm_peak:>8.1%}")


if __name__ == "__main__":
  app.run(main)
