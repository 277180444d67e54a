"""The one file API: every read and write of results, states, figures, configs and records.

Paths are strings: local paths or URIs (`gs://bucket/dir`, `s3://...`, TensorFlow's in-memory
`ram://...`). URIs go through etils epath's TensorFlow gfile backend, local paths through its
`os` backend, so a `gs://` work directory is the same bucket on every host, never a local
folder named `gs:`.

Multi-host: the `write_*` functions write on process 0 only (the other processes return
without writing), atomically: a temporary file, then a rename, so a reader never sees half a
file. `read_shared` reads a file every host must see identically (a resume state, a finished
step's record) and checks across hosts that they all read the same bytes: a work directory
that is not shared (a local path on a pod) is a clear error on every host, not one host
resuming while another starts over and waits in a collective.
"""

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils.epath import backend as epath_backend

from vit_repr import parallel


def is_uri(path: str) -> bool:
  """Whether `path` names a file system by scheme (`gs://`, `ram://`, ...)."""
  return "://" in str(path)


def _backend(path: str) -> epath_backend.Backend:
  return epath_backend.tf_backend if is_uri(path) else epath_backend.os_backend


def join(*parts: str) -> str:
  """Joins path parts with '/' (local paths and URIs alike)."""
  return posixpath.join(*(str(p) for p in parts))


def absolute(path: str) -> str:
  """A local path made absolute; a URI unchanged."""
  return str(path) if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _backend(path).exists(str(path))


def makedirs(path: str) -> None:
  """Creates the directory `path` and its parents (no error if it exists)."""
  _backend(path).makedirs(str(path), exist_ok=True)


def read_bytes(path: str) -> bytes:
  """The contents of `path` (this process's read).

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  if not exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  with _backend(path).open(str(path), "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path: str, contents: bytes) -> str:
  """Writes `contents` to `path` atomically, on process 0 only; creates the parent directory.

  Returns:
    `path`.
  """
  if jax.process_index() != 0:
    return path
  backend = _backend(path)
  backend.makedirs(posixpath.dirname(str(path)) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with backend.open(tmp, "wb") as f:
    f.write(contents)
  backend.replace(tmp, str(path))
  return path


def write_text(path: str, text: str) -> str:
  """`write_bytes` of UTF-8 text."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Any, **dump_kwargs: Any) -> str:
  """Writes `value` as JSON (`json.dumps(value, **dump_kwargs)`); process 0, atomic."""
  return write_text(path, json.dumps(value, **dump_kwargs))


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  """`arrays` in NumPy's `.npz` format."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  return buffer.getvalue()


def npz_arrays(contents: bytes) -> dict[str, np.ndarray]:
  """The arrays of `.npz` bytes (no pickles: nothing from a file is executed)."""
  with np.load(io.BytesIO(contents), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> str:
  """Writes `arrays` to the `.npz` file `path`; process 0, atomic."""
  return write_bytes(path, npz_bytes(arrays))


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of the `.npz` file `path`."""
  return npz_arrays(read_bytes(path))


def read_shared(path: str) -> bytes | None:
  """The contents of `path` (None if it does not exist), the same on every host.

  In a multi-process job all processes first wait for each other (so a file process 0 wrote
  just before is there for every reader), then every process reads `path` itself and all
  compare a digest of what they read (small collectives, so every process must call this at
  the same point).

  Raises:
    ValueError: the processes did not read the same contents (the work directory is not one
      file system shared by every host, or a process could not read the file).
  """
  if jax.process_count() > 1:  # A barrier: what process 0 wrote before this call is there.
    parallel.host_values(np.zeros(1, np.int32))
  contents = read_bytes(path) if exists(path) else None
  if jax.process_count() > 1:
    digest = b"" if contents is None else hashlib.sha256(contents).digest()[:8]
    mine = np.frombuffer(digest.ljust(8, b"\0"), np.int32)
    seen = parallel.host_values(np.concatenate([[contents is not None], mine]).astype(np.int32))
    if (seen != seen[0]).any():
      found = [int(p) for p in np.flatnonzero(seen[:, 0])]
      missing = [int(p) for p in np.flatnonzero(seen[:, 0] == 0)]
      raise ValueError(
          f"The processes do not read the same {path}: processes {found} find it, "
          + (f"processes {missing} do not" if missing else "with different contents")
          + ". Every host must see one shared work directory (a gs:// bucket or a shared "
          "file system mounted at the same path), not a local folder per host.")
  return contents


def walk_files(root: str) -> Iterator[str]:
  """Every file under the directory `root`, recursively, in sorted order."""
  backend = _backend(root)
  for directory, _, names in sorted(backend.walk(str(root))):
    for name in sorted(names):
      yield join(str(directory), name)
