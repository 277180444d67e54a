"""Tests for vit_repr.receptive_field and the receptive-field study (paper Figure 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import receptive_field as erf_config
from tests.conftest import run_python
from vit_repr import receptive_field, results
from vit_repr.studies import receptive_field as erf_study

SIZE = 16


def conv(x, kernel, stride=1, padding="SAME"):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def images(n=4, seed=1, size=SIZE):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def accumulate(fn, params, shapes, batches, **options):
  erf = receptive_field.ReceptiveField(fn, shapes, image_size=batches[0].shape[1], **options)
  state = erf.init()
  for batch in batches:
    state = erf.update(state, params, batch)
  return erf.result(state)


@pytest.mark.parametrize("k", [1, 3, 5], ids=["k1", "k3", "k5"])
@pytest.mark.parametrize("estimator", ["mean_abs", "abs_of_sum"])
def test_single_conv_has_exactly_k_by_k_support(k, estimator):
  """out[y, x, c] = sum_ij W[i, j, :, c] . in[y + i - k//2, x + j - k//2]: the gradient of the
  centre (8, 8) is W on the k x k window around it, zero elsewhere."""
  kernel = jax.random.normal(jax.random.key(k), (k, k, 3, 5))
  fn = lambda w, x: {"conv": conv(x, w)}
  result = accumulate(fn, kernel, {"conv": (SIZE, SIZE, 5)}, [images(3), images(2, seed=2)],
                      estimator=estimator, channel_chunk=2)
  w = np.asarray(kernel, np.float64)
  window = (np.abs(w).sum(2).mean(-1) if estimator == "mean_abs"
            else np.abs(w.mean(-1)).sum(2))
  expected = np.zeros((SIZE, SIZE))
  expected[8 - k // 2:8 + k // 2 + 1, 8 - k // 2:8 + k // 2 + 1] = window
  np.testing.assert_allclose(result.raw_maps[0], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(result.maps[0], expected / expected.max(), rtol=1e-5, atol=1e-7)
  assert np.count_nonzero(result.maps[0]) == k * k
  assert result.num_examples == 5
  np.testing.assert_allclose(result.centres[0], [8.5, 8.5])


def test_padding_images_are_left_out():
  kernel = jax.random.normal(jax.random.key(3), (3, 3, 3, 5))
  fn = lambda w, x: {"conv": jnp.tanh(conv(x, w))}
  erf = receptive_field.ReceptiveField(fn, {"conv": (SIZE, SIZE, 5)}, image_size=SIZE)
  batch = images(5)
  state = erf.update(erf.init(), kernel, batch, jnp.arange(5) < 3)
  padded = erf.result(state)
  reference = accumulate(fn, kernel, {"conv": (SIZE, SIZE, 5)}, [batch[:3]])
  np.testing.assert_allclose(padded.raw_maps, reference.raw_maps, rtol=1e-6, atol=1e-9)
  assert padded.num_examples == 3


def two_layer_net(params, x):
  hidden = jnp.tanh(conv(x, params["w1"]) + 0.3)
  return {"hidden": hidden, "out": conv(hidden, params["w2"], stride=2)}


@pytest.mark.parametrize("layer_groups", [1, 2], ids=["one_group", "group_per_layer"])
def test_nonlinear_net_matches_full_jacobian(layer_groups):
  """Two 3x3 convs with tanh: per-image Jacobians by jax.jacrev, reduced in float64 NumPy;
  supports 3x3 and 5x5. channel_chunk=3 of 4 + 5 channels: in one group a chunk straddles the
  two layers (the hidden layer's probes run the backward pass from 'out' through a zero
  cotangent); with a group per layer the last chunk of each is padded."""
  keys = jax.random.split(jax.random.key(0), 2)
  params = {"w1": jax.random.normal(keys[0], (3, 3, 3, 4)),
            "w2": jax.random.normal(keys[1], (3, 3, 4, 5))}
  batch = images(3)
  result = accumulate(two_layer_net, params, {"hidden": (SIZE, SIZE, 4),
                                              "out": (SIZE // 2, SIZE // 2, 5)}, [batch],
                      channel_chunk=3, layer_groups=layer_groups)
  for row, (name, (y, x)) in enumerate([("hidden", (8, 8)), ("out", (4, 4))]):
    jac = jax.jacrev(lambda im: two_layer_net(params, im[None])[name][0, y, x])
    per_image = [np.abs(np.asarray(jac(im), np.float64)).sum(-1).mean(0) for im in batch]
    expected = np.mean(per_image, axis=0)
    np.testing.assert_allclose(result.raw_maps[row], expected, rtol=1e-4, atol=1e-7)
    support = 3 if name == "hidden" else 5
    assert np.count_nonzero(result.maps[row] > 1e-6) == support * support


@pytest.mark.parametrize("center,cells", [("single", [(2, 2)]),
                                          ("mean", [(1, 1), (1, 2), (2, 1), (2, 2)])])
def test_patch_tokens_with_cls(center, cells):
  """A linear patch embedding (4x4 patches, 4x4 grid) with a CLS token prepended: the centre
  token's receptive field is its own patch (or the four central patches, averaged)."""
  kernel = jax.random.normal(jax.random.key(3), (4, 4, 3, 6))

  def tokens(w, x):
    patches = conv(x, w, stride=4, padding="VALID").reshape(x.shape[0], 16, 6)
    return {"tokens": jnp.concatenate([jnp.ones((x.shape[0], 1, 6)), patches], axis=1)}

  result = accumulate(tokens, kernel, {"tokens": (17, 6)}, [images(2)], token_grid=(4, 4),
                      num_prefix_tokens=1, center=center)
  patch = np.abs(np.asarray(kernel, np.float64)).sum(2).mean(-1)
  expected = np.zeros((SIZE, SIZE))
  for r, c in cells:
    expected[4 * r:4 * r + 4, 4 * c:4 * c + 4] = patch / len(cells)
  np.testing.assert_allclose(result.raw_maps[0], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(result.centres[0], [8.0, 8.0] if center == "mean" else [10.0, 10.0])


def scaled_copies(num_layers):
  """Layer i = (i + 1) * the image tiled to 3 * (i % 3 + 1) channels: every channel's gradient
  at the centre pixel is i + 1 on one colour, zero elsewhere, so ERF_i = (i + 1) * delta."""
  return lambda w, x: {f"layer{i}": (i + 1) * jnp.tile(x, (1, 1, 1, i % 3 + 1))
                       for i in range(num_layers)}


@pytest.mark.parametrize("layer_groups", [1, 4, 13], ids=["1", "4", "13"])
@pytest.mark.parametrize("max_channels", [None, 4], ids=["all_channels", "k4"])
def test_many_layers_keep_their_order(layer_groups, max_channels):
  """13 layers of 3-9 channels (a sorted-key bug shows at 10+): each map lands on its layer's
  row, divided by that layer's own channel count, whatever the grouping and chunking."""
  shapes = {f"layer{i}": (SIZE, SIZE, 3 * (i % 3 + 1)) for i in range(13)}
  result = accumulate(scaled_copies(13), None, shapes, [images(2)], channel_chunk=5,
                      layer_groups=layer_groups, max_channels=max_channels)
  assert result.names == tuple(shapes)
  expected = np.zeros((13, SIZE, SIZE))
  expected[:, 8, 8] = np.arange(1, 14)
  np.testing.assert_allclose(result.raw_maps, expected, rtol=1e-6)


@pytest.mark.parametrize("num_layers,num_groups,expected", [
    (24, 8, [3] * 8), (17, 8, [2, 2, 2, 2, 2, 2, 2, 3]), (2, 4, [1, 1]), (5, 1, [5]),
], ids=["vit_b", "r50", "fewer_layers", "one_group"])
def test_group_layers_covers_every_layer_once_in_order(num_layers, num_groups, expected):
  groups = receptive_field.group_layers(num_layers, num_groups)
  assert [len(g) for g in groups] == expected
  assert [i for g in groups for i in g] == list(range(num_layers))


def ones_kernel(k, channels, seed):
  """`[k, k, 3, channels]` of random signs: |w| = 1, so a single conv's 'mean_abs' ERF is
  uniform on its support."""
  return jnp.sign(jax.random.normal(jax.random.key(seed), (k, k, 3, channels)))


# Per layer: fn, kernel size, per-example shape for an image side s, options, the input rows
# that output cell i reads (the same for columns) and the pixel stride of a cell.
_RADIUS_LAYERS = {
    "patch4": (lambda w, x: {"r": jnp.concatenate(
        [jnp.ones((x.shape[0], 1, 5)),
         conv(x, w, stride=4, padding="VALID").reshape(x.shape[0], 16, 5)], axis=1)},
               4, lambda s: (17, 5), dict(token_grid=(4, 4), num_prefix_tokens=1),
               lambda i: range(4 * i, 4 * i + 4), 4),
    "dilated3": (lambda w, x: {"r": jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))},
                 3, lambda s: (s, s, 5), {}, lambda i: (i - 2, i, i + 2), 1),
    "same2": (lambda w, x: {"r": conv(x, w)}, 2, lambda s: (s, s, 5), {},
              lambda i: (i, i + 1), 1),  # 'SAME' pads an even kernel's extra row after.
}


@pytest.mark.parametrize("layer,center,size,centre,radius2", [
    ("patch4", "single", SIZE, 10.0, 2 * 15 / 12),  # Uniform on rows 8..11.
    ("patch4", "mean", SIZE, 8.0, 2 * 63 / 12),     # Uniform on rows 4..11.
    ("dilated3", "single", SIZE, 8.5, 2 * 8 / 3),   # Rows 6, 8, 10.
    ("dilated3", "mean", SIZE, 8.0, 2 * 35 / 12),   # Uniform on rows 5..10.
    ("dilated3", "single", 15, 7.5, 2 * 8 / 3),     # Odd grid: rows 5, 7, 9.
    ("same2", "single", SIZE, 8.5, 2 * 1 / 2),      # Rows 8, 9 (centroid 9).
    ("same2", "mean", SIZE, 8.0, 2 * 3 / 4),        # Rows 7, 8, 9 weighted 1, 2, 1.
], ids=["patch_even_single", "patch_even_mean", "dilated_even_single", "dilated_even_mean",
        "dilated_odd", "asymmetric_single", "asymmetric_mean"])
def test_radius_is_measured_from_the_centre_locations_centre(layer, center, size, centre,
                                                             radius2):
  """ERFs known in closed form (one linear layer with |w| = 1: uniform on the central cells'
  input windows). The radius is the root mean squared distance of the pixel centres
  (y + 0.5, x + 0.5) from the centre location's centre (`centre`, the same in y and x:
  (cell + 0.5) * stride, averaged over the central cells for 'mean'): checked against a float64
  NumPy formula and the closed form `radius2`. The symmetric cases have that centre as their
  centroid, so a radius taken from any other point is larger; the asymmetric ones tell it from
  the ERF's centroid."""
  fn, k, shape, options, window, stride = _RADIUS_LAYERS[layer]
  result = accumulate(fn, ones_kernel(k, 5, seed=k), {"r": shape(size)},
                      [images(2, size=size)], center=center, **options)
  cells = receptive_field.center_cells((size // stride,) * 2, center)
  expected = np.zeros((size, size))
  for row, col in cells:
    rows, cols = np.zeros(size), np.zeros(size)
    rows[list(window(row))] = cols[list(window(col))] = 1.0
    expected += np.outer(rows, cols) / len(cells)
  np.testing.assert_allclose(result.maps[0], expected / expected.max(), rtol=1e-6)
  np.testing.assert_allclose(result.centres[0], [centre, centre])
  y, x = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
  squared = (y - centre) ** 2 + (x - centre) ** 2
  np.testing.assert_allclose(result.radius[0], np.sqrt((expected * squared).sum() /
                                                       expected.sum()), rtol=1e-6)
  np.testing.assert_allclose(result.radius[0], np.sqrt(radius2), rtol=1e-6)


def test_channel_subset_averages_the_chosen_channels():
  kernel = jax.random.normal(jax.random.key(4), (3, 3, 3, 10))
  fn = lambda w, x: {"conv": conv(x, w)}
  erf = receptive_field.ReceptiveField(fn, {"conv": (SIZE, SIZE, 10)}, image_size=SIZE,
                                       max_channels=4, channel_seed=7)
  state = erf.update(erf.init(), kernel, images(2))
  chosen = erf._channels["conv"]  # pylint: disable=protected-access
  assert len(chosen) == 4 and len(set(chosen.tolist())) == 4
  window = np.abs(np.asarray(kernel, np.float64)[..., chosen]).sum(2).mean(-1)
  np.testing.assert_allclose(erf.result(state).raw_maps[0][7:10, 7:10], window, rtol=1e-5)


@pytest.mark.parametrize("grid,center,expected", [
    ((5, 5), "mean", [(2, 2)]), ((4, 4), "single", [(2, 2)]), ((4, 3), "mean", [(1, 1), (2, 1)]),
], ids=["odd", "even_single", "even_rows_mean"])
def test_center_cells(grid, center, expected):
  assert receptive_field.center_cells(grid, center) == expected


def test_bad_inputs_raise_clear_errors():
  fn = lambda w, x: {"t": x}
  with pytest.raises(ValueError, match="estimator"):
    receptive_field.ReceptiveField(fn, {"t": (4, 4, 3)}, image_size=4, estimator="grad")
  with pytest.raises(ValueError, match="token_grid"):
    receptive_field.ReceptiveField(fn, {"t": (17, 8)}, image_size=32, token_grid=(3, 3),
                                   num_prefix_tokens=1)
  with pytest.raises(ValueError, match="tokens \\[T, D\\] or feature maps"):
    receptive_field.ReceptiveField(fn, {"t": (8,)}, image_size=4)
  erf = receptive_field.ReceptiveField(fn, {"t": (4, 4, 3)}, image_size=4)
  with pytest.raises(ValueError, match="Expected images"):
    erf.update(erf.init(), None, jnp.ones((1, 5, 5, 3)))
  with pytest.raises(ValueError, match="vit_b32"):
    erf_config.get_config("vit_b99")


@pytest.mark.slow
def test_eight_devices_equal_one_device(tmp_path):
  code = f"""
import jax, numpy as np
from tests.test_receptive_field import conv, images
from vit_repr import parallel, receptive_field
mesh = parallel.make_mesh()
w = jax.random.normal(jax.random.key(0), (3, 3, 3, 4))
erf = receptive_field.ReceptiveField(lambda w, x: {{'c': jax.numpy.tanh(conv(x, w))}},
                                     {{'c': (16, 16, 4)}}, image_size=16, mesh=mesh)
state = erf.update(erf.init(), w, jax.device_put(images(16), parallel.batch_sharding(mesh)))
np.save({str(tmp_path)!r} + f'/{{jax.device_count()}}.npy', erf.result(state).raw_maps)
"""
  run_python(code, num_devices=8)
  run_python(code, num_devices=1)
  np.testing.assert_allclose(np.load(tmp_path / "8.npy"), np.load(tmp_path / "1.npy"),
                             rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_runlocal_end_to_end_resumes(tmp_path):
  """ViT receptive fields are global from the first block; the ResNet stem's are local and
  grow with depth (paper Fig 6), on random-init runlocal models; a run killed after one batch
  and rerun equals an uninterrupted one."""
  config = erf_config.get_config("runlocal")
  config.model_a.overrides.depth = 2
  uninterrupted = tmp_path / "uninterrupted"
  erf_study.run(config, str(uninterrupted))
  config.stop_after_batches = 1  # Killed after model A's first of two batches.
  assert erf_study.run(config, str(tmp_path)).summary == {"batches_done": 1, "batches_total": 2}
  assert (tmp_path / "receptive_field_state_a.npz").exists()
  assert not (tmp_path / "receptive_field.npz").exists()
  config.stop_after_batches = None
  summary = erf_study.run(config, str(tmp_path)).summary
  arrays, metadata = results.read_results(str(tmp_path), "receptive_field")
  expected, _ = results.read_results(str(uninterrupted), "receptive_field")
  for key in ("raw_maps_a", "raw_maps_b", "radius_a", "radius_b"):
    np.testing.assert_allclose(arrays[key], expected[key], rtol=1e-5, atol=1e-9)
  assert arrays["maps_a"].shape == (4, 32, 32) and arrays["maps_b"].shape == (5, 32, 32)
  for key in ("a", "b"):
    np.testing.assert_allclose(arrays[f"maps_{key}"].max(axis=(1, 2)), 1.0)
  assert np.all(arrays["maps_a"][0] > 0)          # Block 0 'mid': every pixel contributes.
  assert np.mean(arrays["maps_b"][0] == 0) > 0.5  # ResNet stem: local support.
  radius_b = arrays["radius_b"]
  assert radius_b[0] < radius_b[1] < radius_b[3]
  assert metadata["estimator"] == "mean_abs" and summary["ViT-Ti/16"]["num_examples"] == 20
  assert (tmp_path / "figures" / "receptive_field.png").stat().st_size > 1000


@pytest.mark.slow
def test_dinov2_centres_on_a_patch_behind_its_registers(tmp_path):
  """`dinov2_b14,runlocal` (12 blocks, 16 x 16 patches of 14 px behind CLS and 4 registers):
  the centre location is patch (8, 8), token 5 + 8 * 16 + 8. The tokens entering block 0
  (`Transformer/in`: patch embedding plus position embedding) have exactly their patch's pixels
  as receptive field, so that layer's map is the patch's 14 x 14 square: a register
  (image-independent) would give an empty map, a token counted from 0 the patch 5 cells to
  the left. Layers (for time): `Transformer/in`, block 0's 'mid' and the last block's 'out',
  in model order; one channel per layer, two images."""
  config = erf_config.get_config("dinov2_b14,runlocal")
  config.data.num_examples = config.analysis.minibatch_size = 2
  config.analysis.max_channels = 1
  config.model_a.layers = ("Transformer/in", "Transformer/encoderblock_0/mid",
                           "Transformer/encoderblock_11/out")
  erf_study.run(config, str(tmp_path))
  arrays, metadata = results.read_results(str(tmp_path), "receptive_field")
  assert list(arrays["names_a"]) == list(config.model_a.layers)
  maps = arrays["maps_a"]
  support = np.zeros((224, 224), bool)
  support[112:126, 112:126] = True  # Patch (8, 8) of 14 px.
  np.testing.assert_array_equal(maps[0] > 0, support)
  np.testing.assert_allclose(arrays["centres_a"], np.full((3, 2), 119.0))
  np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
  assert np.all(maps[1:] > 0)  # From block 0's attention on: every patch contributes.
  assert metadata["models"]["a"]["overrides"]["num_registers"] == 4


def test_models_of_one_registered_name_keep_apart_in_the_summary():
  """DINOv2 and SigLIP are both 'ViT-B/16': the summary and the figure tell A from B."""
  specs = [("a", erf_config.get_config("dinov2_b14").model_a),
           ("b", erf_config.get_config("siglip_b16").model_a)]
  assert erf_study._labels(specs) == {"a": "ViT-B/16 (A)", "b": "ViT-B/16 (B)"}
  specs[1] = ("b", erf_config.get_config("r50").model_a)
  assert erf_study._labels(specs) == {"a": "ViT-B/16", "b": "BiT-R50x1"}
