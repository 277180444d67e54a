"""Centered kernel alignment (CKA), the representation-similarity measure of Raghu et al., "Do
Vision Transformers See Like Convolutional Neural Networks?" (NeurIPS 2021).

* `full_batch`: kernels (`gram_linear`, `gram_rbf`), the biased and unbiased HSIC estimators
  (`hsic_biased`, `hsic_unbiased`) and full-batch CKA (`linear_cka`, `debiased_cka`,
  `rbf_cka`); the matrix-product precisions `PRECISIONS`.
* `minibatch`: streaming minibatch CKA, `MinibatchCKA` with its `MinibatchCKAState` and
  `CKAResult`, and `minibatch_cka` over whole arrays; the Gram placements `GRAMS`.
* `calibration`: permutation tests and bootstrap intervals: streamed for `MinibatchCKA`
  (`num_permutations`, `num_bootstrap`), and over examples for full-batch debiased CKA
  (`permutation_test`, `bootstrap_interval`).
* `sharded_update` and `host_grams`: the computation behind `MinibatchCKA.update`, the jitted
  update sharded over the mesh (with Grams by XLA) and Grams by the host's BLAS on CPU meshes.

The public names are imported here: `from vit_repr import cka; cka.linear_cka(x, y)`.
"""

from vit_repr.cka.calibration import bootstrap_interval, permutation_test
from vit_repr.cka.full_batch import (PRECISIONS, debiased_cka, gram_linear, gram_rbf, hsic_biased,
                                     hsic_unbiased, linear_cka, rbf_cka)
from vit_repr.cka.minibatch import (GRAMS, CKAResult, Layers, MinibatchCKA, MinibatchCKAState,
                                    minibatch_cka)

__all__ = ["GRAMS", "PRECISIONS", "CKAResult", "Layers", "MinibatchCKA", "MinibatchCKAState",
           "bootstrap_interval", "debiased_cka", "gram_linear", "gram_rbf", "hsic_biased",
           "hsic_unbiased", "linear_cka", "minibatch_cka", "permutation_test", "rbf_cka"]
