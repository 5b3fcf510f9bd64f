"""Cloud TPU generations and the slices `vit-jax aot` compiles for: published figures, with sources.

A JAX device is a TensorCore on v3 (two per chip) and a whole chip elsewhere
(v4 and v5p run their two TensorCores as one "megacore" device; v5e and v6e
have one TensorCore per chip). Figures are per chip as Google publishes them;
the `per_device` properties divide by the devices per chip. Google's pages write
"GB" for v5e, v5p and v6e HBM; the TPU compiler's usable limits (15.75, 31.24 GiB
on v5e, v6e) show binary units, as on v3 and v4.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip."""

  name: str
  peak_bf16_flops: float  # per chip
  hbm_bytes: int  # per chip
  hbm_bytes_per_s: float  # per chip
  devices_per_chip: int
  # The bandwidth one chip all-reduces at: the published all-reduce bandwidth of a
  # whole Pod divided by its chips, where Google publishes it (see `source`).
  allreduce_bytes_per_s: float
  one_chip_topology: str  # libtpu's topology string for a slice of one chip
  options: tuple[tuple[str, Any], ...]  # libtpu's options for this generation's slices
  source: str

  @property
  def peak_flops_per_device(self) -> float:
    return self.peak_bf16_flops / self.devices_per_chip

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.hbm_bytes // self.devices_per_chip

  @property
  def hbm_bytes_per_s_per_device(self) -> float:
    return self.hbm_bytes_per_s / self.devices_per_chip


_MEGACORE = (("chip_config_name", "megacore"),)
CHIPS: dict[str, Chip] = {
  c.name: c
  for c in [
    # 123 TFLOP/s bf16, 32 GiB HBM2 at 900 GB/s; all-reduce 340 TB/s per 1024-chip Pod.
    Chip(
      "v3",
      123e12,
      32 * GiB,
      900e9,
      2,
      340e12 / 1024,
      "v3:1x1",
      (),
      "https://cloud.google.com/tpu/docs/v3",
    ),
    # 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; all-reduce 1.1 PB/s per 4096-chip Pod.
    Chip(
      "v4",
      275e12,
      32 * GiB,
      1200e9,
      1,
      1.1e15 / 4096,
      "v4:1x1x1",
      _MEGACORE,
      "https://cloud.google.com/tpu/docs/v4",
    ),
    # 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s; all-reduce 51.2 TB/s per 256-chip Pod.
    Chip(
      "v5e",
      197e12,
      16 * GiB,
      819e9,
      1,
      51.2e12 / 256,
      "v5e:1x1",
      (),
      "https://cloud.google.com/tpu/docs/v5e",
    ),
    # 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI per chip. No Pod
    # all-reduce figure is published: half the bidirectional ICI bandwidth, the
    # ratio v5e (400 GB/s ICI, 200 GB/s all-reduce) and v6e (800, 400) show.
    Chip(
      "v5p",
      459e12,
      95 * GiB,
      2765e9,
      1,
      1200e9 / 2,
      "v5p:1x1x1",
      _MEGACORE,
      "https://cloud.google.com/tpu/docs/v5p",
    ),
    # 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s; all-reduce 102.4 TB/s per 256-chip Pod.
    Chip(
      "v6e",
      918e12,
      32 * GiB,
      1638e9,
      1,
      102.4e12 / 256,
      "v6e:1x1",
      (),
      "https://cloud.google.com/tpu/docs/v6e",
    ),
  ]
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice: its accelerator-type name, its chip and libtpu's topology string."""

  name: str
  chip: Chip
  topology: str
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def libtpu_options(self) -> dict[str, Any]:
    return dict(self.chip.options + self.options)

  @property
  def chips(self) -> int:
    dims = [int(x) for x in self.topology.split(":")[1].split("x")]
    n = 1
    for d in dims:
      n *= d
    return n

  @property
  def devices(self) -> int:
    return self.chips * self.chip.devices_per_chip

  def single_chip(self) -> Topology:
    """A slice of one chip of the same generation: the per-device program without the slice."""
    return Topology(f"{self.chip.name}-1chip", self.chip, self.chip.one_chip_topology)


# Names are Cloud TPU accelerator types: v3, v4 and v5p count TensorCores, v5e and v6e chips.
# v5e and v6e hosts hold 8 chips in a 2x4 block; libtpu is told so for the 8-chip slices.
_HOST_2X4 = (("chips_per_host_bounds", (2, 4, 1)),)
TOPOLOGIES: dict[str, Topology] = {
  t.name: t
  for t in [
    Topology("v3-8", CHIPS["v3"], "v3:2x2"),
    Topology("v3-32", CHIPS["v3"], "v3:4x4"),
    Topology("v3-128", CHIPS["v3"], "v3:8x8"),
    Topology("v3-512", CHIPS["v3"], "v3:16x16"),
    Topology("v4-8", CHIPS["v4"], "v4:2x2x1"),
    Topology("v4-32", CHIPS["v4"], "v4:2x2x4"),
    Topology("v4-128", CHIPS["v4"], "v4:4x4x4"),
    Topology("v5e-8", CHIPS["v5e"], "v5e:2x4", _HOST_2X4),
    Topology("v5e-16", CHIPS["v5e"], "v5e:4x4"),
    Topology("v5e-256", CHIPS["v5e"], "v5e:16x16"),
    Topology("v5p-8", CHIPS["v5p"], "v5p:2x2x1"),
    Topology("v5p-128", CHIPS["v5p"], "v5p:4x4x4"),
    Topology("v6e-8", CHIPS["v6e"], "v6e:2x4", _HOST_2X4),
    Topology("v6e-256", CHIPS["v6e"], "v6e:16x16"),
  ]
}


def markdown_table() -> str:
  """The chips' figures as a markdown table (docs/tpu.md's)."""
  lines = [
    "| generation | peak bf16 per chip | HBM per chip | HBM bandwidth per chip | JAX devices per "
    "chip | "
    "all-reduce bandwidth per chip | source |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for c in CHIPS.values():
    lines.append(
      f"| {c.name} | {c.peak_bf16_flops / 1e12:.0f} TFLOP/s | {c.hbm_bytes / GiB:.0f} GiB | "
      f"{c.hbm_bytes_per_s / 1e9:.0f} GB/s | {c.devices_per_chip} | "
      f"{c.allreduce_bytes_per_s / 1e9:.0f} GB/s | {c.source} |"
    )
  return "\n".join(lines)
