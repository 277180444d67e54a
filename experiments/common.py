"""The shared start of every experiment main: multi-host init, argv check, logging, config."""

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

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


def run_study(run: Callable[[ml_collections.ConfigDict, str], dict[str, Any]],
              config_file: str) -> None:
  """The absl main of a study: `--config=configs/<config_file>:<arg>` and `--workdir`, then
  `run(config, workdir)`, logging its headline numbers. Call it under `__main__`."""
  config_flag = config_flags.DEFINE_config_file("config", None, f"configs/{config_file}:<arg>",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Output directory (resumable).",
                                     required=True)
  flags.mark_flag_as_required("config")

  def main(argv: list[str]) -> None:
    setup(argv, config_flag.value, workdir_flag.value)
    logging.info("Done: %s", json.dumps(run(config_flag.value, workdir_flag.value)))

  app.run(main)
