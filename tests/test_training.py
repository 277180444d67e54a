"""Tests for vit_repr.training, .recipe (against NumPy), .metrics_log and configs/train.py."""

import math
import struct
import os
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import train as train_configs
from configs import reproduce as reproduce_configs
from tests.conftest import fake_tfds_cifar10, run_python
from vit_repr import checkpoints, files, metrics_log, parallel, recipe, reproduction, training


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """A 2-block ViT at 16x16 on the embedded digits: a step takes milliseconds."""
  config = train_configs.get_config("vit_cls,runlocal")
  config.data.image_size = 16
  config.model.overrides.update(dict(patch_size=4, hidden_size=16, mlp_dim=32, num_heads=2))
  config.train.update(train_overrides)
  return config


def load_params(workdir):
  return checkpoints.restore(os.path.join(workdir, "params"))


# ---------------------------------------------------------------------------------------------
# Schedule, losses and optimizer against direct formulas.


@pytest.mark.parametrize("decay_type,warmup,end,base", [
    ("cosine", 10, 0.0, 0.3), ("cosine", 0, 1e-4, 0.3), ("linear", 5, 1e-3, 0.3),
    ("constant", 7, 0.0, 0.3), ("constant", 0, 0.0, 0.3), ("cosine", 4, 1e-3, 0.0),
    ("linear", 0, 1e-3, 0.0)],
    ids=["cosine-warmup", "cosine-no-warmup-end", "linear-end", "constant",
         "constant-no-warmup", "cosine-zero-base-end", "linear-zero-base-end"])
def test_schedule_matches_formula(decay_type, warmup, end, base):
  total = 50
  schedule = recipe.make_schedule(ml_collections.ConfigDict(dict(
      decay_type=decay_type, warmup_steps=warmup, end_learning_rate=end)), base, total)
  steps = np.arange(0, total + 5)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps), np.float64)
  expected = []
  for s in steps:
    if s < warmup:
      expected.append(base * s / warmup)
      continue
    p = min(1.0, (s - warmup) / (total - warmup))
    d = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}
    expected.append(end + (base - end) * d[decay_type])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_schedule_rejects_bad_values():
  with pytest.raises(ValueError, match="decay_type"):
    recipe.make_schedule(ml_collections.ConfigDict(dict(
        decay_type="step", warmup_steps=0, end_learning_rate=0.0)), 0.1, 10)
  with pytest.raises(ValueError, match="warmup_steps=10"):
    recipe.make_schedule(ml_collections.ConfigDict(dict(
        decay_type="cosine", warmup_steps=10, end_learning_rate=0.0)), 0.1, 10)


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_losses_match_numpy(loss, smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)) * 3
  labels = rng.integers(0, 5, size=6)
  targets = np.eye(5)[labels] * (1 - smoothing) + smoothing / 5
  if loss == "softmax":
    log_p = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    expected = -np.sum(targets * log_p, axis=1)
    got = jax.jit(recipe.softmax_cross_entropy)(logits.astype(np.float32), labels, smoothing)
  else:
    expected = -np.sum(targets * np_log_sigmoid(logits)
                       + (1 - targets) * np_log_sigmoid(-logits), axis=1)
    got = jax.jit(recipe.sigmoid_cross_entropy)(logits.astype(np.float32), labels, smoothing)
  assert got.shape == (6,)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5)


def optimizer_config(name, clip):
  config = train_configs.get_config("vit_cls")
  config.train.total_steps = 10
  config.train.optimizer.update(dict(name=name, learning_rate=0.1, weight_decay=0.01,
                                     weight_decay_pattern=".*/kernel", grad_clip_norm=clip))
  config.train.schedule.update(dict(decay_type="linear", warmup_steps=2))
  return config.train


@pytest.mark.parametrize("name,clip", [("adam", 0.5), ("adam", None), ("sgd", 0.5)],
                         ids=["adam-clipped", "adam", "sgd-momentum-clipped"])
def test_optimizer_matches_numpy(name, clip):
  train = optimizer_config(name, clip)
  tx, schedule = recipe.make_optimizer(train)
  rng = np.random.default_rng(1)
  params = {"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}}
  grads = [{"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}}
           for _ in range(4)]
  state = tx.init(jax.tree.map(jnp.float32, params))
  p = jax.tree.map(jnp.float32, params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(jax.tree.map(jnp.float32, g), state, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
  # Direct float64 reference.
  opt = train.optimizer
  ref = {k: v.copy() for k, v in params["dense"].items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v = {k: np.zeros_like(x) for k, x in ref.items()}
  for t, g in enumerate(grads, start=1):
    g = g["dense"]
    norm = math.sqrt(sum(np.sum(x**2) for x in g.values()))
    scale = min(1.0, clip / norm) if clip else 1.0
    lr = float(schedule(t - 1))
    for k in ref:
      gk = g[k] * scale
      decay = opt.weight_decay * ref[k] if k == "kernel" else 0.0
      if name == "adam":
        m[k] = opt.b1 * m[k] + (1 - opt.b1) * gk
        v[k] = opt.b2 * v[k] + (1 - opt.b2) * gk**2
        step = (m[k] / (1 - opt.b1**t)) / (np.sqrt(v[k] / (1 - opt.b2**t)) + opt.eps)
        ref[k] = ref[k] - lr * (step + decay)
      else:
        m[k] = opt.momentum * m[k] + gk + decay
        ref[k] = ref[k] - lr * m[k]
  for k in ref:
    np.testing.assert_allclose(np.asarray(p["dense"][k], np.float64), ref[k], rtol=2e-5,
                               atol=2e-6)


def test_unknown_optimizer():
  train = optimizer_config("adam", None)
  train.optimizer.name = "lamb"
  with pytest.raises(ValueError, match="adam"):
    recipe.make_optimizer(train)


# ---------------------------------------------------------------------------------------------
# Steps.


def random_batch(config, size, seed=0):
  rng = np.random.default_rng(seed)
  side = config.data.image_size
  return {"image": rng.uniform(-1, 1, (size, side, side, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def test_gradient_accumulation_equals_whole_batch():
  results = []
  for accum in (1, 4):
    config = tiny_config(accum_steps=accum)
    config.train.schedule.warmup_steps = 0  # the first update has a non-zero learning rate
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = training.build_model(config, 10)
    tx, schedule = recipe.make_optimizer(config.train)
    state = training.init_state(model, tx, config)
    step = training.make_train_step(model, tx, schedule, config.train, mesh)
    batch = parallel.global_batch(random_batch(config, 16), mesh)
    new_state, metrics = step(state, batch)
    results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)
  config = tiny_config()
  initial = training.init_state(training.build_model(config, 10),
                                recipe.make_optimizer(config.train)[0], config).params
  assert not np.allclose(p1["head"]["kernel"], initial["head"]["kernel"])


def test_bfloat16_step_is_close_to_float32():
  out = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(dtype=dtype)
    config.train.schedule.warmup_steps = 0
    mesh = parallel.make_mesh(jax.devices()[:1])
    model = training.build_model(config, 10)
    tx, schedule = recipe.make_optimizer(config.train)
    step = training.make_train_step(model, tx, schedule, config.train, mesh)
    state = training.init_state(model, tx, config)
    batch = parallel.global_batch(random_batch(config, 16), mesh)
    state, _ = step(state, batch)  # the head leaves zero: logits now depend on the body
    new_state, metrics = step(state, parallel.global_batch(random_batch(config, 16, 1), mesh))
    out[dtype] = jax.device_get((new_state.params, metrics))
  assert jax.tree.leaves(out["bfloat16"][0])[0].dtype == np.float32  # params stay float32
  assert out["bfloat16"][1]["finite"]
  np.testing.assert_allclose(out["bfloat16"][1]["loss"], out["float32"][1]["loss"], rtol=2e-2)
  np.testing.assert_allclose(out["bfloat16"][1]["grad_norm"], out["float32"][1]["grad_norm"],
                             rtol=0.1)


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from tests.test_training import tiny_config, random_batch
      from vit_repr import parallel, recipe, training
      assert jax.device_count() == 8
      config = tiny_config(accum_steps=2)
      config.train.schedule.warmup_steps = 0
      model = training.build_model(config, 10)
      tx, schedule = recipe.make_optimizer(config.train)
      out = {}
      for n in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        state = jax.device_put(training.init_state(model, tx, config), parallel.replicated(mesh))
        step = training.make_train_step(model, tx, schedule, config.train, mesh)
        batch = parallel.global_batch(random_batch(config, 16), mesh)
        new_state, metrics = step(state, batch)
        if n == 8:
          leaf = jax.tree.leaves(new_state.params)[0]
          assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
        out[n] = jax.device_get((new_state.params, metrics))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                   out[1], out[8])
      print("OK", float(out[8][1]["loss"]))
      """)
  assert "OK" in run_python(code, num_devices=8).stdout


# ---------------------------------------------------------------------------------------------
# Whole runs.


def test_one_step_on_embedded_data(tmp_path):
  config = tiny_config(total_steps=1)
  config.train.schedule.warmup_steps = 0
  result = training.run(config, str(tmp_path))
  assert result.step == 1
  records = metrics_log.read_metrics(str(tmp_path))
  assert [(r["split"], r["step"]) for r in records] == [("train", 1), ("eval", 1)]
  train, evaluation = records
  # Without warmup the first update uses the base rate; the zero-initialised head gives
  # uniform logits, so the first loss is log(classes).
  np.testing.assert_allclose(train["learning_rate"], 3e-3, rtol=1e-6)
  np.testing.assert_allclose(train["loss"], math.log(10), rtol=1e-5)
  assert evaluation["num_examples"] == 48 and 0 <= evaluation["accuracy"] <= 1
  assert result.final_eval["accuracy"] == evaluation["accuracy"]
  assert os.listdir(tmp_path / "tensorboard")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.params),
               load_params(str(tmp_path)))


@pytest.mark.parametrize("source", ["params_dir", "npz"])
def test_fine_tuning_starts_from_the_checkpoint(tmp_path, source):
  first = training.run(tiny_config(total_steps=3, checkpoint_every=3), str(tmp_path / "a"))
  trained = jax.device_get(first.params)
  path = str(tmp_path / "a" / "params")
  if source == "npz":  # the vision_transformer layout: '/'-joined parameter paths
    path = str(tmp_path / "trained.npz")
    np.savez(path, **traverse_util.flatten_dict(trained, sep="/"))
  config = tiny_config(total_steps=1)
  config.init.checkpoint = path
  config.train.optimizer.update(dict(learning_rate=0.0, weight_decay=0.0))
  config.train.schedule.warmup_steps = 0
  result = training.run(config, str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.params), trained)


MOCK_EXAMPLES = 24


@pytest.fixture
def fake_cifar10(tmp_path):
  """cifar10 with splits of MOCK_EXAMPLES, offline (see conftest.fake_tfds_cifar10)."""
  with fake_tfds_cifar10(str(tmp_path), MOCK_EXAMPLES) as data_dir:
    yield data_dir


def test_one_step_on_mock_tfds(fake_cifar10, tmp_path):
  config = tiny_config(total_steps=2, global_batch_size=8, log_every=1)
  config.train.schedule.warmup_steps = 1
  config.data.update(dict(name="cifar10", data_dir=fake_cifar10, eval_num_examples=16,
                          eval_global_batch_size=8))
  result = training.run(config, str(tmp_path / "work"))
  train = [r for r in metrics_log.read_metrics(str(tmp_path / "work")) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2] and train[1]["learning_rate"] > 0
  assert result.final_eval["num_examples"] == 16
  assert result.params["head"]["kernel"].shape == (16, 10)


@pytest.mark.slow
def test_loss_goes_down(tmp_path):
  config = tiny_config(total_steps=60, global_batch_size=32, log_every=10, eval_every=60,
                       checkpoint_every=60)
  config.train.optimizer.learning_rate = 1e-2
  config.train.schedule.warmup_steps = 5
  training.run(config, str(tmp_path))
  records = metrics_log.read_metrics(str(tmp_path))
  losses = [r["loss"] for r in records if r["split"] == "train"]
  # Chance level is loss log(10) = 2.303 and accuracy 0.1.
  assert losses[0] > 2.2 and losses[-1] < losses[0] - 0.1, losses
  final = records[-1]
  assert final["split"] == "eval" and final["accuracy"] > 0.2 and final["loss"] < 2.15, final


def test_kill_and_resume_is_bit_identical(tmp_path):
  config = tiny_config(total_steps=7, checkpoint_every=3, log_every=1, eval_every=100)
  reference = training.run(config, str(tmp_path / "full"))
  killed = tiny_config(total_steps=7, checkpoint_every=3, log_every=1, eval_every=100,
                       stop_after_steps=5)
  partial = training.run(killed, str(tmp_path / "resumed"))
  assert partial.step == 5
  assert [d for d in os.listdir(tmp_path / "resumed" / "checkpoints") if d.isdigit()] == ["3"]
  assert not (tmp_path / "resumed" / "params").exists()
  resumed = training.run(config, str(tmp_path / "resumed"))  # restarts from step 3
  assert resumed.step == 7
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference.params),
               jax.device_get(resumed.params))
  full_log = metrics_log.read_metrics(str(tmp_path / "full"))
  resumed_log = metrics_log.read_metrics(str(tmp_path / "resumed"))
  assert [r["step"] for r in resumed_log] == [r["step"] for r in full_log]
  assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
  # A finished run is reused as is.
  again = training.run(config, str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.params),
               jax.device_get(resumed.params))


def test_workdir_of_another_config_is_refused(tmp_path):
  training.run(tiny_config(total_steps=3, checkpoint_every=3), str(tmp_path))
  other = tiny_config(total_steps=3, checkpoint_every=3)
  other.train.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config.*learning_rate: 0.003 -> 0.5"):
    training.run(other, str(tmp_path))
  # Settings that do not change the parameters may differ.
  relaxed = tiny_config(total_steps=3, checkpoint_every=1, log_every=3)
  assert training.run(relaxed, str(tmp_path)).step == 3


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  make_schedule = recipe.make_schedule

  def poisoned(schedule, base, total):
    fn = make_schedule(schedule, base, total)
    return lambda step: jnp.where(step >= 4, jnp.nan, fn(step))  # update 5 uses NaN

  monkeypatch.setattr(recipe, "make_schedule", poisoned)
  config = tiny_config(total_steps=6, checkpoint_every=2, log_every=3)
  with pytest.raises(FloatingPointError, match=r"at step 5 .*checkpoint is step 4"):
    training.run(config, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [2, 4]
  monkeypatch.undo()
  model = training.build_model(config, 10)
  tx, _ = recipe.make_optimizer(config.train)
  abstract = jax.eval_shape(lambda: training.init_state(model, tx, config))
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(str(ckpt_dir)) as manager:
    state = manager.restore(4, args=ocp.args.StandardRestore(abstract))
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
  records = metrics_log.read_metrics(str(tmp_path))
  assert max(r["step"] for r in records) == 4  # the bad window was never written


@pytest.mark.parametrize("field,value,match", [
    ("loss", "hinge", "softmax_xent"), ("accum_steps", 3, "multiple of 3"),
    ("label_smoothing", 1.0, "label_smoothing"), ("dtype", "float16", "bfloat16")],
    ids=["loss", "accum", "smoothing", "dtype"])
def test_bad_train_config(tmp_path, field, value, match):
  config = tiny_config()
  config.train[field] = value
  with pytest.raises(ValueError, match=match):
    training.run(config, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("arg", list(train_configs.EMBEDDED + train_configs.REAL)
                         + ["vit_noskip,block=1", "bit,fraction=0.3", "imagenet_r50,runlocal",
                            "finetune,runlocal", "vit_noskip,runlocal"])
def test_configs_build_their_models(arg):
  config = train_configs.get_config(arg)
  model = training.build_model(config, 10)
  size = config.data.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  assert jax.tree.leaves(shapes)
  recipe.make_optimizer(config.train)
  digest, _ = training.config_fingerprint(config)
  assert len(digest) == 64
  if arg == "vit_noskip,block=1":
    assert model.remove_skips == (1,)
  if arg == "bit,fraction=0.3":
    assert config.data.subset_fraction == 0.3
  if arg.endswith("runlocal"):
    assert config.data.name == "digits" and config.init.checkpoint is None


def test_real_recipe_hyperparameters():
  vit = train_configs.get_config("imagenet_vit_b16")
  assert (vit.train.global_batch_size, vit.train.total_steps) == (4096, 300 * 1_281_167 // 4096)
  assert vit.train.optimizer.learning_rate == 3e-3 and vit.train.optimizer.weight_decay == 0.3
  r50 = train_configs.get_config("imagenet_r50")
  assert r50.train.optimizer.name == "sgd" and r50.train.optimizer.learning_rate == 1.6
  assert r50.train.total_steps == 28150


@pytest.mark.parametrize("arg", ["resnet", "vit_cls,block=2", "vit_cls,fast"],
                         ids=["unknown-recipe", "block-not-noskip", "unknown-option"])
def test_bad_config_args(arg):
  with pytest.raises(ValueError, match="recipe|block"):
    train_configs.get_config(arg)


@pytest.mark.slow
def test_experiment_main_runs_runlocal(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from absl import app
      from experiments import train
      sys.argv = ["train", "--config=configs/train.py:mixer,runlocal",
                  "--workdir={tmp_path}"]
      try:
        app.run(train.main)
      except SystemExit as e:
        assert not e.code, e.code
      print("OK")
      """)
  assert "OK" in run_python(code).stdout
  assert (tmp_path / "params").exists() and (tmp_path / "config.json").exists()
  assert len(metrics_log.read_metrics(str(tmp_path))) == 6


def test_workdir_orbax_cannot_write_is_refused_before_training():
  """Orbax checkpoints go through TensorStore: TensorFlow's ram:// is refused up front (by
  training and by the main job, before its first step), with the schemes that work."""
  for run in (lambda: training.run(tiny_config(), "ram://runs/vit"),
              lambda: reproduction.run(reproduce_configs.get_config("runlocal"), "ram://job")):
    with pytest.raises(ValueError, match=r"not ram:// .*local or bucket work directory"):
      run()
  assert not files.exists("ram://job") and not files.exists("ram://runs")
  training.check_checkpoint_dir("gs://bucket/run")  # Accepted: no bucket is touched.


def scalar_events(contents: bytes) -> list[tuple[str, int, float]]:
  """(tag, step, value) of every scalar of a TensorBoard event file, read from its TFRecord
  framing: length (uint64), its CRC, the Event proto, the proto's CRC."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found, offset = [], 0
  while offset < len(contents):
    (length,) = struct.unpack("<Q", contents[offset:offset + 8])
    event = event_pb2.Event.FromString(contents[offset + 12:offset + 12 + length])
    found += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    offset += 12 + length + 4
  return found


def test_metrics_and_tensorboard_events_reach_a_uri_workdir():
  """A URI work directory (ram:// here, gs:// on a pod) gets metrics.jsonl and the TensorBoard
  event file, whose scalars are the ones written; no local folder named after the URI."""
  writer = metrics_log.MetricsWriter("ram://metrics_run", start_step=0)
  writer.write("train", 1, {"loss": 2.5})
  writer.write("eval", 2, {"accuracy": 0.75})
  writer.close()
  assert [r["step"] for r in metrics_log.read_metrics("ram://metrics_run")] == [1, 2]
  events = [p for p in files.walk_files("ram://metrics_run") if "/tensorboard/" in p]
  assert len(events) == 1, events
  assert scalar_events(files.read_bytes(events[0])) == [("train/loss", 1, 2.5),
                                                        ("eval/accuracy", 2, 0.75)]
  assert not os.path.exists("ram:")
