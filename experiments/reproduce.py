r"""The main job: reproduces the paper's studies into one work directory.

    python -m experiments.reproduce --workdir=outputs/reproduce
    python -m experiments.reproduce --config=configs/reproduce.py:local --workdir=/tmp/r

`make demo` runs the first line on the embedded dataset.
"""

import os
import shlex
import sys

from absl import flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr import files, reproduction

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "reproduce.py"),
    "Reproduction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for arrays, figures and logs.",
                               required=True)


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  command = "python -m experiments.reproduce " + shlex.join(sys.argv[1:])
  summary = reproduction.run(_CONFIG.value, _WORKDIR.value, command=command)
  workdir = files.absolute(_WORKDIR.value)
  logging.info("Headline numbers of every step: %s", files.join(workdir, "summary.json"))
  print(f"Results (arrays, figures as PNG and PDF) are in {workdir}.\n")
  print(reproduction.judgement_table(summary))
  print(f"\nReport: {files.join(workdir, reproduction.REPORT_FILE)}")


if __name__ == "__main__":
  common.run_main(main)
