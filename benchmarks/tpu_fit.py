"""The README's table of configs, TPU topologies, HBM per device and fit, from `vit-jax aot`.

Each row runs `vit-jax aot --json-only` (the real TPU compiler, through libtpu,
on this CPU machine) and reads its JSON line. A full-size ViT-B/16 step takes
about a minute to compile on 2 cores.

  python benchmarks/tpu_fit.py [--out fit.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GiB = 1024 ** 3
ROWS = [  # (label, config, topology, overrides)
    ("pre-training, as configured (bf16 + remat)", "vit_b16_pretrain_i21k", "v3-8", []),
    ("pre-training, bf16 only", "vit_b16_pretrain_i21k", "v3-8", ["--config.model.remat=False"]),
    ("pre-training, remat only", "vit_b16_pretrain_i21k", "v3-8", ["--config.model.dtype=float32"]),
    ("pre-training, plain fp32", "vit_b16_pretrain_i21k", "v3-8",
     ["--config.model.dtype=float32", "--config.model.remat=False"]),
    ("fine-tune ImageNet 384", "vit_b16_imagenet", "v3-8", []),
    ("fine-tune CIFAR-10 384", "vit_b16_cifar10", "v3-8", []),
    ("fine-tune ImageNet 384, ViT-L/16", "vit_b16_imagenet", "v3-8", ["--config.model.name=ViT-L_16"]),
    ("fine-tune ImageNet 384, 4 hosts", "vit_b16_imagenet", "v4-32", []),
]


def run(config: str, topology: str, overrides: list[str]) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "vit_jax.cli", "aot", "--json-only", "--config",
         os.path.join(root, "configs", f"{config}.py"), "--topology", topology, *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[tuple[str, dict]]) -> str:
  lines = ["| setup | model | topology | batch (per device) | dtype / remat | train HBM per device | fits | "
           "compiled TFLOP per step per device | est. step s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for label, r in rows:
    t = r["train"]
    peak = t.get("hbm_peak_bytes")
    hbm = f"{peak / GiB:.2f} GiB" if peak else "n/a"
    if not t["fits"] and t.get("hbm_limit_bytes"):
      hbm = f"> {t['hbm_limit_bytes'] / GiB:.2f} GiB (needs {peak / GiB:.2f} GiB of temporaries)"
    flops = f"{t['flops_per_device'] / 1e12:.1f}" if t.get("flops_per_device") else "-"
    est = f"{t['estimated_step_seconds']:.2f}" if t.get("estimated_step_seconds") else "-"
    lines.append(f"| {label} | {r['model']} @ {r['image_size']} | {r['topology']} ({r['devices']} dev, "
                 f"{r['hosts']} host) | {r['global_batch']} ({r['per_device_batch']}) | "
                 f"{r['dtype']} / {'remat' if r['remat'] else 'no remat'} | {hbm} of "
                 f"{r['hbm_capacity_bytes'] / GiB:.0f} GiB | {'yes' if t['fits'] else 'no'} | {flops} | {est} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None, help="also write the JSON lines here")
  args = ap.parse_args()
  results = []
  for label, config, topology, overrides in ROWS:
    r = run(config, topology, overrides)
    results.append((label, r))
    print(f"{label}: {'fits' if r['fits'] else 'does not fit'}", file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"label": label, **r}) + "\n")
  print(markdown(results))


if __name__ == "__main__":
  main()
