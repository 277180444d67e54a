r"""Mean attention distance per head and per-head CKA to a ResNet (paper Figures 3-5).

    python -m experiments.attention_distance --config=configs/attention_distance.py:vit_b16+r50 \
        --workdir=/tmp/attn_b16
    python -m experiments.attention_distance --config=configs/attention_distance.py:runlocal \
        --workdir=/tmp/attn
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr.studies import attention_distance

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/attention_distance.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.mark_flag_as_required("config")


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(attention_distance.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
  app.run(main)
