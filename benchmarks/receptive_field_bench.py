"""Cost of the effective receptive fields of study 2b (paper Fig 6) on this machine.

For ViT-B/32, ViT-B/16 and BiT-R50x1 at 224x224 (full width, random weights; the paper's
layers: every ViT block's 'mid' and 'out', the ResNet stem and every unit output; centre
'single') and each estimator ('mean_abs', the paper's: one backward pass per channel of every
layer; 'abs_of_sum': one per layer), times `vit_repr.receptive_field.ReceptiveField.update` and
prints per model and estimator:

  compile s       tracing and XLA compilation of the update (ahead of time);
  s/img K         seconds per image of the compiled update with `max_channels=K` channels per
                  layer ('mean_abs'; 'abs_of_sum' always uses every channel), wall and CPU;
  s/img all       extrapolated to every channel, linearly in the FLOPs executed (the seconds per
                  executed FLOP measured with K channels, held for all channels, with the same
                  `channel_chunk`: K by default, so that every group loops over its chunks as
                  with all channels; larger chunks x batch run slower on CPUs, where their
                  backward activations outgrow the caches, and faster on accelerators);
  GFLOP/img       FLOPs executed per image with every channel, and the minimum as a share of it
                  (one forward pass, and each backward pass from its own layer: the rest is the
                  backward passes of a group's lower layers through its upper ones, see
                  `ReceptiveField`'s `layer_groups`);
  GFLOP/s         FLOPs executed per second in the timed update, and as a share of the float32
                  GEMM peak (jitted `jnp.dot`) measured in the same run (best of before/after);
  paper h         projected hours of the paper's setting on this machine: 32 images, every
                  channel.

FLOPs come from XLA's cost analysis of lowered (not compiled) programs, 2 per multiply-add: for
each layer l alone, `ReceptiveField` with 1 and 2 channels gives F_l, the forward pass to l, and
B_l, one backward pass from l's centre to the input. An update runs one forward pass (the
groups' forward passes are merged by XLA) and every probe of a group (padded to whole chunks)
from the group's top layer.

  python -m benchmarks.receptive_field_bench             # defaults, ~5 min on 2 CPU cores
  python -m benchmarks.receptive_field_bench --models=ViT-B/32 --estimators=abs_of_sum
  python -m benchmarks.receptive_field_bench --max_channels=16 --batch_size=4 --layer_groups=24
"""

import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from vit_repr import features, receptive_field
from vit_repr.models import create, flatten_intermediates

_MODELS = flags.DEFINE_list("models", ["ViT-B/32", "ViT-B/16", "BiT-R50x1"],
                            "Registered ViT or BiT model names.")
_ESTIMATORS = flags.DEFINE_list("estimators", list(receptive_field.ESTIMATORS),
                                "ReceptiveField estimators to time.")
_MAX_CHANNELS = flags.DEFINE_integer("max_channels", 8,
                                     "K: channels per layer in the timed 'mean_abs' update.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Images per update.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input side in pixels.")
_STEPS = flags.DEFINE_integer("steps", 1, "Timed updates after a warm-up (median reported).")
_LAYER_GROUPS = flags.DEFINE_integer("layer_groups", None,
                                     "ReceptiveField layer_groups (default: its default).")
_CHANNEL_CHUNK = flags.DEFINE_integer(
    "channel_chunk", None, "ReceptiveField channel_chunk (default: K for 'mean_abs', so that "
    "each group loops over chunks as with every channel; its default for 'abs_of_sum').")
_PAPER_IMAGES = flags.DEFINE_integer("paper_images", 32, "Images of the paper's setting.")

_LAYERS = {"ViT": (r"Transformer/encoderblock_\d+/(mid|out)",),
           "BiT": (r"root_block/out", r"block\d/unit\d+/out")}


def model_setup(name: str, size: int) -> tuple[Callable, dict, dict[str, tuple[int, ...]], dict]:
  """(fn, params, per-example shapes of the paper's layers in order, ReceptiveField options)."""
  model = create(name, num_classes=10, image_size=size)
  params = timing.random_variables(
      model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
  shapes = features.intermediate_shapes(model, size)
  names = features.select_names(list(shapes), _LAYERS[name.split("-")[0]])
  tokens = model.token_layout()

  def fn(p, x):
    _, sown = model.apply({"params": p}, x, mutable=["intermediates"])
    return flatten_intermediates(sown)

  options = dict(image_size=size, token_grid=None if tokens is None else tokens.grid,
                 num_prefix_tokens=0 if tokens is None else tokens.num_prefix_tokens)
  return fn, params, {n: shapes[n][1:] for n in names}, options


def layer_flops(fn: Callable, params: dict, shapes: Mapping[str, Sequence[int]],
                options: dict) -> tuple[np.ndarray, np.ndarray]:
  """Per layer, FLOPs per image of the forward pass to it and of one backward pass from it.

  Returns:
    (forward `[layers]`, backward `[layers]`), from the cost analysis of `ReceptiveField` on
    each layer alone with 1 and 2 channels (one chunk, so every probe is counted).
  """
  size = options["image_size"]
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  forward, backward = [], []
  for name, shape in shapes.items():
    cost = []
    for channels in (1, 2):
      erf = receptive_field.ReceptiveField(fn, {name: shape}, max_channels=channels,
                                           layer_groups=1, **options)
      cost.append(jax.jit(erf.update).lower(erf.init(), params, images).cost_analysis()["flops"])
    backward.append(cost[1] - cost[0])
    forward.append(cost[0] - backward[-1])
  return np.asarray(forward), np.asarray(backward)


def executed_flops(forward: np.ndarray, backward: np.ndarray, probes: Sequence[int],
                   layer_groups: int, chunk: int) -> float:
  """FLOPs per image `ReceptiveField` runs: one forward pass (XLA merges the groups' forward
  passes, common subexpressions) and, per layer group, each of its `probes` (padded to whole
  chunks) pulled back from the group's top layer."""
  total = float(forward.max())
  for group in receptive_field.group_layers(len(probes), layer_groups):
    count = sum(probes[i] for i in group)
    size = min(chunk, count)
    total += -(-count // size) * size * backward[group[-1]]
  return total


def minimum_flops(forward: np.ndarray, backward: np.ndarray, probes: Sequence[int]) -> float:
  """One forward pass to the last layer and each probe pulled back from its own layer."""
  return float(forward.max() + np.dot(probes, backward))


def time_updates(erf: receptive_field.ReceptiveField, params: dict, images: jax.Array,
                 steps: int) -> tuple[float, float, float]:
  """(trace + compile s of the update, median update wall s, its process CPU s)."""
  state = erf.init()
  start = time.perf_counter()
  update = jax.jit(erf.update).lower(state, params, images).compile()
  compile_seconds = time.perf_counter() - start
  state = jax.block_until_ready(update(state, params, images))  # Warm-up (first-run costs).
  walls, cpus = [], []
  for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    state = jax.block_until_ready(update(state, params, images))
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - start_cpu)
  return compile_seconds, float(np.median(walls)), float(np.median(cpus))


def bench_model(name: str) -> list[dict]:
  """Times every estimator on `name`; one row of measurements and FLOP counts each."""
  size, batch, k = _IMAGE_SIZE.value, _BATCH.value, _MAX_CHANNELS.value
  fn, params, shapes, options = model_setup(name, size)
  groups = {} if _LAYER_GROUPS.value is None else {"layer_groups": _LAYER_GROUPS.value}
  start = time.perf_counter()
  forward, backward = layer_flops(fn, params, shapes, options)
  print(f"  {name}: FLOPs of {len(shapes)} layers counted in {time.perf_counter() - start:.0f} s",
        flush=True)
  images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
  rows = []
  for estimator in _ESTIMATORS.value:
    max_channels = k if estimator == "mean_abs" else None
    chunk = _CHANNEL_CHUNK.value or max_channels
    erf = receptive_field.ReceptiveField(
        fn, shapes, estimator=estimator, max_channels=max_channels, **groups, **options,
        **({} if chunk is None else {"channel_chunk": chunk}))
    num_groups = len(receptive_field.group_layers(len(shapes), erf.layer_groups))
    widths = [shape[-1] for shape in shapes.values()]
    probes_all = widths if estimator == "mean_abs" else [1] * len(widths)
    probes_k = [min(k, c) for c in probes_all] if estimator == "mean_abs" else probes_all
    compile_seconds, wall, cpu = time_updates(erf, params, images, _STEPS.value)
    flops_k = executed_flops(forward, backward, probes_k, num_groups, erf.channel_chunk)
    flops_all = executed_flops(forward, backward, probes_all, num_groups, erf.channel_chunk)
    seconds_all = wall / batch * flops_all / flops_k
    rows.append(dict(
        model=name, estimator=estimator, layers=len(shapes), groups=num_groups,
        probes=sum(probes_all), k=max_channels, compile_s=compile_seconds, wall=wall / batch,
        cpu=cpu / batch, seconds_all=seconds_all, gflop_all=flops_all / 1e9,
        useful=minimum_flops(forward, backward, probes_all) / flops_all,
        gflops=flops_k * batch / wall / 1e9,
        paper_h=_PAPER_IMAGES.value * seconds_all / 3600))
    print(f"  done {name} {estimator}: {wall / batch:.2f} s/img with K={max_channels}",
          flush=True)
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (numbers are only "
        f"meaningful near 0); batch {_BATCH.value}, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, "
        f"float32, K={_MAX_CHANNELS.value} channels per layer timed for 'mean_abs'.", flush=True)
  peaks = timing.gemm_peaks(4096, 3)
  rows = [row for name in _MODELS.value for row in bench_model(name)]
  after = timing.gemm_peaks(4096, 3)
  peak = max(peaks["xla"], after["xla"])
  print(f"float32 GEMM peak (4096^3, best before/after): NumPy "
        f"{max(peaks['numpy'], after['numpy']):.1f} GFLOP/s, XLA jnp.dot {peak:.1f} GFLOP/s; "
        f"load average now {os.getloadavg()[0]:.1f}.")
  header = ("model", "estimator", "layers (groups)", "probes/img", "compile s",
            "s/img K (CPU s)", "s/img all", "GFLOP/img all", "minimum share", "GFLOP/s",
            "% XLA peak", f"paper h ({_PAPER_IMAGES.value} img)")
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    print(f"| {r['model']} | {r['estimator']} | {r['layers']} ({r['groups']}) | {r['probes']} | "
          f"{r['compile_s']:.1f} | {r['wall']:.2f} ({r['cpu']:.2f}) | {r['seconds_all']:.1f} | "
          f"{r['gflop_all']:.0f} | {100 * r['useful']:.0f}% | {r['gflops']:.1f} | "
          f"{100 * r['gflops'] / peak:.0f}% | {r['paper_h']:.2f} |")
  print("\ns/img all = s/img K x (GFLOP executed with every channel / with K): linear in the "
        "channels, at the FLOP rate measured with K, with the same channel_chunk.")


if __name__ == "__main__":
  app.run(main)
