"""Study 2b, effective receptive fields of ViT and ResNet layers (Raghu et al. 2021, Fig 6).

For each model spec (`config.model_a`, optionally `config.model_b`) and each selected layer,
`vit_repr.receptive_field.ReceptiveField` accumulates, over the images of `config.data`, the
absolute gradient of the centre location's representation with respect to the input pixels,
per channel, averaged over channels and images, normalised to max 1 per layer. Default layers:
ViT, the representations after the residual additions of every block ('mid' after attention,
'out' after the MLP); ResNet, the stem and every unit output. The centre location and the
estimator are `analysis.center` and `analysis.estimator` (see `vit_repr.receptive_field`).

Each model's pass saves its running sums every `checkpoint_every` batches to
`<workdir>/receptive_field_state_<a|b>.npz` and resumes there after a kill.

Outputs in the workdir: `receptive_field.{npz,json}` (per model: normalised maps
`maps_<k>` `[layers, H, W]`, raw maps, ERF radii in pixels, centres, layer names; metadata with
every choice) and `figures/receptive_field.{png,pdf}` (one ERF image per layer, per model).
"""


import ml_collections
import numpy as np
from absl import logging

from vit_repr import features, plotting, receptive_field
from vit_repr.models import display_name, flatten_intermediates, layout
from vit_repr.studies import loading, runner


def _model_specs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  specs = [("a", config.model_a)]
  if config.model_b.name:
    specs.append(("b", config.model_b))
  return specs


def _labels(specs: list[tuple[str, ml_collections.ConfigDict]]) -> dict[str, str]:
  """A distinct label per model for the summary and the figure: its registered name, with the
  model's letter when both models share one (e.g. DINOv2 and SigLIP are both 'ViT-B/16')."""
  names = [spec.name for _, spec in specs]
  return {key: spec.name if names.count(spec.name) == 1 else f"{spec.name} ({key.upper()})"
          for key, spec in specs}


def _estimator(model, spec: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
               mesh) -> receptive_field.ReceptiveField:
  """The ERF accumulator of one model's selected layers."""
  image_size = config.data.image_size
  shapes = features.intermediate_shapes(model, image_size)
  names = features.select_names(list(shapes), list(spec.layers))
  tokens = model.token_layout()

  def representations(params, images):
    _, sown = model.apply({"params": params}, images, mutable=["intermediates"])
    return flatten_intermediates(sown)

  analysis = config.analysis
  return receptive_field.ReceptiveField(
      representations, {n: shapes[n][1:] for n in names}, image_size=image_size,
      token_grid=layout.token_grid(tokens), num_prefix_tokens=layout.num_prefix_tokens(tokens),
      center=analysis.center,
      estimator=analysis.estimator, channel_chunk=analysis.channel_chunk,
      max_channels=analysis.max_channels, channel_seed=analysis.channel_seed,
      layer_groups=analysis.layer_groups, mesh=mesh)


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Computes the effective receptive fields of `config`'s models into `workdir`.

  Args:
    config: a `configs/receptive_field.py` config (model_a, model_b, data, analysis).
    workdir: output directory.

  Returns:
    The result; summary: per model (its registered name; with its letter, e.g.
    'ViT-B/16 (A)', when both models share one) the images and the ERF radius (pixels) of each
    layer.
  """
  study = runner.Study(config, workdir)
  arrays, panels, summary, models_meta = {}, [], {}, {}
  specs = _model_specs(config)
  labels = _labels(specs)
  for key, spec in specs:
    model, params = study.model(spec)
    estimator = _estimator(model, spec, config, study.mesh)
    logging.info("Model %s (%s): receptive fields of %d layers.", key.upper(), spec.name,
                 len(estimator.names))
    state, progress = study.accumulate(
        estimator.init(),
        lambda state, batch: estimator.update(state, params, batch["image"], batch["valid"]),
        study.passes(minibatch_size=config.analysis.minibatch_size),
        state_file=f"receptive_field_state_{key}.npz", what=f"Receptive fields of {spec.name}")
    if not progress.complete:
      return runner.Interrupted(progress)
    result = estimator.result(state)
    arrays.update({f"maps_{key}": result.maps, f"raw_maps_{key}": result.raw_maps,
                   f"radius_{key}": result.radius, f"centres_{key}": result.centres,
                   f"names_{key}": np.asarray(result.names, dtype=str)})
    panels.append((labels[key], result.maps, [display_name(n) for n in result.names]))
    summary[labels[key]] = {
        "num_examples": result.num_examples,
        "radius_px": {display_name(n): round(float(r), 2)
                      for n, r in zip(result.names, result.radius)},
        "examples_per_second": progress.examples_per_second}
    models_meta[key] = {**loading.describe(spec), "num_examples": result.num_examples,
                        "layers": list(result.names)}
  metadata = {
      "models": models_meta,
      "definition": "ERF[y, x] = mean_images mean_c sum_rgb |d r[centre, c] / d image[y, x, rgb]|"
                    ", normalised to max 1 per layer",
      "estimator": config.analysis.estimator, "center": config.analysis.center,
      "channels": ("every channel (exact)" if config.analysis.max_channels is None else
                   f"a fixed random subset of {config.analysis.max_channels} channels per wider "
                   f"layer (seed {config.analysis.channel_seed})"),
      "radius": "sqrt of the ERF-weighted mean squared pixel distance from the centre "
                "location's centre",
  }
  return study.finish("receptive_field", arrays, metadata, summary, figures={
      "receptive_field": lambda path: plotting.plot_receptive_fields(panels, path)})
