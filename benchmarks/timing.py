"""Measurement pieces shared by the benchmarks: the GEMM peak and random model parameters.

Every benchmark reports achieved GFLOP/s against the machine's float32 GEMM peak measured in
its own run: the best rate of an n x n x n float32 matrix product in NumPy and in jitted XLA
(`jnp.dot`), 2 FLOPs per multiply-add.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np


def best_seconds(fn, repeats: int) -> float:
  """Best wall-clock seconds of `fn()` over `repeats` runs, after one warm-up (JAX results
  waited for)."""
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
  return {"numpy": flops / best_seconds(lambda: a @ a, repeats) / 1e9,
          "xla": flops / best_seconds(lambda: matmul(a_device, a_device), repeats) / 1e9}


def random_variables(model, images: jax.ShapeDtypeStruct) -> dict:
  """Random float32 variables of `model`'s shapes, drawn with NumPy (speed does not depend on
  the values, and `model.init` would spend tens of seconds compiling its initialisers)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32), s.dtype),
      shapes)
