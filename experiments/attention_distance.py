r"""Mean attention distance per head and per-head CKA to a ResNet (paper Figures 3-5).

    python -m experiments.attention_distance --config=configs/attention_distance.py:vit_b16+r50 \
        --workdir=/tmp/attn_b16
    python -m experiments.attention_distance --config=configs/attention_distance.py:runlocal \
        --workdir=/tmp/attn
"""

from experiments import common
from vit_repr.studies import attention_distance

if __name__ == "__main__":
  common.run_study(attention_distance.run, "attention_distance.py")
