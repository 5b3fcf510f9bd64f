"""How JAX starts in a `vit-jax` command: which platform, and where compiled programs are kept."""
from __future__ import annotations

import os
from typing import Mapping


def keep_off_absent_tpus(force_cpu: bool = False) -> None:
  """With libtpu installed but no TPU attached, JAX would probe for one and stall: use the CPU."""
  if "JAX_PLATFORMS" in os.environ and not force_cpu:
    return
  import importlib.util  # pylint: disable=import-outside-toplevel
  has_tpu = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0", "/dev/vfio/vfio"))
  if force_cpu or (importlib.util.find_spec("libtpu") is not None and not has_tpu):
    os.environ["JAX_PLATFORMS"] = "cpu"
  if force_cpu:
    # Compile-only use of libtpu touches no TPU: let several such processes run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compilation_cache_dir(configured: str | None, enabled: bool,
                          environ: Mapping[str, str] | None = None) -> str | None:
  """Where compiled programs are kept between runs; None where the user has set JAX's cache up."""
  if configured or not enabled:
    return None  # the user's own directory, or the cache turned off
  environ = os.environ if environ is None else environ
  root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "vit-jax", "jax")


def keep_compiled_programs() -> None:
  """A rerun (a resumed job, a restarted server) loads its compiled steps instead of compiling."""
  import jax  # pylint: disable=import-outside-toplevel
  path = compilation_cache_dir(jax.config.jax_compilation_cache_dir,
                               jax.config.jax_enable_compilation_cache)
  if path is None:
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return  # a read-only home: run without the cache rather than warn on every read
  jax.config.update("jax_compilation_cache_dir", path)
