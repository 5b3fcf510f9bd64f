"""ViT-B/16 (or --model) at 224: our jitted model against transformers' PyTorch
ViTForImageClassification.

Same weights, same CPU, one run. Each side runs in its own worker process and
the two take turns (ours, theirs, ours, theirs, ...): the idle one waits on a
pipe, so neither's thread pool competes with the other's, and load from
elsewhere on a shared machine hits both alike. We report medians and ratios of
inference (fp32 and bf16, batch 1, 8, 32), inference that also returns every
layer's attention weights (ours: with the rollout map; theirs:
`output_attentions=True`, batch 8), the training step (forward, backward,
gradients clipped at global norm 1, SGD momentum: the fine-tuning recipe's
update; batch 8; bf16 computes in bf16 with float32 params, as PyTorch's
autocast does), the training step's compile time (scanned and
unscanned), peak memory of each side (fresh processes), and the achieved
GFLOP/s next to what a plain float32 matrix multiply reaches here through XLA
and through PyTorch.

`--malloc LIB` preloads another allocator (tcmalloc, jemalloc) into both
workers, so an allocator's effect is measured on both sides at once.

  JAX_PLATFORMS=cpu python benchmarks/vit_vs_torch.py [--quick] [--json out.json]
      [--skip inference,attention,train,compile,memory] [--batches 1,8,32] [--dtypes fp32,bf16]
      [--model ViT-B_16]
      [--malloc /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

B16_GFLOP_PER_IMAGE = 35.2  # ViT-B/16 at 224, forward (17.6 GMACs)
TRAIN_FACTOR = 3  # forward + backward: two matmuls per forward one
MATMUL_N = 2048
LR, MOMENTUM, CLIP_NORM = 0.01, 0.9, 1.0  # the training step's SGD, on both sides


def _optax_sgd():
  """Clipping at global norm CLIP_NORM, then SGD with momentum (the fine-tuning recipe's update)."""
  import optax

  return optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.sgd(LR, momentum=MOMENTUM))


def _seconds(fn, iters: int) -> float:
  t = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t) / iters


def _matmul_gflops(matmul, repeats: int = 5) -> float:
  """GFLOP/s of the best of `repeats` float32 MATMUL_N^3 products."""
  matmul()
  return 2 * MATMUL_N**3 / min(_seconds(matmul, 3) for _ in range(repeats)) / 1e9


def gflop_per_image(name: str) -> float:
  """Nominal forward GFLOP per image at 224, scaled so that ViT-B/16 counts the usual 35.2."""
  from vit_jax import models
  from vit_jax.planning import aot

  flops = lambda n: aot.model_flops_per_image(models.create_model(n, num_classes=1000), train=False)
  return B16_GFLOP_PER_IMAGE * flops(name) / flops("ViT-B_16")


def _peak_rss_mib() -> float:
  """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
  with open("/proc/self/status", encoding="utf-8") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _inputs(batch: int):
  import numpy as np

  rng = np.random.default_rng(batch)
  return (
    rng.uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32),
    rng.integers(0, 1000, batch).astype(np.int32),
  )


# ---- the two workers: each answers `setup` (build and warm up a function) and `time`.


class JaxSide:
  """Our model, jitted, on the weights in the .npz."""

  def __init__(self, weights: str, name: str):
    import jax

    from vit_jax import models
    from vit_jax.weights import checkpoint

    self.jax = jax
    self.name = name
    self.model = models.create_model(name, num_classes=1000)
    self.params = jax.device_put(checkpoint.load_pretrained(weights, self.model))
    self.fn = None

  def matmul(self) -> float:
    import jax.numpy as jnp

    a = self.jax.random.normal(self.jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
    f = self.jax.jit(lambda x: x @ x)
    return _matmul_gflops(lambda: f(a).block_until_ready())

  def setup(self, kind: str, batch: int, dtype: str = "fp32") -> None:
    import jax.numpy as jnp
    import optax

    jax = self.jax
    x, y = (jax.device_put(a) for a in _inputs(batch))
    if kind == "inference":
      # bf16 as `--dtype bfloat16` runs it (and as PyTorch's model.to(bfloat16)): the
      # weights cast to bf16 once.
      dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
      m = self.model.clone(dtype=dt, param_dtype=dt)
      p = jax.tree_util.tree_map(lambda v: v.astype(dt), self.params)
      f = jax.jit(lambda p, x: m.apply({"params": p}, x, train=False))
      self.fn = lambda: f(p, x).block_until_ready()
    elif kind == "attention":
      from vit_jax import models
      from vit_jax.apps import explain

      def maps(p, x):
        logits, weights = models.attention_weights(self.model, p, x)
        return logits, weights, explain.rollout(self.model, weights)

      f = jax.jit(maps)
      self.fn = lambda: jax.block_until_ready(f(self.params, x))
    else:
      tx = _optax_sgd()
      # bf16: compute in bf16, params and optimizer state in float32 (PyTorch: autocast).
      model = self.model.clone(dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)

      def step(state, x, y):
        p, o = state

        def loss(p):
          logits = model.apply({"params": p}, x, train=True).astype(jnp.float32)
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), value

      f = jax.jit(step, donate_argnums=(0,))
      p = jax.tree_util.tree_map(jnp.copy, self.params)
      state = self.state = [(p, tx.init(p))]

      def run():
        state[0], value = f(state[0], x, y)
        value.block_until_ready()

      self.fn = run
    self.fn()  # compile and warm up

  def compile_seconds(self, scan: bool, repeats: int) -> float:
    """Median seconds to lower and compile the training step (a fresh function each time)."""
    import jax.numpy as jnp
    import optax

    from vit_jax import models

    jax = self.jax
    model = models.create_model(self.name, num_classes=1000, scan=scan)
    shapes = models.param_shapes(model)
    tx = _optax_sgd()
    x = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((8,), jnp.int32)
    times = []
    for _ in range(repeats):

      def step(p, o, x, y):
        g = jax.grad(
          lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y
          ).mean()
        )(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

      t = time.perf_counter()
      jax.jit(step).lower(shapes, jax.eval_shape(tx.init, shapes), x, y).compile()
      times.append(time.perf_counter() - t)
    return statistics.median(times)


class TorchSide:
  """transformers' ViTForImageClassification (its default attention, SDPA) on the same weights."""

  def __init__(self, weights: str, name: str):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    self.torch = torch
    self.model = transformers.ViTForImageClassification.from_pretrained(weights).eval()
    self.weights, self.eager = weights, None
    self.fn = None

  def matmul(self) -> float:
    a = self.torch.randn(MATMUL_N, MATMUL_N)
    return _matmul_gflops(lambda: a @ a)

  def setup(self, kind: str, batch: int, dtype: str = "fp32") -> None:
    torch = self.torch
    x, y = _inputs(batch)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y).long()
    if kind == "inference":
      m = self.model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
      xt = xt.to(m.dtype)

      def run():
        with torch.inference_mode():
          m(pixel_values=xt)

      self.fn = run
    elif kind == "attention":
      # SDPA does not return its weights: transformers' eager attention does.
      import transformers

      if self.eager is None:
        self.eager = transformers.ViTForImageClassification.from_pretrained(
          self.weights, attn_implementation="eager"
        ).eval()
      m = self.eager

      def run():
        with torch.inference_mode():
          assert (
            len(m(pixel_values=xt, output_attentions=True).attentions) == m.config.num_hidden_layers
          )

      self.fn = run
    else:
      m = self.model.float().train()
      opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)

      def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
          logits = m(pixel_values=xt).logits
        torch.nn.functional.cross_entropy(logits.float(), yt).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP_NORM)
        opt.step()

      self.fn = step
    self.fn()  # warm up


def same_step(name: str, batch: int = 2) -> dict:
  """One fp32 training step on each side from the same weights: how far apart the updates are.

  The timed steps must do the same work. Call with torch imported before JAX.
  """
  import jax
  import numpy as np
  import optax

  from vit_jax.weights import convert

  with tempfile.TemporaryDirectory() as tmp:
    npz, hf = write_weights(tmp, name)
    ours, theirs = JaxSide(npz, name), TorchSide(hf, name)
  before = {k: v.detach().numpy().copy() for k, v in theirs.model.state_dict().items()}
  x, y = (jax.numpy.asarray(a) for a in _inputs(batch))
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ours.model.apply({"params": p}, x, train=True), y
  ).mean()
  grad_norm = float(optax.global_norm(jax.grad(loss)(ours.params)))
  # setup() runs one step to warm up; that step is the one compared.
  ours.setup("train", batch)
  theirs.setup("train", batch)
  ours_update = convert.to_torch_state_dict(
    jax.tree_util.tree_map(
      lambda a, b: np.asarray(a) - np.asarray(b), ours.state[0][0], ours.params
    ),
    ours.model.num_heads,
  )
  theirs_update = {k: v.detach().numpy() - before[k] for k, v in theirs.model.state_dict().items()}
  diff = max(float(np.abs(ours_update[k] - theirs_update[k]).max()) for k in ours_update)
  size = max(float(np.abs(u).max()) for u in ours_update.values())
  norm = lambda u: float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in u.values())))
  return {
    "grad_norm": grad_norm,
    "update_norm": {"jax": norm(ours_update), "torch": norm(theirs_update)},
    "max_abs_update": size,
    "max_abs_update_diff": diff,
  }


def worker(side: str, weights: str, name: str) -> None:
  """Answers one JSON request per stdin line with one JSON line on stdout."""
  impl = (JaxSide if side == "jax" else TorchSide)(weights, name)
  out = sys.stdout
  sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
  print(json.dumps({"ready": True}), file=out, flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    cmd = req.pop("cmd")
    if cmd == "time":
      reply = {"seconds": _seconds(impl.fn, req["iters"])}
    elif cmd == "setup":
      impl.setup(**req)
      reply = {}
    elif cmd == "matmul":
      reply = {"gflops": impl.matmul()}
    elif cmd == "compile":
      reply = {"seconds": impl.compile_seconds(**req)}
    elif cmd == "peak_rss_mib":
      reply = {"mib": _peak_rss_mib()}
    elif cmd == "mapped":
      reply = {"mapped": mapped(req["path"])}
    else:
      raise ValueError(f"unknown command {cmd!r}")
    print(json.dumps(reply), file=out, flush=True)


def mapped(path: str) -> bool:
  """Whether this process has the shared library at `path` mapped."""
  real = os.path.realpath(path)
  with open("/proc/self/maps", encoding="utf-8") as f:
    return any(line.rstrip("\n").endswith(real) for line in f)


class Worker:
  """A worker process on one side, driven over its stdin and stdout."""

  def __init__(self, side: str, weights: str, name: str, malloc: str | None = None):
    # No persistent compilation cache: compile times are measured, not loaded.
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      TF_CPP_MIN_LOG_LEVEL="3",
      JAX_ENABLE_COMPILATION_CACHE="false",
    )
    if malloc:
      env["LD_PRELOAD"] = " ".join(filter(None, (os.path.abspath(malloc), env.get("LD_PRELOAD"))))
    self.proc = subprocess.Popen(
      [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        side,
        "--weights",
        weights,
        "--model",
        name,
      ],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )
    self._read()
    # The loader skips a library it cannot preload with only a warning on stderr.
    if malloc and not self("mapped", path=malloc)["mapped"]:
      self.close()
      raise RuntimeError(
        f"--malloc {malloc}: not loaded by the {side} worker (see its warning above)"
      )

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker exited with status {self.proc.wait()}")
    return json.loads(line)

  def __call__(self, cmd: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def interleaved(workers: dict[str, Worker], iters: int, repeats: int) -> dict[str, float]:
  """Median seconds per call on each side, the sides taking turns."""
  times = {k: [] for k in workers}
  for _ in range(repeats):
    for k, w in workers.items():
      times[k].append(w("time", iters=iters)["seconds"])
  return {k: statistics.median(v) for k, v in times.items()}


def compare(workers, kind: str, batch: int, dtype: str, repeats: int, gflop: float) -> dict:
  for w in workers.values():
    w("setup", kind=kind, batch=batch, dtype=dtype)
  med = interleaved(workers, max(1, 8 // batch), repeats)
  flops = TRAIN_FACTOR * gflop if kind == "train" else gflop
  return {
    "kind": kind,
    "batch": batch,
    "dtype": dtype,
    **{f"{k}_img_s": batch / t for k, t in med.items()},
    **{f"{k}_gflops": batch / t * flops for k, t in med.items()},
    "ratio": med["torch"] / med["jax"],
  }


def peak_memory(side: str, weights: str, name: str, batch: int, malloc: str | None = None) -> float:
  """Peak RSS (MiB) of a fresh worker after fp32 inference at `batch`."""
  w = Worker(side, weights, name, malloc)
  w("setup", kind="inference", batch=batch)
  w("time", iters=2)
  mib = w("peak_rss_mib")["mib"]
  w.close()
  return mib


def write_weights(directory: str, name: str) -> tuple[str, str]:
  """Random weights (not the init: every parameter perturbed) as .npz and as a transformers
  directory.
  """
  import jax
  import numpy as np

  from vit_jax import models
  from vit_jax.weights import checkpoint
  from vit_jax.weights import convert

  model = models.create_model(name, num_classes=1000)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda x: np.asarray(x) + rng.normal(0, 0.02, x.shape).astype(np.float32),
    models.init_params(model, 0),
  )
  npz, hf = os.path.join(directory, "weights.npz"), os.path.join(directory, "weights_hf")
  checkpoint.save(params, npz)
  convert.to_transformers(params, model, hf)
  return npz, hf


def machine() -> dict:
  import jax
  import torch
  import transformers

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
      f.seek(0)
      flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    cpu += (
      " (" + " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags) + ")"
    )
  except (OSError, StopIteration):
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7 (a smoke run)")
  ap.add_argument("--json", default=None, help="also write the results here")
  ap.add_argument(
    "--skip", default="", help="comma list of: inference,attention,train,compile,memory"
  )
  ap.add_argument("--batches", default="1,8,32", help="inference batch sizes")
  ap.add_argument("--dtypes", default="fp32,bf16", help="compute dtypes (inference and training)")
  ap.add_argument("--model", default="ViT-B_16", help="variant, at 224 px with 1000 classes")
  ap.add_argument(
    "--malloc",
    default=None,
    metavar="LIB",
    help="a shared-library allocator to preload into both workers (LD_PRELOAD)",
  )
  ap.add_argument(
    "--check-step",
    action="store_true",
    help="only compare one training step of each side (same weights) and print the JSON",
  )
  ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  ap.add_argument("--weights", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args.worker, args.weights, args.model)
    return
  if args.check_step:
    import torch  # noqa: F401, PLC0415  (before JAX: see same_step)

    print(json.dumps(same_step(args.model)))
    return
  if args.malloc and not os.path.isfile(args.malloc):
    ap.error(f"--malloc {args.malloc}: no such file")
  skip = set(filter(None, args.skip.split(",")))
  repeats = 3 if args.quick else 7
  result = {
    "machine": machine(),
    "model": args.model,
    "gflop_per_image": gflop_per_image(args.model),
    "malloc": os.path.abspath(args.malloc) if args.malloc else "default (the C library's)",
  }
  print(json.dumps({"machine": result["machine"], "malloc": result["malloc"]}), flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    npz, hf = write_weights(tmp, args.model)
    weights = {"jax": npz, "torch": hf}
    workers = {side: Worker(side, path, args.model, args.malloc) for side, path in weights.items()}
    result["matmul_gflops"] = {k: w("matmul")["gflops"] for k, w in workers.items()}
    print(json.dumps(result["matmul_gflops"]), flush=True)
    runs = []
    if "inference" not in skip:
      runs += [
        ("inference", int(b), d) for d in args.dtypes.split(",") for b in args.batches.split(",")
      ]
    if "attention" not in skip:
      runs.append(("attention", 8, "fp32"))
    if "train" not in skip:
      runs += [("train", 8, d) for d in args.dtypes.split(",")]
    result["runs"] = []
    for kind, batch, dtype in runs:
      r = compare(workers, kind, batch, dtype, repeats, result["gflop_per_image"])
      result["runs"].append(r)
      print(json.dumps(r), flush=True)
    if "compile" not in skip:
      result["compile_seconds"] = {
        k: workers["jax"]("compile", scan=scan, repeats=3)["seconds"]
        for k, scan in (("unscanned", False), ("scanned", True))
      }
      print(json.dumps(result["compile_seconds"]), flush=True)
    # Over everything each worker ran: with training, the step's peak.
    result["peak_rss_mib_workers"] = {k: w("peak_rss_mib")["mib"] for k, w in workers.items()}
    print(json.dumps(result["peak_rss_mib_workers"]), flush=True)
    for w in workers.values():
      w.close()
    if "memory" not in skip:
      result["peak_rss_mib_batch8"] = {
        side: peak_memory(side, path, args.model, 8, args.malloc) for side, path in weights.items()
      }
      print(json.dumps(result["peak_rss_mib_batch8"]), flush=True)
  print(table(result))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


def table(r: dict) -> str:
  """The results as a Markdown table, headed by the machine and the matmul ceilings."""
  mm = r["matmul_gflops"]
  lines = [
    f"{r['model']} at 224 ({r['gflop_per_image']:.1f} GFLOP per image forward)",
    f"machine: {r['machine']}",
    f"allocator: {r['malloc']}",
    f"fp32 {MATMUL_N}x{MATMUL_N} matmul: XLA {mm['jax']:.0f} GFLOP/s, PyTorch {mm['torch']:.0f} "
    "GFLOP/s",
    "",
    "| benchmark | batch | ours (img/s) | PyTorch (img/s) | ours / PyTorch | ours GFLOP/s | "
    "PyTorch GFLOP/s |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for x in r.get("runs", []):
    name = {
      "inference": f"inference {x['dtype']}",
      "attention": "inference fp32 + attention maps",
      "train": f"train step {x['dtype']} (SGD momentum, clipping)",
    }[x["kind"]]
    lines.append(
      f"| {name} | {x['batch']} | {x['jax_img_s']:.2f} | {x['torch_img_s']:.2f} | "
      f"{x['ratio']:.2f} | "
      f"{x['jax_gflops']:.0f} | {x['torch_gflops']:.0f} |"
    )
  if "compile_seconds" in r:
    c = r["compile_seconds"]
    lines.append(
      f"\ntrain-step compile (batch 8): {c['unscanned']:.1f} s unscanned, {c['scanned']:.1f} s "
      "scanned"
    )
  if "peak_rss_mib_batch8" in r:
    m = r["peak_rss_mib_batch8"]
    lines.append(
      f"peak RSS, fp32 inference batch 8: ours {m['jax']:.0f} MiB, PyTorch {m['torch']:.0f} MiB"
    )
  if "peak_rss_mib_workers" in r:
    m = r["peak_rss_mib_workers"]
    lines.append(
      f"peak RSS of the workers over all the runs above: ours {m['jax']:.0f} MiB, PyTorch "
      f"{m['torch']:.0f} MiB"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  main()
