r"""Spatial localization: token-vs-input-patch CKA maps (paper Figures 9-10).

    python -m experiments.localization --config=configs/localization.py:vit_b16+r50 \
        --workdir=/tmp/loc_b16_r50
    python -m experiments.localization --config=configs/localization.py:runlocal --workdir=/tmp/loc
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import localization

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/localization.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(localization.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
