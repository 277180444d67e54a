"""Speed and memory of minibatch CKA (vit_repr.cka.MinibatchCKA); prints a table.

Workload: a cross-model heatmap (default 12 x 16 layers) of minibatch CKA with the unbiased
HSIC estimator (Nguyen, Raghu & Kornblith, 2021), features `[b, p]` per layer per minibatch.
Reported per configuration: seconds per minibatch (an update folds one minibatch per device),
achieved GFLOP/s
against the minimal FLOP count (sum over layers of 2·b²·p for the Grams plus 2·La·Lb·b² for
the pairs), that rate as a fraction of this machine's float32 GEMM peak measured in the same
run (NumPy's and XLA's), the process CPU seconds per minibatch (a steadier measure when other
jobs share the cores), and the peak resident memory of the worker process. Sweeps: where the
Grams run (host BLAS or XLA on the device), feature means (zero, or 30x the spread: host Grams
then shift the features first), Gram block count, feature size p, layers, b, example count,
device count. With --peers, the fastest PyTorch CKA library (pytorch-cka) runs the same
workload in a separate process, first in `--rounds` alternating rounds with vit_repr (the
medians and their ratio are printed), then beside each sweep.

Every configuration runs in a fresh subprocess (peak memory per configuration, fake CPU
devices, and no XLA / torch thread pools in one process).

  python -m benchmarks.cka_bench --quick --peers    # ~3-4 minutes on 2 idle cores
  python -m benchmarks.cka_bench --peers            # the full table (needs ~8 GB free)
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = "/root/.cache/vit_repr_peers/bin/python"
VIT_B16_FEATURES = 197 * 768  # 151,296 features per example: ViT-B/16 tokens x width


def minimal_flops(la: int, lb: int, b: int, p: int) -> float:
  """Minimal FLOPs of one minibatch: full Grams of every layer plus all pair products."""
  return (la + lb) * 2.0 * b * b * p + 2.0 * la * lb * b * b


def peak_rss_gb() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_gemm(cfg: dict) -> dict:
  """float32 GEMM throughput of NumPy and XLA on square matrices."""
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  return timing.gemm_peaks(cfg["n"], cfg["repeats"])


def worker_ours(cfg: dict) -> dict:
  """Times MinibatchCKA.update on a fixed set of random features (compile excluded)."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  from vit_repr import cka, parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  b, p, la, lb = cfg["b"], cfg["p"], cfg["la"], cfg["lb"]
  global_batch = b * devices
  keys = jax.random.split(jax.random.key(0), la + lb)
  sharding = parallel.batch_sharding(mesh)
  offset = cfg.get("offset", 0.0)  # Feature means, in units of the features' spread.
  make = jax.jit(lambda k: jax.random.normal(k, (global_batch, p)) + offset * jax.random.normal(
      jax.random.fold_in(k, 1), (p,)), out_shardings=sharding)
  feats = [make(k) for k in keys]
  xs, ys = feats[:la], feats[la:]
  estimator = cka.MinibatchCKA(mesh, grams=cfg.get("grams", "auto"), gram_blocks=cfg["blocks"],
                               feature_chunk=cfg["chunk"])
  state = estimator.update(estimator.init(xs, ys), xs, ys)  # compiles
  jax.block_until_ready(state)
  steps = max(1, cfg["n"] // global_batch)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state = estimator.update(state, xs, ys)
  jax.block_until_ready(state)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  estimator.result(state)
  minibatches = steps * devices
  one_layer = np.asarray(feats[0].addressable_shards[0].data)
  gram_seconds = timing.best_seconds(lambda: one_layer @ one_layer.T, repeats=5)
  return {"seconds_per_minibatch": seconds / minibatches,
          "cpu_seconds_per_minibatch": cpu_seconds / minibatches, "total_seconds": seconds,
          "minibatches": minibatches, "devices": devices, "peak_gb": peak_rss_gb(),
          "gram_ms": 1e3 * gram_seconds}



PEER_CODE = r"""
import json, sys, time, torch
from torch import nn
from cka import compute_cka
from torch.utils.data import DataLoader, TensorDataset
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
b, p = cfg["b"], cfg["p"]

class Bank(nn.Module):
  # Each layer returns a fixed feature tensor, so only pytorch-cka's own work is timed.
  def __init__(self, num):
    super().__init__()
    self.layers = nn.ModuleList(Layer(torch.randn(b, p)) for _ in range(num))
  def forward(self, x):
    return [layer(x) for layer in self.layers]

class Layer(nn.Module):
  def __init__(self, feat):
    super().__init__()
    self.register_buffer("feat", feat)
  def forward(self, x):
    return self.feat

m1, m2 = Bank(cfg["la"]), Bank(cfg["lb"])
names1 = [f"layers.{i}" for i in range(cfg["la"])]
names2 = [f"layers.{i}" for i in range(cfg["lb"])]
steps = max(1, cfg["n"] // b)
loader = lambda k: DataLoader(TensorDataset(torch.zeros(k * b, 1)), batch_size=b)
run = lambda k: compute_cka(m1, m2, loader(k), layers=names1,
                            model2_layers=names2, device="cpu", progress=False)
run(1)
start, cpu_start = time.perf_counter(), time.process_time()
run(steps)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
one = m1.layers[0].feat
gram_seconds = []
for _ in range(6):
  start = time.perf_counter(); one @ one.T; gram_seconds.append(time.perf_counter() - start)
import resource
print(json.dumps({"gram_ms": 1e3 * min(gram_seconds[1:]), "seconds_per_minibatch": seconds / steps,
                  "cpu_seconds_per_minibatch": cpu_seconds / steps, "total_seconds": seconds,
                  "minibatches": steps, "devices": 1,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def spawn(kind: str, cfg: dict, devices: int = 1) -> dict | None:
  """Runs one configuration in a fresh process; None (with a note) if it fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if kind == "peer":
    cmd = [PEERS_PYTHON, "-c", PEER_CODE, json.dumps(cfg)]
  else:
    cmd = [sys.executable, "-m", "benchmarks.cka_bench", "--worker", kind, json.dumps(cfg)]
  proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
  if proc.returncode:
    print(f"  [{kind} {cfg} failed: {proc.stderr.strip().splitlines()[-1:]}]", flush=True)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few, small configurations")
  parser.add_argument("--peers", action="store_true",
                      help=f"also time pytorch-cka with {PEERS_PYTHON} (skipped if missing)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating rounds of vit_repr and pytorch-cka on the main workload")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    kind, cfg = args.worker[0], json.loads(args.worker[1])
    print(json.dumps({"gemm": worker_gemm, "ours": worker_ours}[kind](cfg)))
    return

  gemm = spawn("gemm", {"n": 2048, "repeats": 3 if args.quick else 7})
  print(f"float32 GEMM peak (2048^3): numpy {gemm['numpy']:.0f} GFLOP/s, "
        f"XLA {gemm['xla']:.0f} GFLOP/s")
  peak = max(gemm.values())
  main_cfg = dict(la=12, lb=16, b=256, p=37_824, n=2048 if not args.quick else 768, blocks=1,
                  chunk=1024, grams="auto")
  peers = args.peers and os.path.exists(PEERS_PYTHON)
  if args.peers and not peers:
    print(f"(peers python {PEERS_PYTHON} not found: skipping pytorch-cka)")
  if peers:
    compare_rounds(main_cfg, args.rounds, devices=(1, 8))

  rows = []  # (sweep, impl, cfg, devices)
  for grams in ("host", "device"):
    rows.append(("grams", "vit_repr", dict(main_cfg, grams=grams), 1))
  for offset in (0.0, 30.0):
    rows.append((f"mean {offset:g}x", "vit_repr", dict(main_cfg, offset=offset), 1))
  device_cfg = dict(main_cfg, grams="device")
  for blocks in ((1, 2) if args.quick else (1, 2, 4, 8)):
    rows.append(("dev. blocks", "vit_repr", dict(device_cfg, blocks=blocks), 1))
  for chunk in (() if args.quick else (0, 512, 2048, 4096)):
    rows.append(("dev. chunk", "vit_repr", dict(device_cfg, chunk=chunk), 1))
  small = dict(main_cfg, p=4096, n=1024 if args.quick else 2048)
  if not args.quick:
    for p in (4096, 16_384, 37_824, VIT_B16_FEATURES):
      rows.append(("features p", "vit_repr", dict(main_cfg, p=p, n=1024), 1))
      if peers:
        rows.append(("features p", "pytorch-cka", dict(main_cfg, p=p, n=1024), 1))
    for la, lb in ((3, 4), (6, 8), (24, 32)):
      rows.append(("layers", "vit_repr", dict(small, la=la, lb=lb), 1))
    for b in (64, 128, 512):
      rows.append(("batch b", "vit_repr", dict(small, b=b), 1))
    for n in (1024, 4096, 8192):
      rows.append(("examples N", "vit_repr", dict(small, n=n), 1))
  for devices in ((1, 2) if args.quick else (1, 2, 4, 8)):
    rows.append(("devices", "vit_repr", dict(small, n=small["n"] * devices), devices))

  header = (f"{'sweep':<12}{'impl':<13}{'grams':>7}{'La x Lb':>8}{'b':>5}{'p':>8}{'N':>6}"
            f"{'blk':>4}{'chunk':>6}{'dev':>4}{'s/minib':>9}{'cpu s/mb':>9}{'total s':>9}"
            f"{'GFLOP/s':>9}{'% peak':>7}{'peak GB':>8}")
  print(header)
  print("-" * len(header))
  for sweep, impl, cfg, devices in rows:
    out = spawn("peer" if impl == "pytorch-cka" else "ours", cfg, devices)
    if out is None:
      continue
    rate = minimal_flops(cfg["la"], cfg["lb"], cfg["b"], cfg["p"]) / out[
        "seconds_per_minibatch"] / 1e9
    blk, chunk, grams = ((cfg["blocks"], cfg["chunk"], cfg["grams"]) if impl == "vit_repr"
                         else ("-", "-", "-"))
    print(f"{sweep:<12}{impl:<13}{grams:>7}{cfg['la']:>3} x {cfg['lb']:<3}{cfg['b']:>5}"
          f"{cfg['p']:>8}{cfg['n']:>6}{blk:>4}{chunk:>6}{out['devices']:>4}"
          f"{out['seconds_per_minibatch']:>9.3f}{out['cpu_seconds_per_minibatch']:>9.3f}"
          f"{out['total_seconds']:>9.2f}{rate:>9.1f}{100 * rate / peak:>7.0f}"
          f"{out['peak_gb']:>8.2f}", flush=True)


def compare_rounds(cfg: dict, rounds: int, devices: tuple[int, ...]) -> None:
  """vit_repr (on each device count) and pytorch-cka on `cfg`, alternating, `rounds` times;
  prints each run's seconds per minibatch, the medians and the ratios peer / vit_repr, and the
  time of one Gram alone in each library's BLAS (NumPy's OpenBLAS SYRK, torch's MKL)."""
  times = {}
  print(f"Alternating rounds on {cfg['la']} x {cfg['lb']} layers, b={cfg['b']}, p={cfg['p']}, "
        f"N={cfg['n']} per device (seconds per minibatch):")
  for round_index in range(rounds):
    runs = [("pytorch-cka", "peer", cfg, 1)] + [
        (f"vit_repr {d} dev", "ours", dict(cfg, n=cfg["n"] * d), d) for d in devices]
    for name, kind, run_cfg, num_devices in runs:
      out = spawn(kind, run_cfg, num_devices)
      if out is not None:
        times.setdefault(name, []).append(out["seconds_per_minibatch"])
        print(f"  round {round_index + 1}: {name:<16}{out['seconds_per_minibatch']:.3f}   "
              f"(one [b, p] Gram alone: {out['gram_ms']:.1f} ms, "
              f"{'torch' if kind == 'peer' else 'NumPy'})", flush=True)
  peer = float(np.median(times.get("pytorch-cka", [np.nan])))
  for name, values in times.items():
    median = float(np.median(values))
    print(f"  median {name:<16}{median:.3f} s   pytorch-cka / this: {peer / median:.2f}x")


if __name__ == "__main__":
  main()
