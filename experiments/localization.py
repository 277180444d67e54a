r"""Spatial localization: token-vs-input-patch CKA maps (paper Figures 9-10).

    python -m experiments.localization --config=configs/localization.py:vit_b16+r50 \
        --workdir=/tmp/loc_b16_r50
    python -m experiments.localization --config=configs/localization.py:runlocal --workdir=/tmp/loc
"""

from experiments import common
from vit_repr.studies import localization

if __name__ == "__main__":
  common.run_study(localization.run, "localization.py")
