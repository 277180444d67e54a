"""The shared start of every experiment main: multi-host init, argv check, logging, config."""

import json
import os

import jax
import ml_collections
from absl import app, flags, logging

_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host TPU pod slices, multi-node GPU): "
    "run the same command on every host.")


def setup(argv: list[str], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Initialises multi-host JAX if asked, rejects extra argv, logs the process layout and the
  config, and writes the config snapshot `config.json` into the workdir (process 0)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.set_verbosity(logging.INFO)
  logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  logging.info("Config:\n%s", config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)
