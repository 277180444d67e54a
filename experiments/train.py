r"""Trains or fine-tunes a model into a work directory (resumes it when interrupted).

    python -m experiments.train --config=configs/train.py:vit_cls --workdir=outputs/vit_cls
    python -m experiments.train --config=configs/train.py:imagenet_r50 --workdir=gs://b/r50 \
        --config.data.data_dir=gs://b/tensorflow_datasets

Rerunning the same command after a preemption continues from the last checkpoint; rerunning a
finished run only reloads its final parameters (`<workdir>/params`).
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

from experiments import common
from vit_repr import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "train.py"),
    "Training config file (configs/train.py:<recipe>[,options]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, params and metrics.",
                               required=True)


def main(argv):
  common.setup(argv, _CONFIG.value, _WORKDIR.value)
  result = training.run(_CONFIG.value, _WORKDIR.value)
  logging.info("Finished at step %d; final eval: %s", result.step, json.dumps(result.final_eval))


if __name__ == "__main__":
  common.run_main(main)
