"""Shared pytest fixtures and helpers."""

import contextlib
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *, num_devices: int = 1, timeout: float = 600,
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh Python process with `num_devices` fake CPU devices.

  XLA's device count is fixed when JAX starts, so multi-device tests run in a subprocess.
  Fails the calling test with the child's stderr when the child fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra_env or {})
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)
  if result.returncode != 0:
    pytest.fail(f"subprocess failed (exit {result.returncode}):\n{result.stderr[-5000:]}")
  return result


@contextlib.contextmanager
def mock_tfds_cifar10(data_dir: str, num_examples: int):
  """Offline cifar10 in `data_dir`: real metadata (train and test splits of `num_examples`)
  written by the test, records from `tfds.testing.mock_data`. Nothing is downloaded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("cifar10", data_dir=data_dir)
  template = tfds.core.naming.ShardedFileTemplate(
      data_dir=builder.data_dir, dataset_name="cifar10", filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in ("train", "test")]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield data_dir
