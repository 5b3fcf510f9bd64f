"""Training input throughput: the tf.data pipeline against a plain PIL + numpy loader, per CPU core.

Both loaders do the same work on the same ImageNet-like JPEGs (about 500x375,
generated here): read the file, Inception crop (area 5-100%, aspect ratio
3/4-4/3), bilinear resize to 224x224, random horizontal flip, scale to
[-1, 1], and stack batches of 32. tf.data decodes only the crop window of each
JPEG; PIL decodes the whole image and resizes with `box=` (crop and resize in
one pass), its fastest plain path. A third row is the tf.data pipeline with
RandAugment(2, 10) after the flip (`augment.randaug_layers=2`,
`randaug_magnitude=10`: big_vision's AugReg 'light2'), the images per core
that a RandAugment training run can count on.

Per core: images per CPU-second of the loader's process (user + system time
of all its threads), so a pipeline that uses every core is compared fairly
with a single-threaded loader. Wall-clock images/s and the cores actually
busy are reported too. Each measurement runs in a fresh process (one loader's
background threads never bill the other), after a warm-up; the two loaders
alternate, and medians are reported.

  python benchmarks/input_pipeline.py [--images 384] [--repeats 5] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZE, BATCH = 224, 32
KINDS = ("tf", "tf_randaug", "pil")


def write_jpegs(root: str, n: int, seed: int = 0) -> None:
  """n JPEGs of ImageNet-like size and entropy in ROOT/train/{class}/ (quality 90, ~4:2:0)."""
  from PIL import Image  # noqa: PLC0415  # each loader runs in a fresh process that imports only its own libraries

  rng = np.random.default_rng(seed)
  shapes = [(375, 500), (500, 375), (333, 500), (500, 400), (375, 500)]
  for i in range(n):
    h, w = shapes[i % len(shapes)]
    # Smooth shapes plus fine grain: compresses like a photo (~100 KB at this size).
    coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    grain = rng.normal(0, 14, (h, w, 3))
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    d = os.path.join(root, "train", f"class_{i % 4}")
    os.makedirs(d, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


# -- the loaders -------------------------------------------------------------------


def tf_batches(root: str, threads: int, randaug: bool = False):
  from vit_jax import data  # noqa: PLC0415  # each loader runs in a fresh process that imports only its own libraries
  from vit_jax.config import schema  # noqa: PLC0415  # each loader runs in a fresh process that imports only its own libraries

  c = schema.base()
  c.dataset, c.folder, c.image_size = "folder", root, SIZE
  c.batch_size = BATCH
  c.data_threads = threads
  c.augment.update(dict(inception_crop=True, hflip=0.5))
  if randaug:
    c.augment.update(dict(randaug_layers=2, randaug_magnitude=10.0))
  return data.host_batches(c, process_index=0, process_count=1)


def _crop_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
  """Inception crop: area 5-100%, aspect 3/4-4/3 (log-uniform), 10 tries, else the whole image."""
  for _ in range(10):
    area = rng.uniform(0.05, 1.0) * w * h
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      return x, y, x + cw, y + ch
  return 0, 0, w, h


def pil_batches(root: str, seed: int = 0):
  from PIL import Image  # noqa: PLC0415  # each loader runs in a fresh process that imports only its own libraries

  paths = sorted(
    os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(root, "train")) for f in fs
  )
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(paths))
    for start in range(0, len(order) - BATCH + 1, BATCH):
      out = np.empty((BATCH, SIZE, SIZE, 3), np.float32)
      for row, k in enumerate(order[start : start + BATCH]):
        with Image.open(paths[k]) as im:
          im = im.convert("RGB")
          im = im.resize((SIZE, SIZE), Image.BILINEAR, box=_crop_box(rng, *im.size))
        a = np.asarray(im)
        if rng.random() < 0.5:
          a = a[:, ::-1]
        np.subtract(a, 127.5, out=out[row], dtype=np.float32)
        out[row] /= 127.5
      yield {"image": out, "label": np.zeros([BATCH], np.int32)}


def measure(kind: str, root: str, threads: int, warmup: int, batches: int) -> dict:
  it = pil_batches(root) if kind == "pil" else tf_batches(root, threads, kind == "tf_randaug")
  for _ in range(warmup):
    b = next(it)
  assert (
    b["image"].shape == (BATCH, SIZE, SIZE, 3)
    and -1.0 <= b["image"].min() <= b["image"].max() <= 1.0
  )
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  n = batches * BATCH
  return {
    "kind": kind,
    "images": n,
    "wall_s": wall,
    "cpu_s": cpu,
    "images_per_s": n / wall,
    "images_per_core_s": n / cpu,
    "cores_busy": cpu / wall,
  }


# -- driver --------------------------------------------------------------------------


def _run_worker(kind: str, root: str, threads: int, warmup: int, batches: int) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  cmd = [
    sys.executable,
    __file__,
    "--worker",
    kind,
    "--root",
    root,
    "--threads",
    str(threads),
    "--warmup",
    str(warmup),
    "--batches",
    str(batches),
  ]
  out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=384)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batches", type=int, default=30, help="measured batches of 32 per run")
  p.add_argument("--warmup", type=int, default=6)
  p.add_argument(
    "--threads",
    type=int,
    default=len(os.sched_getaffinity(0)),
    help="tf.data threads (default: every CPU this process may use)",
  )
  p.add_argument("--json", default=None, help="also write the summary here")
  p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
  p.add_argument("--root", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(measure(args.worker, args.root, args.threads, args.warmup, args.batches)))
    return

  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.images)
    sizes = [os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs]
    print(
      f"{args.images} JPEGs, mean {np.mean(sizes) / 1024:.0f} KiB; {args.threads} tf.data threads; "
      f"{len(os.sched_getaffinity(0))} CPUs; {args.repeats} alternating runs of {args.batches} "
      f"batches of {BATCH} each",
      flush=True,
    )
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for r in range(args.repeats):
      for kind in KINDS[r % 3 :] + KINDS[: r % 3]:  # each kind first, middle and last in turn
        runs[kind].append(_run_worker(kind, root, args.threads, args.warmup, args.batches))

  metrics = ("images_per_s", "images_per_core_s", "cores_busy")
  med = {k: {m: statistics.median(x[m] for x in v) for m in metrics} for k, v in runs.items()}
  ratio = med["tf"]["images_per_core_s"] / med["pil"]["images_per_core_s"]
  print()
  print("| loader                         | images/s | cores busy | images/s per core |")
  print("| ------------------------------ | -------: | ---------: | ----------------: |")
  labels = {
    "tf": f"tf.data ({args.threads} threads)",
    "tf_randaug": "tf.data + RandAugment(2, 10)",
    "pil": "PIL + numpy (1 thread)",
  }
  for k, label in labels.items():
    m = med[k]
    print(
      f"| {label:<30} | {m['images_per_s']:8.1f} | {m['cores_busy']:10.2f} "
      f"| {m['images_per_core_s']:17.1f} |"
    )
  print(f"\ntf.data / PIL per core: {ratio:.2f}x (target >= 1.3x)")
  randaug_cost = med["tf"]["images_per_core_s"] / med["tf_randaug"]["images_per_core_s"]
  print(f"RandAugment(2, 10): {randaug_cost:.2f}x the CPU time per image of the plain pipeline")
  summary = {
    "tf_images_per_s": med["tf"]["images_per_s"],
    "tf_images_per_core_s": med["tf"]["images_per_core_s"],
    "tf_randaug_images_per_s": med["tf_randaug"]["images_per_s"],
    "tf_randaug_images_per_core_s": med["tf_randaug"]["images_per_core_s"],
    "randaug_cost_per_image": randaug_cost,
    "pil_images_per_s": med["pil"]["images_per_s"],
    "pil_images_per_core_s": med["pil"]["images_per_core_s"],
    "ratio_per_core": ratio,
    "threads": args.threads,
    "images": args.images,
    "repeats": args.repeats,
    "runs": runs,
  }
  print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
