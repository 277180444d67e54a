"""One module per study of Raghu et al. (NeurIPS 2021), each exposing `run(config, workdir)`.

The experiment mains in experiments/ and the main job (`vit_repr.reproduction`) call these; a
study builds its pieces from the library (models, checkpoints, data, features, analyses),
streams the data once, and writes arrays, metadata and figures to its work directory.
"""
