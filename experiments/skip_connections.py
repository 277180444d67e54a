r"""Skip connections: norm ratios and training without skips (paper Figures 7-8).

    python -m experiments.skip_connections --config=configs/skip_connections.py:vit_b16 \
        --workdir=/tmp/skip_b16
    python -m experiments.skip_connections --config=configs/skip_connections.py:runlocal \
        --workdir=/tmp/skip
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import skip_connections

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/skip_connections.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(skip_connections.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
