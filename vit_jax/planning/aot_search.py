"""`vit-jax aot --search`: the fastest dtype, remat, accumulation and mesh that fit a TPU slice.

Each variant is the config with four levers set, compiled for the slice by the
real TPU compiler (`aot.Program`). A variant is *eligible* when its training
step fits with at least `headroom` of the usable HBM to spare; the answer is
the eligible variant with the shortest estimated step.

The search compiles variants from the likely fastest down, and skips a variant
an earlier result rules out:
- memory: a variant that keeps at least as much as one that was not eligible,
  on the same mesh, is not eligible either. More memory: float32 over bfloat16,
  less remat, fewer accumulation steps. Meshes are not ordered: FSDP shards the
  params and optimizer state but adds gather buffers, and for ViT-B/16 at 512
  images per v3 core it needs more than data parallelism (19.55 against 19.47 GiB).
- time: a variant that does at least the work of an eligible one, on the same
  mesh, is not faster: more remat (it recomputes), more accumulation steps (the
  same FLOPs, the weights read once per micro-batch), float32 over bfloat16 (the
  MXU multiplies bfloat16 either way; float32 moves twice the bytes). Meshes are
  not ordered by time either: FSDP moves 1.5x the bytes of data parallelism's
  all-reduce, yet for ViT-B/16 on v3-8 at 4 accumulation steps the compiler
  estimates it 0.5% faster (1.341 against 1.348 s).
So accumulation grows only until a variant fits, and float32 is compiled only
where bfloat16 runs out of memory; both meshes are searched.
`exhaustive=True` compiles every variant; `check_rules` tests both rules on
its results.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import resource
import tempfile
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from vit_jax import errors
from vit_jax.config import recipes
from vit_jax.planning import aot
from vit_jax.planning import tpus
from vit_jax.training import steps

DTYPES = ("bfloat16", "float32")  # fastest first
# Remat policies, from least recomputation (most memory) to most: the config's
# model.remat and model.remat_policy (a jax.checkpoint_policies name).
REMAT = {
  "none": None,
  # Keeps every matmul without batch dimensions (the Dense layers: q, k, v,
  # out, both MLP layers) and recomputes the rest (norms, GELU, softmax, the
  # attention products) in the backward pass.
  "dots": "dots_with_no_batch_dims_saveable",
  "full": "nothing_saveable",
}  # keeps each block's input alone
MESHES = ("dp", "fsdp")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One setting of the four levers."""

  dtype: str
  remat: str
  accum_steps: int
  mesh: str

  def values(self, model_axis: int = 1) -> dict[str, Any]:
    """The config keys and values this variant sets."""
    values = {"model.dtype": self.dtype, "model.remat": self.remat != "none"}
    if self.remat != "none":
      values["model.remat_policy"] = REMAT[self.remat]
    data, fsdp = (-1, 1) if self.mesh == "dp" else (1, -1)
    return {
      **values,
      "accum_steps": self.accum_steps,
      "mesh.data": data,
      "mesh.fsdp": fsdp,
      "mesh.model": model_axis,
    }

  def overrides(self, model_axis: int = 1) -> list[str]:
    """The `--config.key=value` flags that set this variant."""
    return [f"--config.{key}={value}" for key, value in self.values(model_axis).items()]

  def apply(
    self, config: ml_collections.ConfigDict, model_axis: int = 1
  ) -> ml_collections.ConfigDict:
    """A copy of `config` with this variant's levers."""
    c = copy.deepcopy(config)
    for key, value in self.values(model_axis).items():
      parent, _, leaf = key.rpartition(".")
      (c[parent] if parent else c)[leaf] = value
    return c

  def label(self) -> str:
    return f"{self.dtype}/{self.remat}/accum {self.accum_steps}/{self.mesh}"

  # Ranks: a larger number keeps more memory.
  def _mem(self) -> tuple[int, int, int]:
    return (
      DTYPES.index(self.dtype),
      list(REMAT)[::-1].index(self.remat),
      -int(math.log2(self.accum_steps)),
    )

  def keeps_at_least(self, other: Variant) -> bool:
    """At least as much memory as `other`, lever by lever, on the same mesh."""
    return self.mesh == other.mesh and all(
      a >= b for a, b in zip(self._mem(), other._mem(), strict=True)
    )

  def works_at_least(self, other: Variant) -> bool:
    """At least the work of `other`, lever by lever, on the same mesh: as many bytes,
    recomputation and micro-batches."""
    a, b = self._mem(), other._mem()
    return self.mesh == other.mesh and a[0] >= b[0] and a[1] <= b[1] and a[2] <= b[2]


def accum_choices(global_batch: int, data_devices: int, max_accum: int = 16) -> list[int]:
  """1, 2, 4, ... up to `max_accum`, while each device still gets a whole micro-batch."""
  out, a = [], 1
  while a <= max_accum and global_batch % a == 0 and (global_batch // a) % data_devices == 0:
    out.append(a)
    a *= 2
  return out


def model_axis(config: ml_collections.ConfigDict, devices: int, num_classes: int) -> int:
  """The config's `mesh.model`, or the smallest larger one that leaves each data device a whole
  example: a global batch under the slice's devices needs tensor parallelism."""
  heads = steps.model_from_config(config, num_classes).num_heads
  m = int(config.mesh.model)
  while m <= devices:
    if devices % m == 0 and heads % m == 0 and config.batch_size % (devices // m) == 0:
      return m
    m += 1
  raise errors.ConfigError(
    f"batch_size {config.batch_size} splits over no data axis of {devices} devices "
    f"with a model axis that divides the {heads} heads; use a batch that is a "
    "multiple of the devices"
  )


def variants(accums: list[int]) -> list[Variant]:
  """Every variant in search order, likely fastest first (mesh, then dtype, remat, accumulation)."""
  return [Variant(d, r, a, m) for m, d, r, a in itertools.product(MESHES, DTYPES, REMAT, accums)]


def ruled_out(v: Variant, results: dict[Variant, dict[str, Any]]) -> str | None:
  """Why an earlier result rules `v` out, or None."""
  for w, r in results.items():
    if "skipped" in r:
      continue
    if not r["eligible"] and v.keeps_at_least(w):
      return f"keeps at least the memory of {w.label()}, which " + (
        "does not fit" if not r["fits"] else "leaves under the headroom"
      )
    if r["eligible"] and v.works_at_least(w):
      return f"does at least the work of {w.label()}, which fits"
  return None


Compile = Callable[[Variant], dict[str, Any]]


def compile_variant(
  config: ml_collections.ConfigDict,
  slice_: tpus.Topology,
  num_classes: int,
  variant: Variant,
  model_axis: int,
  try_chip: bool,
  log_path: str | None = None,
) -> dict[str, Any]:
  """One variant's compiler report, with what the search keeps of the model, and this process's
  peak resident memory. Runs in a child process of its own (`Search.run`); libtpu's start-up
  messages, which every child would print again, go to `log_path`."""
  if log_path:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
  config = variant.apply(config, model_axis)
  try:
    program = aot.Program(config, slice_, num_classes)
    report = program.train()
  except (jax.errors.JaxRuntimeError, errors.UserError) as e:
    # A variant the compiler (or the mesh) rejects for another reason than memory: the
    # row says why. A bug in this code is not caught: it shows its traceback.
    report = {
      "fits": False,
      "hbm_peak_bytes": None,
      "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
    }
  else:
    report["model_flops_per_image"] = aot.model_flops_per_image(program.setup.model, train=True)
    if report["fits"] and report.get("estimated_step_seconds") is None:
      # One chip's estimate, where the compiler gives one for this generation; once it
      # has given none, the roofline (a compile saved per variant: minutes on v4).
      report.update(
        aot.derived_step_seconds(config, slice_, num_classes, report, try_chip=try_chip)
      )
  report.setdefault("hbm_limit_bytes", aot.usable_hbm_bytes(slice_))
  report["compile_peak_rss_bytes"] = peak_rss_bytes()
  return report


def peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def total_memory_bytes() -> int | None:
  """MemTotal of /proc/meminfo."""
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# What one compile of the search may take at its peak, for the default of `jobs`: measured,
# the largest child of the pre-training recipe's search on v3-8 (ViT-B/16, batch 4096,
# libtpu 0.0.50.1) peaked at 9.4 GiB (bfloat16, full remat, FSDP); variants that do not fit
# fail at 1.2-1.4 GiB, those that fit take 4.5-9.4.
COMPILE_MEMORY_BYTES = 10 * 2**30


def default_jobs(total: int | None = None) -> int:
  """Compiles at once by default: as many as half the machine's memory holds at
  COMPILE_MEMORY_BYTES each, at least one, at most one per mesh (a 24 GiB machine: one)."""
  total = total_memory_bytes() if total is None else total
  if not total:
    return 1
  return max(1, min(len(MESHES), total // 2 // COMPILE_MEMORY_BYTES))


@dataclasses.dataclass
class Search:
  """The search's inputs: the config, the slice, and how one variant is compiled.

  Each variant compiles in a child process that exits when it is done, so the search holds
  no compiled program, and its memory is one compile's, per compile running at once: the TPU
  compiler kept what each compile took (the pre-training search on v3-8 reached 24 GB in
  one process and was killed). `jobs` compiles run at once, at most one per mesh; None:
  `default_jobs()`, as many as half the machine's memory holds at COMPILE_MEMORY_BYTES each.
  """

  config: ml_collections.ConfigDict
  slice: tpus.Topology
  num_classes: int
  headroom: float = 0.10
  max_accum: int = 16
  compile_fn: Compile | None = None  # tests pass a model of the compiler
  jobs: int | None = None

  def __post_init__(self):
    if self.jobs is None:
      self.jobs = default_jobs()
    if self.jobs < 1:
      raise errors.ConfigError(f"--jobs {self.jobs}: at least 1 compile at a time")
    self.model_axis = model_axis(self.config, self.slice.devices, self.num_classes)
    self.data_devices = self.slice.devices // self.model_axis
    self.accums = accum_choices(self.config.batch_size, self.data_devices, self.max_accum)
    self.flops_per_image = None
    self._chip_estimates: bool | None = None  # does one chip of this generation get estimates?
    self.compile_peaks: list[int] = []  # each child's peak resident memory, in bytes
    # The children's stderr (libtpu's start-up lines, each compile's warnings).
    self.log_path = os.path.join(tempfile.gettempdir(), f"vit-jax-aot-search-{os.getpid()}.log")

  def _compile(self, v: Variant, pool: concurrent.futures.Executor | None) -> dict[str, Any]:
    if self.compile_fn is not None:
      return self.compile_fn(v)
    args = (
      self.config,
      self.slice,
      self.num_classes,
      v,
      self.model_axis,
      self._chip_estimates is not False,
      self.log_path,
    )
    report = pool.submit(compile_variant, *args).result()
    self.compile_peaks.append(report["compile_peak_rss_bytes"])
    if self.flops_per_image is None:
      self.flops_per_image = report.get("model_flops_per_image")
    if self._chip_estimates is None and report.get("chip_step_source"):
      self._chip_estimates = report["chip_step_source"] == "compiler"
    return report

  def row(self, v: Variant, report: dict[str, Any]) -> dict[str, Any]:
    """One variant's result, as printed and as JSON."""
    usable = report["hbm_limit_bytes"]
    peak = report.get("hbm_peak_bytes")
    seconds = report.get("estimated_step_seconds") or report.get("derived_step_seconds")
    eligible = bool(
      report["fits"]
      and peak is not None
      and peak <= (1 - self.headroom) * usable
      and seconds is not None
    )
    flops_per_image = self.flops_per_image or report.get("model_flops_per_image")
    return {
      "variant": v.label(),
      "dtype": v.dtype,
      "remat": v.remat,
      "accum_steps": v.accum_steps,
      "mesh": v.mesh,
      "model_axis": self.model_axis,
      "fits": bool(report["fits"]),
      "eligible": eligible,
      "hbm_peak_bytes": peak,
      "hbm_usable_bytes": usable,
      "headroom": None if peak is None else 1 - peak / usable,
      "flops_per_device": report.get("flops_per_device"),
      "step_seconds": seconds,
      "step_seconds_source": None
      if seconds is None
      else (
        "compiler"
        if report.get("estimated_step_seconds")
        else f"derived ({report.get('chip_step_source')})"
      ),
      "mfu": aot.mfu(flops_per_image, self.config.batch_size, seconds, self.slice)
      if flops_per_image
      else None,
      "error": report.get("error"),
      "compile_peak_rss_bytes": report.get("compile_peak_rss_bytes"),
    }

  def run(
    self, exhaustive: bool = False, progress: Callable[[Variant, dict | None], None] | None = None
  ) -> Iterator[dict[str, Any]]:
    """One row per variant (skipped ones say why), in search order; `progress` sees each row
    as its variant finishes.

    No rule crosses meshes, so each mesh is searched in a thread of its own; a semaphore
    lets `jobs` of them compile at once, each compile in a fresh child process.
    """
    gate = threading.Semaphore(self.jobs)
    lock = threading.Lock()

    def search_mesh(mesh: str, pool) -> dict[Variant, dict[str, Any]]:
      results: dict[Variant, dict[str, Any]] = {}
      for v in (v for v in variants(self.accums) if v.mesh == mesh):
        reason = None if exhaustive else ruled_out(v, results)
        if reason:
          row = {
            "variant": v.label(),
            "dtype": v.dtype,
            "remat": v.remat,
            "accum_steps": v.accum_steps,
            "mesh": v.mesh,
            "skipped": reason,
          }
        else:
          with gate:
            report = self._compile(v, pool)
          row = self.row(v, report)
        results[v] = row
        if progress:
          with lock:
            progress(v, row)
      return results

    # A fresh process per compile: it exits, and gives back all it took.
    context = multiprocessing.get_context("spawn")
    with (
      concurrent.futures.ProcessPoolExecutor(
        max_workers=len(MESHES), mp_context=context, max_tasks_per_child=1
      )
      if self.compile_fn is None
      else contextlib.nullcontext() as pool
    ):
      with concurrent.futures.ThreadPoolExecutor(len(MESHES)) as threads:
        futures = {mesh: threads.submit(search_mesh, mesh, pool) for mesh in MESHES}
        by_mesh = {mesh: f.result() for mesh, f in futures.items()}
    for v in variants(self.accums):
      yield by_mesh[v.mesh][v]


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The eligible row with the shortest step (ties: less memory)."""
  eligible = [r for r in rows if r.get("eligible")]
  return min(eligible, key=lambda r: (r["step_seconds"], r["hbm_peak_bytes"])) if eligible else None


def summary(rows: list[dict[str, Any]], search: Search) -> dict[str, Any]:
  """The last JSON line: the recommended overrides and their figures."""
  top = best(rows)
  variant = (
    None if top is None else Variant(top["dtype"], top["remat"], top["accum_steps"], top["mesh"])
  )
  return {
    "topology": search.slice.name,
    "headroom": search.headroom,
    "model_axis": search.model_axis,
    "recommended": None if variant is None else variant.overrides(search.model_axis),
    "variant": None if variant is None else dataclasses.asdict(variant),
    "estimated_step_seconds": None if top is None else top["step_seconds"],
    "step_seconds_source": None if top is None else top["step_seconds_source"],
    "hbm_peak_bytes": None if top is None else top["hbm_peak_bytes"],
    "mfu": None if top is None else top["mfu"],
    "searched": sum(1 for r in rows if "skipped" not in r),
    "skipped": sum(1 for r in rows if "skipped" in r),
  }


def check_rules(rows: list[dict[str, Any]]) -> list[str]:
  """The pruning rules' violations among compiled rows (an exhaustive search's): empty when both
  held.
  """
  compiled = {
    Variant(r["dtype"], r["remat"], r["accum_steps"], r["mesh"]): r
    for r in rows
    if "skipped" not in r
  }
  broken = []
  for v, w in itertools.permutations(compiled, 2):
    rv, rw = compiled[v], compiled[w]
    if v.keeps_at_least(w) and rv["eligible"] and not rw["eligible"]:
      broken.append(f"memory: {v.label()} is eligible but {w.label()}, which keeps less, is not")
    if (
      v.works_at_least(w)
      and rv["eligible"]
      and rw["eligible"]
      and rv["step_seconds"] < rw["step_seconds"]
    ):
      broken.append(
        f"time: {v.label()} ({rv['step_seconds']:.4g} s) is faster than {w.label()} "
        f"({rw['step_seconds']:.4g} s), which does less work"
      )
  return broken


TABLE_HEADER = (
  f"{'dtype':9} {'remat':5} {'accum':>5} {'mesh':5} {'HBM GiB':>8} {'headroom':>8} "
  f"{'TFLOP/dev':>9} {'step s':>7} {'MFU':>6}  note"
)


def table_row(r: dict[str, Any]) -> str:
  """One row of the text table."""
  gib = lambda x: "-" if x is None else f"{x / aot.GiB:.2f}"
  head = f"{r['dtype']:9} {r['remat']:5} {r['accum_steps']:>5} {r['mesh']:5} "
  if "skipped" in r:
    return head + f"{'':>8} {'':>8} {'':>9} {'':>7} {'':>6}  skipped: {r['skipped']}"
  note = (
    "eligible" if r["eligible"] else ("fits, under the headroom" if r["fits"] else "does not fit")
  )
  if r.get("error") and not r["fits"]:
    note += f" ({r['error'][:120]})"
  if r["step_seconds_source"] not in (None, "compiler"):
    note += f", {r['step_seconds_source']} step time"
  return head + (
    f"{gib(r['hbm_peak_bytes']):>8} "
    f"{'-' if r['headroom'] is None else format(r['headroom'], '.1%'):>8} "
    f"{'-' if not r['flops_per_device'] else format(r['flops_per_device'] / 1e12, '.1f'):>9} "
    f"{'-' if r['step_seconds'] is None else format(r['step_seconds'], '.3f'):>7} "
    f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%'):>6}  {note}"
  )


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a text table."""
  return "\n".join([TABLE_HEADER, *(table_row(r) for r in rows)])


def config_file(spec: str, config: ml_collections.ConfigDict, result: dict[str, Any]) -> str:
  """A config file that imports `spec` and sets the user's overrides and the search's answer."""
  base = _flat(recipes.read(spec))
  user = {key: value for key, value in _flat(config).items() if base.get(key, object()) != value}
  answer = Variant(**result["variant"]).values(result["model_axis"])
  lines = [
    f'"""{spec} with `vit-jax aot --search`\'s setting for {result["topology"]}.',
    "",
    f"Estimated step {result['estimated_step_seconds']:.3f} s ({result['step_seconds_source']}), "
    f"{result['hbm_peak_bytes'] / aot.GiB:.2f} GiB HBM per device, MFU {result['mfu']:.1%}.",
    '"""',
    "from vit_jax.config import recipes",
    "",
    "",
    "def get_config():",
    f"  c = recipes.read({spec!r})",
  ]
  lines += [f"  c.{key} = {value!r}" for key, value in {**user, **answer}.items()]
  lines.append("  return c")
  return "\n".join(lines) + "\n"


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def to_json(obj: dict[str, Any]) -> str:
  return json.dumps(obj)
