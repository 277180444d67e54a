"""Training and fine-tuning of the studied models: data-parallel jit, resumable with orbax.

Trains any `vit_repr.models` model (ViT with a CLS or GAP head and chosen skip connections
removed, BiT ResNet-v2, MLP-Mixer) from scratch or from a checkpoint, on any dataset of
`vit_repr.data`, for the controlled-change studies of Raghu et al., "Do Vision Transformers See
Like Convolutional Neural Networks?" (NeurIPS 2021): skip connections (Fig. 8), CLS vs GAP
(Figs 9-11) and pretraining data scale (Figs 12-13). The recipe (optimizer, learning-rate
schedule and losses of the original ViT and BiT training code) is in `vit_repr.recipe`.

Steps: one step is one optimizer update on one global batch. With `accum_steps = k` the batch
is split into k equal micro-batches whose gradients a `lax.scan` averages: the same update as
the whole batch, with a k-th of the activation memory.

Distribution: one `jit`-compiled step over a one-axis mesh (`vit_repr.parallel`), parameters and
optimizer state replicated, the batch sharded over `parallel.DATA_AXIS`; the same code runs on
one CPU, several GPUs or a multi-host TPU slice. `train.dtype='bfloat16'` computes in bfloat16
with float32 parameters.

Checkpoints and resume: the whole `TrainState` (step, params, optimizer state, rng) is saved
with an orbax `CheckpointManager` in `<workdir>/checkpoints` every `checkpoint_every` steps and
at the end, beside a fingerprint of the result-determining config. A rerun with the same config
and workdir restores the latest step and continues with the same data (`data.train_batches`
with `start_step`) and the same per-step rng (`fold_in(rng, step)`), so its final parameters are
bit-identical to an uninterrupted run's; a workdir from another config is refused. Loss,
gradient and parameter norms are checked for finiteness whenever metrics are fetched (every log
or checkpoint step, never in between), so no non-finite state is ever saved and a divergence
stops the run naming its first bad step. The final parameters are also saved alone in
`<workdir>/params` (`vit_repr.checkpoints.restore`), where every study loads them.

Metrics: training loss, accuracy, learning rate, gradient norm, images/s and ETA are logged
(absl) and written to the run's metrics log (`vit_repr.metrics_log`: `<workdir>/metrics.jsonl`
and TensorBoard events in `<workdir>/tensorboard`), as are the periodic evaluations on the
held-out split.

This module is the loop and its resume (~460 lines): the step, the evaluation and the
checkpoint bookkeeping share one train state and are read together; the recipe (optimizer,
schedule, losses) is `vit_repr.recipe` and the metrics files `vit_repr.metrics_log`.
"""

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_repr import checkpoints, data, files, metrics_log, models, parallel, recipe

# Config entries that change how a run is carried out or reported but not its parameters:
# they may differ between a run and its resumption.
RUN_ONLY_KEYS = ("data.data_dir", "data.eval_split", "data.eval_num_examples",
                 "data.eval_global_batch_size", "data.crop_fraction", "mesh.num_devices",
                 "train.log_every", "train.eval_every", "train.checkpoint_every",
                 "train.keep_checkpoints", "train.stop_after_steps")
FINGERPRINT_FILE = "config_fingerprint.json"
CHECKPOINT_URI_SCHEMES = ("gs://", "s3://")  # Object stores Orbax (TensorStore) writes.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: int32 `[]`, optimizer updates done so far.
    params: the model's 'params' collection (float32).
    opt_state: the optax state.
    rng: uint32 key data of the run's base key (`jax.random.key_data`); step s uses
      `fold_in(key, s)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What `run` returns.

  Attributes:
    model: the unbound Flax module that was trained.
    params: its final parameters (replicated over the mesh).
    step: optimizer updates done.
    final_eval: the last evaluation record ('loss', 'accuracy', 'num_examples', 'step').
  """
  model: nn.Module
  params: Any
  step: int
  final_eval: Mapping[str, float]


# ---------------------------------------------------------------------------------------------
# The train and eval steps.


def _micro_batches(batch: Mapping[str, jax.Array], accum_steps: int, mesh: Mesh) -> Any:
  """`[B, ...]` -> `[accum_steps, B / accum_steps, ...]`, micro-batch k = rows k, k + accum, ...

  Interleaved rows keep every micro-batch spread evenly over the devices (no resharding).
  """
  spec = NamedSharding(mesh, PartitionSpec(None, parallel.DATA_AXIS))

  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)

  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], train: ml_collections.ConfigDict,
                    mesh: Mesh) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                            tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted, data-parallel `train_step(state, batch) -> (state, metrics)`.

  Args:
    model: the Flax module; called as `model.apply({'params': p}, images, train=True,
      rngs={'dropout': key})`.
    tx: the optimizer (`recipe.make_optimizer`).
    schedule: its learning-rate schedule (reported in the metrics).
    train: the config's `train` section (`loss`, `label_smoothing`, `accum_steps`).
    mesh: the mesh; the state is replicated, the batch sharded over `parallel.DATA_AXIS`.

  Returns:
    A function taking `TrainState` and `{'image': [B, H, W, 3], 'label': [B]}` and returning the
    new state (the old one is donated) and float32 scalar metrics 'loss', 'accuracy',
    'learning_rate', 'grad_norm', 'param_norm' and bool 'finite' (loss, gradient norm and new
    parameter norm all finite).
  """
  loss_fn = recipe.LOSS_FNS[train.loss]
  accum_steps = int(train.accum_steps)

  def micro_loss(params, images, labels, key):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
    loss = jnp.mean(loss_fn(logits, labels, train.label_smoothing))
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum_steps == 1:
      (loss, accuracy), grads = grad_fn(state.params, batch["image"], batch["label"], key)
    else:
      def body(carry, xs):
        index, micro = xs
        (loss, accuracy), grads = grad_fn(state.params, micro["image"], micro["label"],
                                          jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, carry, (loss, accuracy, grads)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      xs = (jnp.arange(accum_steps), _micro_batches(batch, accum_steps, mesh))
      sums, _ = jax.lax.scan(body, zeros, xs)
      loss, accuracy, grads = jax.tree.map(lambda x: x / accum_steps, sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    metrics = {"loss": loss, "accuracy": accuracy, "learning_rate": schedule(state.step),
               "grad_norm": grad_norm, "param_norm": param_norm,
               "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, loss: str, mesh: Mesh
                   ) -> Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """The jitted `eval_step(params, batch) -> {'loss_sum', 'correct', 'count'}` (float32 sums).

  The loss is unsmoothed; divide the sums over an eval pass by 'count'.
  """
  loss_fn = recipe.LOSS_FNS[loss]

  def eval_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=False)
    return {"loss_sum": jnp.sum(loss_fn(logits, batch["label"])),
            "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
            "count": jnp.asarray(batch["label"].shape[0], jnp.float32)}

  replicated = parallel.replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=replicated)


# ---------------------------------------------------------------------------------------------
# Building a run from its config.


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """`models.create(config.model.name, **overrides)` with the dataset's classes and resolution.

  `num_classes` and `image_size` default to the dataset's classes and `config.data.image_size`;
  `dtype` comes from `config.train.dtype` ('float32' | 'bfloat16').
  """
  if config.train.dtype not in recipe.DTYPES:
    raise ValueError(f"train.dtype must be one of {sorted(recipe.DTYPES)}; got "
                     f"{config.train.dtype!r}.")
  overrides = {**config.model.overrides.to_dict(), "dtype": recipe.DTYPES[config.train.dtype]}
  return models.create_from_config(config.model.name, overrides, num_classes=num_classes,
                                   image_size=config.data.image_size)


def make_train_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The data mesh over `config.mesh.num_devices` devices (None: all), the same number from
  every host (each host feeds its own devices): the first `num_devices / hosts` of each."""
  devices, hosts = jax.devices(), jax.process_count()
  count = config.mesh.num_devices
  if count is None:
    return parallel.make_mesh(devices)
  if not 0 < count <= len(devices) or count % hosts:
    raise ValueError(f"mesh.num_devices={count} but {len(devices)} devices are visible on "
                     f"{hosts} host(s); use a multiple of {hosts} in 1..{len(devices)}, or "
                     "None for all.")
  per_host = count // hosts
  return parallel.make_mesh([d for p in range(hosts)
                             for d in [d for d in devices if d.process_index == p][:per_host]])


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, params: Any = None) -> TrainState:
  """The state at step 0: fresh parameters from `config.seed` (or `params`), optimizer init."""
  init_key, run_key = jax.random.split(jax.random.key(config.seed))
  if params is None:
    size = config.data.image_size
    params = model.init({"params": init_key}, jnp.zeros((1, size, size, 3), jnp.float32),
                        train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(run_key))


def config_fingerprint(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """(sha256 hex, flat dict) of the config entries that determine the trained parameters."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
  kept = {k: v for k, v in sorted(flat.items())
          if not any(k == r or k.startswith(r + ".") for r in RUN_ONLY_KEYS)}
  digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
  return digest, kept


def _check_fingerprint(config: ml_collections.ConfigDict, ckpt_dir: str, has_checkpoint: bool
                       ) -> None:
  """Refuses a workdir trained with another config; records the fingerprint otherwise."""
  digest, flat = config_fingerprint(config)
  path = files.join(ckpt_dir, FINGERPRINT_FILE)
  contents = files.read_shared(path)
  if contents is not None:
    stored = json.loads(contents)
    if stored["fingerprint"] != digest:
      old = stored["config"]
      diff = [f"{k}: {old.get(k, '<absent>')!r} -> {flat.get(k, '<absent>')!r}"
              for k in sorted(set(old) | set(flat)) if old.get(k) != flat.get(k)]
      raise ValueError(
          f"The checkpoints in {ckpt_dir} were written by a run with a different config; "
          f"continuing would mix two runs. Differences (checkpointed -> now): {'; '.join(diff)}. "
          "Use a new --workdir for the new config, or rerun with the original config to resume.")
  elif has_checkpoint:
    raise ValueError(f"{ckpt_dir} holds checkpoints but no {FINGERPRINT_FILE}, so it cannot be "
                     "checked against this config; use a new --workdir.")
  else:
    files.write_json(path, {"fingerprint": digest, "config": flat}, indent=2, sort_keys=True)


def check_checkpoint_dir(workdir: str) -> None:
  """Raises ValueError unless Orbax can write checkpoints under `workdir`: a local path, or a
  URI of a scheme TensorStore writes (`CHECKPOINT_URI_SCHEMES`)."""
  if files.is_uri(workdir) and not str(workdir).startswith(CHECKPOINT_URI_SCHEMES):
    scheme = str(workdir).split("://")[0] + "://"
    raise ValueError(
        f"Training writes Orbax checkpoints, which take a local path or a URI starting with "
        f"{' or '.join(CHECKPOINT_URI_SCHEMES)}, not {scheme} (workdir {workdir!r}). Train into "
        f"a local or bucket work directory; the studies alone also accept {scheme}.")


def _validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  train = config.train
  if train.loss not in recipe.LOSSES:
    raise ValueError(f"Unknown train.loss {train.loss!r}; use one of {recipe.LOSSES}.")
  if not 0.0 <= train.label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing must be in [0, 1); got {train.label_smoothing}.")
  if train.total_steps < 1:
    raise ValueError(f"train.total_steps must be >= 1; got {train.total_steps}.")
  for name in ("log_every", "eval_every", "checkpoint_every", "accum_steps"):
    if train[name] < 1:
      raise ValueError(f"train.{name} must be >= 1; got {train[name]}.")
  micro = train.global_batch_size // train.accum_steps
  if train.global_batch_size % train.accum_steps or micro % mesh.devices.size:
    raise ValueError(
        f"train.global_batch_size={train.global_batch_size} must split into accum_steps="
        f"{train.accum_steps} micro-batches each divisible by the {mesh.devices.size} devices; "
        f"use a batch that is a multiple of {train.accum_steps * mesh.devices.size}.")


# ---------------------------------------------------------------------------------------------
# Evaluation.


def _evaluate(eval_step: Callable[..., dict[str, jax.Array]], params: Any,
              batches: data.EvalBatches) -> dict[str, float]:
  """Mean loss and accuracy of `params` over one pass of `batches`."""
  sums = None
  for batch in batches:
    out = eval_step(params, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  return {"loss": float(sums["loss_sum"] / sums["count"]),
          "accuracy": float(sums["correct"] / sums["count"]), "num_examples": int(sums["count"])}


# ---------------------------------------------------------------------------------------------
# The run.


def run(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Trains (or resumes, or reuses) the model of `config` in `workdir`.

  Idempotent: a finished run's workdir is reused without training (its final parameters are
  restored), an interrupted one resumes from its latest checkpoint, an empty one starts at
  step 0 (from `config.init.checkpoint` when set: an original `.npz` via
  `checkpoints.load`, or a `params` directory of an earlier run via `checkpoints.restore`).

  Args:
    config: a `configs/train.py` config (sections `model`, `init`, `data`, `train`, `mesh`).
    workdir: directory for checkpoints, final params, metrics and TensorBoard logs.

  Returns:
    The `TrainResult`. With `train.stop_after_steps` set (simulated preemption) the run stops
    after that step without a checkpoint, and the result holds the parameters at that step.

  Raises:
    ValueError: bad config values, or a workdir holding checkpoints of another config.
    FloatingPointError: non-finite loss, gradients or parameters (the message names the step;
      the checkpoints before it are kept).
  """
  check_checkpoint_dir(workdir)
  mesh = make_train_mesh(config)
  _validate(config, mesh)
  train = config.train
  info = data.dataset_info(config.data.name, config.data.data_dir)
  model = build_model(config, info.num_classes)
  tx, schedule = recipe.make_optimizer(train)
  ckpt_dir = files.join(files.absolute(workdir), "checkpoints")
  params_dir = files.join(files.absolute(workdir), "params")
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=train.keep_checkpoints, enable_async_checkpointing=False, create=True))
  latest = manager.latest_step()
  _check_fingerprint(config, ckpt_dir, latest is not None)
  replicated = parallel.replicated(mesh)
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, config))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  if latest is not None:
    logging.info("Resuming from step %d of %s.", latest, ckpt_dir)
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
  else:
    params = None
    if config.init.checkpoint:
      path = config.init.checkpoint
      params = (checkpoints.load(path, model) if str(path).endswith(".npz")
                else checkpoints.restore(path, abstract.params))
    state = jax.jit(functools.partial(init_state, model, tx, config),
                    out_shardings=replicated)(params)
  try:
    if int(state.step) < train.total_steps:
      writer = metrics_log.MetricsWriter(workdir, int(state.step))
      try:
        state = _train_loop(config, model, tx, schedule, mesh, manager, writer, state, info)
      finally:
        writer.close()
    else:
      logging.info("Run already finished (%d steps); reusing its parameters.", train.total_steps)
  finally:
    manager.close()
  step = int(state.step)
  if step == train.total_steps and not files.exists(params_dir):
    checkpoints.save(params_dir, state.params)
  evals = [r for r in metrics_log.read_metrics(workdir) if r["split"] == "eval"]
  final_eval = {k: v for k, v in evals[-1].items() if k != "split"} if evals else {}
  return TrainResult(model=model, params=state.params, step=step, final_eval=final_eval)


def _first_bad_step(records: list[dict[str, Any]], first_step: int) -> int | None:
  for offset, record in enumerate(records):
    if not record["finite"]:
      return first_step + offset
  return None


def _train_loop(config: ml_collections.ConfigDict, model: nn.Module,
                tx: optax.GradientTransformation, schedule: Callable[[jax.Array], jax.Array],
                mesh: Mesh, manager: ocp.CheckpointManager, writer: metrics_log.MetricsWriter,
                state: TrainState, info: data.DatasetInfo) -> TrainState:
  """Runs steps `state.step + 1 .. total_steps` (or to `stop_after_steps`); returns the state."""
  train, cfg_data = config.train, config.data
  start, total = int(state.step), train.total_steps
  batches = data.train_batches(
      cfg_data.name, cfg_data.train_split, image_size=cfg_data.image_size,
      global_batch_size=train.global_batch_size, mesh=mesh, seed=config.seed,
      data_dir=cfg_data.data_dir, subset_fraction=cfg_data.subset_fraction,
      subset_seed=cfg_data.subset_seed, start_step=start, shuffle_buffer=cfg_data.shuffle_buffer,
      area_range=tuple(cfg_data.area_range), random_flip=cfg_data.random_flip,
      num_shards=cfg_data.num_shards)
  eval_batches = data.eval_batches(
      cfg_data.name, cfg_data.eval_split, image_size=cfg_data.image_size,
      global_batch_size=cfg_data.eval_global_batch_size, mesh=mesh,
      num_examples=cfg_data.eval_num_examples, data_dir=cfg_data.data_dir,
      crop_fraction=cfg_data.crop_fraction)
  train_step = make_train_step(model, tx, schedule, train, mesh)
  eval_step = make_eval_step(model, train.loss, mesh)
  logging.info("Training %s on %s (%d classes) for steps %d..%d, global batch %d on %d devices.",
               config.model.name, cfg_data.name, info.num_classes, start + 1, total,
               train.global_batch_size, mesh.devices.size)
  stop = min(total, train.stop_after_steps or total)
  window, window_start, run_start = [], time.perf_counter(), time.perf_counter()
  for step in range(start + 1, stop + 1):
    state, metrics = train_step(state, next(batches))
    window.append(metrics)
    checkpoint_now = step % train.checkpoint_every == 0 or step == total
    eval_now = step % train.eval_every == 0 or step == total
    if step % train.log_every and not checkpoint_now and not eval_now and step != stop:
      continue
    records = jax.device_get(window)
    bad = _first_bad_step(records, step - len(window) + 1)
    if bad is not None:
      raise FloatingPointError(
          f"Non-finite loss, gradient or parameters at step {bad} (loss "
          f"{records[bad - step + len(window) - 1]['loss']}); stopped without saving. The last "
          f"good checkpoint is step {manager.latest_step()} in {manager.directory}. Lower the "
          "learning rate, clip gradients (optimizer.grad_clip_norm) or train in float32, then "
          "rerun with a new workdir (or the same config to retry from that checkpoint).")
    now = time.perf_counter()
    rate = len(window) * train.global_batch_size / (now - window_start)
    values = {k: float(np.mean([r[k] for r in records]))
              for k in ("loss", "accuracy", "grad_norm")}
    values.update(learning_rate=float(records[-1]["learning_rate"]),
                  param_norm=float(records[-1]["param_norm"]), images_per_second=rate)
    eta = (total - step) * train.global_batch_size / rate
    logging.info("step %d/%d: loss %.4f, accuracy %.3f, lr %.3g, %.1f images/s, elapsed %.0fs, "
                 "ETA %.0fs", step, total, values["loss"], values["accuracy"],
                 values["learning_rate"], rate, now - run_start, eta)
    writer.write("train", step, values)
    window, window_start = [], time.perf_counter()
    if eval_now:
      result = _evaluate(eval_step, state.params, eval_batches)
      logging.info("step %d eval on %s/%s: loss %.4f, accuracy %.4f (%d examples)", step,
                   cfg_data.name, cfg_data.eval_split, result["loss"], result["accuracy"],
                   result["num_examples"])
      writer.write("eval", step, result)
      window_start = time.perf_counter()
    if checkpoint_now:
      manager.save(step, args=ocp.args.StandardSave(state))
      window_start = time.perf_counter()
  if stop < total:
    logging.info("Stopping after step %d as train.stop_after_steps asks (no checkpoint).", stop)
  return state
