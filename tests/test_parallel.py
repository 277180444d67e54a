"""Tests for vit_repr.parallel: host ranges, batch-size checks, sharding on 8 fake devices."""

import textwrap

import jax
import numpy as np
import pytest

from tests.conftest import run_python
from vit_repr import parallel


@pytest.mark.parametrize("num_examples,hosts", [(10, 1), (10, 3), (1000, 8), (7, 7)],
                         ids=["one-host", "remainder", "many", "one-each"])
def test_host_shard_ranges_disjoint_contiguous_equal(num_examples, hosts):
  ranges = [parallel.host_shard(num_examples, h, hosts) for h in range(hosts)]
  per_host = num_examples // hosts
  assert all(stop - start == per_host for start, stop in ranges)
  covered = np.concatenate([np.arange(start, stop) for start, stop in ranges])
  # Disjoint, in host order, covering [0, hosts * per_host); the remainder is read by no host.
  np.testing.assert_array_equal(covered, np.arange(hosts * per_host))


def test_host_shard_defaults_to_this_process():
  assert parallel.host_shard(10) == (0, 10)


@pytest.mark.parametrize("args,match", [((10, 3, 3), r"process_index 3 is not in \[0, 3\)"),
                                        ((2, 0, 3), "cannot be split over 3 hosts")],
                         ids=["bad-index", "too-few-examples"])
def test_host_shard_errors(args, match):
  with pytest.raises(ValueError, match=match):
    parallel.host_shard(*args)


def test_single_device_mesh_and_batch_checks():
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert mesh.axis_names == (parallel.DATA_AXIS,)
  assert parallel.host_batch_size(5, mesh) == 5
  with pytest.raises(ValueError, match="must be positive"):
    parallel.check_global_batch_size(0, mesh)
  with pytest.raises(ValueError, match="at least one device"):
    parallel.make_mesh([])


@pytest.mark.slow
def test_sharding_on_eight_devices():
  code = textwrap.dedent("""
      import numpy as np, jax
      from vit_repr import parallel
      mesh = parallel.make_mesh()
      assert mesh.devices.shape == (8,)
      assert parallel.host_batch_size(16, mesh) == 16
      try:
        parallel.check_global_batch_size(12, mesh)
      except ValueError as e:
        assert "12" in str(e) and "8 devices" in str(e) and "16" in str(e), e
      else:
        raise AssertionError("12 examples accepted on 8 devices")
      x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
      y = np.arange(16, dtype=np.int32)
      batch = parallel.global_batch({"x": x, "y": y}, mesh)
      assert batch["x"].shape == (16, 3)
      for shard in batch["x"].addressable_shards:
        assert shard.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
      np.testing.assert_array_equal(np.asarray(batch["y"]), y)
      # A jitted reduction over the sharded batch equals the NumPy one.
      total = jax.jit(lambda b: b["x"].sum(axis=0))(batch)
      np.testing.assert_allclose(np.asarray(total), x.astype(np.float64).sum(axis=0))
      rep = jax.device_put(np.ones(3, np.float32), parallel.replicated(mesh))
      assert all(s.data.shape == (3,) for s in rep.addressable_shards)
      try:
        parallel.global_batch({"x": x[:12]}, mesh)
      except ValueError as e:
        assert "12" in str(e), e
      else:
        raise AssertionError("a host batch of 12 accepted on 8 devices")
      print("OK")
      """)
  assert "OK" in run_python(code, num_devices=8).stdout
