"""What each step of the main job shows, next to what Raghu et al. (NeurIPS 2021) found.

`FINDINGS[key]` holds, for the step `key` of `vit_repr.reproduction`, the report's heading,
one sentence on what the paper found, and the pure function that writes one sentence on what
this run shows from the step's headline numbers (the JSON-ready dict its study returned).
The headline statistics of the representation step (paper Figs 1-2) are pure functions of
CKA heatmaps below, so a notebook can compute them on any heatmap.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(frozen=True)
class Finding:
  """The text of one step of the main job.

  Attributes:
    title: report heading, naming the paper's figures.
    paper_finding: one sentence: what the paper found.
    observed: headline numbers -> one sentence: what this run shows.
  """
  title: str
  paper_finding: str
  observed: Callable[[Mapping[str, Any]], str]


def _cross_cka(cross: npt.ArrayLike) -> np.ndarray:
  """`cross` as an array `[ViT layers, ResNet layers]`, at least one of each (its dtype kept:
  the statistics are computed in the precision the heatmap was saved in)."""
  cross = np.asarray(cross)
  if cross.ndim != 2 or 0 in cross.shape:
    raise ValueError("Expected a cross-model CKA heatmap [ViT layers, ResNet layers] with at "
                     f"least one layer on each side; got shape {cross.shape}.")
  return cross


def mean_cka(heatmap: npt.ArrayLike) -> float:
  """Mean of every entry of a CKA heatmap (diagonal included), NaN entries ignored.

  Args:
    heatmap: CKA `[La, Lb]` (within one model, La = Lb, or across two); NaN marks a constant
      layer, where CKA is undefined.

  Returns:
    The mean over the La * Lb entries that are not NaN, computed in the heatmap's dtype.
  """
  return float(np.nanmean(np.asarray(heatmap)))


def vit_depth_matching_lower_resnet(cross: npt.ArrayLike) -> float:
  """Where in ViT's depth ResNet's lower half is found (paper Fig 2: about its lowest quarter).

  For each ResNet layer of the lower half (the first max(1, Lb // 2) columns), the ViT layer
  with the highest CKA to it (NaN entries ignored; the first on ties), as relative depth
  i / (La - 1) (0 = first ViT layer, 1 = last; 0 when La = 1); averaged over those columns.

  Args:
    cross: CKA `[La, Lb]` between ViT layers (rows, in computation order) and ResNet layers
      (columns, in computation order).

  Returns:
    The mean relative ViT depth, in [0, 1].

  Raises:
    ValueError: `cross` is not 2-D with a layer on each side, or a lower-half column is all NaN.
  """
  cross = _cross_cka(cross)
  lower_resnet = cross[:, :max(1, cross.shape[1] // 2)]
  return float(np.mean(np.nanargmax(lower_resnet, axis=0) / max(1, cross.shape[0] - 1)))


def top_vit_best_cka_to_resnet(cross: npt.ArrayLike) -> float:
  """How much ViT's top layers resemble any ResNet layer (paper Fig 2: little).

  For each ViT layer of the top quarter (the last max(1, La // 4) rows), its highest CKA with
  any ResNet layer (NaN entries ignored); averaged over those rows.

  Args:
    cross: CKA `[La, Lb]` between ViT layers (rows, in computation order) and ResNet layers
      (columns).

  Returns:
    The mean best CKA (NaN when a top row is all NaN).

  Raises:
    ValueError: `cross` is not 2-D with a layer on each side.
  """
  cross = _cross_cka(cross)
  top_vit = cross[-max(1, cross.shape[0] // 4):]
  return float(np.mean(np.nanmax(top_vit, axis=1)))


def _fraction(value: float) -> str:
  return f"{100 * value:.0f}%"


def _dataset(n: Mapping[str, Any]) -> str:
  """From 'splits' {split: images}, 'num_classes', 'pipeline_examples_per_second' and
  'pipeline_rate_includes_startup' (absent: False)."""
  timed = ("one batch only: start-up included" if n.get("pipeline_rate_includes_startup")
           else "after the first batch: start-up excluded")
  return (f"{sum(n['splits'].values())} images in {n['num_classes']} classes "
          f"({n['splits']}); the sharded pipeline streamed "
          f"{n['pipeline_examples_per_second']} images/s ({timed}).")


def _models(n: Mapping[str, Any]) -> str:
  """From 'test_accuracy' {model: accuracy in [0, 1]}."""
  return "Test accuracy of each model trained here: " + ", ".join(
      f"{name} {_fraction(acc)}" for name, acc in n["test_accuracy"].items()) + "."


def _representation(n: Mapping[str, Any]) -> str:
  """From 'mean_cka' {'cka_aa', 'cka_bb', 'cka_ab'}, 'vit_depth_matching_lower_resnet',
  'top_vit_best_cka_to_resnet' and 'num_examples'."""
  return (f"Mean CKA over all layer pairs within ViT {n['mean_cka']['cka_aa']:.2f}, within "
          f"ResNet {n['mean_cka']['cka_bb']:.2f}, across {n['mean_cka']['cka_ab']:.2f}; "
          f"ResNet's lower-half layers best match ViT layers at mean relative depth "
          f"{n['vit_depth_matching_lower_resnet']:.2f} (0 = first, 1 = last); ViT's "
          f"top-quarter layers reach mean CKA {n['top_vit_best_cka_to_resnet']:.2f} with their "
          f"best ResNet layer ({n['num_examples']} examples accumulated).")


def _attention(n: Mapping[str, Any]) -> str:
  """From 'mean_distance_per_layer', 'first_layer_distance_range',
  'last_layer_distance_range', 'num_examples' and, if computed, 'distance_cka_correlation'
  {ResNet layer: correlation}."""
  return (f"Mean attention distance per block, averaged over heads (px): "
          f"{n['mean_distance_per_layer']}; first block's heads span "
          f"{n['first_layer_distance_range']} px, last block's "
          f"{n['last_layer_distance_range']} px; Pearson correlation over heads of a head's "
          f"distance with its CKA to each ResNet layer: "
          f"{n.get('distance_cka_correlation', 'not computed')} ({n['num_examples']} examples).")


def _receptive_fields(n: Mapping[str, Any]) -> str:
  """From 'models' {model: {'radius_px': {layer: radius in pixels}}}."""
  return ("Effective receptive-field radius (px; RMS distance from the centre, weighted by the "
          "receptive field) from the first to the last layer: ") + (
      "; ".join(f"{name} " + " → ".join(f"{r:.1f}" for r in m["radius_px"].values())
                for name, m in n["models"].items()) + ".")


def _skip_connections(n: Mapping[str, Any]) -> str:
  """From 'norm_ratios' {'mean_ratio_of_means': {model: {token group: ratio}}} (the paper's
  CLS and spatial groups; register tokens left out) and 'ablation' {'test_accuracy': {model:
  accuracy}, 'mean_diagonal_cka_vs_reference': {model: CKA}}."""
  return ("Norm ratio ||z|| / ||f(z)|| of the residual stream to its branch, mean over "
          "sub-layers (CLS / spatial tokens): " + "; ".join(
      f"{name} " + " / ".join(f"{v:.2f}" for group, v in groups.items() if group != "register")
      for name, groups in n["norm_ratios"]["mean_ratio_of_means"].items())
          + ". Test accuracy: " + ", ".join(
              f"{name} {_fraction(acc)}"
              for name, acc in n["ablation"]["test_accuracy"].items())
          + "; CKA of each ablated ViT's layer with the same layer of the unablated one, mean "
          "over layers: " + ", ".join(
              f"{name} {v:.2f}"
              for name, v in n["ablation"]["mean_diagonal_cka_vs_reference"].items())
          + ".")


def _localization(n: Mapping[str, Any]) -> str:
  """From 'own_patch' {'model:layer': {'own_patch_cka', 'peak_at_own_patch'}} and
  'num_examples'."""
  return ("Mean CKA of each token with its own patch (fraction of tokens most similar to their "
          "own patch): " + "; ".join(
              f"{name} {v['own_patch_cka']:.2f} ({v['peak_at_own_patch']:.0%})"
              for name, v in n["own_patch"].items()) + f" ({n['num_examples']} examples).")


def _probes(n: Mapping[str, Any]) -> str:
  """From 'models' {model: {'fewshot_<shots>shot_last_layer': {kind: accuracy}, ...}} (the
  linear-probes study's summary): per model, its 'cls' entry (the CLS token's probe, absent
  without a CLS token) and its 'token' entry (the mean over the spatial tokens of their
  per-token probes; absent without per-token probes)."""
  fewshot = {name: next((k, v) for k, v in m.items() if k.startswith("fewshot_"))
             for name, m in n["models"].items()}
  shots = "/".join(sorted({k[len("fewshot_"):].split("shot")[0] for k, _ in fewshot.values()},
                          key=int))

  def model(name: str, accuracy: Mapping[str, float]) -> str:
    if "token" not in accuracy:
      return f"{name} no per-token probes"
    cls = f"CLS {_fraction(accuracy['cls'])}, " if "cls" in accuracy else ""
    return f"{name} {cls}spatial {_fraction(accuracy['token'])}"

  return (f"{shots}-shot probe accuracy on the last block of the CLS token and of a single "
          "spatial token (mean over the spatial tokens' probes): "
          + "; ".join(model(name, accuracy) for name, (_, accuracy) in fewshot.items()) + ".")


def _data_scale(n: Mapping[str, Any]) -> str:
  """From 'models' {model: {'fraction', 'test_accuracy', 'cka_first_layer',
  'cka_last_layer'}} (models without 'cka_first_layer', the reference, are left out)."""
  return "CKA of a layer with the same layer of the full-data model, first → last layer: " + (
      "; ".join(f"{name} ({_fraction(m['fraction'])} of the data, test accuracy "
                f"{_fraction(m['test_accuracy'])}) {m['cka_first_layer']:.2f} → "
                f"{m['cka_last_layer']:.2f}"
                for name, m in n["models"].items() if "cka_first_layer" in m) + ".")


# Step key -> its text, in the main job's order.
FINDINGS: dict[str, Finding] = {
    "dataset": Finding(
        title="The data",
        paper_finding="The paper analyses ImageNet validation images; this run uses the data "
                      "named below, read through the same sharded pipeline.",
        observed=_dataset),
    "models": Finding(
        title="The models the studies analyse",
        paper_finding="The paper analyses ViTs and BiT ResNets pretrained on JFT-300M or "
                      "ImageNet-21k, plus controlled variants trained for the study.",
        observed=_models),
    "representation": Finding(
        title="Representation structure (Figs 1-2)",
        paper_finding="ViT's CKA heatmap is uniform, with high similarity between lower and "
                      "higher layers, while ResNet's shows stages; ResNet's lower half "
                      "resembles roughly ViT's lowest quarter, and ViT's top layers resemble "
                      "no ResNet layer.",
        observed=_representation),
    "attention": Finding(
        title="Mean attention distance (Figs 3-5)",
        paper_finding="With enough pretraining data, ViT's lower blocks mix local and global "
                      "heads while its higher blocks are all global; local heads are the ones "
                      "most similar to ResNet's lower layers.",
        observed=_attention),
    "receptive_fields": Finding(
        title="Effective receptive fields (Fig 6)",
        paper_finding="ResNet's effective receptive fields grow gradually with depth; ViT's "
                      "become global early, yet stay peaked at the centre patch because of the "
                      "skip connections.",
        observed=_receptive_fields),
    "skip_connections": Finding(
        title="Skip connections (Figs 7-8)",
        paper_finding="The norm ratio ||z|| / ||f(z)|| of the residual stream to each branch is "
                      "much higher in ViT than in ResNet, with a phase transition between the "
                      "CLS and the spatial tokens in the middle of the network; removing one "
                      "block's skip connection breaks ViT's uniform representation structure "
                      "at that block and lowers accuracy.",
        observed=_skip_connections),
    "localization": Finding(
        title="Spatial localization (Figs 9-10)",
        paper_finding="A CLS-trained ViT's output tokens stay most similar to the input patch at "
                      "their own position; ResNet's localization is weaker, and a GAP-trained "
                      "ViT loses it in its top layers.",
        observed=_localization),
    "probes": Finding(
        title="Linear probes per layer and per token (Fig 11)",
        paper_finding="Linear probe accuracy rises through the blocks; probing individual "
                      "tokens separates the models: a CLS-trained ViT's spatial tokens probe "
                      "poorly in the top blocks, a GAP-trained ViT's tokens probe well.",
        observed=_probes),
    "data_scale": Finding(
        title="Pretraining data scale (Figs 12-13)",
        paper_finding="Models trained on less data form weaker intermediate representations: "
                      "their higher layers differ most from the full-data model's, while lower "
                      "layers converge first.",
        observed=_data_scale),
}
