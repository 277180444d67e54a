"""Study 3 (vit_repr.studies.skip_connections): models without skips, configs, end to end."""

import json
import os

import jax
import numpy as np
import pytest

from configs import common
from configs import skip_connections as skip_configs
from vit_repr import checkpoints, data, features, models, parallel, results
from vit_repr.studies import loading, runner, skip_connections

LN_EPS = 1e-6


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def mlp(x, p):
  return gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["Dense_1"]["kernel"] + \
      p["Dense_1"]["bias"]


def attention(x, p):
  """Multi-head self-attention of `x` [b, T, D] from the checkpoint-layout parameters."""
  q, k, v = (np.einsum("btd,dhe->bthe", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  heads = np.einsum("bhqk,bkhe->bqhe", probs, v)
  return np.einsum("bqhe,hed->bqd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def vit_block(z, p, skip):
  """(mid, out) of a pre-norm ViT block in float64."""
  f = attention(layer_norm(z, p["LayerNorm_0"]), p["MultiHeadDotProductAttention_1"])
  mid = z + f if skip else f
  g = mlp(layer_norm(mid, p["LayerNorm_2"]), p["MlpBlock_3"])
  return mid, (mid + g if skip else g)


def mixer_block(z, p, skip):
  """(mid, out) of a Mixer block in float64."""
  y = layer_norm(z, p["LayerNorm_0"])
  f = np.swapaxes(mlp(np.swapaxes(y, 1, 2), p["token_mixing"]), 1, 2)
  mid = z + f if skip else f
  g = mlp(layer_norm(mid, p["LayerNorm_1"]), p["channel_mixing"])
  return mid, (mid + g if skip else g)


def to_float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


FAMILIES = {
    "vit": ("ViT-Ti/16", dict(hidden_size=16, num_heads=2, mlp_dim=24),
            "Transformer/encoderblock_{}", vit_block, lambda p, i: p["Transformer"][
                f"encoderblock_{i}"]),
    "mixer": ("Mixer-S/32", dict(hidden_size=16, tokens_mlp_dim=8, channels_mlp_dim=24),
              "MixerBlock_{}", mixer_block, lambda p, i: p[f"MixerBlock_{i}"]),
}


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILIES)
def test_block_without_skip_computes_exactly_its_branches(family):
  """Block 1 of 3 without skips returns g(f(z)) (no z anywhere); blocks 0 and 2 keep z + ..."""
  name, overrides, path, block_fn, block_params = FAMILIES[family]
  model = models.create(name, image_size=16, patch_size=4, depth=3, num_classes=3,
                        remove_skips=(1,), **overrides)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  # Random parameters of the right shapes (compiling the initialisers is the slow part).
  shapes = jax.eval_shape(model.init, jax.random.key(1), images)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(scale=0.3, size=s.shape).astype(np.float32),
                        shapes)
  sown = jax.jit(lambda p, x: models.flatten_intermediates(
      model.apply({"params": p}, x, mutable=["intermediates"])[1]))(params, images)
  sown = to_float64(sown)
  for block, skip in ((0, True), (1, False), (2, True)):
    prefix = path.format(block)
    z = sown[f"{prefix}/in"]
    mid, out = block_fn(z, to_float64(block_params(params, block)), skip)
    np.testing.assert_allclose(sown[f"{prefix}/mid"], mid, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sown[f"{prefix}/out"], out, rtol=1e-4, atol=1e-5)
    # The residual stream is not negligible, so the check tells the two cases apart.
    _, other = block_fn(z, to_float64(block_params(params, block)), not skip)
    assert np.abs(other - out).max() > 1e-2


def test_config_args():
  with pytest.raises(ValueError, match="runlocal"):
    skip_configs.get_config("vit_b99")
  paper = skip_configs.get_config("vit_b16")
  assert paper.ablation.reference == "imagenet_vit_b16"  # The data-scale reference too.
  assert [tuple(paper.models[n].model.overrides.remove_skips) for n in paper.ablation.models] \
      == [(1,), (6,), (10,)]
  assert paper.norm_ratio.models.vit_b16.checkpoint.endswith("ViT-B_16.npz")
  assert paper.ablation.cka.data.name == "imagenet2012"
  local = skip_configs.get_config("local")
  assert local.ablation.models == ("vit_noskip_block1", "vit_noskip_block4")
  assert tuple(local.models.vit_noskip_block4.model.overrides.remove_skips) == (4,)
  assert local.models.vit_cls.train.total_steps == 1500


BAD_CONFIGS = {
    "missing_model": (dict(models=("vit_noskip_block9",)), "not in config.models"),
    "no_ablated_models": (dict(models=()), "ablation.models is empty"),
    "ablated_model_keeps_skips": (dict(models=("vit_cls",)), "removes no skip"),
}


@pytest.mark.parametrize("ablation,match", BAD_CONFIGS.values(), ids=BAD_CONFIGS)
def test_bad_configs_fail_before_training(tmp_path, ablation, match):
  config = skip_configs.get_config("runlocal")
  config.ablation.update(ablation)
  with pytest.raises(ValueError, match=match):
    skip_connections.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "models")


def direct_norm_ratios(model, params, config):
  """ratio_of_means `[L, 3]` (cls, spatial, register: NaN, these models have no registers) of
  every sub-layer recomputed on the host in float64 from `params`."""
  cfg = config.data
  layers = model.residual_sublayers()
  names = sorted({n for layer in layers for n in (layer.stream, layer.branch)})
  extractor = features.FeatureExtractor(model, names, image_size=cfg.image_size)
  sums = np.zeros((2, len(layers), 3))
  for batch in data.eval_batches(cfg.name, cfg.split, image_size=cfg.image_size,
                                 global_batch_size=40, mesh=parallel.make_mesh(),
                                 num_examples=cfg.num_examples):
    flat = extractor(params, batch["image"])
    inter = {n: np.asarray(v, np.float64).reshape(-1, *extractor.shapes[n])
             for n, v in flat.items()}
    for row, layer in enumerate(layers):
      z = inter[layer.stream] - (inter[layer.branch] if layer.stream_minus_branch else 0)
      f = inter[layer.branch]
      nz, nf = np.linalg.norm(z, axis=-1), np.linalg.norm(f, axis=-1)
      if nz.ndim == 2:  # ViT tokens, CLS first.
        sums[:, row, 0] += nz[:, 0].sum(), nf[:, 0].sum()
        sums[:, row, 1] += nz[:, 1:].sum(), nf[:, 1:].sum()
      else:
        sums[:, row, 1] += nz.sum(), nf.sum()
  with np.errstate(invalid="ignore"):
    return sums[0] / sums[1]


@pytest.mark.slow
def test_runlocal_end_to_end(tmp_path):
  """Killed after one norm-ratio batch and rerun: the norm ratios of the TRAINED ViT (its
  parameters read back from its run directory here, not through the study's loader) and of a
  random-init ResNet match a float64 recomputation; the ablation's arrays are Study 1's."""
  config = skip_configs.get_config("runlocal")
  config.checkpoint_every = 1
  config.stop_after_batches = 1
  assert skip_connections.run(config, str(tmp_path)).summary == {"batches_done": 1,
                                                                  "batches_total": 3}
  config.stop_after_batches = None
  summary = skip_connections.run(config, str(tmp_path)).summary
  ratios, meta = results.read_results(str(tmp_path), "norm_ratios")
  assert meta["statistic"] == "ratio_of_means" and meta["num_examples"] == 120
  vit = config.models.vit_cls.model
  trained = (models.create_from_config(vit.name, vit.overrides.to_dict(), num_classes=10,
                                       image_size=32),
             checkpoints.restore(str(tmp_path / "models" / "vit_cls" / "params")))
  resnet = models.create_from_config("BiT-R50x1", config.norm_ratio.models.resnet.overrides,
                                     num_classes=10, image_size=32)
  random_init = (resnet, resnet.init(jax.random.key(config.norm_ratio.models.resnet.seed),
                                     np.zeros((1, 32, 32, 3), np.float32))["params"])
  for key, (model, params) in (("vit_cls", trained), ("resnet", random_init)):
    np.testing.assert_allclose(ratios[f"{key}/ratio_of_means"],
                               direct_norm_ratios(model, params, config), rtol=1e-4)
  assert list(ratios["vit_cls/names"]) == [f"Transformer/encoderblock_{i}/{k}"
                                           for i in range(2) for k in ("attn", "mlp")]
  assert np.all(np.isfinite(ratios["vit_cls/ratio_of_means"][:, :2]))
  assert np.all(np.isnan(ratios["vit_cls/ratio_of_means"][:, 2]))  # No registers.
  assert ratios["resnet/identity_shortcut"].tolist() == [False, True, False, False, False]
  assert np.all(np.isnan(ratios["resnet/ratio_of_means"][:, 0]))
  assert set(summary["norm_ratios"]["mean_ratio_of_means"]) == {"resnet", "vit_cls"}

  ablation, meta = results.read_results(str(tmp_path), "skip_ablation")
  assert meta["removed_blocks"] == {"vit_noskip_block1": [1]}
  for name in ("vit_cls", "vit_noskip_block1"):
    with open(tmp_path / "models" / name / "metrics.jsonl") as f:
      last_eval = [json.loads(line) for line in f if '"eval"' in line][-1]
    assert meta["test_accuracy"][name] == pytest.approx(last_eval["accuracy"])
  cka_dir = str(tmp_path / "ablation" / "vit_noskip_block1")
  heatmaps, _ = results.read_results(cka_dir, "cka_heatmap")
  np.testing.assert_array_equal(ablation["vit_noskip_block1/cka_self"], heatmaps["cka_aa"])
  np.testing.assert_array_equal(ablation["vit_noskip_block1/cka_vs_reference"],
                                heatmaps["cka_ab"])
  np.testing.assert_allclose(np.diag(ablation["vit_noskip_block1/cka_self"]), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.diag(ablation["reference/cka_self"]), 1.0, atol=1e-5)
  assert list(ablation["names"]) == [f"Transformer/encoderblock_{i}/{k}"
                                     for i in range(2) for k in ("mid", "out")]
  assert summary["ablation"]["mean_diagonal_cka_vs_reference"]["vit_noskip_block1"] == \
      pytest.approx(np.mean(np.diag(heatmaps["cka_ab"])), abs=1e-3)
  for stem in ("norm_ratios", "skip_ablation_self", "skip_ablation_vs_reference"):
    for ext in ("png", "pdf"):
      assert os.path.getsize(tmp_path / "figures" / f"{stem}.{ext}") > 1000


ORDER_MODELS = {
    # A ViT-L/16 (24 blocks, 14x14 patches at 224 px) and a Mixer-B/16 (12 blocks), narrow.
    "vit_l16": ("ViT-L/16", dict(hidden_size=32, mlp_dim=64), 24, ("attn", "mlp"),
                "Transformer/encoderblock_{}/{}"),
    "mixer_b16": ("Mixer-B/16", dict(hidden_size=32, tokens_mlp_dim=16, channels_mlp_dim=64),
                  12, ("token_mixing", "channel_mixing"), "MixerBlock_{}/{}"),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", ORDER_MODELS, ids=ORDER_MODELS)
def test_norm_ratio_rows_follow_the_computation_order(key, tmp_path):
  """At full depth and grid, the rows, their names and their block indices are in the order
  the model computes them (block 2 before block 10, token mixing before channel mixing), and
  each row holds the ratio of the sub-layer it names."""
  name, width, depth, kinds, pattern = ORDER_MODELS[key]
  config = skip_configs.get_config("vit_b16")
  config.data.update(name="digits", num_examples=8)
  config.norm_ratio.global_batch_size = 8
  spec = common.model_spec(name, overrides=width)
  result, layers = skip_connections.norm_ratios(spec, runner.Study(config, str(tmp_path)),
                                                "state.npz")
  expected = [pattern.format(i, kind) for i in range(depth) for kind in kinds]
  assert list(result.names) == expected == [layer.name for layer in layers]
  assert [layer.block for layer in layers] == [i for i in range(depth) for _ in kinds]
  model = models.create_from_config(name, width, num_classes=10, image_size=224)
  params = jax.jit(model.init)(jax.random.key(spec.seed),
                               np.zeros((1, 224, 224, 3), np.float32))
  rows = [expected.index(pattern.format(i, kind)) for i in (2, 10) for kind in kinds]
  cfg = config.data
  inter = features.FeatureExtractor(model, r".*", image_size=224)(
      params["params"], next(iter(data.eval_batches(
          cfg.name, cfg.split, image_size=224, global_batch_size=8, mesh=parallel.make_mesh(),
          num_examples=8)))["image"])
  for row in rows:
    block = layers[row].name.rsplit("/", 1)[0]
    z = np.asarray(inter[layers[row].stream], np.float64).reshape(8, -1, width["hidden_size"])
    f = np.asarray(inter[layers[row].branch], np.float64).reshape(8, -1, width["hidden_size"])
    spatial = slice(1, None) if key == "vit_l16" else slice(None)
    expected_ratio = (np.linalg.norm(z[:, spatial], axis=-1).mean()
                      / np.linalg.norm(f[:, spatial], axis=-1).mean())
    np.testing.assert_allclose(result.ratio_of_means[row, 1], expected_ratio, rtol=1e-4,
                               err_msg=block)


def test_family_settings_name_the_norm_ratio_models():
  config = skip_configs.get_config("dinov2_b14+siglip_b16")
  assert list(config.norm_ratio.models) == ["dinov2_b14", "siglip_b16"]
  assert config.norm_ratio.models.dinov2_b14.overrides.num_registers == 4
  assert not config.ablation.reference and not config.models  # Part (a) alone.
  assert skip_configs.get_config("vit_b16").ablation.reference  # The paper setting stays.
  with pytest.raises(ValueError, match="dinov2_b14"):
    skip_configs.get_config("dinov2_b99")


@pytest.mark.slow
def test_dinov2_registers_are_their_own_group(tmp_path):
  """`dinov2_b14,runlocal` (12 blocks, 16 x 16 patches behind CLS and 4 registers), one batch
  of 8 images: the 'register' column (appended last) is finite and equals the float64 ratio of
  mean norms over tokens 1..4 of the sown z and f(z); 'cls' is token 0 alone and 'spatial'
  tokens 5.. (registers averaged into either would change them)."""
  config = skip_configs.get_config("dinov2_b14,runlocal")
  config.data.num_examples = config.norm_ratio.global_batch_size = 8
  summary = skip_connections.run(config, str(tmp_path)).summary
  ratios, meta = results.read_results(str(tmp_path), "norm_ratios")
  assert meta["groups"] == ["cls", "spatial", "register"]
  values = ratios["dinov2_b14/ratio_of_means"]
  assert values.shape == (24, 3) and np.all(np.isfinite(values))
  assert ratios["dinov2_b14/num_tokens"].tolist() == [[1, 256, 4]] * 24
  assert set(summary["norm_ratios"]["mean_ratio_of_means"]["dinov2_b14"]) == {
      "cls", "spatial", "register"}

  spec = config.norm_ratio.models.dinov2_b14
  model, params = loading.load_model(spec, image_size=224, num_classes=10)
  images = next(iter(data.eval_batches("digits", config.data.split, image_size=224,
                                       global_batch_size=8, mesh=parallel.make_mesh(),
                                       num_examples=8)))["image"]
  _, sown = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(
      params, images)
  sown = models.flatten_intermediates(sown)
  expected = np.zeros((24, 3))
  for row, layer in enumerate(model.residual_sublayers()):
    nz, nf = (np.linalg.norm(np.asarray(sown[name], np.float64), axis=-1)  # [8, 261]
              for name in (layer.stream, layer.branch))
    for column, tokens in enumerate((slice(0, 1), slice(5, None), slice(1, 5))):
      expected[row, column] = nz[:, tokens].mean() / nf[:, tokens].mean()
  np.testing.assert_allclose(values, expected, rtol=1e-4)


@pytest.mark.slow
def test_a_map_head_has_no_cls_and_no_register_group(tmp_path):
  """`siglip_b16,runlocal` (MAP head, 14 x 14 patches, no prefix token): both the 'cls' and
  the 'register' columns are NaN, every token is spatial, the figure is drawn."""
  config = skip_configs.get_config("siglip_b16,runlocal")
  config.data.num_examples = config.norm_ratio.global_batch_size = 8
  summary = skip_connections.run(config, str(tmp_path)).summary
  ratios, _ = results.read_results(str(tmp_path), "norm_ratios")
  values = ratios["siglip_b16/ratio_of_means"]
  assert np.all(np.isnan(values[:, [0, 2]])) and np.all(np.isfinite(values[:, 1]))
  assert ratios["siglip_b16/num_tokens"].tolist() == [[0, 196, 0]] * 24
  assert set(summary["norm_ratios"]["mean_ratio_of_means"]["siglip_b16"]) == {"spatial"}
  assert os.path.getsize(tmp_path / "figures" / "norm_ratios.png") > 1000
