r"""Pretraining data scale: CKA to the full-data model and probe curves (paper Figures 12-13).

    python -m experiments.data_scale --config=configs/data_scale.py:local --workdir=/tmp/ds
    python -m experiments.data_scale --config=configs/data_scale.py:runlocal --workdir=/tmp/ds_smoke
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import data_scale

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/data_scale.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (trained models resumable).",
                               required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(data_scale.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
