r"""Linear probes per layer and per token (paper Fig 11; the probe curves of Figs 12-13).

    python -m experiments.linear_probes --config=configs/linear_probes.py:vit_b16_i1k+vit_b16_i21k \
        --workdir=/tmp/probes
    python -m experiments.linear_probes --config=configs/linear_probes.py:runlocal \
        --workdir=/tmp/probes_local
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import linear_probes

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/linear_probes.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(linear_probes.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
