"""Writing study results: `.npz` arrays plus JSON metadata in a work directory.

Every study writes `<workdir>/<name>.npz` (arrays, loadable with `allow_pickle=False`) and
`<workdir>/<name>.json` (config, dataset, example counts, library versions, devices), so a
figure can be redrawn without recomputing anything.
"""

import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                       "tensorflow-cpu", "tensorflow-datasets", "scikit-learn")


def environment_metadata() -> dict[str, Any]:
  """Library versions, Python version, device kinds and process layout of this run."""
  versions = {}
  for package in _VERSIONED_PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {
      "versions": versions,
      "python": platform.python_version(),
      "devices": [str(d.device_kind) for d in jax.devices()],
      "process_count": jax.process_count(),
  }


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def write_results(workdir: str, name: str, arrays: Mapping[str, np.ndarray],
                  metadata: Mapping[str, Any]) -> tuple[str, str]:
  """Writes `<workdir>/<name>.npz` and `<workdir>/<name>.json` (only on process 0).

  Args:
    workdir: output directory (created if missing).
    name: file stem, e.g. 'cka_heatmap'.
    arrays: numeric arrays to store.
    metadata: JSON-serialisable description (numpy scalars and arrays are converted); the
      environment (versions, devices) is added under 'environment'.

  Returns:
    The paths of the `.npz` and `.json` files.
  """
  os.makedirs(workdir, exist_ok=True)
  npz_path = os.path.join(workdir, f"{name}.npz")
  json_path = os.path.join(workdir, f"{name}.json")
  if jax.process_index() == 0:
    np.savez(npz_path, **{k: np.asarray(v) for k, v in arrays.items()})
    with open(json_path, "w") as f:
      json.dump(_to_jsonable({**metadata, "environment": environment_metadata()}), f,
                indent=2)  # Insertion order: layer-keyed entries stay in model order.
  return npz_path, json_path


def read_results(workdir: str, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads back what `write_results` wrote: (arrays, metadata)."""
  with np.load(os.path.join(workdir, f"{name}.npz"), allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  with open(os.path.join(workdir, f"{name}.json")) as f:
    metadata = json.load(f)
  return arrays, metadata
