"""Installs vit_repr: how Vision Transformers and CNNs represent images (Raghu et al., 2021)."""

import setuptools

setuptools.setup(
    name="vit_repr",
    version="0.1.0",
    description=(
        "Representation analyses of Vision Transformers, BiT ResNets and MLP-Mixers "
        "in JAX/Flax: CKA heatmaps, attention distances, receptive fields, probes."
    ),
    packages=setuptools.find_packages(include=["vit_repr", "vit_repr.*"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py>=2.1",
        # epath: checkpoint paths, local or gs:// (vit_repr.checkpoints).
        "etils[epath]>=1.5",
        "flax>=0.10,<0.13",
        "jax>=0.6",
        "matplotlib>=3.8",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # timm's .safetensors ViT files, read without torch (vit_repr.timm_checkpoints).
        "safetensors>=0.4",
        # The embedded offline dataset (scikit-learn's bundled handwritten digits).
        "scikit-learn>=1.3",
        # ndimage.zoom: the original ViT position-embedding resize (vit_repr.checkpoints).
        "scipy>=1.11",
        # TensorBoard event files of training runs without importing TensorFlow outside
        # vit_repr.data (vit_repr.metrics_log).
        "tensorboardX>=2.6",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "importlib_resources>=6",  # tensorflow-datasets writes test datasets with it.
        ],
    },
)
