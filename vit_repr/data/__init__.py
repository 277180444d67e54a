"""Input pipelines: TFDS datasets and an embedded offline dataset, sharded over a JAX mesh.

What lives where:

* `sources`: datasets by name and split (any prepared TFDS name, local or gs://, or the
  embedded offline 'digits'), `DatasetInfo`, `known_datasets`, `dataset_info`, and the nested
  seeded subsets (`subset_indices`).
* `preprocessing`: the eval and train preprocessing of the original ViT and BiT releases.
* `plans`: which examples an eval pass uses and which host and device reads each one
  (`EvalPlan`, `eval_plan`); the numbers do not depend on the host count.
* `pipelines`: the tf.data eval and train pipelines (`eval_batches`, `train_batches` and their
  host-local NumPy forms), sharded over the mesh and prefetched to the devices.
* `summary`: `summarize`, a dataset's class counts, pixel statistics and montage.

Only this package imports TensorFlow; it hides accelerators from TF before building a pipeline.
"""

from vit_repr.data.pipelines import (DEFAULT_SHUFFLE_BUFFER, DEVICE_PREFETCH, EvalBatches,
                                     default_num_shards, eval_batches, eval_numpy_batches,
                                     train_batches, train_numpy_batches)
from vit_repr.data.plans import EvalPlan, eval_plan
from vit_repr.data.preprocessing import TRAIN_AREA_RANGE, TRAIN_ASPECT_RANGE
from vit_repr.data.sources import DatasetInfo, dataset_info, known_datasets, subset_indices
from vit_repr.data.summary import summarize

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "DEVICE_PREFETCH", "DatasetInfo", "EvalBatches", "EvalPlan",
           "TRAIN_AREA_RANGE", "TRAIN_ASPECT_RANGE", "dataset_info", "default_num_shards",
           "eval_batches", "eval_numpy_batches", "eval_plan", "known_datasets", "subset_indices",
           "summarize", "train_batches", "train_numpy_batches"]
