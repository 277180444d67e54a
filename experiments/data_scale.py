r"""Pretraining data scale: CKA to the full-data model and probe curves (paper Figures 12-13).

    python -m experiments.data_scale --config=configs/data_scale.py:local --workdir=/tmp/ds
    python -m experiments.data_scale --config=configs/data_scale.py:runlocal --workdir=/tmp/ds_smoke
"""

from experiments import common
from vit_repr.studies import data_scale

if __name__ == "__main__":
  common.run_study(data_scale.run, "data_scale.py")
