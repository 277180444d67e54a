"""Tests for vit_repr.data: digits, TFDS (genuine files written offline), hosts, sharding."""

import dataclasses
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from tests.conftest import fake_tfds_cifar10, run_python
from vit_repr import data, parallel
from vit_repr.data import preprocessing, sources


def np_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize with half-pixel centres and edge clamping, float64."""
  image = image.astype(np.float64)

  def axis(n_in, n_out):
    centre = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    low = np.floor(centre)
    frac = centre - low
    return np.clip(low, 0, n_in - 1).astype(int), np.clip(low + 1, 0, n_in - 1).astype(int), frac

  r0, r1, fr = axis(image.shape[0], out_h)
  c0, c1, fc = axis(image.shape[1], out_w)
  rows = image[r0] * (1 - fr)[:, None, None] + image[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def digits_reference(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The documented 'digits' split, built directly from scikit-learn: uint8 images, labels."""
  digits = sk_datasets.load_digits()
  train, test = model_selection.train_test_split(
      np.arange(1797), test_size=360, stratify=digits.target, random_state=0)
  idx = {"train": train, "test": test}[split]
  images = np.round(digits.images[idx] * 255.0 / 16.0)
  return np.repeat(images[..., None], 3, axis=-1), digits.target[idx]


def collect(batches):
  batches = list(batches)
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


# ------------------------------------------------------------------------------------------
# Embedded dataset.


def test_digits_info_and_split():
  info = data.dataset_info("digits")
  assert info.num_classes == 10
  assert dict(info.splits) == {"train": 1437, "test": 360, "validation": 360}
  assert info.image_shape == (8, 8, 3)
  assert "BSD-3" in info.license and "Alpaydin" in info.citation
  assert "digits" in data.known_datasets() and "cifar10" in data.known_datasets()
  _, train_labels = digits_reference("train")
  _, test_labels = digits_reference("test")
  # Stratified: every class's test share is within one example of 360/1797 of its size.
  totals = np.bincount(np.concatenate([train_labels, test_labels]))
  assert np.all(np.abs(np.bincount(test_labels) - totals * 360 / 1797) <= 1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_eval_matches_numpy_reference(split):
  images, labels = collect(data.eval_numpy_batches(
      "digits", split, image_size=20, global_batch_size=50))
  ref_images, ref_labels = digits_reference(split)
  n = (len(ref_labels) // 50) * 50
  assert images.shape == (n, 20, 20, 3) and images.dtype == np.float32
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, ref_labels[:n])
  expected = np.stack([np_resize_bilinear(im, 20, 20) for im in ref_images[:n]]) / 127.5 - 1
  np.testing.assert_allclose(images, expected, atol=2e-5)
  assert images.min() >= -1.0 and images.max() <= 1.0


def test_eval_is_deterministic_and_counts_drops():
  kwargs = dict(image_size=16, global_batch_size=64, num_examples=300)
  a_images, a_labels = collect(data.eval_numpy_batches("digits", "train", **kwargs))
  b_images, b_labels = collect(data.eval_numpy_batches("digits", "train", **kwargs))
  np.testing.assert_array_equal(a_images, b_images)
  np.testing.assert_array_equal(a_labels, b_labels)
  plan = data.eval_plan(1437, global_batch_size=64, num_examples=300)
  assert (plan.num_batches, plan.num_examples, plan.num_dropped) == (4, 256, 44)
  assert len(a_labels) == 256


def test_eval_shuffle_reorders_the_same_examples_deterministically():
  kwargs = dict(image_size=8, global_batch_size=64, num_examples=256)
  def read(**shuffle):
    return collect(data.eval_numpy_batches("digits", "train", **kwargs, **shuffle))

  canonical_images, canonical_labels = read()
  first, first_labels = read(shuffle_seed=1)
  again, _ = read(shuffle_seed=1)
  other, _ = read(shuffle_seed=2)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, canonical_images)
  assert not np.array_equal(first, other)
  # Same examples, another order: sort both image sets by their bytes and compare.
  def key_sorted(images):
    return images[np.lexsort(images.reshape(len(images), -1).T)]
  np.testing.assert_array_equal(key_sorted(first), key_sorted(canonical_images))
  np.testing.assert_array_equal(np.sort(first_labels), np.sort(canonical_labels))


# ------------------------------------------------------------------------------------------
# Eval preprocessing on synthetic images.


@pytest.mark.parametrize("shape,size", [((13, 9), 16), ((40, 25), 12), ((8, 8), 8)],
                         ids=["up-nonsquare", "down-nonsquare", "identity"])
def test_eval_resize_matches_numpy(shape, size):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  out = preprocessing._eval_preprocess(image, size, None).numpy()
  expected = np_resize_bilinear(image, size, size) / 127.5 - 1
  np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("shape,size,fraction,resized,offset", [
    ((20, 30), 8, 0.5, (16, 24), (4, 8)),
    ((30, 20), 8, 0.5, (24, 16), (8, 4)),
    ((50, 50), 14, 0.875, (16, 16), (1, 1)),
], ids=["landscape", "portrait", "square-0.875"])
def test_eval_central_crop_matches_numpy(shape, size, fraction, resized, offset):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  out = preprocessing._eval_preprocess(image, size, fraction).numpy()
  full = np_resize_bilinear(image, *resized) / 127.5 - 1
  top, left = offset
  np.testing.assert_allclose(out, full[top:top + size, left:left + size], atol=2e-5)


# ------------------------------------------------------------------------------------------
# Nested subsets.


def test_subsets_are_nested_and_sized():
  sets = {f: data.subset_indices(1000, f, subset_seed=3) for f in (0.1, 0.3, 1.0)}
  assert [len(sets[f]) for f in (0.1, 0.3, 1.0)] == [100, 300, 1000]
  assert set(sets[0.1]) <= set(sets[0.3]) <= set(sets[1.0])
  assert np.all(np.diff(sets[0.3]) > 0)
  other = data.subset_indices(1000, 0.3, subset_seed=4)
  assert set(other) != set(sets[0.3])
  np.testing.assert_array_equal(data.subset_indices(1000, 0.3, subset_seed=3), sets[0.3])


def test_eval_subset_reads_the_subset_examples():
  _, ref_labels = digits_reference("train")
  idx = data.subset_indices(1437, 0.1, subset_seed=7)
  _, labels = collect(data.eval_numpy_batches(
      "digits", "train", image_size=8, global_batch_size=16, subset_fraction=0.1,
      subset_seed=7))
  assert len(idx) == 144
  np.testing.assert_array_equal(labels, ref_labels[idx])


@pytest.mark.parametrize("fraction", [0.0, 1.5, 1e-5], ids=["zero", "above-one", "empty"])
def test_bad_subset_fraction(fraction):
  with pytest.raises(ValueError, match="subset_fraction"):
    data.subset_indices(1000, fraction)


# ------------------------------------------------------------------------------------------
# Hosts.


@pytest.mark.parametrize("hosts", [2, 4])
def test_eval_host_split_assembles_to_single_host(hosts):
  plans = [data.eval_plan(360, global_batch_size=32, process_index=h, process_count=hosts)
           for h in range(hosts)]
  single = data.eval_plan(360, global_batch_size=32, process_index=0, process_count=1)
  per_host = [p.host_indices.reshape(p.num_batches, -1) for p in plans]
  assert all(p.shape == (11, 32 // hosts) for p in per_host)
  np.testing.assert_array_equal(np.concatenate(per_host, axis=1).ravel(), single.host_indices)
  batches = [list(data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=32,
                                          process_index=h, process_count=hosts))
             for h in range(hosts)]
  images, labels = collect(data.eval_numpy_batches("digits", "test", image_size=8,
                                                   global_batch_size=32, process_count=1))
  joined = [np.concatenate([b[i]["label"] for b in batches]) for i in range(11)]
  np.testing.assert_array_equal(np.concatenate(joined), labels)
  joined = [np.concatenate([b[i]["image"] for b in batches]) for i in range(11)]
  np.testing.assert_array_equal(np.concatenate(joined), images)


def minibatches_of(plans, minibatch):
  """{first example: sorted examples} of every real minibatch of per-host `plans`."""
  found = {}
  for plan in plans:
    for rows in plan.host_indices.reshape(-1, minibatch):
      assert np.all(rows >= 0) or np.all(rows < 0)  # Padding is whole minibatches.
      if rows[0] >= 0:
        found[int(rows[0])] = tuple(np.sort(rows))
  return found


@pytest.mark.parametrize("shuffle_seed", [None, 4])
def test_minibatch_plan_uses_the_same_minibatches_for_any_layout(shuffle_seed):
  # 360 examples in minibatches of 40: 9 minibatches for 1 device, 2 or 8 devices (the last
  # batch padded) and 1, 2 or 4 hosts. Without minibatch plans 2 devices dropped 40 examples.
  reference = minibatches_of([data.eval_plan(360, global_batch_size=40, minibatch_size=40,
                                             shuffle_seed=shuffle_seed, process_count=1)], 40)
  assert len(reference) == 9
  if shuffle_seed is None:
    assert sorted(reference) == list(range(0, 360, 40))
  for devices, hosts in [(2, 1), (2, 2), (8, 1), (8, 2), (8, 4)]:
    plans = [data.eval_plan(360, global_batch_size=40 * devices, minibatch_size=40,
                            shuffle_seed=shuffle_seed, process_index=h, process_count=hosts)
             for h in range(hosts)]
    assert {(p.num_examples, p.num_dropped) for p in plans} == {(360, 0)}
    assert {p.num_batches for p in plans} == {-(-9 // devices)}
    assert minibatches_of(plans, 40) == reference, (devices, hosts)


def test_minibatch_plan_pads_with_invalid_zero_images_and_checks_sizes():
  batches = list(data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=80,
                                         minibatch_size=20, num_examples=130))
  # 6 minibatches of 20 in 2 batches of 4 slots: slot 0 takes minibatches 0, 1; slot 1 2, 3;
  # slot 2 4, 5; slot 3 is padding in both.
  assert len(batches) == 2
  ref_images, ref_labels = digits_reference("test")
  for step, batch in enumerate(batches):
    np.testing.assert_array_equal(batch["valid"], np.arange(80) < 60)
    assert not batch["image"][60:].any() and not batch["label"][60:].any()
    expected = np.concatenate([np.arange(20 * m, 20 * m + 20) for m in (step, 2 + step, 4 + step)])
    np.testing.assert_array_equal(batch["label"][:60], ref_labels[expected])
  # Fewer minibatches than devices: host 1 of 2 holds only padding (and still yields a batch).
  only_padding = list(data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=80,
                                              minibatch_size=20, num_examples=20,
                                              process_index=1, process_count=2))
  assert len(only_padding) == 1 and only_padding[0]["image"].shape == (40, 8, 8, 3)
  assert not only_padding[0]["valid"].any() and not only_padding[0]["image"].any()
  with pytest.raises(ValueError, match="whole minibatches of 30 examples per host"):
    data.eval_plan(360, global_batch_size=80, minibatch_size=30)
  with pytest.raises(ValueError, match="whole minibatches of 40 examples per host"):
    data.eval_plan(360, global_batch_size=120, minibatch_size=40, process_count=2,
                   process_index=0)
  with pytest.raises(ValueError, match="smaller than one minibatch of 40"):
    data.eval_plan(360, global_batch_size=80, minibatch_size=40, num_examples=39)


@pytest.mark.parametrize("layout", [dict(minibatch_size=20), dict(num_devices=4)],
                         ids=["minibatch", "plain"])
@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_each_eval_host_reads_only_its_records(monkeypatch, hosts, layout):
  source = sources._source("digits", "test", None)
  ranges = []

  def read(start, stop):
    ranges.append((start, stop))
    return source.read(start, stop)

  monkeypatch.setattr(sources, "_source", lambda *_: dataclasses.replace(source, read=read))
  covered = []
  for h in range(hosts):
    ranges.clear()
    list(data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=80,
                                 process_index=h, process_count=hosts, **layout))
    covered.append(np.concatenate([np.arange(a, b) for a, b in ranges]))
  # Minibatch plan: 18 minibatches over 4 slots (5 steps, 2 padding slots). Plain plan: 4
  # batches of 80 (40 examples dropped), each device's 20 rows a run of its 80 examples. Every
  # host reads one contiguous run of records, each record once in all, no other host's.
  used = 360 if "minibatch_size" in layout else 320
  for records in covered:
    np.testing.assert_array_equal(records, np.arange(records[0], records[0] + len(records)))
  np.testing.assert_array_equal(np.sort(np.concatenate(covered)), np.arange(used))


@pytest.mark.parametrize("devices,hosts,minibatch", [(2, 2, None), (8, 4, None), (4, 2, 20),
                                                     (8, 4, 10), (8, 2, 20)])
def test_reshuffled_multihost_pass_exchanges_rows_instead_of_reading_them(devices, hosts,
                                                                          minibatch):
  """With `exchange`, each host's buffers hold only the records it reads in canonical order,
  and the hosts' buffers indexed by `plan.exchange` are the one-host pass, row for row."""
  batch = 10 * devices if minibatch is None else minibatch * devices
  kwargs = dict(global_batch_size=batch, num_examples=300 if minibatch != 20 else 130,
                minibatch_size=minibatch, num_devices=devices)
  one_host = data.eval_plan(360, shuffle_seed=5, process_index=0, process_count=1, **kwargs)
  plans = [data.eval_plan(360, shuffle_seed=5, exchange=True, process_index=h,
                          process_count=hosts, **kwargs) for h in range(hosts)]
  canonical = [data.eval_plan(360, process_index=h, process_count=hosts, **kwargs)
               for h in range(hosts)]
  buffers = np.concatenate([p.host_indices.reshape(p.num_batches, -1) for p in plans], axis=1)
  assert buffers.shape[1] % devices == 0
  np.testing.assert_array_equal(np.take_along_axis(buffers, plans[0].exchange, axis=1).ravel(),
                                one_host.host_indices)
  for plan, own in zip(plans, canonical):
    np.testing.assert_array_equal(np.sort(plan.host_indices[plan.host_indices >= 0]),
                                  np.sort(own.host_indices[own.host_indices >= 0]))
  # Without the exchange a host reads from its first row's record to its last: nearly all.
  spread = data.eval_plan(360, shuffle_seed=5, process_index=0, process_count=hosts, **kwargs)
  real = spread.host_indices[spread.host_indices >= 0]
  assert real.max() - real.min() > 0.8 * one_host.num_examples


# ------------------------------------------------------------------------------------------
# Training pipeline.


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


TRAIN = dict(image_size=12, global_batch_size=40, seed=5)


def test_train_shapes_ranges_and_epochs():
  batches = take(data.train_numpy_batches("digits", "test", **TRAIN), 18)
  assert batches[0]["image"].shape == (40, 12, 12, 3) and batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32
  images = np.stack([b["image"] for b in batches])
  assert images.min() >= -1.0 and images.max() <= 1.0
  _, ref_labels = digits_reference("test")
  # 360 examples = 9 batches: each epoch holds every example once, in a new order.
  first = np.concatenate([b["label"] for b in batches[:9]])
  second = np.concatenate([b["label"] for b in batches[9:]])
  np.testing.assert_array_equal(np.bincount(first), np.bincount(ref_labels))
  np.testing.assert_array_equal(np.bincount(second), np.bincount(ref_labels))
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, ref_labels)


def test_train_is_deterministic_and_seeded():
  a = take(data.train_numpy_batches("digits", "test", **TRAIN), 3)
  b = take(data.train_numpy_batches("digits", "test", **TRAIN), 3)
  c = take(data.train_numpy_batches("digits", "test", **{**TRAIN, "seed": 6}), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("start_step", [4, 9, 13], ids=["mid-epoch", "epoch-start", "epoch-2"])
def test_train_resume_equals_uninterrupted(start_step):
  full = take(data.train_numpy_batches("digits", "test", **TRAIN), start_step + 3)
  resumed = take(data.train_numpy_batches("digits", "test", start_step=start_step, **TRAIN), 3)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_train_augmentation_is_crop_flip_of_the_image():
  # Full-area crops leave only the flip: each training image is its eval image or its mirror.
  batch = take(data.train_numpy_batches("digits", "test", area_range=(1.0, 1.0), **TRAIN), 1)[0]
  ref_images, ref_labels = digits_reference("test")
  candidates = np.stack([np_resize_bilinear(im, 12, 12) for im in ref_images]) / 127.5 - 1
  flips = 0
  for image, label in zip(batch["image"], batch["label"]):
    dist = np.abs(candidates - image).max(axis=(1, 2, 3))
    dist_flip = np.abs(candidates[:, :, ::-1] - image).max(axis=(1, 2, 3))
    match = min(dist.min(), dist_flip.min())
    assert match < 2e-5
    best = np.argmin(np.minimum(dist, dist_flip))
    assert ref_labels[best] == label
    flips += dist_flip.min() < dist.min()
  assert 5 < flips < 35


def test_train_without_random_flip_never_mirrors():
  # Full-area crops and no flip: each training image is its eval image, never its mirror.
  batch = take(data.train_numpy_batches("digits", "test", area_range=(1.0, 1.0),
                                        random_flip=False, **TRAIN), 2)
  ref_images, ref_labels = digits_reference("test")
  candidates = np.stack([np_resize_bilinear(im, 12, 12) for im in ref_images]) / 127.5 - 1
  mirrors = candidates[:, :, ::-1]
  asymmetric = np.abs(candidates - mirrors).max(axis=(1, 2, 3)) > 0.1
  for image, label in zip(np.concatenate([b["image"] for b in batch]),
                          np.concatenate([b["label"] for b in batch])):
    best = np.argmin(np.abs(candidates - image).max(axis=(1, 2, 3)))
    assert np.abs(candidates[best] - image).max() < 2e-5 and ref_labels[best] == label
    if asymmetric[best]:
      assert np.abs(mirrors - image).max(axis=(1, 2, 3)).min() > 2e-5


def test_train_hosts_cover_the_split():
  _, ref_labels = digits_reference("test")
  labels = [np.concatenate([b["label"] for b in take(data.train_numpy_batches(
      "digits", "test", process_index=h, process_count=2, **TRAIN), 9)]) for h in range(2)]
  # Host h reads the contiguous half [180h, 180(h+1)): 9 steps of 20 = one epoch of its half.
  for h in range(2):
    np.testing.assert_array_equal(np.bincount(labels[h], minlength=10),
                                  np.bincount(ref_labels[180 * h:180 * (h + 1)], minlength=10))


def host_rows_joined(make_batches, hosts, steps):
  """The global batches assembled from the host batches of `hosts` hosts (rows in host order)."""
  per_host = [take(make_batches(process_index=h, process_count=hosts), steps)
              for h in range(hosts)]
  return [{k: np.concatenate([per_host[h][s][k] for h in range(hosts)]) for k in ("image", "label")}
          for s in range(steps)]


@pytest.mark.parametrize("hosts", [2, 4])
def test_train_global_batches_do_not_depend_on_host_count(hosts):
  make = lambda **h: data.train_numpy_batches("digits", "test", start_step=7, **TRAIN, **h)
  one_host = take(make(), 4)  # Steps 7..10 cross the epoch boundary (9 steps of 40).
  for single, joined in zip(one_host, host_rows_joined(make, hosts, 4)):
    np.testing.assert_array_equal(single["label"], joined["label"])
    np.testing.assert_array_equal(single["image"], joined["image"])


def test_eval_reshuffled_pass_is_one_global_permutation():
  make = lambda **h: data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=64,
                                             num_examples=300, shuffle_seed=3, **h)
  one_host = list(make())
  joined = host_rows_joined(make, 2, len(one_host))
  for single, two in zip(one_host, joined):
    np.testing.assert_array_equal(single["image"], two["image"])
  # The pass is the 256 used examples permuted by jax.random.permutation(key(3), 256).
  ref_images, ref_labels = digits_reference("test")
  order = np.asarray(jax.random.permutation(jax.random.key(3), 256))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in one_host]),
                                ref_labels[:256][order])


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_each_training_host_reads_only_its_records(monkeypatch, hosts):
  source = sources._source("digits", "test", None)
  ranges = []

  def read(start, stop):
    ranges.append((start, stop))
    return source.read(start, stop)

  monkeypatch.setattr(sources, "_source", lambda *_: dataclasses.replace(source, read=read))
  for h in range(hosts):
    ranges.clear()
    take(data.train_numpy_batches("digits", "test", process_index=h, process_count=hosts,
                                  **TRAIN), 12)
    covered = np.concatenate([np.arange(a, b) for a, b in ranges])
    # Host h asks for records of its own reader shards only: 360 / hosts, each read once.
    np.testing.assert_array_equal(np.sort(covered), np.arange(360 // hosts * h,
                                                               360 // hosts * (h + 1)))


def test_train_shards_must_divide_batch_and_hosts():
  with pytest.raises(ValueError, match=r"num_shards=3 must divide the global batch 40"):
    take(data.train_numpy_batches("digits", "test", num_shards=3, **TRAIN), 1)
  with pytest.raises(ValueError, match=r"multiple of the 4 hosts.*data.num_shards"):
    take(data.train_numpy_batches("digits", "test", num_shards=2, process_index=0,
                                  process_count=4, **TRAIN), 1)


def test_train_subset_uses_only_subset_examples():
  _, ref_labels = digits_reference("train")
  idx = data.subset_indices(1437, 0.25, subset_seed=1)
  steps = len(idx) // 40
  labels = np.concatenate([b["label"] for b in take(data.train_numpy_batches(
      "digits", "train", subset_fraction=0.25, subset_seed=1, **TRAIN), steps)])
  assert np.all(np.bincount(labels, minlength=10) <= np.bincount(ref_labels[idx], minlength=10))


# ------------------------------------------------------------------------------------------
# Summary.


def test_summarize_matches_numpy():
  summary = data.summarize("digits", "test", image_size=8, examples_per_class=3, max_classes=4,
                           batch_size=50)
  ref_images, ref_labels = digits_reference("test")
  scaled = ref_images / 127.5 - 1
  np.testing.assert_array_equal(summary["class_counts"], np.bincount(ref_labels))
  np.testing.assert_allclose(summary["pixel_mean"], scaled.mean(axis=(0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(summary["pixel_std"], scaled.std(axis=(0, 1, 2)), atol=1e-6)
  assert summary["montage"].shape == (4 * 8, 3 * 8, 3)
  for c in range(4):
    for j in range(3):
      tile = summary["montage"][8 * c:8 * (c + 1), 8 * j:8 * (j + 1)]
      np.testing.assert_allclose(tile, ref_images[ref_labels == c][j] / 255.0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Errors.


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match=r"(?s)Unknown dataset 'cifar_10'.*cifar10.*digits"):
    data.dataset_info("cifar_10")


def test_unknown_split():
  with pytest.raises(ValueError, match="splits are"):
    list(data.eval_numpy_batches("digits", "val", image_size=8, global_batch_size=8))


def test_digits_validation_is_the_test_split():
  """Configs written for ImageNet's 'validation' split run on the digits unchanged."""
  def read(split):
    return list(data.eval_numpy_batches("digits", split, image_size=8, global_batch_size=40))
  for validation, test in zip(read("validation"), read("test"), strict=True):
    np.testing.assert_array_equal(validation["image"], test["image"])
    np.testing.assert_array_equal(validation["label"], test["label"])


def test_sample_seed_draws_a_seeded_sample_without_replacement():
  """`sample_seed`: num_examples distinct examples drawn from the whole split, read in
  canonical order; another seed draws others; None keeps the first num_examples."""
  def indices(sample_seed):
    return data.eval_plan(1_000, global_batch_size=10, num_examples=100,
                          sample_seed=sample_seed, process_index=0,
                          process_count=1).host_indices
  first, drawn, other = indices(None), indices(0), indices(1)
  np.testing.assert_array_equal(first, np.arange(100))
  assert len(set(drawn)) == 100 and np.all(np.diff(drawn) > 0) and drawn.max() > 500
  expected = np.sort(np.asarray(jax.random.permutation(jax.random.key(0), 1_000))[:100])
  np.testing.assert_array_equal(drawn, expected)
  assert set(drawn) != set(other)


@pytest.mark.parametrize("name,hint", [("cifar10", "tfds build cifar10"),
                                       ("imagenet2012", "manual_dir")])
def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path, name, hint):
  with pytest.raises(FileNotFoundError, match=hint):
    data.dataset_info(name, data_dir=str(tmp_path))
  assert not any(tmp_path.rglob("*.tar*"))  # nothing was downloaded


def test_too_many_examples():
  with pytest.raises(ValueError, match="only 360 examples"):
    data.eval_plan(360, global_batch_size=8, num_examples=400)
  with pytest.raises(ValueError, match="smaller than one global batch"):
    data.eval_plan(360, global_batch_size=64, num_examples=40)


# ------------------------------------------------------------------------------------------
# TFDS datasets, offline: genuine TFDS files written by the test.

MOCK_EXAMPLES = 20


@pytest.fixture
def fake_cifar10(tmp_path):
  """cifar10 with splits of MOCK_EXAMPLES, offline (see conftest.fake_tfds_cifar10)."""
  with fake_tfds_cifar10(str(tmp_path), MOCK_EXAMPLES) as data_dir:
    yield data_dir


def test_tfds_eval_matches_direct_read(fake_cifar10):
  info = data.dataset_info("cifar10", data_dir=fake_cifar10)
  assert info.num_classes == 10 and info.splits["test"] == MOCK_EXAMPLES
  builder = tfds.builder("cifar10", data_dir=fake_cifar10)
  raw = list(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
  images, labels = collect(data.eval_numpy_batches(
      "cifar10", "test", image_size=16, global_batch_size=8, data_dir=fake_cifar10))
  assert images.shape == (16, 16, 16, 3)
  np.testing.assert_array_equal(labels, [ex["label"] for ex in raw[:16]])
  expected = np.stack([np_resize_bilinear(ex["image"], 16, 16) for ex in raw[:16]]) / 127.5 - 1
  np.testing.assert_allclose(images, expected, atol=2e-5)


def test_tfds_train_resume(fake_cifar10):
  kwargs = dict(image_size=16, global_batch_size=8, seed=0, data_dir=fake_cifar10)
  full = take(data.train_numpy_batches("cifar10", "train", **kwargs), 5)
  resumed = take(data.train_numpy_batches("cifar10", "train", start_step=3, **kwargs), 2)
  assert full[0]["image"].shape == (8, 16, 16, 3)
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ------------------------------------------------------------------------------------------
# Sharding over 8 fake CPU devices.


@pytest.mark.slow
def test_batches_sharded_over_eight_devices():
  code = textwrap.dedent("""
      import numpy as np, jax
      from vit_repr import data, parallel
      mesh = parallel.make_mesh()
      assert mesh.devices.size == 8
      batches = data.eval_batches("digits", "test", image_size=8, global_batch_size=16,
                                  mesh=mesh, num_examples=48)
      assert len(batches) == 3
      ref = list(data.eval_numpy_batches("digits", "test", image_size=8, global_batch_size=16,
                                         num_examples=48, num_devices=8))
      # Device-major: device d's 2 rows of batch i are examples 6 d + 2 i, 6 d + 2 i + 1.
      canonical = list(data.eval_numpy_batches("digits", "test", image_size=8,
                                               global_batch_size=48, num_examples=48))[0]
      rows = (6 * np.arange(8)[None, :, None] + 2 * np.arange(3)[:, None, None]
              + np.arange(2)).reshape(3, 16)
      for i, expected in enumerate(ref):
        np.testing.assert_array_equal(expected["image"], canonical["image"][rows[i]])
      for batch, expected in zip(batches, ref):
        assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
        assert batch["image"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
        for shard in batch["image"].addressable_shards:
          rows = shard.index[0]
          assert shard.data.shape == (2, 8, 8, 3)
          np.testing.assert_array_equal(np.asarray(shard.data), expected["image"][rows])
        np.testing.assert_array_equal(np.asarray(batch["label"]), expected["label"])
      train = data.train_batches("digits", "test", image_size=8, global_batch_size=16,
                                 mesh=mesh, seed=1)
      host = data.train_numpy_batches("digits", "test", image_size=8, global_batch_size=16,
                                      seed=1)
      for _ in range(3):
        a, b = next(train), next(host)
        np.testing.assert_array_equal(np.asarray(a["image"]), b["image"])
      try:
        data.eval_batches("digits", "test", image_size=8, global_batch_size=12, mesh=mesh)
      except ValueError as e:
        assert "12" in str(e) and "8 devices" in str(e), e
      else:
        raise AssertionError("no error for a batch of 12 on 8 devices")
      print("OK")
      """)
  assert "OK" in run_python(code, num_devices=8).stdout


# ------------------------------------------------------------------------------------------
# Cluttered digits.


def magnified(grey: np.ndarray) -> np.ndarray:
  """uint8 `[n, 8 s, 8 s]`: grey digits `[n, 8, 8]`, every pixel an s x s block
  (s = `_CLUTTER_SCALE`)."""
  block = np.ones((1, sources._CLUTTER_SCALE, sources._CLUTTER_SCALE), np.uint8)
  return np.kron(grey.astype(np.uint8), block)


def cluttered_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The stored 'cluttered_digits' split: uint8 images `[n, 32, 32, 3]`, labels."""
  _, images, labels, splits = sources._cluttered_digits()
  return images[splits[split]], labels[splits[split]]


def digit_corners(canvases: np.ndarray, digits: np.ndarray) -> np.ndarray:
  """int `[n, 2]`: the first (row-major) top-left corner at which `canvases[i] >= digits[i]`
  everywhere under the digit, or (-1, -1) where there is none."""
  side = digits.shape[1]
  fits = np.concatenate([
      (np.lib.stride_tricks.sliding_window_view(canvases[i:i + 500], (side, side), axis=(1, 2))
       >= digits[i:i + 500, None, None]).all(axis=(3, 4))
      for i in range(0, len(canvases), 500)])
  first = fits.reshape(len(fits), -1).argmax(axis=1)
  corners = np.stack(np.unravel_index(first, fits.shape[1:]), axis=1)
  return np.where(fits.any(axis=(1, 2))[:, None], corners, -1)


def test_cluttered_digits_info():
  info = data.dataset_info("cluttered_digits")
  assert info.name == "cluttered_digits" and info.num_classes == 10
  assert dict(info.splits) == {"train": 5748, "test": 720, "validation": 720}
  assert info.image_shape == (32, 32, 3)
  assert "BSD-3" in info.license and "CC BY 4.0" in info.license
  assert "Alpaydin" in info.citation
  assert "cluttered_digits" in data.known_datasets()


@pytest.mark.parametrize("split", ["train", "test"])
def test_cluttered_digits_are_the_digits_placed_over_clutter(split):
  """Placement p of reference digit i is row p * n + i: its label, and its magnified digit
  lies under the canvas at some corner; every other pixel is clutter (a fragment value, no
  more than the fragments' area); corners cover the canvas uniformly."""
  images, labels = cluttered_split(split)
  ref_images, ref_labels = digits_reference(split)
  placements = sources._CLUTTER_PLACEMENTS[split]
  assert images.shape == (placements * len(ref_labels), 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.tile(ref_labels, placements))
  canvases = images[..., 0]
  np.testing.assert_array_equal(images, np.repeat(canvases[..., None], 3, axis=-1))
  digits = np.tile(magnified(ref_images[..., 0]), (placements, 1, 1))
  side, fragment_side = digits.shape[1], sources._CLUTTER_FRAGMENT_SIZE * sources._CLUTTER_SCALE
  corners = digit_corners(canvases, digits)
  assert np.all(corners >= 0), f"{np.sum(corners[:, 0] < 0)} canvases lack their digit"
  # The digit pasted at its corner; any pixel that differs is a fragment pixel: an ink value
  # of a digit scaled by _CLUTTER_INTENSITY.
  placed = np.zeros_like(canvases)
  for canvas, digit, (top, left) in zip(placed, digits, corners):
    canvas[top:top + side, left:left + side] = digit
  ink = np.unique(ref_images)
  fragment_values = np.round(ink * sources._CLUTTER_INTENSITY)
  clutter = canvases != placed
  assert np.isin(canvases[clutter], fragment_values).all()
  assert clutter.any()
  ink_pixels = np.count_nonzero(canvases, axis=(1, 2))
  assert np.all(ink_pixels >= np.count_nonzero(digits, axis=(1, 2)))
  assert np.all(ink_pixels <= np.count_nonzero(digits, axis=(1, 2))
                + sources._CLUTTER_FRAGMENTS * fragment_side**2)
  # Uniform corners: every position occurs, the mean within 5 standard errors of the centre.
  positions = 32 - side + 1
  standard_error = np.sqrt((positions**2 - 1) / 12 / len(corners))
  for axis in range(2):
    assert np.all(np.bincount(corners[:, axis], minlength=positions) > 0)
    assert abs(corners[:, axis].mean() - (positions - 1) / 2) < 5 * standard_error


def test_cluttered_digits_placements_are_drawn_independently():
  """The placements of one digit, and the test and train splits, use different corners."""
  train, _ = cluttered_split("train")
  test, _ = cluttered_split("test")
  train_digits = magnified(digits_reference("train")[0][..., 0])
  test_digits = magnified(digits_reference("test")[0][..., 0])
  n = len(test_digits)
  first, second = (digit_corners(test[p * n:(p + 1) * n, ..., 0], test_digits) for p in (0, 1))
  train_first = digit_corners(train[:n, ..., 0], train_digits[:n])
  assert np.mean(np.all(first == second, axis=1)) < 0.1
  assert np.mean(np.all(first == train_first, axis=1)) < 0.1


def test_cluttered_digits_splits_share_no_digit():
  """The splits are built from disjoint digits (their reference split, test above) and share
  no canvas."""
  _, _, _, digit_splits = sources._digits()
  assert not np.intersect1d(digit_splits["train"], digit_splits["test"]).size
  train, _ = cluttered_split("train")
  test, _ = cluttered_split("test")
  train_rows = {row.tobytes() for row in train[..., 0]}
  assert not any(row.tobytes() in train_rows for row in test[..., 0])
  assert len({row.tobytes() for row in test[..., 0]}) == len(test)


def test_cluttered_split_fragments_come_from_the_other_digits(monkeypatch):
  """Flat digits of distinct values (fragments at half intensity): row p * n + i holds digit i
  and fragments of other digits only, at most `_CLUTTER_FRAGMENTS` of them."""
  monkeypatch.setattr(sources, "_CLUTTER_INTENSITY", 0.5)
  values = np.array([60, 100, 140, 180, 220, 252])
  digits = np.broadcast_to(values[:, None, None], (6, 8, 8)).astype(np.uint8)
  canvases = sources._cluttered_split(digits, 3, seed=0)
  assert canvases.shape == (18, 32, 32) and canvases.dtype == np.uint8
  assert np.all(digit_corners(canvases, magnified(np.tile(digits, (3, 1, 1)))) >= 0)
  for row, canvas in enumerate(canvases):
    own = values[row % 6]
    clutter = set(np.unique(canvas)) - {0, own}
    assert clutter <= set(values[values != own] // 2), row
    assert len(clutter) <= sources._CLUTTER_FRAGMENTS
  assert set(np.unique(canvases)) - {0, *values}  # Some clutter shows.


def test_cluttered_split_is_seeded_and_stored_read_only():
  digits = digits_reference("test")[0][..., 0].astype(np.uint8)
  first = sources._cluttered_split(digits, 2, seed=2)
  np.testing.assert_array_equal(first, sources._cluttered_split(digits, 2, seed=2))
  assert not np.array_equal(first, sources._cluttered_split(digits, 2, seed=3))
  _, images, labels, splits = sources._cluttered_digits()
  for array in (images, labels, splits["test"]):
    with pytest.raises(ValueError, match="read-only"):
      array[0] = 1


def layered(pieces, corners, canvas_size):
  """`[len(pieces), canvas_size, canvas_size]`: each piece alone on a dark canvas at its
  top-left corner."""
  layers = np.zeros((len(pieces), canvas_size, canvas_size), np.int64)
  for layer, piece, (top, left) in zip(layers, pieces, corners):
    layer[top:top + piece.shape[0], left:left + piece.shape[1]] = piece
  return layers


def test_place_with_clutter_draws_fragments_then_digit_and_keeps_the_maximum():
  # A 5 x 7 digit: its row and column are drawn from different ranges.
  digit = np.random.default_rng(1).integers(100, 256, (5, 7)).astype(np.uint8)
  fragments = np.random.default_rng(2).integers(100, 256, (3, 4, 4)).astype(np.uint8)
  rng = np.random.default_rng(0)
  canvas = sources.place_with_clutter(digit, fragments, rng, canvas_size=9)
  draws = np.random.default_rng(0)
  corners = [(draws.integers(0, 9 - 4 + 1), draws.integers(0, 9 - 4 + 1)) for _ in range(3)]
  corners.append((draws.integers(0, 9 - 5 + 1), draws.integers(0, 9 - 7 + 1)))
  layers = layered([*fragments, digit], corners, 9)
  # The pieces overlap, and the digit lies under a fragment: np.add or pasting would differ.
  assert (layers > 0).sum(axis=0).max() > 1
  assert np.any((layers[3] > 0) & (layers[3] < layers[:3].max(axis=0)))
  assert canvas.dtype == np.uint8 and canvas.shape == (9, 9)
  np.testing.assert_array_equal(canvas, layers.max(axis=0))
  assert rng.integers(0, 2**30) == draws.integers(0, 2**30)  # No other draws.


def test_place_with_clutter_digit_as_large_as_the_canvas_lands_at_the_origin():
  digit = np.random.default_rng(3).integers(0, 256, (12, 12)).astype(np.uint8)
  fragments = np.full((2, 4, 4), 200, np.uint8)
  canvas = sources.place_with_clutter(digit, fragments, np.random.default_rng(5),
                                      canvas_size=12)
  draws = np.random.default_rng(5)
  corners = [(draws.integers(0, 12 - 4 + 1), draws.integers(0, 12 - 4 + 1)) for _ in range(2)]
  corners.append((0, 0))
  np.testing.assert_array_equal(canvas, layered([*fragments, digit], corners, 12).max(axis=0))


def test_cluttered_digits_served_by_eval_batches():
  """Sharded eval batches at the native 32 px hold the test canvases, scaled to [-1, 1], with
  their labels, in canonical order; 'validation' is the same split."""
  batches = data.eval_batches("cluttered_digits", "test", image_size=32, global_batch_size=120,
                              mesh=parallel.make_mesh())
  assert len(batches) == 6 and batches.plan.num_examples == 720
  rows = [(np.asarray(b["image"]), np.asarray(b["label"])) for b in batches]
  order = batches.plan.positions.ravel()
  images, labels = np.empty((720, 32, 32, 3), np.float32), np.empty(720, np.int64)
  images[order] = np.concatenate([image for image, _ in rows])
  labels[order] = np.concatenate([label for _, label in rows])
  canvases, split_labels = cluttered_split("test")
  np.testing.assert_array_equal(labels, split_labels)
  np.testing.assert_array_equal(labels, np.tile(digits_reference("test")[1], 2))
  np.testing.assert_allclose(images, canvases / 127.5 - 1, atol=2e-5)
  assert images.min() >= -1.0 and images.max() <= 1.0
  validation, validation_labels = collect(data.eval_numpy_batches(
      "cluttered_digits", "validation", image_size=32, global_batch_size=720))
  np.testing.assert_array_equal(validation_labels, split_labels)
  np.testing.assert_allclose(validation, canvases / 127.5 - 1, atol=2e-5)
