"""Shared pytest fixtures and helpers."""

import contextlib
import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One persistent XLA compilation cache for the test session, its xdist workers and the
# subprocesses they start (set before any test imports JAX): a program many tests run (a
# ViT-B/16 forward pass, a training step) is compiled once per session, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(REPO_ROOT, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Longest first (marker `seconds`), the rest in their usual order. `make test` runs xdist
  with --maxschedchunk=1, so it hands tests out one or two at a time in this order and the long
  tests spread over both workers (its default gives each worker a block of consecutive tests:
  every long test on one worker, the other idle at the end)."""
  def seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("seconds")
    return marker.args[0] if marker else 0.0
  items.sort(key=lambda item: -seconds(item))


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
def fake_tfds_cifar10(data_dir: str, num_examples: int):
  """An offline cifar10 in `data_dir`, prepared in TFDS's genuine format (tfrecord shards,
  dataset_info.json) from random images: 'train' and 'test' splits of `num_examples` each,
  read by `tfds.builder('cifar10', data_dir=data_dir)` like a real one (split slicing
  included). Nothing is downloaded."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = tfds.builder("cifar10", data_dir=data_dir).info.features
  rng = np.random.default_rng(num_examples)

  def split(offset):
    return [(str(offset + i), {"id": f"{offset + i}", "label": int(rng.integers(10)),
                               "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)})
            for i in range(num_examples)]

  tfds.dataset_builders.store_as_tfds_dataset(
      name="cifar10", version=str(tfds.builder_cls("cifar10").VERSION), features=features,
      split_datasets={"train": split(0), "test": split(num_examples)}, data_dir=data_dir,
      disable_shuffling=True)
  yield data_dir


_IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = JSON.stringify(
      [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]));
  document.body.appendChild(out);
});
</script>"""


def images_loaded_in_chromium(html_path: str, tmp_dir: str) -> list[tuple[str, bool]]:
  """[(alt text, loaded?)] for every <img> of `html_path` rendered by headless Chromium.

  Renders a copy of the page with a script that, once the page has loaded, writes each
  image's state (complete with a natural width > 0) into the DOM, which `--dump-dom` returns.
  Skips the calling test, saying how to install Chromium, when it is not on PATH.
  """
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  if browser is None:
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make test` "
                "installs it when run as root): the report's browser check is skipped.")
  with open(html_path) as f:
    page = f.read()
  probe = os.path.join(tmp_dir, "image_check.html")
  with open(probe, "w") as f:
    f.write(page.replace("</body>", _IMAGE_CHECK_SCRIPT + "</body>"))
  result = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
       "--dump-dom", "file://" + os.path.abspath(probe)],
      capture_output=True, text=True, timeout=120)
  found = re.search(r'<pre id="image-check">(.*?)</pre>', result.stdout, re.S)
  if found is None:
    pytest.fail(f"Chromium did not render {html_path} (exit {result.returncode}):\n"
                f"{result.stderr[-3000:]}")
  return [tuple(item) for item in json.loads(html.unescape(found.group(1)))]
