"""Many hosts, one result (processes x fake CPU devices, gloo collectives): the CKA study on
1 x 1, 1 x 2, 2 x 1 and 2 x 2 gives the numbers of one process, with the same examples, and
resumes exactly (on a non-local `ram://` work directory, and on another host count); the main
job on every layout equals 1 x 1; hosts that do not share the work directory fail loudly; a
file process 0 wrote is there for every host that reads it next; a host that fails stops the
others at once."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# Runs the CKA heatmap study (runlocal: 360 digits, minibatch 40, 2 passes, the second a
# global reshuffle; 9 minibatches, so 2 and 4 devices pad their last batch) in one process of a
# layout, with a simulated preemption after one batch and a rerun; process 0 then writes the
# heatmap to out_path. With a fork directory, the work directory is copied there after the
# preemption (another layout then resumes it).
_WORKER = """
import json, shutil, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, processes, workdir, out_path, guard, fork = sys.argv[1:8]
pid, processes = int(pid), int(processes)
if processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=processes,
                             process_id=pid)
import numpy as np
from configs import cka_heatmap
from vit_repr import files
from vit_repr.studies import representation, resume

def config(stop):
  c = cka_heatmap.get_config('runlocal')
  c.data.num_examples = 360
  c.checkpoint_every = 1
  c.stop_after_batches = stop
  return c

if guard == 'guard':  # The hot loop (every update) makes no implicit transfer: no per-batch
  accumulate = resume.accumulate  # copies of the parameters or of anything else.
  def guarded_accumulate(state, update, *args, **kwargs):
    def guarded_update(state, batch):
      with jax.transfer_guard('disallow'):
        return update(state, batch)
    return accumulate(state, guarded_update, *args, **kwargs)
  resume.accumulate = guarded_accumulate
try:
  first = representation.run(config(1), workdir).summary
  if fork != '-':
    shutil.copytree(workdir, fork)
  summary = representation.run(config(None), workdir).summary
except ValueError as error:
  print('ERROR:', error)
  sys.exit(3)
if pid == 0:  # Process 0 wrote the heatmap; another process may finish before it is written.
  np.savez(out_path, **files.read_npz(files.join(workdir, 'cka_heatmap.npz')))
  print(json.dumps({'first': first, 'summary': summary}))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_layout(processes: int, devices: int, workdir: str, out_path: str,
                guard: bool = False, fork: str = "-") -> list[subprocess.CompletedProcess]:
  """Runs the worker as `processes` processes of `devices` fake CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, "-c", _WORKER, port, str(pid), str(processes), workdir, out_path,
       "guard" if guard else "-", fork],
      env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for pid in range(processes)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  return results


@pytest.mark.slow
@pytest.mark.seconds(150)
def test_layouts_give_one_heatmap_and_resume_exactly(tmp_path):
  # name: (processes, devices per process, hot loop under a transfer guard, work directory).
  # One process keeps its work directory in TensorFlow's in-memory file system (ram://): not
  # a local folder, so every read and write goes through vit_repr.files. The 1x2 run's state
  # after its preemption is copied to the 2x1 work directory: 2 hosts continue what 1 host of
  # the same 2 devices saved.
  layouts = {"1x1": (1, 1, False, "ram://study"), "1x2": (1, 2, True, str(tmp_path / "1x2")),
             "2x1": (2, 1, False, str(tmp_path / "2x1")), "2x2": (2, 2, False,
                                                               str(tmp_path / "2x2"))}
  heatmaps = {}
  for name, (processes, devices, guard, workdir) in layouts.items():
    fork = layouts["2x1"][3] if name == "1x2" else "-"
    results = _run_layout(processes, devices, workdir, str(tmp_path / f"{name}.npz"), guard,
                          fork)
    for result in results:
      assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
    headline = json.loads(results[0].stdout.strip().splitlines()[-1])
    assert headline["first"]["batches_done"] == 1  # Stopped after one batch, then resumed.
    # Every layout uses the 9 minibatches of each pass (2 and 4 devices pad their last batch).
    assert (headline["summary"]["num_examples"], headline["summary"]["num_minibatches"]) == (
        720, 18), (name, headline)
    heatmaps[name] = dict(np.load(tmp_path / f"{name}.npz"))
    assert not os.path.exists(os.path.join(REPO_ROOT, "ram:"))
  # Within- and cross-model heatmaps and their errors: every layout equals one device.
  reference = heatmaps.pop("1x1")
  keys = [k for k in reference if reference[k].dtype.kind == "f"]
  assert {"cka_aa", "cka_ab", "cka_bb", "stderr_ab"} <= set(keys), sorted(reference)
  for name, arrays in heatmaps.items():
    for key in keys:
      # Standard errors (~1e-3 here) come from a variance of float32 sums: their rounding is
      # ~1e-5 absolute (near 0 on the diagonal, where CKA = 1).
      atol = 3e-5 if key.startswith("stderr") else 1e-6
      np.testing.assert_allclose(arrays[key], reference[key], rtol=1e-5, atol=atol,
                                 err_msg=f"{name} {key}")


@pytest.mark.slow
def test_hosts_without_a_shared_workdir_fail_loudly(tmp_path):
  # ram:// is private to each process: like a local folder per host on a pod. The rerun finds
  # process 0's saved state on process 0 only, and both processes stop with the reason.
  results = _run_layout(2, 1, "ram://study", str(tmp_path / "out.npz"))
  for pid, result in enumerate(results):
    assert result.returncode == 3, f"process {pid}:\n{result.stderr[-4000:]}"
    assert "do not read the same ram://study/" in result.stdout
    assert "processes [0] find it, processes [1] do not" in result.stdout
    assert "shared work directory" in result.stdout


_WRITE_THEN_READ = """
import sys, time
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                           process_id=pid)
from vit_repr import files
for round in range(3):
  if pid == 0:
    time.sleep(1.5)  # Process 0 is slow to write; process 1 arrives at the read first.
  files.write_text(path, f'round {round}')
  print(files.read_shared(path).decode())
"""


@pytest.mark.slow
def test_a_file_written_by_process_0_is_read_by_every_host(tmp_path):
  path = str(tmp_path / "shared.txt")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _WRITE_THEN_READ, port, str(pid), path],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(2)]
  for pid, proc in enumerate(procs):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"process {pid}:\n{err[-3000:]}"
    read = [line for line in out.splitlines() if line.startswith("round")]  # Gloo logs too.
    assert read == ["round 0", "round 1", "round 2"], out


# The main job (experiments.reproduce's `reproduction.run`, runlocal: every study of the paper
# and the training of its models) in one process of a layout.
_MAIN_JOB = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, processes, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if processes > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=processes,
                             process_id=pid)
from configs import reproduce
from vit_repr import reproduction
reproduction.run(reproduce.get_config('runlocal'), workdir)
"""
# Headline numbers that measure the machine, not the data.
_TIMINGS = ("seconds", "examples_per_second", "pipeline_examples_per_second")


def _run_main_job(processes: int, devices: int, workdir: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _MAIN_JOB, port, str(pid), str(processes),
                             workdir], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for pid in range(processes)]
  for pid, proc in enumerate(procs):
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, f"{processes}x{devices} process {pid}:\n{err[-5000:]}"


def _assert_numbers_close(found, expected, where):
  """Nested headline numbers equal up to float32 rounding (timings left out)."""
  if isinstance(expected, dict):
    assert set(found) == set(expected), where
    for key in expected:
      if key not in _TIMINGS:
        _assert_numbers_close(found[key], expected[key], f"{where}.{key}")
  elif isinstance(expected, list):
    assert len(found) == len(expected), where
    for i, (f, e) in enumerate(zip(found, expected)):
      _assert_numbers_close(f, e, f"{where}[{i}]")
  elif isinstance(expected, float):
    np.testing.assert_allclose(found, expected, rtol=5e-3, atol=2e-3, err_msg=where)
  else:
    assert found == expected, where


@pytest.mark.slow
@pytest.mark.seconds(800)
def test_main_job_on_every_layout_equals_one_device(tmp_path):
  one = str(tmp_path / "1x1")
  _run_main_job(1, 1, one)
  # 2 hosts x 2 devices train vit_cls again (the model of most studies) and reuse the other
  # trained models, so the comparison covers training and every study at a bounded cost;
  # 2 x 1 reuses every trained model and runs every study. One host with several devices is
  # the layout of each study's own multi-device test (test_representation, test_attention, ...).
  for processes, devices, retrained in ((2, 2, ["vit_cls"]), (2, 1, [])):
    workdir = str(tmp_path / f"{processes}x{devices}")
    shutil.copytree(os.path.join(one, "models"), os.path.join(workdir, "models"),
                    ignore=lambda directory, names, skip=retrained: skip
                    if directory.endswith("models") else [])
    _run_main_job(processes, devices, workdir)
    assert os.path.exists(os.path.join(workdir, "models", "vit_cls", "params"))
    assert os.path.exists(os.path.join(workdir, "report.html"))
    _assert_same_results(workdir, one)


def _assert_same_results(workdir: str, one: str) -> None:
  """Every result `.npz` of every study and the headline numbers of the main job in `workdir`
  equal those of the one-device run in `one` (to float32 rounding of another layout)."""
  with open(os.path.join(one, "summary.json")) as f, open(
      os.path.join(workdir, "summary.json")) as g:
    _assert_numbers_close(json.load(g), json.load(f), f"{workdir} summary")
  compared = []
  for directory, _, names in os.walk(one):
    for name in names:
      # Resume states and cached probe features record their layout; results do not.
      if not name.endswith(".npz") or "state" in name or name.startswith("features_"):
        continue
      path = os.path.join(directory, name)
      expected = np.load(path)
      found = np.load(os.path.join(workdir, os.path.relpath(path, one)))
      assert set(found.files) == set(expected.files), path
      for key in expected.files:
        e, f = expected[key], found[key]
        if e.dtype.kind != "f":
          np.testing.assert_array_equal(f, e, err_msg=f"{workdir}: {path} {key}")
          continue
        # vit_cls trained on 4 devices rounds differently: CKA agrees to ~1e-5, standard
        # errors (float32 variances of sums) and receptive fields (gradients) to ~3e-3, and
        # a probe accuracy may move by one example of its evaluation set (the smallest, the
        # 264-example holdout: 3.8e-3). A standard error is compared as its variance: where
        # that is 0 in exact arithmetic (a layer's CKA with itself) it is float32 rounding
        # of unit-scale sums, whose square root (0 on one layout, 2.9e-5 on another) is far
        # above its size.
        scale = np.nanmax(np.abs(e)) if e.size and not np.isnan(e).all() else 1.0
        probe = "probe" in path or "/linear" in key or "/fewshot" in key
        if "stderr" in key:
          e, f, atol = e ** 2, f ** 2, 1e-2 * scale ** 2 + np.finfo(np.float32).eps
        else:
          atol = (1e-4 if key.startswith("cka") else 1.01 / 264 if probe
                  else 5e-3 * scale + 1e-6)
        np.testing.assert_allclose(f, e, rtol=0, atol=atol, err_msg=f"{workdir}: {path} {key}")
      compared.append(os.path.relpath(path, one))
  studies = {"representation", "attention", "receptive_fields", "skip_connections",
             "localization", "probes", "data_scale"}
  assert studies <= {c.split(os.sep)[0] for c in compared}, compared


_ONE_HOST_FAILS = """
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                           process_id=pid)
sys.argv = sys.argv[:1]
from jax.experimental import multihost_utils
from experiments import common
from vit_repr import data

def main(argv):
  multihost_utils.sync_global_devices('started')
  if pid == 1:
    data.dataset_info('no_such_dataset')  # A user error on this host only.
  multihost_utils.sync_global_devices('never reached by process 1')

common.run_main(main)
"""


@pytest.mark.slow
def test_a_host_that_fails_stops_the_others_at_once():
  """Process 1 stops with a user error while process 0 waits in a collective: both exit with
  status 1 within seconds (without the fast exit, 5 minutes: JAX's shutdown barrier)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _ONE_HOST_FAILS, port, str(pid)], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for pid in range(2)]
  errors = [proc.communicate(timeout=150)[1] for proc in procs]
  assert [proc.returncode for proc in procs] == [1, 1], errors
  assert "Error on process 1: Unknown dataset 'no_such_dataset'" in errors[1], errors[1][-3000:]
  assert "Gloo" in errors[0] and "Traceback" in errors[0], errors[0][-3000:]
