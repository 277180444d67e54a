r"""Effective receptive fields of ViT and ResNet layers (paper Figure 6).

    python -m experiments.receptive_field --config=configs/receptive_field.py:vit_b32+r50 \
        --workdir=/tmp/erf
    python -m experiments.receptive_field --config=configs/receptive_field.py:runlocal \
        --workdir=/tmp/erf
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import receptive_field

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/receptive_field.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(receptive_field.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
