"""What int8 post-training quantization changes in a classifier's answers, and its speed.

bf16_agreement.py's method and models, for `--quantize int8`:
  * the demo's fine-tuned ViT on its held-out digits, calibrated on its training digits;
  * a full-size ViT-B/16 with random weights at realistic scales, on crops of scikit-image's
    photographs, calibrated on other crops of them.
Each model runs in float32, with int8 weights, and with int8 weights and activations
(static ranges from the calibration images); with --layers, also once per layer group
with that group's inputs left float, to find which layers cost the agreement. Reported:
top-1 agreement with float32, the largest change of any probability, the median change of
float32's top class, and images per second of float32 and the two int8 settings, taken in
turn in one process (batches of 8, 64 images, the best of 5 rounds).

  python benchmarks/int8_agreement.py [--demo-workdir DIR] [--crops 256] [--layers]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import bf16_agreement as bf16
import numpy as np

from vit_jax.apps import classifier
from vit_jax.apps import demo
from vit_jax.data import preprocess
from vit_jax.models import quantize

# Layer groups (qwix module-path regexes) whose inputs --layers leaves float one at a time.
GROUPS = {
  "qkv": r".*MultiHeadDotProductAttention_0/(query|key|value)",
  "attention out": r".*MultiHeadDotProductAttention_0/out",
  "mlp in": r".*MlpBlock_0/Dense_0",
  "mlp out": r".*MlpBlock_0/Dense_1",
  "head": r"(head|pre_logits)",
}


def _speeds(clfs: dict[str, classifier.Classifier], images: np.ndarray, rounds: int) -> dict:
  """Images per second of each classifier in predict's batches of 8 (compiled first), the best
  of `rounds` passes taken in turn, so that load from other work on the CPU hits them alike."""
  for clf in clfs.values():
    clf.logits(images[: clf.batch_size])  # compiles
  best = dict.fromkeys(clfs, float("inf"))
  for _ in range(rounds):
    for name, clf in clfs.items():
      t = time.perf_counter()
      clf.logits(images)
      best[name] = min(best[name], time.perf_counter() - t)
  return {name: len(images) / t for name, t in best.items()}


def _quantized(clf: classifier.Classifier, calibration: np.ndarray | None, **setting):
  """`clf` with int8 weights (and activations, calibrated on `calibration`), as --quantize does."""
  batches = None
  if calibration is not None:
    batches = [calibration[i : i + 8] for i in range(0, len(calibration), 8)]
  setting = quantize.Setting(activations=calibration is not None, **setting)
  model, params, setting = quantize.quantize(clf.model, clf.params, batches, setting)
  return dataclasses.replace(clf, model=model, params=params, quantized=setting.describe())


def compare(
  checkpoint: str, images: np.ndarray, calibration: np.ndarray, layers: bool, **kw
) -> dict:
  """float32 against int8 weights, and int8 weights + activations calibrated on `calibration`."""
  clf = classifier.load_classifier(checkpoint, dtype="float32", **kw)
  p32 = np.asarray(clf.activation(clf.logits(images)))
  out = {"images": len(images), "calibration_images": len(calibration)}
  runs = {"int8 weights": (None, {}), "int8 weights+activations": (calibration, {})}
  if layers:
    for group, pattern in GROUPS.items():
      runs[f"int8 weights+activations, {group} inputs float"] = (
        calibration,
        {"skip_activations": (pattern,)},
      )
  timed = {"float32": clf}
  for name, (cal, setting) in runs.items():
    q = _quantized(clf, cal, **setting)
    out[name] = bf16.agreement(p32, np.asarray(q.activation(q.logits(images))))
    if name in ("int8 weights", "int8 weights+activations"):
      timed[name] = q
  speed = _speeds(timed, images[:64], rounds=5)
  out["float32_img_s"] = speed.pop("float32")
  for name, img_s in speed.items():
    out[name]["img_s"] = img_s
  return out


def demo_digits(workdir: str | None, layers: bool) -> dict:
  """The demo's fine-tuned model on its held-out digits 5-9, calibrated on training digits."""
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix="int8-demo-")
    demo.run(workdir)
  ckpt = os.path.join(workdir, "finetune", "final.npz")
  size = classifier.load_classifier(ckpt).image_size
  read = lambda paths: np.stack(
    [preprocess.eval_resize(preprocess.read_rgb(p), size) for p in paths]
  )
  root = os.path.join(workdir, "digits", "b")
  test = classifier.calibration_paths(os.path.join(root, "test"), 10**9)  # all, sorted
  calibration = read(classifier.calibration_paths(os.path.join(root, "train"), 64))
  return compare(
    ckpt,
    read(test),
    calibration,
    layers,
    labels_path=os.path.join(workdir, "finetune", "labels.txt"),
  )


def random_b16(crops: int, layers: bool) -> dict:
  """A full-size ViT-B/16 on crops of the photographs (bf16_agreement's), calibrated on 64 other
  crops."""
  cf = bf16._fixtures()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "b16.npz")
    cf.write_original(path, cf.Spec(**cf.B16, image_size=224, classes=1000))
    return compare(path, bf16.photo_crops(crops, 0), bf16.photo_crops(64, 1), layers)


def cpu_flags() -> str:
  """`lscpu | grep -o 'avx512\\w*\\|amx\\w*' | sort -u`, on one line."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return " ".join(sorted(set(re.findall(r"(?:avx512|amx)\w*", out)))) or "none"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--demo-workdir", default=None, help="a finished `vit-jax demo` run (default: run one)"
  )
  ap.add_argument("--crops", type=int, default=256, help="photograph crops for ViT-B/16")
  ap.add_argument("--skip-b16", action="store_true")
  ap.add_argument("--skip-demo", action="store_true")
  ap.add_argument(
    "--layers", action="store_true", help="also leave each layer group's inputs float"
  )
  ap.add_argument("--json-only", action="store_true")
  args = ap.parse_args()
  result = {
    "machine": bf16.machine(),
    "cpu_flags": cpu_flags(),
    "date": time.strftime("%Y-%m-%d"),
  }
  if not args.skip_demo:
    result["demo digits"] = demo_digits(args.demo_workdir, args.layers)
  if not args.skip_b16:
    result["ViT-B/16 random weights"] = random_b16(args.crops, args.layers)
  clear = lambda v: (
    "none"
    if v["clear_lead_agreement"] is None
    else f"{v['clear_lead_agreement']:.2%} of {v['clear_lead_images']}"
  )
  if not args.json_only:
    print(f"{result['machine']}; {result['cpu_flags']}; {result['date']}")
    print(
      "| model | setting | images | top-1 agreement | max prob diff | median top-class diff "
      "| median top-1 lead | agreement where the lead > max diff | img/s (float32 img/s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in result.items():
      if not isinstance(r, dict):
        continue
      for setting, v in r.items():
        if isinstance(v, dict):
          speed = f"{v['img_s']:.1f} ({r['float32_img_s']:.1f})" if "img_s" in v else ""
          print(
            f"| {name} | {setting} | {r['images']} | {v['top1_agreement']:.2%} | "
            f"{v['max_prob_diff']:.4f} | {v['median_top_prob_diff']:.2e} | "
            f"{v['median_top1_margin']:.2e} | {clear(v)} | {speed} |"
          )
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
