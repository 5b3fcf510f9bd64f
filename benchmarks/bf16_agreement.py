"""What bf16 compute changes in a classifier's answers, against float32 on the same weights.

Two models, each run in float32 and in bfloat16 compute (params and logits
float32, as `--dtype bfloat16` runs them):
  * the demo's fine-tuned ViT on its held-out digits (a trained model on real data);
  * a full-size ViT-B/16 with random weights at realistic scales in the original
    layout (tests/ckpt_fixtures.py), on crops of scikit-image's photographs.
Reported per model: top-1 agreement, the largest change of any probability, and the
median change of float32's top class. `--dtype auto` may pick bf16 only where the
agreement is at least 99%.

  python benchmarks/bf16_agreement.py [--demo-workdir DIR] [--crops 256] [--json-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from skimage import data

from vit_jax.apps import classifier
from vit_jax.apps import demo
from vit_jax.data import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = (
  "astronaut",
  "coffee",
  "chelsea",
  "rocket",
  "immunohistochemistry",
  "hubble_deep_field",
  "retina",
)


def _fixtures():
  spec = importlib.util.spec_from_file_location(
    "ckpt_fixtures", os.path.join(ROOT, "tests", "ckpt_fixtures.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules["ckpt_fixtures"] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def compare(checkpoint: str, images: np.ndarray, **kw) -> dict:
  """Agreement of bf16 with float32 compute on `images` (preprocessed, [N, S, S, 3])."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    clf = classifier.load_classifier(checkpoint, dtype=dtype, **kw)
    t = time.perf_counter()
    out[dtype] = np.asarray(clf.activation(clf.logits(images)))
    out[f"{dtype}_seconds"] = time.perf_counter() - t
  return {
    "images": len(images),
    **agreement(out["float32"], out["bfloat16"]),
    "float32_img_s": len(images) / out["float32_seconds"],
    "bfloat16_img_s": len(images) / out["bfloat16_seconds"],
  }


def agreement(p32: np.ndarray, q: np.ndarray) -> dict:
  """How far the probabilities `q` are from float32's `p32` ([N, classes] each)."""
  top = p32.argmax(-1)
  agree = top == q.argmax(-1)
  # How far float32's top class leads the next: a lead under the largest change is a coin toss.
  ranked = np.sort(p32, axis=-1)
  margin = ranked[:, -1] - ranked[:, -2]
  clear = margin > np.abs(p32 - q).max()
  rows = np.arange(len(top))
  return {
    "top1_agreement": float(np.mean(agree)),
    "median_top1_margin": float(np.median(margin)),
    "clear_lead_images": int(clear.sum()),
    "clear_lead_agreement": float(np.mean(agree[clear])) if clear.any() else None,
    "max_prob_diff": float(np.abs(p32 - q).max()),
    "median_top_prob_diff": float(np.median(np.abs(p32[rows, top] - q[rows, top]))),
  }


def demo_digits(workdir: str | None) -> dict:
  """The demo's fine-tuned model on every held-out image of digits 5-9."""
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix="bf16-demo-")
    demo.run(workdir)
  root = os.path.join(workdir, "digits", "b", "test")
  paths = sorted(
    os.path.join(root, d, f)
    for d in sorted(os.listdir(root))
    for f in sorted(os.listdir(os.path.join(root, d)))
  )
  ckpt = os.path.join(workdir, "finetune", "final.npz")
  size = classifier.load_classifier(ckpt).image_size
  images = np.stack([preprocess.eval_resize(preprocess.read_rgb(p), size) for p in paths])
  return compare(ckpt, images, labels_path=os.path.join(workdir, "finetune", "labels.txt"))


def random_b16(crops: int) -> dict:
  """A full-size ViT-B/16 (1000 classes, realistic random scales) on crops of real photographs."""
  cf = _fixtures()
  images = photo_crops(crops, seed=0)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "b16.npz")
    cf.write_original(path, cf.Spec(**cf.B16, image_size=224, classes=1000))
    return compare(path, images)


def photo_crops(count: int, seed: int) -> np.ndarray:
  """`count` square crops (96 px to the photograph's short side) of scikit-image's photographs,
  resized to 224 as evaluation does: [count, 224, 224, 3] in [-1, 1]."""
  rng = np.random.default_rng(seed)
  photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
  out = []
  for i in range(count):
    photo = photos[i % len(photos)]
    side = int(rng.integers(96, min(photo.shape[:2]) + 1))
    y, x = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
    out.append(preprocess.eval_resize(np.ascontiguousarray(photo[y : y + side, x : x + side]), 224))
  return np.stack(out)


def machine() -> str:
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = f.read().splitlines()
    cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    cpu += (
      " (" + " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags) + ")"
    )
  except (OSError, StopIteration):
    pass
  return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--demo-workdir", default=None, help="a finished `vit-jax demo` run (default: run one)"
  )
  ap.add_argument("--crops", type=int, default=256, help="photograph crops for ViT-B/16")
  ap.add_argument("--skip-b16", action="store_true")
  ap.add_argument("--json-only", action="store_true")
  args = ap.parse_args()
  result = {"machine": machine(), "demo digits": demo_digits(args.demo_workdir)}
  if not args.skip_b16:
    result["ViT-B/16 random weights"] = random_b16(args.crops)
  if not args.json_only:
    print(result["machine"])
    print(
      "| model | images | top-1 agreement | max prob diff | median top-class diff | median top-1 "
      "lead "
      "| agreement where the lead > max diff | fp32 img/s | bf16 img/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in result.items():
      if name != "machine":
        clear = (
          "none"
          if r["clear_lead_agreement"] is None
          else f"{r['clear_lead_agreement']:.2%} of {r['clear_lead_images']}"
        )
        print(
          f"| {name} | {r['images']} | {r['top1_agreement']:.2%} | {r['max_prob_diff']:.4f} | "
          f"{r['median_top_prob_diff']:.2e} | {r['median_top1_margin']:.2e} | {clear} | "
          f"{r['float32_img_s']:.1f} | {r['bfloat16_img_s']:.1f} |"
        )
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
