"""The shared shape of every experiment main: multi-host init, argv check, logging, config,
and a kind exit on the user errors the library reports."""

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import vit_repr
from vit_repr import files

_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host TPU pod slices, multi-node GPU): "
    "run the same command on every host.")
_LIBRARY_DIR = os.path.dirname(os.path.abspath(vit_repr.__file__)) + os.sep


def setup(argv: list[str], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Initialises multi-host JAX if asked, rejects extra argv, logs the process layout, writes
  the config snapshot `config.json` into the workdir (process 0) and logs the config at
  verbosity 1 (`--verbosity=1`)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("Process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  path = files.write_json(files.join(workdir, "config.json"), config.to_dict(), indent=2,
                          sort_keys=True)
  logging.info("Config written to %s.", path)
  logging.vlog(1, "Config:\n%s", config)


def raised_by_library(error: BaseException) -> bool:
  """Whether `error` was raised by vit_repr's own code: a user error (bad config, missing
  checkpoint, dataset not prepared) whose message says what is wrong and how to fix it."""
  frame = error.__traceback__
  while frame is not None and frame.tb_next is not None:
    frame = frame.tb_next
  return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_LIBRARY_DIR)


def run_main(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, where a ValueError or FileNotFoundError raised by the library prints its
  message alone and exits with status 1 (`--verbosity=1` shows the traceback). What the run
  saved before the error (checkpoints, accumulator states) stays in the workdir.

  In a multi-process job a process that fails reports its error and exits at once, skipping
  JAX's shutdown barrier: the other processes' next collective then fails within a second and
  they exit the same way (a normal exit would leave them waiting in that collective until the
  barrier's 5-minute timeout)."""
  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except app.UsageError:  # Bad flags: the same on every process; absl prints the usage.
      raise
    except Exception as error:  # pylint: disable=broad-except
      user_error = (isinstance(error, (ValueError, FileNotFoundError))
                    and raised_by_library(error) and logging.get_verbosity() < 1)
      if jax.process_count() == 1:
        if not user_error:
          raise
        print(f"Error: {error}\n(Rerun with --verbosity=1 for the traceback.)", file=sys.stderr)
        sys.exit(1)
      if user_error:
        print(f"Error on process {jax.process_index()}: {error}", file=sys.stderr)
      else:
        traceback.print_exc()
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access

  app.run(guarded)


def run_study(run: Callable[[ml_collections.ConfigDict, str], Any], config_file: str) -> None:
  """The absl main of a study: `--config=configs/<config_file>:<arg>` and `--workdir`, then
  `run(config, workdir)`, logging its headline numbers (the result's `summary`). Call it under
  `__main__`."""
  config_flag = config_flags.DEFINE_config_file("config", None, f"configs/{config_file}:<arg>",
                                                lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Output directory (resumable).",
                                     required=True)
  flags.mark_flag_as_required("config")

  def main(argv: list[str]) -> None:
    setup(argv, config_flag.value, workdir_flag.value)
    result = run(config_flag.value, workdir_flag.value)
    logging.info("%s: %s", "Done" if result.complete else "Stopped early",
                 json.dumps(result.summary))

  run_main(main)
