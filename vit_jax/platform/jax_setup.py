"""How JAX starts in a `vit-jax` command: which platform, and where compiled programs are kept."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

from vit_jax import errors


def keep_off_absent_tpus(force_cpu: bool = False) -> None:
  """With libtpu installed but no TPU attached, JAX would probe for one and stall: use the CPU."""
  if "JAX_PLATFORMS" in os.environ and not force_cpu:
    return

  has_tpu = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0", "/dev/vfio/vfio"))
  if force_cpu or (importlib.util.find_spec("libtpu") is not None and not has_tpu):
    os.environ["JAX_PLATFORMS"] = "cpu"
  if force_cpu:
    allow_several_compile_only_libtpus()


def allow_several_compile_only_libtpus() -> None:
  """Compile-only use of libtpu touches no TPU: let several such processes run at once
  (libtpu otherwise holds a lock file that a second process fails on)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compilation_cache_dir(
  configured: str | None, enabled: bool, environ: Mapping[str, str] | None = None
) -> str | None:
  """Where compiled programs are kept between runs; None where the user has set JAX's cache up."""
  if configured or not enabled:
    return None  # the user's own directory, or the cache turned off
  environ = os.environ if environ is None else environ
  root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "vit-jax", "jax")


def keep_compiled_programs() -> None:
  """A rerun (a resumed job, a restarted server) loads its compiled steps instead of compiling."""
  import jax  # noqa: PLC0415  # the command's start-up imports this module before JAX

  path = compilation_cache_dir(
    jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  )
  if path is None:
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return  # a read-only home: run without the cache rather than warn on every read
  jax.config.update("jax_compilation_cache_dir", path)


# --dtype of the commands that run a model for its outputs (predict, serve, explain).
DTYPES = ("auto", "float32", "bfloat16")
DTYPE_ENV = "VIT_JAX_DTYPE"  # the default of --dtype (auto when unset)


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
  try:
    with open(cpuinfo, encoding="utf-8") as f:
      return set(
        next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
      )
  except OSError:
    return set()


def native_bf16(platform: str | None = None, cpu_flags: set[str] | None = None) -> tuple[bool, str]:
  """Whether this machine multiplies bf16 matrices in hardware (TPU, or a CPU with AMX), and why."""
  if platform is None:
    import jax  # noqa: PLC0415  # the command's start-up imports this module before JAX

    platform = jax.devices()[0].platform
  if platform == "tpu":
    return True, "a TPU's matrix units take bf16"
  if platform != "cpu":
    return False, f"{platform}: float32 (bf16 only where measured: TPUs and AMX CPUs)"
  flags = _cpu_flags() if cpu_flags is None else cpu_flags
  if "amx_bf16" in flags:
    return True, "this CPU has AMX bf16 tiles"
  have = "AVX512-BF16 dot products but no AMX" if "avx512_bf16" in flags else "no bf16 matrix unit"
  return False, f"this CPU has {have}"


def compute_dtype(choice: str | None = None) -> tuple[str, str]:
  """('float32' or 'bfloat16', why) for --dtype CHOICE (None: $VIT_JAX_DTYPE, else auto)."""
  choice = choice or os.environ.get(DTYPE_ENV) or "auto"
  if choice not in DTYPES:
    raise errors.ConfigError(f"dtype {choice!r}: choose one of {', '.join(DTYPES)}")
  if choice != "auto":
    return choice, "asked for"
  native, why = native_bf16()
  return ("bfloat16" if native else "float32"), f"auto: {why}"


def libtpu_mismatch(
  requires: list[str] | None = None, jax_version: str | None = None, libtpu: str | None = None
) -> str | None:
  """Why the installed libtpu is not the one the installed jax pairs with (its `jax[tpu]` extra's
  libtpu requirement), or None when it is, or when libtpu is not installed. The arguments stand
  in for the installed packages' metadata (tests)."""
  from importlib import metadata  # noqa: PLC0415  # the command's start-up imports this module

  from packaging.requirements import Requirement  # noqa: PLC0415  # likewise

  try:
    libtpu = libtpu or metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None
  jax_version = jax_version or metadata.version("jax")
  requires = metadata.requires("jax") if requires is None else requires
  for line in requires or ():
    req = Requirement(line)
    if req.name == "libtpu" and req.marker is not None and req.marker.evaluate({"extra": "tpu"}):
      if req.specifier.contains(libtpu, prereleases=True):
        return None
      return (
        f"libtpu {libtpu} is not the one jax {jax_version} pairs with (its jax[tpu] extra asks "
        f"for libtpu{req.specifier}); install 'jax[tpu]=={jax_version}', or "
        "pip install -e '.[aot]' for the pair this project pins"
      )
  return None
