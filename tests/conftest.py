"""Shared pytest fixtures and helpers."""

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
