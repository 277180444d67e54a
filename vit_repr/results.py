"""Writing study results: `.npz` arrays plus JSON metadata in a work directory.

Every study writes `<workdir>/<name>.npz` (arrays, loadable with `allow_pickle=False`) and
`<workdir>/<name>.json` (config, dataset, example counts, library versions, devices), so a
figure can be redrawn without recomputing anything.
"""

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vit_repr import files

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
  """Writes `<workdir>/<name>.npz` and `<workdir>/<name>.json` (process 0, atomically).

  Args:
    workdir: output directory, local or a URI such as gs://bucket/dir (created if missing).
    name: file stem, e.g. 'cka_heatmap'.
    arrays: numeric arrays to store.
    metadata: JSON-serialisable description (numpy scalars and arrays are converted); the
      environment (versions, devices) is added under 'environment'.

  Returns:
    The paths of the `.npz` and `.json` files.
  """
  npz_path = files.write_npz(files.join(workdir, f"{name}.npz"), arrays)
  json_path = files.write_json(  # Insertion order: layer-keyed entries stay in model order.
      files.join(workdir, f"{name}.json"),
      _to_jsonable({**metadata, "environment": environment_metadata()}), indent=2)
  return npz_path, json_path


def read_results(workdir: str, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads back what `write_results` wrote: (arrays, metadata), the same on every host.

  Raises:
    FileNotFoundError: no such results in `workdir`.
    ValueError: the hosts of a multi-process job do not see the same files.
  """
  found = {}
  for suffix in ("npz", "json"):
    path = files.join(workdir, f"{name}.{suffix}")
    found[suffix] = files.read_shared(path)
    if found[suffix] is None:
      raise FileNotFoundError(f"No results {path}; run the study that writes them first.")
  return files.npz_arrays(found["npz"]), json.loads(found["json"])
