"""Compile a config's exact train and inference steps for a TPU topology, on a CPU machine.

With `libtpu` installed, JAX describes a TPU slice without the hardware
(`jax.experimental.topologies`) and the real TPU compiler compiles the sharded
step for it: same mesh, shardings, dtypes and batch as `vit-jax train` would
run. The compiler reports memory (does it fit in HBM?) and cost (FLOPs, an
estimated step time). Run with JAX_PLATFORMS=cpu (the command sets it).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from vit_jax import errors
from vit_jax.models import resnet
from vit_jax.planning import tpus
from vit_jax.platform import jax_setup
from vit_jax.training import sharding
from vit_jax.training import steps

GiB = 1024**3


def model_flops_per_image(model, train: bool = True, as_computed: bool = False) -> float:
  """Analytic FLOPs (2 x multiply-adds) per image: forward, or 3x forward for a training step.

  The nominal count (the figure MFU is quoted against) runs every block on
  every token; `as_computed` counts what the model runs, whose last block
  works on the class token alone (see `models.Encoder.output_tokens`).
  """
  tokens = model.grid_size**2 + (1 if model.classifier == "token" else 0)
  d, m = model.hidden_size, model.mlp_dim
  channels = 3 if model.resnet_layers is None else resnet.out_channels(model.resnet_layers)
  macs = model.grid_size**2 * model.patch_size**2 * channels * d  # patch embedding
  if model.resnet_layers is not None:  # a hybrid's ResNet, before the patches
    macs += resnet.macs(model.resnet_layers, model.image_size)
  per_block = lambda queries: (
    2 * tokens * d * d
    + 2 * queries * d * d  # k, v; q, out
    + 2 * queries * tokens * d
    + 2 * queries * d * m
  )
  pruned = as_computed and model.classifier == "token" and not model.scan
  macs += (model.num_layers - 1) * per_block(tokens) + per_block(1 if pruned else tokens)
  if model.representation_size:
    macs += d * model.representation_size
  macs += (model.representation_size or d) * (model.num_classes or 0)
  return 2.0 * macs * (3 if train else 1)


def topology(name: str) -> tpus.Topology:
  """The slice called `name`, or a one-line error listing the known ones."""
  if name not in tpus.TOPOLOGIES:
    raise errors.ConfigError(f"unknown topology {name!r}; known: {', '.join(tpus.TOPOLOGIES)}")
  return tpus.TOPOLOGIES[name]


def get_devices(slice_: str | tpus.Topology) -> list:
  """The devices of a TPU slice described by libtpu (no hardware needed)."""
  t = topology(slice_) if isinstance(slice_, str) else slice_
  jax_setup.allow_several_compile_only_libtpus()  # before libtpu loads, on the first call
  try:
    desc = topologies.get_topology_desc(
      platform="tpu", topology_name=t.topology, **t.libtpu_options
    )
  except Exception as e:
    raise errors.UserError(
      f"cannot describe TPU topology {t.name} ({str(e).splitlines()[0]}); "
      "is libtpu installed (pip install 'vit-jax[aot]')?"
    ) from None
  return list(desc.devices)


# The two forms of the TPU compiler's out-of-memory message.
_OOM = (
  re.compile(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", re.I),
  re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM "
    r"\(([\d.]+)([KMGT])?\)",
    re.I,
  ),
)
_UNIT = {None: 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024 * GiB}


def _oom_bytes(error: str) -> tuple[int | None, int | None]:
  """(bytes needed, bytes available) from the compiler's out-of-memory message."""
  m = next((m for p in _OOM if (m := p.search(error or ""))), None)
  if not m:
    return None, None
  return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


def usable_hbm_bytes(slice_: str | tpus.Topology) -> int:
  """The HBM per device the TPU compiler lets a program use on this slice (a little under the
  chip's).
  """
  return _usable_hbm_bytes((topology(slice_) if isinstance(slice_, str) else slice_).chip.name)


@functools.cache
def _usable_hbm_bytes(chip: str) -> int:
  """Read off the compiler's own out-of-memory message for a program that cannot fit (well under
  a second): 15.48 GiB of a v3 core's 16, 30.75 of a v4's 32 with libtpu 0.0.50."""
  t = tpus.CHIPS[chip]
  devices = get_devices(tpus.Topology(f"{chip}-1chip", t, t.one_chip_topology))
  mesh = jax.sharding.Mesh(devices, ("d",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  huge = 4 * t.hbm_bytes_per_device  # four times the chip's HBM per device, in float32
  fn = jax.jit(
    lambda x: jnp.zeros((len(devices) * huge // 4,), jnp.float32) + x[0], out_shardings=shard
  )
  compiled, error = _compile(fn, jax.ShapeDtypeStruct((len(devices),), jnp.float32, sharding=shard))
  _, available = _oom_bytes(error or "")
  if compiled is not None or available is None:
    raise RuntimeError(
      f"the TPU compiler accepted or misreported a program of {huge} bytes per device: "
      f"{(error or '')[:300]}"
    )
  return available


def _compile(fn, *args) -> tuple[Any, str | None]:
  """Compiled executable, or None and the compiler's out-of-memory message."""
  try:
    return fn.lower(*args).compile(), None
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "hbm" in str(e).lower():
      return None, str(e)
    raise


def _report(compiled, error: str | None, usable: int) -> dict[str, Any]:
  if compiled is None:
    used, limit = _oom_bytes(error or "")
    # When only temporaries are reported, the true peak is higher still: a lower bound.
    return {
      "fits": False,
      "hbm_peak_bytes": used,
      "hbm_limit_bytes": limit or usable,
      "error": (error or "").strip().splitlines()[0][:300],
    }
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Donated arguments alias outputs: count those bytes once.
  peak = (
    mem.argument_size_in_bytes
    + mem.temp_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.generated_code_size_in_bytes
  )
  return {
    "fits": peak <= usable,
    "hbm_peak_bytes": int(peak),
    "hbm_limit_bytes": usable,
    "hbm_breakdown": {
      "arguments": int(mem.argument_size_in_bytes),
      "temporaries": int(mem.temp_size_in_bytes),
      "outputs": int(mem.output_size_in_bytes),
      "aliased": int(mem.alias_size_in_bytes),
      "code": int(mem.generated_code_size_in_bytes),
    },
    "flops_per_device": float(cost.get("flops", 0.0)),
    "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
    # Some programs get no estimate: the compiler returns -1 plus a small number (seen
    # on multi-host slices, and on v4 and v5e beyond some per-device batch).
    "estimated_step_seconds": seconds
    if (seconds := float(cost.get("optimal_seconds", 0.0))) > 0
    else None,
    **({} if seconds > 0 else {"compiler_optimal_seconds": seconds}),
  }


@dataclasses.dataclass
class Program:
  """A config's steps on one slice: the mesh, the shapes, and what the compiler says of them."""

  config: ml_collections.ConfigDict
  slice: tpus.Topology
  num_classes: int

  def __post_init__(self):
    devices = get_devices(self.slice)
    self.mesh = sharding.make_mesh(self.config.mesh.to_dict(), devices)
    # The data is not opened here: a multi-label list is the one kind known from the config.
    self.setup = steps.Setup(
      self.config, self.num_classes, self.config.dataset == "multilabel", self.mesh
    )
    self.devices = len(devices)
    self.hosts = len({d.process_index for d in devices})
    self.data_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def _batch(self, n: int, with_mask: bool = False) -> dict:
    size, shard = self.config.image_size, self.setup.batch_sharding
    spec = {
      "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=shard),
      "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=shard),
    }
    if with_mask:
      spec["mask"] = jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=shard)
    return spec

  def train(self) -> dict[str, Any]:
    """The training step's report: fit, HBM, FLOPs and the compiler's step time."""
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(self.mesh))
    compiled = _compile(
      self.setup.jit_train_step(),
      self.setup.abstract_state(),
      self._batch(self.config.batch_size),
      rng,
    )
    report = _report(*compiled, usable_hbm_bytes(self.slice))
    accum = self.setup.accum_steps
    if accum > 1 and report["fits"]:
      # The compiler's cost analysis counts a loop's body once: the accumulation loop
      # (a lax.scan) is counted as one micro-batch. Scaled by the micro-batches, which
      # also counts the optimizer update accum times: an upper bound, by (accum - 1)
      # updates. For ViT-B/16 on v3-8, a whole step at one image per device is
      # estimated at 0.012 s, a micro-batch of 256 per device at 0.67 s.
      report["compiler_counted_one_micro_batch"] = {
        key: report[key]
        for key in ("flops_per_device", "bytes_accessed_per_device", "estimated_step_seconds")
      }
      report["flops_per_device"] *= accum
      report["bytes_accessed_per_device"] *= accum
      if report["estimated_step_seconds"] is not None:
        report["estimated_step_seconds"] *= accum
    return report

  def inference(self) -> dict[str, Any]:
    params = self.setup.abstract_state().params
    compiled = _compile(
      self.setup.jit_eval_step(), params, self._batch(self.config.eval_batch_size, True)
    )
    return {
      "global_batch": self.config.eval_batch_size,
      **_report(*compiled, usable_hbm_bytes(self.slice)),
    }

  def param_bytes(self) -> int:
    """Bytes of the parameters (and so of one gradient), as stored."""
    shapes = jax.tree_util.tree_leaves(self.setup.abstract_state().params)
    return int(sum(x.size * x.dtype.itemsize for x in shapes))


def roofline_seconds(report: dict[str, Any], slice_: tpus.Topology) -> float | None:
  """max(FLOPs / peak, bytes / HBM bandwidth) of one device's program: a lower bound on its time."""
  if not report.get("flops_per_device"):
    return None
  chip = slice_.chip
  return max(
    report["flops_per_device"] / chip.peak_flops_per_device,
    report.get("bytes_accessed_per_device", 0.0) / chip.hbm_bytes_per_s_per_device,
  )


def derived_step_seconds(
  config: ml_collections.ConfigDict,
  slice_: tpus.Topology,
  num_classes: int,
  slice_report: dict[str, Any] | None = None,
  try_chip: bool = True,
) -> dict[str, Any]:
  """A step time where the compiler gives none: one chip's compute, plus the collectives.

  t = t_chip + c * (n - 1) / n * P / B. t_chip is the compiler's estimate for the
  same per-device program compiled on one chip (the same per-device batch, dtype,
  remat and accumulation; no partitioning); where the compiler gives none there
  either (v4 and v5e, for ViT-B/16), the roofline of the slice's own per-device
  program (`roofline_seconds`, from `slice_report`). P is the bytes of the
  parameters (one gradient), n the slice's chips, B the chip's all-reduce
  bandwidth (`tpus.Chip`). c = 2 for data parallelism (a ring all-reduce sends
  and receives each byte twice) and 3 for FSDP (an all-gather of the parameters
  for the forward pass, another for the backward, a reduce-scatter of the
  gradients). Communication is not overlapped with compute: on that count an
  upper bound.
  """
  chip = slice_.single_chip()
  per_device = config.batch_size // (slice_.devices // config.mesh.model)
  one = copy.deepcopy(config)
  one.batch_size = one.eval_batch_size = per_device * chip.devices // config.mesh.model
  one.mesh.data, one.mesh.fsdp = -1, 1
  program = Program(one, chip, num_classes)
  report = program.train() if try_chip else {}
  chip_seconds, source = report.get("estimated_step_seconds"), "compiler"
  if chip_seconds is None and slice_report is not None:
    chip_seconds, source = roofline_seconds(slice_report, slice_), "roofline"
  n, bandwidth = slice_.chips, slice_.chip.allreduce_bytes_per_s
  comm = (3 if config.mesh.fsdp != 1 else 2) * (n - 1) / n * program.param_bytes() / bandwidth
  return {
    "chip_step_seconds": chip_seconds,
    "chip_step_source": None if chip_seconds is None else source,
    "collective_seconds": comm,
    "derived_step_seconds": None if chip_seconds is None else chip_seconds + comm,
  }


def mfu(
  model_flops_per_image: float, global_batch: int, seconds: float | None, slice_: tpus.Topology
) -> float | None:
  """Model FLOPs utilisation: the model's FLOPs per step over the slice's peak bf16 FLOP/s for that
  time.
  """
  if not seconds:
    return None
  return (
    model_flops_per_image
    * global_batch
    / (seconds * slice_.devices * slice_.chip.peak_flops_per_device)
  )


def check(
  config: ml_collections.ConfigDict, name: str, num_classes: int | None = None
) -> dict[str, Any]:
  """Compiles the config's train and inference steps for the slice `name`; returns the report."""
  t = topology(name)
  classes = num_classes or config.num_classes or default_classes(config)
  program = Program(config, t, classes)
  train, infer = program.train(), program.inference()
  flops_per_image = model_flops_per_image(program.setup.model, train=True)
  seconds, source = train.get("estimated_step_seconds"), "compiler"
  if seconds is None and train["fits"]:
    train.update(derived_step_seconds(config, t, classes, train))
    seconds, source = train["derived_step_seconds"], f"derived ({train['chip_step_source']})"
  return {
    "topology": name,
    "devices": program.devices,
    "hosts": program.hosts,
    "mesh": dict(program.mesh.shape),
    "model": str(program.setup.model.spec),
    "image_size": config.image_size,
    "dtype": config.model.dtype,
    "remat": bool(config.model.remat),
    "remat_policy": config.model.remat_policy if config.model.remat else None,
    "accum_steps": program.setup.accum_steps,
    "global_batch": config.batch_size,
    "per_device_batch": config.batch_size // program.data_devices,
    "hbm_capacity_bytes": t.chip.hbm_bytes_per_device,
    "hbm_usable_bytes": usable_hbm_bytes(name),
    "model_flops_per_image": flops_per_image,
    **{
      k: train.get(k)
      for k in ("hbm_peak_bytes", "fits", "flops_per_device", "estimated_step_seconds")
    },
    "step_seconds": seconds,
    "step_seconds_source": source if seconds else None,
    "mfu": mfu(flops_per_image, config.batch_size, seconds, t),
    "train": train,
    "inference": infer,
  }


def default_classes(config: ml_collections.ConfigDict) -> int:
  known = {
    "cifar10": 10,
    "cifar100": 100,
    "imagenet2012": 1000,
    "imagenet21k": 21843,
    "oxford_iiit_pet": 37,
  }
  return known.get(config.dataset, 1000)


def table(report: dict[str, Any]) -> str:
  """A readable summary of one report."""

  def gib(x):
    return "n/a" if x is None else f"{x / GiB:.2f} GiB"

  r, t, i = report, report["train"], report["inference"]
  rows = [
    (
      "topology",
      f"{r['topology']} ({r['devices']} devices, {r['hosts']} host(s), mesh {r['mesh']})",
    ),
    (
      "model",
      f"{r['model']} at {r['image_size']}px, {r['dtype']}, remat={r['remat']}, "
      f"accum_steps={r['accum_steps']}",
    ),
    ("batch", f"{r['global_batch']} global, {r['per_device_batch']} per device"),
    (
      "train step HBM",
      f"{gib(t.get('hbm_peak_bytes'))} of {gib(r['hbm_usable_bytes'])} usable "
      f"({gib(r['hbm_capacity_bytes'])} per device) "
      f"-> {'fits' if t['fits'] else 'DOES NOT FIT'}",
    ),
    (
      "inference HBM",
      f"{gib(i.get('hbm_peak_bytes'))} (batch {i['global_batch']}) -> "
      f"{'fits' if i['fits'] else 'DOES NOT FIT'}",
    ),
    ("model FLOPs/image", f"{r['model_flops_per_image'] / 1e9:.1f} GFLOP (3x forward)"),
  ]
  if t.get("flops_per_device"):
    rows.append(("compiled FLOPs/device", f"{t['flops_per_device'] / 1e12:.2f} TFLOP per step"))
  if r.get("step_seconds"):
    how = (
      "the compiler's estimate"
      if r["step_seconds_source"] == "compiler"
      else f"derived: one chip's {t['chip_step_seconds']:.3f} s ({t['chip_step_source']}) + "
      f"{t['collective_seconds']:.3f} s of collectives"
    )
    rows.append(("estimated step time", f"{r['step_seconds']:.3f} s ({how})"))
    rows.append(("MFU", f"{r['mfu']:.1%} of {r['devices']} devices' peak bf16 FLOP/s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(report: dict[str, Any]) -> str:
  return json.dumps(report, sort_keys=False)
