"""Compile a config's exact train and inference steps for a TPU topology, on a CPU machine.

With `libtpu` installed, JAX describes a TPU slice without the hardware
(`jax.experimental.topologies`) and the real TPU compiler compiles the sharded
step for it: same mesh, shardings, dtypes and batch as `vit-jax train` would
run. The compiler reports memory (does it fit in HBM?) and cost (FLOPs, an
estimated step time). Run with JAX_PLATFORMS=cpu (the command sets it).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import errors
from vit_jax import resnet
from vit_jax import sharding
from vit_jax import steps

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice: its topology string for libtpu and its HBM per JAX device."""
  name: str
  topology: str
  hbm_bytes: int
  options: tuple[tuple[str, Any], ...] = ()


# HBM per JAX device: a v3 core, a v4/v5p megacore chip, a v5e/v6e chip.
TOPOLOGIES = {t.name: t for t in [
    Topology("v3-8", "v3:2x2", 16 * GiB),
    Topology("v3-32", "v3:4x4", 16 * GiB),
    Topology("v4-8", "v4:2x2x1", 32 * GiB, (("chip_config_name", "megacore"),)),
    Topology("v4-32", "v4:2x2x4", 32 * GiB, (("chip_config_name", "megacore"),)),
    Topology("v5e-8", "v5e:2x4", 16 * GiB, (("chips_per_host_bounds", (2, 4, 1)),)),
    Topology("v5e-16", "v5e:4x4", 16 * GiB),
    Topology("v5p-8", "v5p:2x2x1", 95 * GiB, (("chip_config_name", "megacore"),)),
    Topology("v6e-8", "v6e:2x4", 32 * GiB, (("chips_per_host_bounds", (2, 4, 1)),)),
]}


def model_flops_per_image(model, train: bool = True, as_computed: bool = False) -> float:
  """Analytic FLOPs (2 x multiply-adds) per image: forward, or 3x forward for a training step.

  The nominal count (the figure MFU is quoted against) runs every block on
  every token; `as_computed` counts what the model runs, whose last block
  works on the class token alone (see `models.Encoder.output_tokens`).
  """
  tokens = model.grid_size ** 2 + (1 if model.classifier == "token" else 0)
  d, m = model.hidden_size, model.mlp_dim
  channels = 3 if model.resnet_layers is None else resnet.out_channels(model.resnet_layers)
  macs = model.grid_size ** 2 * model.patch_size ** 2 * channels * d  # patch embedding
  if model.resnet_layers is not None:  # a hybrid's ResNet, before the patches
    macs += resnet.macs(model.resnet_layers, model.image_size)
  per_block = lambda queries: (2 * tokens * d * d + 2 * queries * d * d  # k, v; q, out
                               + 2 * queries * tokens * d + 2 * queries * d * m)
  pruned = as_computed and model.classifier == "token" and not model.scan
  macs += (model.num_layers - 1) * per_block(tokens) + per_block(1 if pruned else tokens)
  if model.representation_size:
    macs += d * model.representation_size
  macs += (model.representation_size or d) * (model.num_classes or 0)
  return 2.0 * macs * (3 if train else 1)


def get_devices(topology: str) -> list:
  """The devices of a TPU slice described by libtpu (no hardware needed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  if topology not in TOPOLOGIES:
    raise errors.ConfigError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
  t = TOPOLOGIES[topology]
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=t.topology, **dict(t.options))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"cannot describe TPU topology {topology} ({str(e).splitlines()[0]}); "
                           "is libtpu installed (pip install 'vit-jax[aot]')?") from None
  return list(desc.devices)


# The two forms of the TPU compiler's out-of-memory message.
_OOM = (re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", re.I),
        re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM "
                   r"\(([\d.]+)([KMGT])?\)", re.I))
_UNIT = {None: 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 * GiB}


def _compile(fn, *args) -> tuple[Any, str | None]:
  """Compiled executable, or None and the compiler's out-of-memory message."""
  try:
    return fn.lower(*args).compile(), None
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "hbm" in str(e).lower():
      return None, str(e)
    raise


def _report(compiled, error: str | None, capacity: int) -> dict[str, Any]:
  if compiled is None:
    m = next((m for p in _OOM if (m := p.search(error or ""))), None)
    used = int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None
    limit = int(float(m.group(3)) * _UNIT[m.group(4)]) if m else None
    # When only temporaries are reported, the true peak is higher still: a lower bound.
    return {"fits": False, "hbm_peak_bytes": used, "hbm_limit_bytes": limit,
            "error": (error or "").strip().splitlines()[0][:300]}
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Donated arguments alias outputs: count those bytes once.
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
  return {"fits": peak <= capacity, "hbm_peak_bytes": int(peak),
          "hbm_breakdown": {"arguments": int(mem.argument_size_in_bytes),
                            "temporaries": int(mem.temp_size_in_bytes),
                            "outputs": int(mem.output_size_in_bytes),
                            "aliased": int(mem.alias_size_in_bytes),
                            "code": int(mem.generated_code_size_in_bytes)},
          "flops_per_device": float(cost.get("flops", 0.0)),
          # Multi-host slices get no usable estimate (the compiler returns a negative number).
          "estimated_step_seconds": seconds if (seconds := float(cost.get("optimal_seconds", 0.0))) > 0
                                    else None}


def check(config: ml_collections.ConfigDict, topology: str, num_classes: int | None = None
          ) -> dict[str, Any]:
  """Compiles the config's train and inference steps for `topology`; returns the report."""
  devices = get_devices(topology)
  capacity = TOPOLOGIES[topology].hbm_bytes
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  classes = num_classes or config.num_classes or _default_classes(config)
  # The data is not opened here: a multi-label list is the one kind known from the config.
  setup = steps.Setup(config, classes, config.dataset == "multilabel", mesh)
  size = config.image_size
  data_devices = mesh.shape["data"] * mesh.shape["fsdp"]

  def batch(n, with_mask=False):
    spec = {"image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=setup.batch_sharding),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=setup.batch_sharding)}
    if with_mask:
      spec["mask"] = jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=setup.batch_sharding)
    return spec

  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  train = _report(*_compile(setup.jit_train_step(), setup.abstract_state(), batch(config.batch_size), rng),
                  capacity)
  eval_bs = config.eval_batch_size
  params = setup.abstract_state().params
  infer = _report(*_compile(setup.jit_eval_step(), params, batch(eval_bs, True)), capacity)
  return {
      "topology": topology, "devices": len(devices),
      "hosts": len({d.process_index for d in devices}),
      "mesh": dict(mesh.shape), "model": str(setup.model.spec), "image_size": size,
      "dtype": config.model.dtype, "remat": bool(config.model.remat),
      "accum_steps": setup.accum_steps,
      "global_batch": config.batch_size, "per_device_batch": config.batch_size // data_devices,
      "hbm_capacity_bytes": capacity,
      "model_flops_per_image": model_flops_per_image(setup.model, train=True),
      **{k: train.get(k) for k in ("hbm_peak_bytes", "fits", "flops_per_device", "estimated_step_seconds")},
      "train": train, "inference": {"global_batch": eval_bs, **infer},
  }


def _default_classes(config: ml_collections.ConfigDict) -> int:
  known = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000, "imagenet21k": 21843,
           "oxford_iiit_pet": 37}
  return known.get(config.dataset, 1000)


def table(report: dict[str, Any]) -> str:
  """A readable summary of one report."""
  def gib(x):
    return "n/a" if x is None else f"{x / GiB:.2f} GiB"
  r, t, i = report, report["train"], report["inference"]
  rows = [("topology", f"{r['topology']} ({r['devices']} devices, {r['hosts']} host(s), mesh {r['mesh']})"),
          ("model", f"{r['model']} at {r['image_size']}px, {r['dtype']}, remat={r['remat']}, "
                    f"accum_steps={r['accum_steps']}"),
          ("batch", f"{r['global_batch']} global, {r['per_device_batch']} per device"),
          ("train step HBM", f"{gib(t.get('hbm_peak_bytes'))} of {gib(r['hbm_capacity_bytes'])} "
                             f"-> {'fits' if t['fits'] else 'DOES NOT FIT'}"),
          ("inference HBM", f"{gib(i.get('hbm_peak_bytes'))} (batch {i['global_batch']}) -> "
                            f"{'fits' if i['fits'] else 'DOES NOT FIT'}"),
          ("model FLOPs/image", f"{r['model_flops_per_image'] / 1e9:.1f} GFLOP (3x forward)")]
  if t.get("flops_per_device"):
    rows.append(("compiled FLOPs/device", f"{t['flops_per_device'] / 1e12:.2f} TFLOP per step"))
  if t.get("estimated_step_seconds"):
    rows.append(("estimated step time", f"{t['estimated_step_seconds']:.3f} s (compiler's estimate)"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(report: dict[str, Any]) -> str:
  return json.dumps(report, sort_keys=False)
