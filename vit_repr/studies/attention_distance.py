"""Study 2a, local and global heads: mean attention distance and per-head CKA to a ResNet.

Raghu et al. (NeurIPS 2021), Figures 3-5. One pass over the data through the ViT of
`config.model` accumulates the mean attention distance of every head of the selected attention
layers (`vit_repr.attention.MeanAttentionDistance`, fused into the jitted forward pass so the
attention maps of all layers are never materialised together). If `config.resnet.name` is set,
the same pass also streams the ResNet and accumulates minibatch CKA (`vit_repr.cka.MinibatchCKA`,
unbiased HSIC) between each attention head of the lower ViT blocks, taken as its own "layer",
and the selected lower ResNet layers (paper Fig 5: local heads resemble the ResNet's lower
layers more). A head's representation is its attention-weighted values before the output
projection (`head_outputs[:, :, h]`, `[b, T, d]`), flattened per example over the patch tokens
only (`analysis.head_token_mode='spatial'`, default: the ResNet has no CLS counterpart) or over
all tokens ('all'); ResNet layers are flattened feature maps. Each device's shard of a global
batch is one CKA minibatch of `analysis.minibatch_size` examples.

The pass saves its state (distance sums and CKA sums) every `checkpoint_every` batches to
`<workdir>/attention_state.npz` and resumes there after a kill (`vit_repr.studies.resume`).

Outputs in the workdir: `attention_distance.{npz,json}` (distance, spread and CLS mass per layer
and head, per-head CKA against each ResNet layer with standard errors and the heads' distances,
names, counts, every methodological choice) and `figures/attention_distance.{png,pdf}` (heads
sorted by distance per layer, Fig 3) and, with a ResNet, `figures/head_cka_vs_distance.{png,pdf}`
(Fig 5).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from vit_repr import attention, cka, features, parallel, plotting
from vit_repr.models import display_name, flatten_intermediates, layout
from vit_repr.studies import loading, runner

STATE_FILE = "attention_state.npz"
HEAD_TOKEN_MODES = ("spatial", "all")


def attention_layers(model_name: str, model: nn.Module, shapes: dict[str, tuple[int, ...]],
                     patterns: Any) -> list[layout.AttentionLayer]:
  """The self-attention layers of `model` (`model.attention_layers()`) whose attention
  probabilities `patterns` select, in model order.

  Raises:
    ValueError: the model has no self-attention (e.g. a ResNet), a pattern matches nothing
      (the available names are listed), or a selected name is not an attention map.
  """
  available = {a.probs: a for a in model.attention_layers()}
  if not available:
    raise ValueError(f"{model_name} has no self-attention, so it has no attention distance: it "
                     "is not a Transformer (e.g. a ResNet or Mixer). Use a ViT model for "
                     "`model`, and put a ResNet in `resnet` for the per-head CKA.")
  names = features.select_names(list(shapes), patterns)
  wrong = [n for n in names if n not in available]
  if wrong:
    raise ValueError(f"Layers {wrong} of {model_name} are not attention maps; select attention "
                     f"probabilities such as {next(iter(available))!r}.")
  return [available[n] for n in names]


def _head_blocks(config: ml_collections.ConfigDict, depth: int) -> list[int]:
  """The ViT blocks whose heads are compared with the ResNet (default (): the lowest quarter)."""
  blocks = config.analysis.head_blocks
  if not blocks:
    return list(range(math.ceil(depth / 4)))
  bad = [b for b in blocks if not 0 <= b < depth]
  if bad:
    raise ValueError(f"analysis.head_blocks {bad} do not exist: the ViT has blocks 0..{depth - 1}.")
  return sorted(set(blocks))


def run(config: ml_collections.ConfigDict, workdir: str) -> runner.Outcome:
  """Computes mean attention distances (and per-head CKA to a ResNet) of `config` into `workdir`.

  Args:
    config: a `configs/attention_distance.py` config (model, resnet, data, analysis).
    workdir: output directory.

  Returns:
    The result; summary: examples, per-layer mean distance (pixels), the lowest and highest
    head distance of the first and last layer, and with a ResNet the Pearson correlation
    between a head's distance and its CKA to each ResNet layer.
  """
  analysis = config.analysis
  if analysis.head_token_mode not in HEAD_TOKEN_MODES:
    raise ValueError(f"analysis.head_token_mode must be one of {HEAD_TOKEN_MODES}; got "
                     f"{analysis.head_token_mode!r}.")
  study = runner.Study(config, workdir)
  mesh, image_size = study.mesh, study.image_size
  model, params = study.model(config.model)
  shapes = features.intermediate_shapes(model, image_size)
  layers = attention_layers(config.model.name, model, shapes, list(config.model.layers))
  names = [a.probs for a in layers]
  num_heads = shapes[names[0]][1]
  tokens = model.token_layout()
  distance = attention.MeanAttentionDistance(
      names, num_heads=num_heads, grid=tokens.grid, patch_size=tokens.patch_size,
      num_prefix_tokens=tokens.num_prefix_tokens, renormalize=analysis.renormalize, mesh=mesh)
  logging.info("%s: %d attention layers x %d heads on a %dx%d grid of %d px patches.",
               config.model.name, len(names), num_heads, *tokens.grid, tokens.patch_size)

  with_resnet = bool(config.resnet.name)
  head_names, head_sources, states = [], {}, {"distance": distance.init()}
  if with_resnet:
    attention_of_block = {a.block: a for a in model.attention_layers()}
    for block in _head_blocks(config, len(attention_of_block)):
      for head in range(num_heads):
        head_names.append(f"block{block}/head{head}")
        head_sources[head_names[-1]] = (attention_of_block[block], head)
    resnet_extractor, resnet_params = study.extractor(config.resnet)
    estimator = cka.MinibatchCKA(mesh, grams=analysis.grams,
                                 gram_blocks=analysis.gram_blocks)
    states["cka"] = estimator.init({n: None for n in head_names},
                                   {n: None for n in resnet_extractor.names})
    logging.info("Per-head CKA: %d heads x %d %s layers.", len(head_names),
                 len(resnet_extractor.names), config.resnet.name)
  token_mode = analysis.head_token_mode

  def distance_and_heads(state, params, images, valid):
    _, sown = model.apply({"params": params}, images, mutable=["intermediates"])
    flat = flatten_intermediates(sown)
    state = distance.fold(state, {n: flat[n] for n in names}, valid)
    heads = {n: features.reduce_tokens(flat[src.heads][:, :, h], token_mode,
                                       token_layout=tokens, name=n)
             for n, (src, h) in head_sources.items()}
    return state, heads

  step = jax.jit(distance_and_heads, donate_argnums=0,
                 out_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)))

  def update(states: dict[str, Any], batch: dict) -> dict[str, Any]:
    new = dict(states)
    new["distance"], heads = step(states["distance"], params, batch["image"], batch["valid"])
    if with_resnet:
      new["cka"] = estimator.update(states["cka"], heads,
                                    resnet_extractor(resnet_params, batch["image"]),
                                    valid=batch["valid"])
    return new

  states, progress = study.accumulate(
      states, update, study.passes(minibatch_size=analysis.minibatch_size),
      state_file=STATE_FILE, what="Attention distance")
  if not progress.complete:
    return runner.Interrupted(progress)
  result = distance.result(states["distance"])

  arrays = {"distance": result.distance, "distance_std": result.distance_std,
            "distance_stderr": result.stderr, "cls_attention": result.cls_attention,
            "distance_sorted": np.sort(result.distance, axis=1),
            "layer_names": np.asarray(names, dtype=str)}
  summary = {
      "num_examples": result.num_examples,
      "mean_distance_per_layer": [round(float(d), 2) for d in result.distance.mean(1)],
      "first_layer_distance_range": [round(float(result.distance[0].min()), 2),
                                     round(float(result.distance[0].max()), 2)],
      "last_layer_distance_range": [round(float(result.distance[-1].min()), 2),
                                    round(float(result.distance[-1].max()), 2)],
      "examples_per_second": progress.examples_per_second,
  }
  figures = {"attention_distance": lambda path: plotting.plot_attention_distance(
      result.distance, [display_name(n) for n in names], path,
      title=f"{config.model.name}: mean attention distance", image_size=image_size)}
  metadata = {
      "models": {"model": loading.describe(config.model)},
      "num_examples": result.num_examples,
      "patch_grid": list(tokens.grid), "patch_size": tokens.patch_size, "image_size": image_size,
      "num_prefix_tokens": tokens.num_prefix_tokens,
      "renormalize": analysis.renormalize,
      "definition": "per head: mean over query patches of sum_j A[i, j] * ||p_i - p_j|| (patch "
                    "centres in pixels), averaged over images; prefix (CLS) tokens excluded as "
                    "queries and keys; " + ("patch-to-patch weights renormalised to sum to 1"
                                            if analysis.renormalize else
                                            "patch-to-patch weights not renormalised"),
  }
  if with_resnet:
    similarity = estimator.result(states["cka"])
    row_of = {n: i for i, n in enumerate(names)}
    head_distance = np.asarray([result.distance[row_of[src.probs], h]
                                if src.probs in row_of else np.nan
                                for src, h in head_sources.values()])
    head_block = np.asarray([int(n.split("/")[0][len("block"):]) for n in head_names])
    arrays.update(head_cka=similarity.cka, head_cka_stderr=similarity.stderr,
                  head_distance=head_distance, head_block=head_block,
                  head_names=np.asarray(head_names, dtype=str),
                  resnet_names=np.asarray(similarity.names_y, dtype=str))
    metadata["models"]["resnet"] = loading.describe(config.resnet)
    metadata.update(
        head_representation=f"head_outputs[:, :, h] (attention-weighted values before the out "
                            f"projection), token_mode {token_mode!r}, flattened per example",
        cka_estimator="minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021), one pass; "
                      "minibatch = each device's shard",
        num_minibatches=similarity.num_batches)
    figures["head_cka_vs_distance"] = lambda path: plotting.plot_head_cka_vs_distance(
        head_distance, similarity.cka, head_block, list(similarity.names_y), path,
        title=f"{config.model.name} heads vs {config.resnet.name}")
    valid = np.isfinite(head_distance)
    summary["distance_cka_correlation"] = {
        display_name(r): round(float(np.corrcoef(
            head_distance[valid], similarity.cka[valid, j])[0, 1]), 3)
        for j, r in enumerate(similarity.names_y)}
  return study.finish("attention_distance", arrays, metadata, summary, figures)
