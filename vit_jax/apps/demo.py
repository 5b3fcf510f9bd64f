"""`vit-jax demo`: transfer learning end to end, offline, on scikit-learn's handwritten digits.

1. Write the 8x8 digits as an image folder (upsampled PNGs), split by class:
   digits 0-4 for pre-training, digits 5-9 as the new task.
2. Pre-train a small ViT on 0-4 at 16 px; export it in the original `.npz` layout.
3. Fine-tune on 5-9 at 24 px from that file through `load_pretrained` (position
   embeddings resized, head reset), the tf.data pipeline, the sharded step over
   several CPU devices, Orbax checkpoints and evaluation.
4. Predict a few held-out images, and draw the learning curves and a grid.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from PIL import Image

from vit_jax import errors
from vit_jax.apps import classifier
from vit_jax.apps import fewshot
from vit_jax.config import schema
from vit_jax.platform import files
from vit_jax.training import evaluation
from vit_jax.training import train

DIGITS_A, DIGITS_B = range(0, 5), range(5, 10)


def _say(msg: str) -> None:
  print(f"[demo] {msg}", flush=True)


def write_digit_folders(root: str, size: int = 32, seed: int = 0) -> dict[str, dict[str, int]]:
  """sklearn's digits as ROOT/{a,b}/{train,val,test}/{digit}/*.png; returns image counts."""
  from sklearn.datasets import load_digits  # noqa: PLC0415  # the demo extra

  digits = load_digits()
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(digits.target))
  counts: dict[str, dict[str, int]] = {}
  for task, classes in (("a", DIGITS_A), ("b", DIGITS_B)):
    idx = [i for i in order if digits.target[i] in classes]
    n = len(idx)
    parts = {
      "train": idx[: int(0.6 * n)],
      "val": idx[int(0.6 * n) : int(0.75 * n)],
      "test": idx[int(0.75 * n) :],
    }
    counts[task] = {}
    for split, ids in parts.items():
      for i in ids:
        d = os.path.join(root, task, split, f"digit_{digits.target[i]}")
        os.makedirs(d, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(
          os.path.join(d, f"{i:04d}.png")
        )
      counts[task][split] = len(ids)
  return counts


def digits_config(folder: str, image_size: int, steps: int, pretrained: str | None):
  """The config of a demo run on a digits folder: a small ViT, no flips, batch 64."""
  c = schema.base()
  c.dataset = "folder"
  c.folder = folder
  c.image_size = image_size
  c.model.name = None  # not a published variant: every field is given
  c.model.update(dict(hidden_size=96, mlp_dim=192, num_heads=3, num_layers=4, patch_size=4))
  c.pretrained = pretrained
  # Digits are small and centred: a mild crop, no flips (a flipped 2 is not a 2).
  c.augment.update(dict(inception_crop=False, hflip=False))
  c.batch_size, c.eval_batch_size = 64, 64
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 20, steps
  c.shuffle_buffer = 1024
  c.log_every, c.eval_every, c.checkpoint_every = 10, max(steps // 4, 1), max(steps // 2, 1)
  c.best_metric = "accuracy"
  c.async_checkpointing = True
  return c


def _curve(workdir: str) -> dict[str, list]:
  rows = [
    json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")
  ]
  return {
    "train": [(r["step"], r["loss"]) for r in rows if r["split"] == "train"],
    "eval": [(r["step"], r["accuracy"]) for r in rows if r["split"] == "eval"],
  }


def _plots(
  out_dir: str, curves: dict[str, dict[str, list]], grid: list[tuple[np.ndarray, str, str]]
) -> list[str]:
  import matplotlib  # noqa: PLC0415  # the demo extra

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415  # the demo extra

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, c in curves.items():
    if c["train"]:
      ax1.plot(*zip(*c["train"], strict=True), label=name)
    if c["eval"]:
      ax2.plot(*zip(*c["eval"], strict=True), marker="o", label=name)
  ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
  ax2.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="validation accuracy")
  for ax in (ax1, ax2):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  curves_png = os.path.join(out_dir, "learning_curves.png")
  fig.savefig(curves_png, dpi=110)
  plt.close(fig)
  cols = 8
  rows = (len(grid) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.55))
  for ax, (img, pred, true) in zip(np.ravel(axes), grid, strict=False):  # more axes than images
    ax.imshow(img, cmap="gray")
    ok = pred == true
    ax.set_title(f"{pred}\n(true {true})", fontsize=8, color="green" if ok else "red")
    ax.axis("off")
  for ax in np.ravel(axes)[len(grid) :]:
    ax.axis("off")
  fig.tight_layout()
  grid_png = os.path.join(out_dir, "predictions.png")
  fig.savefig(grid_png, dpi=110)
  plt.close(fig)
  return [curves_png, grid_png]


def run(
  workdir: str = "demo-run", pretrain_steps: int = 300, finetune_steps: int = 200
) -> dict[str, Any]:
  """Runs the demo in `workdir`; returns the summary numbers."""
  if files.is_remote(workdir):  # it writes thousands of small images and reads them back
    raise errors.ConfigError(
      f"--workdir {workdir}: the demo runs on local disk; give a local directory"
    )
  t0 = time.perf_counter()

  os.makedirs(workdir, exist_ok=True)
  data = os.path.join(workdir, "digits")
  _say(f"1/5 writing scikit-learn's handwritten digits as an image folder under {data}")
  counts = write_digit_folders(data)
  _say(f"    digits 0-4 (pre-training): {counts['a']}; digits 5-9 (new task): {counts['b']}")
  _say(f"    {jax.device_count()} CPU devices; batches are sharded over all of them")

  _say(f"2/5 pre-training a small ViT on digits 0-4 at 16 px ({pretrain_steps} steps)")
  pre_dir = os.path.join(workdir, "pretrain")
  pre_cfg = digits_config(os.path.join(data, "a"), 16, pretrain_steps, None)
  pre = train.train_and_evaluate(pre_cfg, pre_dir)
  pre_ckpt = os.path.join(pre_dir, "final.npz")
  _say(
    f"    pre-trained: accuracy {pre['test']['accuracy']:.3f} on digits 0-4; saved {pre_ckpt} "
    "(original ViT .npz layout)"
  )

  _say(
    "3/5 fine-tuning on digits 5-9 at 24 px from that checkpoint: position embeddings "
    "resized 4x4 -> 6x6, head re-initialised"
  )
  ft_dir = os.path.join(workdir, "finetune")
  ft_cfg = digits_config(os.path.join(data, "b"), 24, finetune_steps, pre_ckpt)
  ft_cfg.base_lr = 0.03
  before = evaluation.evaluate(ft_cfg, pre_ckpt, "test")
  # The paper's few-shot linear evaluation: 10 training images per class, frozen features.
  few_before = fewshot.evaluate(ft_cfg, pre_ckpt, shots=(10,))["shots"]["10"]["mean"]
  _say(
    f"    before fine-tuning (zero head): accuracy {before['accuracy']:.3f}; "
    f"10-shot linear on the pre-trained features: {few_before:.3f}"
  )
  ft = train.train_and_evaluate(ft_cfg, ft_dir)
  after = ft["test"]
  few_after = fewshot.evaluate(ft_cfg, os.path.join(ft_dir, "final.npz"), shots=(10,))["shots"][
    "10"
  ]["mean"]

  _say("4/5 predicting held-out images with `vit-jax predict`'s library")
  clf = classifier.load_classifier(
    os.path.join(ft_dir, "final.npz"), labels_path=os.path.join(ft_dir, "labels.txt")
  )
  test_root = os.path.join(data, "b", "test")
  paths = sorted(
    os.path.join(test_root, d, f)
    for d in sorted(os.listdir(test_root))
    for f in sorted(os.listdir(os.path.join(test_root, d)))
  )[::9][:24]
  grid = []
  for r in classifier.classify_files(clf, paths, k=1):
    true = os.path.basename(os.path.dirname(r.image))
    pred = r.predictions[0]["label"]
    with Image.open(r.image) as im:
      grid.append((np.asarray(im), pred, true))
  shown_ok = sum(p == t for _, p, t in grid)
  _say(f"    {shown_ok}/{len(grid)} of the shown images right; e.g. {paths[0]} -> {grid[0][1]}")

  _say("5/5 drawing the learning curves and a grid of predictions")
  pngs = _plots(
    workdir,
    {"pre-train (0-4, 16 px)": _curve(pre_dir), "fine-tune (5-9, 24 px)": _curve(ft_dir)},
    grid,
  )
  elapsed = time.perf_counter() - t0
  summary = {
    "before_accuracy": before["accuracy"],
    "after_accuracy": after["accuracy"],
    "fewshot_10_before": few_before,
    "fewshot_10_after": few_after,
    "test_images": after["count"],
    "pretrain_accuracy": pre["test"]["accuracy"],
    "seconds": elapsed,
    "workdir": workdir,
  }
  print()
  print("Summary")
  print(f"  pre-trained on digits 0-4: test accuracy {pre['test']['accuracy']:.3f}")
  print(
    f"  digits 5-9 before fine-tuning: {before['accuracy']:.3f}; after: {after['accuracy']:.3f} "
    f"({after['count']} held-out images)"
  )
  print(
    f"  10-shot linear accuracy (frozen features, mean of 3 seeds): pre-trained {few_before:.3f}, "
    f"fine-tuned {few_after:.3f}"
  )
  print(
    f"  checkpoints: {pre_ckpt}, {ft_dir}/checkpoints (Orbax), {ft_dir}/final.npz, "
    f"{ft_dir}/best.npz"
  )
  print(f"  TensorBoard: tensorboard --logdir {workdir}")
  print(f"  pictures: {', '.join(pngs)}")
  print(
    f"  predict: vit-jax predict --checkpoint {ft_dir}/final.npz --labels {ft_dir}/labels.txt "
    f"{paths[0]}"
  )
  print(f"  took {elapsed:.0f} s")
  print(f"fine-tuned accuracy {after['accuracy']:.3f} on {after['count']} held-out images")
  return summary
