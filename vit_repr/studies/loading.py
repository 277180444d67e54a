"""Builds a study's model and parameters from its config: public checkpoint, trained, or init.

A model spec (`config.model_a`, `config.model_b`, ...) is a ConfigDict with
  name: registered model name ('ViT-B/16', 'BiT-R50x1', ...);
  overrides: constructor overrides (None: the registered value; `num_classes` defaults to
    the dataset's classes, `image_size` to the study's resolution);
  checkpoint: '' for random initialisation from `seed`, a path ending in `.npz` for an original
    Google checkpoint (`checkpoints.load`), or a parameter directory written by
    `checkpoints.save` (e.g. `<train workdir>/params` of `vit_repr.training`);
  seed: initialisation seed when `checkpoint` is ''.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from vit_repr import checkpoints, files, models, parallel


def describe(spec: ml_collections.ConfigDict) -> dict[str, Any]:
  """The JSON-ready description of a model spec recorded in every result's metadata."""
  overrides = {k: v for k, v in spec.overrides.to_dict().items() if v is not None}
  return {"name": spec.name, "overrides": overrides,
          "checkpoint": spec.checkpoint or f"random init (seed {spec.seed})"}


def load_model(spec: ml_collections.ConfigDict, *, image_size: int, num_classes: int,
               mesh: Mesh | None = None) -> tuple[nn.Module, Any]:
  """The Flax module and its 'params' collection for a model spec, placed on the mesh once.

  Args:
    spec: the model spec (see the module docstring).
    image_size: input resolution of the study's data.
    num_classes: the dataset's classes (used unless `spec.overrides.num_classes` is set).
    mesh: the study's mesh (default all devices): the parameters are replicated on it here,
      so the jitted passes never copy them again.

  Returns:
    (model, params), every leaf a `jax.Array` replicated over `mesh`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = models.create_from_config(spec.name, spec.overrides.to_dict(),
                                    num_classes=num_classes, image_size=image_size)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if not spec.checkpoint:
    logging.info("%s: random initialisation (seed %d).", spec.name, spec.seed)
    init = jax.jit(lambda key: model.init(key, images)["params"],
                   out_shardings=parallel.replicated(mesh))
    return model, init(jax.random.key(spec.seed))
  if str(spec.checkpoint).endswith(".npz"):
    return model, parallel.replicate(checkpoints.load(spec.checkpoint, model), mesh)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=parallel.replicated(mesh)),
                          abstract)
  return model, checkpoints.restore(spec.checkpoint, abstract)


def trained_spec(train_config: ml_collections.ConfigDict, run_dir: str,
                 layers: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The model spec of a model trained by `vit_repr.training.run(train_config, run_dir)`.

  Args:
    train_config: the training config (a `configs/train.py` recipe) the model was trained with.
    run_dir: that run's work directory; its final parameters are in `<run_dir>/params`.
    layers: the layer patterns the study selects.
  """
  return ml_collections.ConfigDict(dict(
      name=train_config.model.name, overrides=train_config.model.overrides.to_dict(),
      checkpoint=files.join(files.absolute(run_dir), "params"), layers=tuple(layers),
      seed=train_config.seed))
