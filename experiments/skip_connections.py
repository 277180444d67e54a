r"""Skip connections: norm ratios and training without skips (paper Figures 7-8).

    python -m experiments.skip_connections --config=configs/skip_connections.py:vit_b16 \
        --workdir=/tmp/skip_b16
    python -m experiments.skip_connections --config=configs/skip_connections.py:runlocal \
        --workdir=/tmp/skip
"""

from experiments import common
from vit_repr.studies import skip_connections

if __name__ == "__main__":
  common.run_study(skip_connections.run, "skip_connections.py")
