"""The paper's pre-training step from one TPU host to pods: compiler estimates, deviceless.

For each slice, `vit-jax aot --search` finds the fastest setting that fits
(dtype, remat, accumulation, mesh) for ViT-B/16 or ViT-L/16 at 224 px with the
global batch of 4096 (configs/vit_b16_pretrain_i21k.py), and this script reports
its per-device batch, HBM, estimated step time, images per second, MFU, and the
days that 90 epochs of ImageNet-21k (14.2M images) would take at that rate.

Step times are the TPU compiler's estimates where it gives one; where it gives
none (some multi-host slices), `aot.derived_step_seconds`: one chip's estimate
for the same per-device program, plus the gradient all-reduce at the chip's
published all-reduce bandwidth. On every slice where the compiler does give an
estimate, the derived figure is computed too, so the two can be compared.

  python benchmarks/tpu_scaling.py --out scaling.jsonl   # rows already in --out are kept
  python benchmarks/tpu_scaling.py --markdown scaling.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 14.2e6 * 90  # 90 epochs of ImageNet-21k
MODELS = {"ViT-B/16": "ViT-B_16", "ViT-L/16": "ViT-L_16"}
SLICES = {
  # TPUv3, the paper's hardware, from one host to 64. Other generations (tpus.TOPOLOGIES)
  # work the same; v4 and v5e get no compiler estimate for ViT-B/16 (the roofline
  # stands in) and each of their compiles takes minutes here.
  "ViT-B/16": ["v3-8", "v3-32", "v3-128", "v3-512"],
  "ViT-L/16": ["v3-128", "v3-512"],
}
# The paper's Table 2: ViT-L/16 pre-trained on ImageNet-21k took 0.23k TPUv3-core-days.
PAPER_L16_CORE_DAYS = 230


def measure(model: str, topology: str) -> dict:
  """One row: the search on `topology`, then the chosen setting's derived step time."""
  from vit_jax.config import config_args  # noqa: PLC0415  # the parent runs each row in its own process and loads no libtpu itself
  from vit_jax.planning import aot  # noqa: PLC0415  # the parent runs each row in its own process and loads no libtpu itself
  from vit_jax.planning import aot_search  # noqa: PLC0415  # the parent runs each row in its own process and loads no libtpu itself

  config = config_args.load_config(
    [
      "--config",
      os.path.join(ROOT, "configs", "vit_b16_pretrain_i21k.py"),
      f"--config.model.name={MODELS[model]}",
    ]
  )
  slice_ = aot.topology(topology)
  start = time.time()
  search = aot_search.Search(config, slice_, 21843)
  rows = list(search.run())
  result = aot_search.summary(rows, search)
  out = {
    "model": model,
    "topology": topology,
    "devices": slice_.devices,
    "hosts": len({d.process_index for d in aot.get_devices(slice_)}),
    "searched": result["searched"],
    "recommended": result["recommended"],
    "failures": [
      f"{r['variant']}: {r['error']}"
      for r in rows
      if r.get("error") and r.get("fits") is False and "RESOURCE_EXHAUSTED" not in r["error"]
    ],
  }
  top = aot_search.best(rows)
  if top is None:
    return {
      **out,
      "search_seconds": round(time.time() - start),
      "error": "no variant fits with 10% headroom",
    }
  chosen = aot_search.Variant(top["dtype"], top["remat"], top["accum_steps"], top["mesh"]).apply(
    config
  )
  derived = aot.derived_step_seconds(chosen, slice_, 21843)
  seconds = top["step_seconds"]
  return {
    **out,
    "search_seconds": round(time.time() - start),
    "per_device_batch": config.batch_size // slice_.devices,
    "variant": top["variant"],
    "hbm_peak_bytes": top["hbm_peak_bytes"],
    "hbm_usable_bytes": top["hbm_usable_bytes"],
    "step_seconds": seconds,
    "step_seconds_source": top["step_seconds_source"],
    "derived_step_seconds": derived["derived_step_seconds"],
    "derived": derived,
    "images_per_second": config.batch_size / seconds,
    "mfu": top["mfu"],
    "days_90_epochs_i21k": IMAGES / (config.batch_size / seconds) / 86400,
  }


def markdown(rows: list[dict]) -> str:
  gib = 1024**3
  lines = [
    "| model | slice | devices (hosts) | per-device batch | setting | HBM per device | "
    "est. step s | images/s | MFU | days, 90 epochs i21k | device-days | derived step s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    if r.get("error"):
      lines.append(f"| {r['model']} | {r['topology']} | | | {r['error']} | | | | | | | |")
      continue
    mark = "" if r["step_seconds_source"] == "compiler" else " (derived)"
    derived = "-" if r["derived_step_seconds"] is None else f"{r['derived_step_seconds']:.3f}"
    lines.append(
      f"| {r['model']} | {r['topology']} | {r['devices']} ({r['hosts']}) | "
      f"{r['per_device_batch']} | "
      f"{r['variant']} | {r['hbm_peak_bytes'] / gib:.2f} of {r['hbm_usable_bytes'] / gib:.2f} GiB "
      "| "
      f"{r['step_seconds']:.3f}{mark} | {r['images_per_second']:,.0f} | {r['mfu']:.0%} | "
      f"{r['days_90_epochs_i21k']:.1f} | {r['days_90_epochs_i21k'] * r['devices']:,.0f} | "
      f"{derived} |"
    )
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--out",
    default="tpu_scaling.jsonl",
    help="JSON lines, one per row (appended; kept rows skipped)",
  )
  ap.add_argument(
    "--markdown", metavar="JSONL", default=None, help="only print the table of a finished run"
  )
  ap.add_argument("--models", nargs="*", default=list(MODELS))
  ap.add_argument("--row", nargs=2, metavar=("MODEL", "SLICE"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.markdown:
    with open(args.markdown, encoding="utf-8") as f:
      print(markdown([json.loads(line) for line in f if line.strip()]))
    return
  if args.row:
    print(json.dumps(measure(*args.row)))
    return
  done = set()
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      done = {(r["model"], r["topology"]) for r in map(json.loads, filter(str.strip, f))}
  for model in args.models:
    for topology in SLICES[model]:
      if (model, topology) in done:
        continue
      # One process per row: each search compiles several programs, whose memory a
      # long-lived process would keep.
      proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--row", model, topology],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
      )
      if proc.returncode:
        raise RuntimeError(f"{model} on {topology}:\n{proc.stderr[-3000:]}")
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
      print(
        f"{model} {topology}: {row.get('variant', row.get('error'))}, "
        f"{row.get('step_seconds')} s, search {row['search_seconds']} s",
        file=sys.stderr,
        flush=True,
      )
  with open(args.out, encoding="utf-8") as f:
    print(markdown([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
  main()
