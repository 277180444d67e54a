r"""CKA heatmaps within and across models (paper Figures 1-2).

    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:vit_b16+r50 \
        --workdir=/tmp/cka_b16_r50
    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:runlocal --workdir=/tmp/cka
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import representation

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/cka_heatmap.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumable).", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(representation.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
