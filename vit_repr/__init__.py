"""vit_repr: how Vision Transformers and CNNs represent images, in JAX/Flax.

Reproduces and extends the analyses of Raghu et al., "Do Vision Transformers See Like
Convolutional Neural Networks?" (NeurIPS 2021, arXiv 2108.08810).
"""

__version__ = "0.1.0"
