"""The shared start of every experiment main: argv check, logging, config snapshot."""

import json
import os

import jax
import ml_collections
from absl import app, logging


def setup(argv: list[str], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Rejects extra argv, logs the process layout and config, writes `config.json` to workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  logging.info("Config:\n%s", config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)
