"""Agreement and speed of vit_repr.similarity against the published implementations pip installs.

A reference check, not a test: the peers live in the separate PyTorch environment of the other
benchmarks (`--peers_python`), with these packages added there and never a test dependency:

  <peers python> -m pip install rsatoolbox repsim polars scikit-learn
  <peers python> -m pip install --no-deps deep-reps platonic-universe

Two stages of this one script:

1. `--stage=peer`, run with the peers' python: reads the input pairs from `--workdir`, runs
   every peer on every pair, writes their values, times and errors to `peers.json`.
2. `--stage=ours` (default `all`: the peer stage first, in a subprocess), run with this repo's
   venv: writes the inputs, runs `vit_repr.similarity.compare` on the same pairs and prints a
   markdown table: our value, the peer's value, |difference|, our time, the peer's time and
   their ratio, with the float32 GEMM peak of this machine measured in the same run (NumPy and
   XLA, `benchmarks/timing.py`) and the peers' torch GEMM rate.

  .venv/bin/python benchmarks/similarity_peers.py

Inputs (float64, NumPy seed 0): features with power-law variances (feature j scaled by
(1 + j)^-1/2); 'related' pairs y = x W / sqrt(p) + 0.5 noise with W Gaussian, 'unrelated' pairs
drawn independently, at n = 256, p = 2048 (more features than examples, where published
PWCCA / SVD code is known to fail) and n = 500, p = 64; 'rank-50' is n = 256, p = 4096 built
from 50 latent factors on each side (y's factors = x's mixed plus noise).
Timing: per call, one warm-up then the median of 3 runs; a call whose warm-up takes longer than
`--slow` seconds (default 5) reports the warm-up alone (marked '1x'). Thread settings are left
as they come and printed (NumPy's BLAS on our side; torch's intra-op threads and NumPy's BLAS on
the peers' side).

Peers (pip names; the versions installed are printed with the table):
* rsatoolbox (Kriegeskorte lab): RSA. `calc_rdm(method='correlation')` is 1 - Pearson r between
  examples, each centred over its features: ours. Its 'euclidean' RDM is the SQUARED distance
  divided by p, so for rsa(dissimilarity='euclidean') the peer's RDM is square-rooted before
  comparing (RDMs(sqrt(d))). comparison='spearman' -> compare(method='spearman') (scipy ranks,
  ties averaged, then Pearson: ours); 'pearson' -> method='corr'.
* repsim (Kisung You, C++/Eigen): `cka([x, y], kernel_type='linear', estimator='gretton')` is
  linear CKA with the biased HSIC: ours. `pwcca([x, y])` has no SVD step (rank tolerance 1e-12)
  and the weights of ours, but averages the two directions: compared with the mean of
  pwcca(x, y) and pwcca(y, x), variance_kept = 1. `svcca([x, y], summary_type='pillai')` is NOT
  Raghu et al.'s SVCCA: it orthonormalises each side first, so its 99%-variance truncation
  acts on a basis whose singular values are all 1 (it drops ~1% of the directions whatever the
  spectrum), and it divides the sum of correlations by the rank of the uncentred input, not by
  the number of canonical pairs; reported for the record, marked 'differs'.
* pytorch-cka: `cka_from_features` uses the UNBIASED HSIC (Song et al. 2012) and clamps to
  [0, 1]; ours is the biased estimator of Kornblith et al. 2019, so they differ by O(p/n)
  terms when p is not small against n (the unbiased value of an unrelated pair is ~0, the
  biased one is not); marked 'differs'.
* deep-reps (Mezosky): `centered_kernel_alignment` (biased HSIC, linear kernel; a Python loop
  over the n^2 pairs): ours. `orthogonal_procrustes(R, R')` is sqrt(||R||^2 + ||R'||^2 -
  2||R^T R'||_*) on the matrices as given; fed columns-centred, unit-Frobenius-norm inputs it is
  our procrustes distance. `compute_standard_svcca(x, y, variance_retained)` divides the sum of
  canonical correlations by the width p of x instead of by the number of pairs min(k_x, k_y);
  its value is rescaled by p / min(k_x, k_y), with k_x, k_y from its own rule (first k whose
  cumulative explained variance >= variance_retained), evaluated on the n x n Gram's
  eigenvalues (the same non-zero ones as its p x p covariance). `compute_wvcca` (its PWCCA)
  calls compute_cca with an extra argument and raises TypeError: reported as the error.
* platonic-universe (`pu.metrics.mknn`): mutual k-NN of Huh et al. 2024 with scikit-learn's
  cosine nearest neighbours excluding the query itself: ours with the same k.
Their packages' __init__ files import heavy unrelated modules (open_clip, astropt, datasets),
so deep-reps and platonic-universe are installed with --no-deps and their measure modules are
imported without running the package __init__.

Not on pip: netrep (Williams et al.; Procrustes / angular shape metrics, LinearMetric(alpha=1,
center_columns=True, score_method='euclidean'|'angular') -- installed from GitHub only),
anatome (SVCCA / PWCCA / CKA in PyTorch; GitHub only), google/svcca (a repository of scripts),
platonic-rep (Huh et al.'s own mutual_knn / cknna; GitHub only). No pip package implements
CKNNA or angular CKA (arccos of linear CKA): those rows say 'no pip package'.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = "/root/.cache/vit_repr_peers/bin/python"
PEER_PACKAGES = ("torch", "numpy", "scipy", "rsatoolbox", "repsim", "pytorch-cka", "deep-reps",
                 "platonic-universe", "scikit-learn")
# (measure, our options, peer, how ours is taken: 'xy' compare(x, y), 'sym' the mean of both
# directions). peer None: no pip package implements it.
ROWS = (
    ("cka", {}, "repsim", "xy"),
    ("cka", {}, "deep-reps", "xy"),
    ("cka", {}, "pytorch-cka", "xy"),
    ("angular_cka", {}, None, "xy"),
    ("svcca", {"variance_kept": 0.99}, "deep-reps", "xy"),
    ("svcca", {"variance_kept": 0.99}, "repsim", "xy"),
    ("pwcca", {"variance_kept": 1.0}, "repsim", "sym"),
    ("pwcca", {"variance_kept": 1.0}, "deep-reps", "xy"),
    ("procrustes", {}, "deep-reps", "xy"),
    ("rsa", {"dissimilarity": "correlation", "comparison": "spearman"}, "rsatoolbox", "xy"),
    ("rsa", {"dissimilarity": "euclidean", "comparison": "pearson"}, "rsatoolbox", "xy"),
    ("mutual_knn", {"k": 10}, "platonic-universe", "xy"),
    ("cknna", {"k": 10}, None, "xy"),
)
# Where the peer computes something else: (measure, peer) -> why, in the table.
DIFFERS = {("cka", "pytorch-cka"): "unbiased HSIC", ("svcca", "repsim"): "not Raghu's SVCCA",
           ("cka", "deep-reps"): "peer bug: H = I - 11^T"}


def make_inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The input pairs, name -> (x, y), deterministic."""
  rng = np.random.default_rng(0)

  def layer(n, p):
    return rng.standard_normal((n, p)) / np.sqrt(1.0 + np.arange(p))

  def related(n, p):
    x = layer(n, p)
    return x, x @ rng.standard_normal((p, p)) / np.sqrt(p) + 0.5 * layer(n, p)

  def rank_50(n, p):
    z = rng.standard_normal((n, 50))
    mixed = z @ rng.standard_normal((50, 50)) / np.sqrt(50) + 0.5 * rng.standard_normal((n, 50))
    return z @ rng.standard_normal((50, p)), mixed @ rng.standard_normal((50, p))

  return {"related n=256 p=2048": related(256, 2048),
          "unrelated n=256 p=2048": (layer(256, 2048), layer(256, 2048)),
          "related n=500 p=64": related(500, 64),
          "unrelated n=500 p=64": (layer(500, 64), layer(500, 64)),
          "rank-50 n=256 p=4096": rank_50(256, 4096)}


def timed(fn, repeats: int, slow: float) -> tuple[float, float, int]:
  """(fn()'s value, median seconds per call, calls timed): one warm-up, then `repeats` calls,
  unless the warm-up took over `slow` seconds (its time is then reported alone)."""
  start = time.perf_counter()
  value = fn()
  first = time.perf_counter() - start
  if first > slow:
    return value, first, 1
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return value, float(np.median(seconds)), repeats


def blas_threads() -> str:
  """The BLAS libraries NumPy (and anything loaded so far) uses, with their thread counts."""
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  return ", ".join(sorted({f"{i['internal_api']} {i['num_threads']} threads"
                          for i in threadpoolctl.threadpool_info()}))


# ----------------------------------------------------------------------------- peer stage


def _submodule(package: str, name: str):
  """`package.name` imported without running `package/__init__.py`."""
  import importlib  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  if package not in sys.modules:
    stub = types.ModuleType(package)
    stub.__path__ = list(importlib.util.find_spec(package).submodule_search_locations)
    sys.modules[package] = stub
  return importlib.import_module(f"{package}.{name}")


def _components(x: np.ndarray, variance_retained: float) -> int:
  """deep-reps' pca() count of components, from the n x n Gram's eigenvalues."""
  xc = x - x.mean(0)
  lam = np.sort(np.linalg.eigvalsh(xc @ xc.T))[::-1]
  return int(np.searchsorted(np.cumsum(lam / lam.sum()), variance_retained)) + 1


def peer_functions() -> dict:
  """(measure, peer) -> f(x, y, **our options), the peer's value in our convention."""
  import cka as pytorch_cka  # pylint: disable=import-outside-toplevel
  import repsim  # pylint: disable=import-outside-toplevel
  import rsatoolbox  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  deep_cca = _submodule("deep_reps", "cca_measures")
  deep_rsm = _submodule("deep_reps", "rsm_measures")
  deep_align = _submodule("deep_reps", "alignment_measures")
  pu_metrics = _submodule("pu", "metrics")
  t = torch.from_numpy

  def unit(a):
    a = a - a.mean(0)
    return t(a / np.linalg.norm(a))

  def deep_svcca(x, y, variance_kept):
    raw = deep_cca.compute_standard_svcca(t(x), t(y), variance_kept)
    return raw * x.shape[1] / min(_components(x, variance_kept), _components(y, variance_kept))

  def rsa(x, y, dissimilarity, comparison):
    rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(a), method=dissimilarity)
            for a in (x, y)]
    if dissimilarity == "euclidean":  # rsatoolbox's: squared distance / p.
      rdms = [rsatoolbox.rdm.RDMs(np.sqrt(np.maximum(r.get_vectors(), 0.0))) for r in rdms]
    method = {"spearman": "spearman", "pearson": "corr"}[comparison]
    return float(rsatoolbox.rdm.compare(rdms[0], rdms[1], method=method)[0, 0])

  return {
      ("cka", "repsim"): lambda x, y: repsim.cka([x, y], "linear", "gretton")[0, 1],
      ("cka", "deep-reps"): lambda x, y: float(deep_rsm.centered_kernel_alignment(t(x), t(y))),
      ("cka", "pytorch-cka"): lambda x, y: float(pytorch_cka.cka_from_features(t(x), t(y))),
      ("svcca", "deep-reps"): deep_svcca,
      ("svcca", "repsim"): lambda x, y, variance_kept: repsim.svcca([x, y], "pillai")[0, 1],
      ("pwcca", "repsim"): lambda x, y, variance_kept: repsim.pwcca([x, y])[0, 1],
      ("pwcca", "deep-reps"): lambda x, y, variance_kept: deep_cca.compute_wvcca(t(x), t(y)),
      ("procrustes", "deep-reps"): lambda x, y: deep_align.orthogonal_procrustes(unit(x),
                                                                                unit(y)),
      ("rsa", "rsatoolbox"): rsa,
      ("mutual_knn", "platonic-universe"): lambda x, y, k: float(pu_metrics.mknn(x, y, k=k)),
  }


def torch_gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  a = torch.randn(n, n)
  return 2.0 * n**3 / min(timed(lambda: a @ a, 1, 0.0)[1] for _ in range(repeats)) / 1e9


def stage_peer(workdir: str, repeats: int, slow: float) -> None:
  """Runs every peer on every pair; writes peers.json."""
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  functions = peer_functions()
  pairs = np.load(os.path.join(workdir, "inputs.npz"))
  results = []
  for case in sorted({key.rsplit("/", 1)[0] for key in pairs.files}):
    x, y = pairs[f"{case}/x"], pairs[f"{case}/y"]
    for measure, options, peer, _ in ROWS:
      if peer is None:
        continue
      row = {"case": case, "measure": measure, "options": options, "peer": peer}
      try:
        fn = functions[measure, peer]
        row["value"], row["seconds"], row["calls"] = timed(
            lambda: float(fn(x, y, **options)), repeats, slow)
      except Exception as error:  # pylint: disable=broad-except
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
      results.append(row)
      print(f"peer: {case} {measure} {peer}: {row.get('value', row.get('error'))}", flush=True)
  meta = {"versions": {p: importlib.metadata.version(p) for p in PEER_PACKAGES},
          "threads": f"torch {torch.get_num_threads()} intra-op threads; {blas_threads()}",
          "torch_gemm": torch_gemm_gflops()}
  with open(os.path.join(workdir, "peers.json"), "w") as f:
    json.dump({"meta": meta, "results": results}, f)


# ----------------------------------------------------------------------------- our stage


def ours(similarity, x, y, measure: str, options: dict, how: str) -> float:
  if how == "sym":
    return 0.5 * (similarity.compare(x, y, measure, **options) +
                  similarity.compare(y, x, measure, **options))
  return similarity.compare(x, y, measure, **options)


def _fmt_seconds(seconds: float, calls: int) -> str:
  return f"{1e3 * seconds:.3g}" + (" (1x)" if calls == 1 else "")


def table_rows(similarity, pairs: dict, peers: list[dict], repeats: int, slow: float):
  """Markdown rows, one per (pair, measure, peer)."""
  by_key = {(r["case"], r["measure"], json.dumps(r["options"]), r["peer"]): r for r in peers}
  for case, (x, y) in pairs.items():
    timings = {}
    for measure, options, peer, how in ROWS:
      key = (measure, json.dumps(options), how)
      if key not in timings:
        timings[key] = timed(lambda: ours(similarity, x, y, measure, options, how), repeats, slow)
      value, seconds, calls = timings[key]
      label = measure + "".join(f" {k}={v}" for k, v in options.items())
      if how == "sym":
        label += " (mean of both orders)"
      cells = [case, label, peer or "-", f"{value:.6f}"]
      theirs = by_key.get((case, measure, json.dumps(options), peer))
      if peer is None:
        cells += ["no pip package", "", _fmt_seconds(seconds, calls), "", ""]
      elif "error" in theirs:
        cells += [theirs["error"][:90], "", _fmt_seconds(seconds, calls), "", ""]
      else:
        diff = f"{abs(value - theirs['value']):.2e}"
        if (measure, peer) in DIFFERS:
          diff += f" ({DIFFERS[measure, peer]})"
        cells += [f"{theirs['value']:.6f}", diff, _fmt_seconds(seconds, calls),
                  _fmt_seconds(theirs["seconds"], theirs["calls"]),
                  f"{theirs['seconds'] / seconds:.3g}"]
      yield "| " + " | ".join(cells) + " |"


def stage_ours(workdir: str, repeats: int, slow: float) -> None:
  sys.path.insert(0, ROOT)
  from absl import logging  # pylint: disable=import-outside-toplevel
  from benchmarks import timing  # pylint: disable=import-outside-toplevel
  from vit_repr import similarity  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.ERROR)  # The CCA measures warn about degenerate sizes.
  with open(os.path.join(workdir, "peers.json")) as f:
    peers = json.load(f)
  pairs = make_inputs()
  gemm = timing.gemm_peaks(2048, 5)
  meta = peers["meta"]
  print(f"float32 GEMM peak (2048^3): numpy {gemm['numpy']:.0f} GFLOP/s, XLA "
        f"{gemm['xla']:.0f} GFLOP/s, peers' torch {meta['torch_gemm']:.0f} GFLOP/s; "
        f"{os.cpu_count()} CPUs")
  print(f"threads: ours: {blas_threads()}; peers: {meta['threads']}")
  print("peers: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
  print(f"times: ms per call, median of {repeats} after a warm-up; (1x): the warm-up alone "
        f"(over {slow:g} s)\n")
  print("| pair | measure | peer | ours | peer's | abs diff | ours ms | peer ms | peer/ours |")
  print("|---|---|---|---|---|---|---|---|---|")
  for line in table_rows(similarity, pairs, peers["results"], repeats, slow):
    print(line, flush=True)


def write_inputs(workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  arrays = {f"{case}/{side}": a for case, pair in make_inputs().items()
            for side, a in zip("xy", pair)}
  np.savez(os.path.join(workdir, "inputs.npz"), **arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", choices=("all", "peer", "ours"), default="all")
  parser.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--slow", type=float, default=5.0,
                      help="seconds: a slower warm-up is reported alone, without repeats")
  parser.add_argument("--peers_python", default=PEERS_PYTHON)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="similarity_peers_")
  if args.stage == "peer":
    stage_peer(workdir, args.repeats, args.slow)
    return
  if args.stage == "all":
    write_inputs(workdir)
    subprocess.run([args.peers_python, os.path.abspath(__file__), "--stage=peer",
                    f"--workdir={workdir}", f"--repeats={args.repeats}", f"--slow={args.slow}"],
                   check=True)
  stage_ours(workdir, args.repeats, args.slow)


if __name__ == "__main__":
  main()
