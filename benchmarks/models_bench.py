"""Forward-pass throughput of the models with every sown intermediate returned.

Measures images/s of the jitted `model.apply(..., mutable=['intermediates'])` (the feature
extraction every analysis of Raghu et al., NeurIPS 2021, runs), for ViT-B/16, BiT-R50x1 and
Mixer-B/16 at 224x224 by default, and the achieved GFLOP/s against the float32 GEMM peak
measured in the same run (a large NumPy matmul and a large jitted `jnp.dot`). Model FLOPs come
from XLA's cost analysis of the compiled forward pass (`compiled.cost_analysis()['flops']`;
2 FLOPs per multiply-add). For comparison it times the same architectures in timm (PyTorch,
CPU, logits only) in a separate process with the peers interpreter when that exists.

  python -m benchmarks.models_bench                    # full table (several minutes)
  python -m benchmarks.models_bench --quick            # smoke run: batch 4, one timed step
  python -m benchmarks.models_bench --models=BiT-R50x1 --notimm
"""

import json
import os
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from vit_repr.models import create, flatten_intermediates

_MODELS = flags.DEFINE_list("models", ["ViT-B/16", "BiT-R50x1", "Mixer-B/16"],
                            "Registered model names (vit_repr.models.known_names()).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed forward passes per model (median reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_LOGITS_ONLY = flags.DEFINE_boolean(
    "logits_only", True, "Also time the forward pass without intermediates (the cost of "
    "materialising them is the difference).")
_TIMM = flags.DEFINE_boolean("timm", True, "Time timm's models with --peers_python if present.")
_PEERS_PYTHON = flags.DEFINE_string("peers_python", "/root/.cache/vit_repr_peers/bin/python",
                                    "Python interpreter with torch + timm.")
_QUICK = flags.DEFINE_boolean("quick", False,
                              "Smoke run: batch 4, one timed step, small GEMMs, no logits-only.")

# timm's names for the same architectures (weights are never downloaded: pretrained=False).
_TIMM_NAMES = {"ViT-B/16": "vit_base_patch16_224", "ViT-B/32": "vit_base_patch32_224",
               "ViT-L/16": "vit_large_patch16_224", "BiT-R50x1": "resnetv2_50x1_bit",
               "BiT-R101x1": "resnetv2_101x1_bit", "BiT-R152x2": "resnetv2_152x2_bit",
               "Mixer-B/16": "mixer_b16_224", "Mixer-L/16": "mixer_l16_224"}

# Runs in the peers interpreter: argv = names, batch, image size, steps; prints one JSON line.
_TIMM_SCRIPT = r"""
import json, sys, time
import timm, torch
names = sys.argv[1].split(",")
batch, size, steps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out, cpu = {}, {}
x = torch.randn(batch, 3, size, size)
for name in names:
  kwargs = {"img_size": size} if name.startswith(("vit_", "mixer_")) else {}
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  with torch.inference_mode():
    model(x)
    times, cpu_times = [], []
    for _ in range(steps):
      start, start_cpu = time.perf_counter(), time.process_time()
      model(x)
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - start_cpu)
  out[name] = sorted(times)[len(times) // 2]
  cpu[name] = sorted(cpu_times)[len(cpu_times) // 2]
print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                  "timm": timm.__version__, "seconds": out, "cpu_seconds": cpu}))
"""


def _median_seconds(fn: Callable[[], object], steps: int) -> tuple[float, float]:
  """Median (wall, process CPU) seconds of `fn()`, blocked until ready, after one warm-up.

  CPU time (all threads of this process) is what the work costs; unlike wall time it barely
  moves when other processes share the cores.
  """
  jax.block_until_ready(fn())
  wall, cpu = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return float(np.median(wall)), float(np.median(cpu))


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def bench_model(name: str, batch: int, size: int, dtype, steps: int, logits_only: bool
                ) -> dict[str, float]:
  """Compiles and times one model's forward pass; returns seconds, FLOPs and output sizes."""
  model = create(name, image_size=size, dtype=dtype)
  images_spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = timing.random_variables(model, images_spec)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, images_spec.shape), jnp.float32)

  def with_intermediates(v, x):
    logits, state = model.apply(v, x, train=False, mutable=["intermediates"])
    return logits, flatten_intermediates(state)

  start = time.perf_counter()
  compiled = jax.jit(with_intermediates).lower(variables, images).compile()
  result = {"compile_s": time.perf_counter() - start, "flops": _flops(compiled)}
  feats = jax.eval_shape(with_intermediates, variables, images)[1]
  result["num_intermediates"] = len(feats)
  result["intermediate_mb"] = sum(
      np.prod(f.shape) * f.dtype.itemsize for f in feats.values()) / 2**20
  result["seconds"], result["cpu_seconds"] = _median_seconds(
      lambda: compiled(variables, images), steps)
  if logits_only:
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, images).compile()
    result["seconds_logits_only"], result["cpu_seconds_logits_only"] = _median_seconds(
        lambda: plain(variables, images), steps)
  return result


def bench_timm(names: list[str], batch: int, size: int, steps: int) -> dict | None:
  """Times timm's versions of `names` in a separate peers process; None if unavailable."""
  timm_names = [_TIMM_NAMES[n] for n in names if n in _TIMM_NAMES]
  if not timm_names or not os.path.exists(_PEERS_PYTHON.value):
    return None
  proc = subprocess.run(
      [_PEERS_PYTHON.value, "-c", _TIMM_SCRIPT, ",".join(timm_names), str(batch), str(size),
       str(steps)], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    print(f"timm comparison skipped (peers process failed):\n{proc.stderr[-2000:]}")
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quick = _QUICK.value
  batch = 4 if quick else _BATCH.value
  steps = 1 if quick else _STEPS.value
  size = _IMAGE_SIZE.value
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (numbers are only "
        f"meaningful near 0); batch {batch}, {size}x{size}, {_DTYPE.value}, "
        f"median of {steps} steps.")
  gemm_size, gemm_steps = (1024, 1) if quick else (4096, 3)
  peaks = timing.gemm_peaks(gemm_size, gemm_steps)

  rows = []
  for name in _MODELS.value:
    r = bench_model(name, batch, size, dtype, steps, _LOGITS_ONLY.value and not quick)
    gflop = r["flops"] / 1e9
    rows.append((name, "vit_repr (jax)", batch / r["seconds"], r["cpu_seconds"] / batch,
                 gflop / batch, gflop / r["seconds"], r["compile_s"],
                 f"{r['num_intermediates']} tensors, {r['intermediate_mb']:.0f} MB"))
    if "seconds_logits_only" in r:
      rows.append((name, "vit_repr logits only", batch / r["seconds_logits_only"],
                   r["cpu_seconds_logits_only"] / batch, gflop / batch,
                   gflop / r["seconds_logits_only"], float("nan"), "-"))
    print(f"  done {name}: {batch / r['seconds']:.2f} img/s", flush=True)

  if _TIMM.value:
    timm = bench_timm(_MODELS.value, batch, size, steps)
    if timm is None:
      print("timm comparison skipped (no peers interpreter or no known timm names).")
    else:
      print(f"timm {timm['timm']} / torch {timm['torch']}, {timm['threads']} threads.")
      by_timm = {v: k for k, v in _TIMM_NAMES.items()}
      flops_per_image = {row[0]: row[4] for row in rows}
      for timm_name, seconds in timm["seconds"].items():
        gflop_img = flops_per_image.get(by_timm[timm_name], float("nan"))
        rows.append((by_timm[timm_name], f"timm {timm_name}", batch / seconds,
                     timm["cpu_seconds"][timm_name] / batch, gflop_img,
                     gflop_img * batch / seconds, float("nan"), "logits only"))

  # The peak is measured before and after the models and the best kept, so a busy moment
  # during one measurement does not inflate the "% of peak" column.
  after = timing.gemm_peaks(gemm_size, gemm_steps)
  peaks = {k: max(peaks[k], after[k]) for k in peaks}
  print(f"float32 GEMM peak ({gemm_size}^3, best before/after): NumPy {peaks['numpy']:.1f} "
        f"GFLOP/s, XLA jnp.dot {peaks['xla']:.1f} GFLOP/s; load average now "
        f"{os.getloadavg()[0]:.1f}.")
  header = ("model", "implementation", "img/s", "CPU s/img", "GFLOP/img", "GFLOP/s",
            "% XLA peak", "compile s", "intermediates returned")
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for name, impl, ips, cpu_img, gf_img, gf_s, comp, inter in sorted(rows, key=lambda r: r[0]):
    print(f"| {name} | {impl} | {ips:.2f} | {cpu_img:.3f} | {gf_img:.2f} | {gf_s:.1f} | "
          f"{100 * gf_s / peaks['xla']:.0f}% | {comp:.1f} | {inter} |")


if __name__ == "__main__":
  app.run(main)
