"""Compile time and speed of the localization study (vit_repr.localization.LocalizationCKA).

Workload: ViT-B/16 at 224 px, i.e. L layers (default 3) of tokens `[197, 768]` (CLS + a 14x14
grid, dropped CLS) against the raw 16x16x3 input patches, minibatch CKA with the unbiased
HSIC estimator (Nguyen, Raghu & Kornblith, 2021) on one device. Reported per minibatch size b:
the compile seconds (the first `update`, which traces and compiles, minus one steady update),
the seconds and process CPU seconds per steady update, and the achieved GFLOP/s of the Gram
work, 2 b² N (L D + P) for the Grams plus 2 L N² b² for the all-pairs product (N = 196
tokens, D = 768, P = 768 pixels), against this machine's float32 GEMM peak measured in the
same run (`benchmarks.timing`, NumPy's and XLA's).

Every configuration runs in a fresh subprocess, so none reuses another's compiled code.

  python -m benchmarks.localization_bench                    # b = 32 and 256, ~2 minutes
  python -m benchmarks.localization_bench --minibatch 64 --layers 1
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, PATCH, WIDTH = 224, 16, 768  # ViT-B/16 at 224 px.
GRID = IMAGE_SIZE // PATCH


def gram_flops(layers: int, b: int) -> float:
  """FLOPs of one minibatch: every token's and patch's Gram, then the all-pairs product."""
  n, pixels = GRID * GRID, PATCH * PATCH * 3
  return 2.0 * b * b * n * (layers * WIDTH + pixels) + 2.0 * layers * n * n * b * b


def worker_gemm(cfg: dict) -> dict:
  """float32 GEMM throughput of NumPy and XLA on square matrices."""
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  return timing.gemm_peaks(cfg["n"], cfg["repeats"])


def worker_localization(cfg: dict) -> dict:
  """Times the first (compiling) and the steady `LocalizationCKA.update` of random features."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_repr import localization  # pylint: disable=g-import-not-at-top
  b, layers = cfg["b"], cfg["layers"]
  shapes = {f"Transformer/encoderblock_{i}/out": (1 + GRID * GRID, WIDTH) for i in range(layers)}
  keys = jax.random.split(jax.random.key(0), layers + 1)
  feats = {n: jax.random.normal(k, (b, *s)) for (n, s), k in zip(shapes.items(), keys)}
  images = jax.random.uniform(keys[-1], (b, IMAGE_SIZE, IMAGE_SIZE, 3))
  jax.block_until_ready((feats, images))
  loc = localization.LocalizationCKA(shapes, image_size=IMAGE_SIZE, num_prefix_tokens=1,
                                     token_grid=(GRID, GRID))
  state = loc.init()
  start = time.perf_counter()
  state = jax.block_until_ready(loc.update(state, feats, images))
  first = time.perf_counter() - start
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(cfg["steps"]):
    state = loc.update(state, feats, images)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / cfg["steps"]
  cpu_seconds = (time.process_time() - cpu_start) / cfg["steps"]
  loc.result(state)
  return {"compile_seconds": first - seconds, "seconds_per_update": seconds,
          "cpu_seconds_per_update": cpu_seconds}


def spawn(kind: str, cfg: dict) -> dict | None:
  """Runs one configuration in a fresh single-device CPU process; None (noted) if it fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "benchmarks.localization_bench", "--worker", kind,
         json.dumps(cfg)]
  proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
  if proc.returncode:
    print(f"  [{kind} {cfg} failed: {proc.stderr.strip().splitlines()[-1:]}]", flush=True)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--minibatch", type=int, nargs="+", default=[32, 256],
                      help="minibatch sizes b (the paper's: 256)")
  parser.add_argument("--layers", type=int, default=3, help="token layers L")
  parser.add_argument("--steps", type=int, default=3, help="timed updates after the first")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    kind, cfg = args.worker[0], json.loads(args.worker[1])
    print(json.dumps({"gemm": worker_gemm, "localization": worker_localization}[kind](cfg)))
    return

  gemm = spawn("gemm", {"n": 2048, "repeats": 7})
  print(f"float32 GEMM peak (2048^3): numpy {gemm['numpy']:.0f} GFLOP/s, "
        f"XLA {gemm['xla']:.0f} GFLOP/s")
  peak = max(gemm.values())
  print(f"ViT-B/16 at {IMAGE_SIZE} px: {args.layers} layers of [{1 + GRID * GRID}, {WIDTH}] "
        f"tokens vs {GRID * GRID} patches of {PATCH * PATCH * 3} pixels, one device")
  header = (f"{'b':>5}{'GFLOP':>8}{'compile s':>11}{'s/update':>10}{'cpu s/upd':>11}"
            f"{'GFLOP/s':>9}{'% peak':>8}")
  print(header)
  print("-" * len(header))
  for b in args.minibatch:
    out = spawn("localization", {"b": b, "layers": args.layers, "steps": args.steps})
    if out is None:
      continue
    flops = gram_flops(args.layers, b)
    rate = flops / out["seconds_per_update"] / 1e9
    print(f"{b:>5}{flops / 1e9:>8.1f}{out['compile_seconds']:>11.1f}"
          f"{out['seconds_per_update']:>10.3f}{out['cpu_seconds_per_update']:>11.3f}"
          f"{rate:>9.1f}{100 * rate / peak:>8.0f}", flush=True)


if __name__ == "__main__":
  main()
