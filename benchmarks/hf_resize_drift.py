"""How far transformers' antialiased resize moves a converted model's scores, on real photographs.

`vit-jax predict` resizes as the original evaluation does: bilinear, no antialiasing
(`tf.image.resize`). A `vit-jax convert` output run through `transformers.pipeline()` is
resized by `ViTImageProcessor`, with PIL, which antialiases when it shrinks. At the
model's own size both are a copy (tests/test_hf_files.py); this measures the rest.

The photographs are scikit-image's (astronaut, coffee, chelsea, rocket,
immunohistochemistry, hubble_deep_field, retina). No public checkpoint can be fetched
offline, so the model is a small ViT trained here on those photographs: it tells which
photograph a square crop comes from, crops of 64-448 px shrunk to 64 px with our resize.
Held-out crops then go through both resizes into the same model; reported per crop size:
the largest and the median change of any class's probability, the change of the top
class's, and how often the top class changes. `--steps` and `--crops` scale it down.

  pip install scikit-image   # the photographs
  python benchmarks/hf_resize_drift.py [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import optax
from PIL import Image
from skimage import data

from vit_jax import models
from vit_jax.data import preprocess
from vit_jax.models import spec
from vit_jax.weights import convert

PHOTOS = (
  "astronaut",
  "coffee",
  "chelsea",
  "rocket",
  "immunohistochemistry",
  "hubble_deep_field",
  "retina",
)
SIZE = 64
SPEC = spec.ModelSpec(
  hidden_size=128,
  mlp_dim=256,
  num_heads=4,
  num_layers=4,
  patch_size=8,
  image_size=SIZE,
  num_classes=len(PHOTOS),
)


def _photos() -> list[np.ndarray]:

  return [getattr(data, name)()[..., :3] for name in PHOTOS]


def _crop(photo: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
  h, w, _ = photo.shape
  side = int(rng.integers(lo, min(hi, h, w) + 1))
  y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  return photo[y : y + side, x : x + side]


def _ours(crop: np.ndarray) -> np.ndarray:
  return preprocess.eval_resize(crop, SIZE)


def _transformers(processor, crop: np.ndarray) -> np.ndarray:
  pixels = processor(images=Image.fromarray(crop), return_tensors="np")["pixel_values"][0]
  return np.transpose(pixels, (1, 2, 0)).astype(np.float32)  # CHW to HWC, in [-1, 1]


def train(photos: list[np.ndarray], steps: int, seed: int = 0):
  """A ViT that tells the photographs apart from their crops, through our resize."""
  model = models.build(SPEC)
  params = models.init_params(model, seed)
  # A zero head would give every step's gradient to the head alone at first: start it small.
  params["head"]["kernel"] = 0.02 * jax.random.normal(
    jax.random.PRNGKey(seed), params["head"]["kernel"].shape
  )
  warmup = min(20, steps // 2)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, max(steps, warmup + 1)))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  rng = np.random.default_rng(seed)
  value = None
  for _ in range(steps):
    labels = rng.integers(0, len(photos), 32)
    x = np.stack([_ours(_crop(photos[k], rng, SIZE, 448)) for k in labels])
    params, opt, value = step(params, opt, x, labels.astype(np.int32))
  return model, params, float(value)


def measure(model, params, photos: list[np.ndarray], crops: int, seed: int = 1) -> dict:
  """Score changes between the two resizes, per range of crop sizes (held-out crops)."""
  from transformers import ViTImageProcessor  # noqa: PLC0415  # transformers after the JAX training: PyTorch loads only for the comparison

  processor = ViTImageProcessor(**convert.preprocessor_config(SIZE))
  probs = jax.jit(lambda x: jax.nn.softmax(model.apply({"params": params}, x, train=False), -1))
  rng = np.random.default_rng(seed)
  out = {}
  for lo, hi in ((64, 64), (65, 128), (129, 256), (257, 448)):
    a, b, labels = [], [], []
    for i in range(crops):
      k = i % len(photos)
      crop = _crop(photos[k], rng, lo, hi)
      a.append(_ours(crop))
      b.append(_transformers(processor, crop))
      labels.append(k)
    pa, pb = np.asarray(probs(np.stack(a))), np.asarray(probs(np.stack(b)))
    diff = np.abs(pa - pb)
    top = pa.argmax(-1)
    out[f"{lo}-{hi}px"] = {
      "crops": crops,
      "accuracy (ours)": float((top == np.array(labels)).mean()),
      "pixels max |diff|": float(np.abs(np.stack(a) - np.stack(b)).max()),
      "max |dp| any class": float(diff.max()),
      "median max |dp| per crop": float(np.median(diff.max(-1))),
      "median |dp| of our top class": float(np.median(diff[np.arange(len(top)), top])),
      "top class changed": float((top != pb.argmax(-1)).mean()),
    }
  return out


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
    model = next(
      line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")
    )
    flags = next(
      line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")
    )
    simd = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return f"{model} ({', '.join(sorted(set(simd)))}), {os.cpu_count()} CPUs"
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--crops", type=int, default=70, help="held-out crops per size range")
  parser.add_argument("--json-only", action="store_true")
  args = parser.parse_args()
  convert.load_torch()  # before TensorFlow (our resize) loads: PyTorch's triton crashes after it
  start = time.perf_counter()
  photos = _photos()
  model, params, loss = train(photos, args.steps)
  result = {
    "cpu": _cpu(),
    "jax": jax.__version__,
    "steps": args.steps,
    "final train loss": loss,
    "by crop size": measure(model, params, photos, args.crops),
    "seconds": round(time.perf_counter() - start, 1),
  }
  if not args.json_only:
    print(f"{result['cpu']}; jax {result['jax']}; {args.steps} steps, final loss {loss:.3f}")
    for size, row in result["by crop size"].items():
      print(
        f"  crops {size:>9}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if k != "crops")
      )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
