"""Similarity measures between two layers' features on the same examples, on arrays.

Framework-free: features are array-likes `[n, ...]` from any framework (JAX, NumPy, PyTorch
through `np.asarray`); each example's features are flattened to `[n, p]` and every measure is
computed in NumPy float64 on the host. The spectral steps (eigendecompositions of n x n Grams or
p x p covariances, O(n³) or O(p³)) are stable in float64; `np.linalg.eigh` replaces the direct
SVD of n x p matrices.

| name        | kind       | range     | reference                              | streaming | memory per layer  |
|-------------|------------|-----------|----------------------------------------|-----------|-------------------|
| cka         | similarity | [0, 1]    | Kornblith et al. 2019 (linear, biased) | yes       | n x n Gram        |
| angular_cka | distance   | [0, π/2]  | Williams et al. 2021                   | yes       | n x n Gram        |
| svcca       | similarity | [0, 1]    | Raghu et al. 2017                      | no        | n*p features      |
| pwcca       | similarity | [0, 1]    | Morcos et al. 2018 (asymmetric)        | no        | n*p features      |
| procrustes  | distance   | [0, √2]   | Williams et al. 2021; Ding et al. 2021 | no        | n*p features      |
| rsa         | similarity | [-1, 1]   | Kriegeskorte et al. 2008               | no        | n x n RDM         |
| mutual_knn  | similarity | [0, 1]    | Huh et al. 2024                        | no        | n x n similarities|
| cknna       | similarity | ~[-1, 1]  | Huh et al. 2024                        | no        | n x n similarities|

Streaming: only CKA has a minibatch form (minibatch CKA with the unbiased HSIC, Nguyen, Raghu &
Kornblith 2021: `vit_repr.cka.MinibatchCKA`, memory independent of n). Every other measure needs
the full example set at once: the layer's n*p features while it is prepared (the CCA measures
and Procrustes then keep an n x min(n, p) factor, PWCCA also k x p projections) or an n x n
matrix per layer (Grams, RDMs, similarities and neighbour masks), so n is limited to ~10⁴.

Definitions (details and the original code they follow are in each module's docstring):
* cka (`kernel`): <K̄, L̄>_F / (||K̄||_F ||L̄||_F), K̄ = H X Xᵀ H the centred linear Gram.
* angular_cka (`kernel`): arccos(cka), radians; a metric.
* svcca (`cca`, default variance_kept=0.99): centre, keep each side's leading singular
  directions explaining `variance_kept` of its variance, CCA between the reduced sides, mean of
  the min(kₓ, k_y) canonical correlations.
* pwcca (`cca`, default variance_kept=1.0): Σᵢ αᵢ ρᵢ, αᵢ ∝ Σⱼ |<hᵢ, xⱼ>| over the features xⱼ of
  the FIRST argument, hᵢ its unit-norm canonical variates: asymmetric.
* procrustes (`kernel`): centre, scale to unit Frobenius norm, d = sqrt(max(0, 2 - 2||XᵀY||_*))
  = min over orthogonal Q of ||X Q - Y||_F (Euclidean shape distance; Ding et al. report d²).
* rsa (`rdm`, defaults dissimilarity='correlation', comparison='spearman'): correlation of the
  off-diagonal upper triangles of the two dissimilarity matrices over examples.
* mutual_knn, cknna (`neighbours`, default k=10): examples scaled to unit norm, cosine
  similarities, k nearest neighbours excluding self; the mean shared fraction of neighbours, and
  CKA with unbiased HSIC restricted to mutual-neighbour pairs (platonic-rep's definitions;
  cknna is symmetric only up to ~1e-3, as there).

Invariances: cka, angular_cka, procrustes and rsa-euclidean: orthogonal maps, isotropic scaling,
translation. svcca (variance_kept=1) and pwcca's second argument: any invertible linear map (full
rank). pwcca's first argument: scaling, translation, permutations and sign flips of features
(not rotations). rsa-correlation: scaling, adding a constant to every feature. mutual_knn,
cknna: orthogonal maps and scaling, not translation (no centring).

Calibration (`permutation`): `permutation_test` gives each heatmap cell its permutation p-value
and chance level (examples of B shuffled against A).

A constant layer (no variance over examples) makes every measure undefined: NaN plus a logged
warning naming the layer. Mismatched example counts, too few examples (n < 2; n < 3 for rsa;
n <= k for the k-NN measures, n < 4 for cknna) and non-finite features raise ValueError.

    from vit_repr import similarity
    similarity.compare(x, y, 'svcca', variance_kept=0.99)
    similarity.heatmap({'block_0': a0, 'block_1': a1}, measure='procrustes')  # [2, 2]
"""

from vit_repr.similarity.api import (MEASURES, Measure, angular_cka, cknna, compare, get_measure,
                                     heatmap, linear_cka, mutual_knn, procrustes_distance, pwcca,
                                     rsa, svcca)
from vit_repr.similarity.permutation import PermutationTest, permutation_test

__all__ = ["MEASURES", "Measure", "PermutationTest", "angular_cka", "cknna", "compare",
           "get_measure", "heatmap", "linear_cka", "mutual_knn", "permutation_test",
           "procrustes_distance", "pwcca", "rsa", "svcca"]
