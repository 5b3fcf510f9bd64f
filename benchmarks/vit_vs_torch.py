"""ViT-B/16 at 224: our jitted model against transformers' PyTorch ViTForImageClassification.

Same weights, same CPU, one run. Measurements are interleaved (ours, theirs,
ours, theirs, ...) so that load from elsewhere on a shared machine hits both
alike; we report medians and ratios. Also: the training step (forward,
backward, SGD momentum, batch 8), the training step's compile time (scanned
and unscanned), peak memory of each side (in separate processes), and the
achieved GFLOP/s next to what a plain float32 matrix multiply reaches here.

  JAX_PLATFORMS=cpu python benchmarks/vit_vs_torch.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from vit_jax import convert, models  # noqa: E402

GFLOP_PER_IMAGE = 35.2  # ViT-B/16 at 224, forward (17.6 GMACs)
THREADS = os.cpu_count() or 1
torch.set_num_threads(THREADS)


def _randomized_params(model):
  params = models.init_params(model, 0)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(np.float32),
                                params)


def _timeit(fn, iters):
  t = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t) / iters


def interleaved(fns: dict, iters: int, repeats: int) -> dict:
  """Median seconds per call of each fn, measured in alternation."""
  for fn in fns.values():  # warm-up (and compile)
    fn()
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k].append(_timeit(fn, iters))
  return {k: statistics.median(v) for k, v in times.items()}


def matmul_ceiling(n=2048, repeats=5) -> float:
  """GFLOP/s of a float32 n x n matmul through XLA: the practical ceiling for the model."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = min(_timeit(lambda: f(a).block_until_ready(), 3) for _ in range(repeats))
  return 2 * n ** 3 / t / 1e9


def inference(model, params, pt, batch, dtype, iters, repeats):
  x = np.random.default_rng(1).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
  m = model.clone(dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)
  p = jax.device_put(params)
  f = jax.jit(lambda p, x: m.apply({"params": p}, x, train=False))
  xj = jax.device_put(x)
  ptm = pt.to(torch.bfloat16) if dtype == "bf16" else pt.float()
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  xt = xt.to(torch.bfloat16) if dtype == "bf16" else xt

  def ours():
    f(p, xj).block_until_ready()

  def theirs():
    with torch.inference_mode():
      ptm(pixel_values=xt)

  med = interleaved({"jax": ours, "torch": theirs}, iters, repeats)
  pt.float()
  return {"batch": batch, "dtype": dtype, "jax_img_s": batch / med["jax"], "torch_img_s": batch / med["torch"],
          "ratio": med["torch"] / med["jax"]}


def train_step(model, params, pt, batch, iters, repeats):
  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
  y = rng.integers(0, 1000, batch)
  tx = optax.sgd(0.01, momentum=0.9)

  def step(state, x, y):
    p, o = state

    def loss(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), l

  f = jax.jit(step, donate_argnums=(0,))
  p = jax.device_put(params)
  state = [(p, tx.init(p))]
  xj, yj = jax.device_put(x), jax.device_put(y)

  def ours():
    state[0], l = f(state[0], xj, yj)
    l.block_until_ready()

  opt = torch.optim.SGD(pt.parameters(), lr=0.01, momentum=0.9)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(y)
  pt.train()

  def theirs():
    opt.zero_grad(set_to_none=True)
    out = pt(pixel_values=xt).logits
    torch.nn.functional.cross_entropy(out, yt).backward()
    opt.step()

  med = interleaved({"jax": ours, "torch": theirs}, iters, repeats)
  pt.eval()
  return {"batch": batch, "jax_img_s": batch / med["jax"], "torch_img_s": batch / med["torch"],
          "ratio": med["torch"] / med["jax"]}


def compile_time(scan: bool, repeats: int = 3) -> float:
  """Median seconds to lower and compile the ViT-B/16 training step (fresh function each time)."""
  model = models.create_model("ViT-B_16", num_classes=1000, scan=scan)
  shapes = models.param_shapes(model)
  tx = optax.sgd(0.01, momentum=0.9)
  x = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((8,), jnp.int32)
  times = []
  for _ in range(repeats):
    def step(p, o, x, y):
      def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
      g = jax.grad(loss)(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o
    t = time.perf_counter()
    jax.jit(step).lower(shapes, jax.eval_shape(tx.init, shapes), x, y).compile()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def peak_memory(side: str, batch: int) -> float:
  """Peak RSS (MiB) of a fresh process running inference at `batch` (fp32) on one side."""
  code = f"""
import os, resource, numpy as np
os.environ.setdefault("JAX_PLATFORMS", "cpu")
batch = {batch}
x = np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
if "{side}" == "jax":
    import jax
    from vit_jax import models
    m = models.create_model("ViT-B_16", num_classes=1000)
    p = models.init_params(m)
    f = jax.jit(lambda p, x: m.apply({{"params": p}}, x))
    for _ in range(3): f(p, x).block_until_ready()
else:
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    pt = ViTForImageClassification(ViTConfig(num_labels=1000)).eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        for _ in range(3): pt(pixel_values=xt)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return float(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
  ap.add_argument("--json", default=None, help="also write the results here")
  ap.add_argument("--skip", default="", help="comma list of: inference,train,compile,memory")
  args = ap.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  repeats = 3 if args.quick else 7
  model = models.create_model("ViT-B_16", num_classes=1000)
  params = _randomized_params(model)
  config = convert.hf_config(model)
  from transformers import ViTForImageClassification  # pylint: disable=import-outside-toplevel
  pt = ViTForImageClassification(config).eval()
  pt.load_state_dict({k: torch.from_numpy(v) for k, v in
                      convert.to_torch_state_dict(params, model.num_heads).items()})
  result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": THREADS,
                        "python": platform.python_version(), "jax": jax.__version__,
                        "torch": torch.__version__},
            "matmul_ceiling_gflops": matmul_ceiling()}
  if "inference" not in skip:
    result["inference"] = []
    for dtype in ("fp32", "bf16"):
      for batch in (1, 8, 32):
        iters = max(1, 8 // batch)
        r = inference(model, params, pt, batch, dtype, iters, repeats)
        r["jax_gflops"] = r["jax_img_s"] * GFLOP_PER_IMAGE
        result["inference"].append(r)
        print(json.dumps(r), flush=True)
  if "train" not in skip:
    result["train"] = train_step(model, params, pt, 8, 1, repeats)
    print(json.dumps(result["train"]), flush=True)
  if "compile" not in skip:
    result["compile_seconds"] = {"unscanned": compile_time(False), "scanned": compile_time(True)}
    print(json.dumps(result["compile_seconds"]), flush=True)
  if "memory" not in skip:
    result["peak_rss_mib_batch8"] = {"jax": peak_memory("jax", 8), "torch": peak_memory("torch", 8)}
    print(json.dumps(result["peak_rss_mib_batch8"]), flush=True)
  print(table(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


def table(r: dict) -> str:
  lines = [f"machine: {r['machine']}", f"fp32 matmul ceiling: {r['matmul_ceiling_gflops']:.0f} GFLOP/s", "",
           "| benchmark | batch | ours (img/s) | PyTorch (img/s) | ours / PyTorch | ours GFLOP/s |",
           "| --- | --- | --- | --- | --- | --- |"]
  for x in r.get("inference", []):
    lines.append(f"| inference {x['dtype']} | {x['batch']} | {x['jax_img_s']:.2f} | {x['torch_img_s']:.2f} | "
                 f"{x['ratio']:.2f} | {x['jax_gflops']:.0f} |")
  if "train" in r:
    t = r["train"]
    lines.append(f"| train step fp32 (SGD momentum) | {t['batch']} | {t['jax_img_s']:.2f} | "
                 f"{t['torch_img_s']:.2f} | {t['ratio']:.2f} | {t['jax_img_s'] * 3 * GFLOP_PER_IMAGE:.0f} |")
  if "compile_seconds" in r:
    c = r["compile_seconds"]
    lines.append(f"\ntrain-step compile: {c['unscanned']:.1f} s unscanned, {c['scanned']:.1f} s scanned")
  if "peak_rss_mib_batch8" in r:
    m = r["peak_rss_mib_batch8"]
    lines.append(f"peak RSS, fp32 inference batch 8: ours {m['jax']:.0f} MiB, PyTorch {m['torch']:.0f} MiB")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
