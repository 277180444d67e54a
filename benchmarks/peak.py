"""The machine's float32 GEMM peak, measured in the benchmark's own process and run.

Every benchmark reports achieved GFLOP/s against this: the best rate of an n x n x n float32
matrix product in NumPy and in jitted XLA (`jnp.dot`), 2 FLOPs per multiply-add.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def _best_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Warm-up (and compilation for XLA).
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def gemm_peaks(n: int = 2048, repeats: int = 10) -> dict[str, float]:
  """GFLOP/s of the best of `repeats` `[n, n] @ [n, n]` products: {'numpy': .., 'xla': ..}."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  a_device = jnp.asarray(a)
  matmul = jax.jit(jnp.dot)
  flops = 2.0 * n**3
  return {"numpy": flops / _best_seconds(lambda: a @ a, repeats) / 1e9,
          "xla": flops / _best_seconds(lambda: matmul(a_device, a_device), repeats) / 1e9}
