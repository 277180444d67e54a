r"""Linear probes per layer and per token (paper Fig 11; the probe curves of Figs 12-13).

    python -m experiments.linear_probes --config=configs/linear_probes.py:vit_b16_i1k+vit_b16_i21k \
        --workdir=/tmp/probes
    python -m experiments.linear_probes --config=configs/linear_probes.py:runlocal \
        --workdir=/tmp/probes_local
"""

from experiments import common
from vit_repr.studies import linear_probes

if __name__ == "__main__":
  common.run_study(linear_probes.run, "linear_probes.py")
