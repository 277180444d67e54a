r"""Effective receptive fields of ViT and ResNet layers (paper Figure 6).

    python -m experiments.receptive_field --config=configs/receptive_field.py:vit_b32+r50 \
        --workdir=/tmp/erf
    python -m experiments.receptive_field --config=configs/receptive_field.py:runlocal \
        --workdir=/tmp/erf
"""

from experiments import common
from vit_repr.studies import receptive_field

if __name__ == "__main__":
  common.run_study(receptive_field.run, "receptive_field.py")
