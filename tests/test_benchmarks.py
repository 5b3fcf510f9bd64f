"""The PyTorch side-by-side benchmark runs end to end (on ViT-Ti/16, to stay quick)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vit_vs_torch.py"


def _module():
  spec = importlib.util.spec_from_file_location("vit_vs_torch", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _macs(d, mlp, layers, patch=16, tokens=197):
  """One 224 px forward, written out: embedding, blocks (projections, MLP, attention), head."""
  block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
  return (tokens - 1) * patch * patch * 3 * d + layers * block + d * 1000


def test_flop_counts():
  from vit_jax import models
  from vit_jax.planning import aot

  bench = _module()
  assert _macs(768, 3072, 12) == pytest.approx(
    17.6e9, rel=3e-3
  )  # the usual figure, rounded (17.56e9)
  # The library's analytic count is the one written out here (integer arithmetic: exact).
  b16 = models.create_model("ViT-B_16", num_classes=1000)
  assert aot.model_flops_per_image(b16, train=False) == 2 * _macs(768, 3072, 12)
  assert aot.model_flops_per_image(b16, train=True) == 3 * 2 * _macs(768, 3072, 12)
  l32 = models.create_model("ViT-L_32", num_classes=1000)
  assert aot.model_flops_per_image(l32, train=False) == 2 * _macs(
    1024, 4096, 24, patch=32, tokens=50
  )
  want = 35.2 * _macs(192, 768, 12) / _macs(768, 3072, 12)
  # The same float64 ratio of integer counts, in another order: a few ulps (~1e-16).
  assert bench.gflop_per_image("ViT-Ti_16") == pytest.approx(want, rel=1e-9)
  want = 35.2 * _macs(1024, 4096, 24, patch=32, tokens=50) / _macs(768, 3072, 12)
  assert bench.gflop_per_image("ViT-L_32") == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_runs_both_sides_and_reports(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(SCRIPT),
      "--model",
      "ViT-Ti_16",
      "--quick",
      "--batches",
      "2",
      "--dtypes",
      "fp32",
      "--skip",
      "compile",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert [(x["kind"], x["batch"]) for x in r["runs"]] == [
    ("inference", 2),
    ("attention", 8),
    ("train", 8),
  ]
  for x in r["runs"]:
    assert x["jax_img_s"] > 0 and x["torch_img_s"] > 0
    # The report's own float64 numbers recombined in another order: a few ulps.
    assert x["ratio"] == pytest.approx(x["jax_img_s"] / x["torch_img_s"])
    flops = r["gflop_per_image"] * (3 if x["kind"] == "train" else 1)
    assert x["jax_gflops"] == pytest.approx(x["jax_img_s"] * flops)
  assert min(r["matmul_gflops"].values()) > 0
  # Fresh workers hold at least the framework and the weights, and well under this machine's RAM.
  assert all(100 < mib < 8000 for mib in r["peak_rss_mib_batch8"].values())
  # The long-lived workers also trained at batch 8, so each holds at least what a fresh one
  # peaked at for inference at batch 8.
  for side, mib in r["peak_rss_mib_workers"].items():
    assert r["peak_rss_mib_batch8"][side] <= mib < 8000
  assert r["malloc"] == "default (the C library's)"
  assert "| inference fp32 | 2 |" in proc.stdout and "| train step fp32" in proc.stdout
  assert "| inference fp32 + attention maps | 8 |" in proc.stdout


def test_a_missing_allocator_is_refused_before_any_work():
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--malloc", "/nonexistent/libtcmalloc.so"],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert (
    proc.returncode == 2 and "--malloc /nonexistent/libtcmalloc.so: no such file" in proc.stderr
  )
  assert proc.stdout == ""


# Debian's packages of the allocators `--malloc` is meant for.
ALLOCATORS = (
  "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
  "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
)


@pytest.mark.slow
def test_the_allocator_is_preloaded_into_the_worker_or_refused(tmp_path):
  from vit_jax import models
  from vit_jax.weights import checkpoint

  bench = _module()
  weights = str(tmp_path / "weights.npz")
  checkpoint.save(
    models.init_params(models.create_model("ViT-Ti_16", num_classes=1000), 0), weights
  )
  # The dynamic loader skips a file it cannot preload with a warning and runs on.
  junk = tmp_path / "libjunk.so"
  junk.write_text("not a shared library")
  with pytest.raises(RuntimeError, match=f"--malloc {junk}: not loaded by the jax worker"):
    bench.Worker("jax", weights, "ViT-Ti_16", str(junk))
  lib = next((p for p in ALLOCATORS if os.path.isfile(p)), None)
  if lib is None:
    pytest.skip(
      "neither Debian allocator package (libtcmalloc-minimal4, libjemalloc2) is installed"
    )
  plain = bench.Worker("jax", weights, "ViT-Ti_16")
  try:
    assert plain("mapped", path=lib) == {"mapped": False}
  finally:
    plain.close()
  preloaded = bench.Worker("jax", weights, "ViT-Ti_16", lib)
  try:
    assert preloaded("mapped", path=lib) == {"mapped": True}
  finally:
    preloaded.close()


@pytest.mark.slow
def test_both_training_steps_make_the_same_update():
  """The timed steps do the same work: clipping at norm 1, then SGD momentum, from one start."""
  bench = _module()
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--check-step", "--model", "ViT-Ti_16"],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  # The random weights' gradient is well over the clipping norm (measured 14), so a side
  # that skipped clipping would move 14x further.
  assert r["grad_norm"] > 2 * bench.CLIP_NORM
  # A first momentum step is lr * the clipped gradient. PyTorch divides by norm + 1e-6
  # (5e-6 relative here); float32 norms add ~1e-7.
  for side in ("jax", "torch"):
    assert r["update_norm"][side] == pytest.approx(bench.LR * bench.CLIP_NORM, rel=1e-4)
  # Element by element: measured 1.4e-5 of the largest update (two float32 backward passes
  # summing in different orders); a different loss, learning rate or parameter mapping
  # would be of the order of the update itself.
  assert r["max_abs_update_diff"] < 1e-3 * r["max_abs_update"]


@pytest.mark.slow
def test_the_resize_drift_measurement_runs_and_sees_antialiasing_only_when_shrinking():
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hf_resize_drift.py"
  run = subprocess.run(
    [sys.executable, str(script), "--steps", "10", "--crops", "7", "--json-only"],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads(run.stdout.strip().splitlines()[-1])["by crop size"]
  # At the model's size both resizes copy the pixels (float32 rounding of x / 127.5 - 1).
  assert rows["64-64px"]["pixels max |diff|"] < 1e-6
  # Shrinking 4-7x, PIL's antialiasing averages what a plain bilinear resize samples.
  assert rows["257-448px"]["pixels max |diff|"] > 0.1


@pytest.mark.slow
def test_the_bf16_agreement_measurement_runs(tmp_path):
  import ckpt_fixtures as cf
  import data_fixtures as df

  # A stand-in for a finished demo run: digits 5-9 and a small model over them.
  df.write_digits(str(tmp_path / "demo" / "digits" / "b"), range(5, 10), size=24)
  (tmp_path / "demo" / "finetune").mkdir()
  cf.write_original(
    tmp_path / "demo" / "finetune" / "final.npz",
    cf.Spec(hidden=48, mlp=96, heads=3, layers=2, patch=4, image_size=24, classes=5),
  )
  (tmp_path / "demo" / "finetune" / "labels.txt").write_text(
    "".join(f"digit_{d}\n" for d in range(5, 10))
  )
  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_agreement.py"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("VIT_JAX_DTYPE", None)
  run = subprocess.run(
    [sys.executable, str(script), "--demo-workdir", str(tmp_path / "demo"), "--crops", "3"],
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  digits, b16 = result["demo digits"], result["ViT-B/16 random weights"]
  assert digits["images"] == 224 and b16["images"] == 3
  for r in (digits, b16):
    assert 0 <= r["top1_agreement"] <= 1 and 0 < r["max_prob_diff"] < 0.5  # bf16 moves something
  assert "| demo digits | 224 |" in run.stdout
