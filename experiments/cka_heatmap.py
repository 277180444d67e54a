r"""CKA heatmaps within and across models (paper Figures 1-2).

    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:vit_b16+r50 \
        --workdir=/tmp/cka_b16_r50
    python -m experiments.cka_heatmap --config=configs/cka_heatmap.py:runlocal --workdir=/tmp/cka
"""

from experiments import common
from vit_repr.studies import representation

if __name__ == "__main__":
  common.run_study(representation.run, "cka_heatmap.py")
