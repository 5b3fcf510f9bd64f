"""The training recipes that ship with the package: `--config NAME` picks one by its file name.

Each recipe is a small Python file with `get_config()`, starting from
`vit_jax.config.schema.base()`.
The checkout's top-level `configs/` holds one-line files that import these, for users who
look there.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING

from vit_jax import errors
from vit_jax.platform import files

if TYPE_CHECKING:
  import ml_collections

_DIR = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
  """Every recipe's name, sorted."""
  return sorted(p.stem for p in _DIR.glob("*.py") if not p.stem.startswith("_"))


def path(name: str) -> str | None:
  """The file of the recipe called `name`, or None when there is no such recipe."""
  return str(_DIR / f"{name}.py") if name in names() else None


def summary(name: str) -> str:
  """The first line of a recipe's docstring (read without importing it)."""
  doc = ast.get_docstring(ast.parse((_DIR / f"{name}.py").read_text()))
  return (doc or "").splitlines()[0] if doc else ""


def _import(file: str):
  """A config file, imported as a file rather than through the package, so that a user's
  file and a recipe load alike."""
  module_spec = importlib.util.spec_from_file_location("vit_jax_user_config", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def absolute(spec: str) -> str:
  """`spec` with a local config file's path made absolute (a recipe name or a URL is kept)."""
  scheme, slashes, _ = spec.partition("://")
  if slashes:
    return spec
  name, sep, arg = spec.partition(":")
  if files.isfile(name):
    return os.path.abspath(name) + sep + arg
  return spec


def read(spec: str) -> ml_collections.ConfigDict:
  """The config a `--config` value names: a recipe or a file, either with an optional `:arg`."""
  scheme, slashes, rest = spec.partition("://")  # a URL's own colon is not an argument's
  name, sep, arg = (rest if slashes else spec).partition(":")
  name = f"{scheme}{slashes}{name}" if slashes else name
  file = name if files.isfile(name) else path(name)
  if file is None:
    raise errors.ConfigError(
      f"--config {spec}: no such recipe or config file (recipes: {', '.join(names())})"
    )
  if files.is_remote(file):  # Python imports local files: a copy of a gs:// config
    with tempfile.TemporaryDirectory() as local:
      copy = os.path.join(local, "config.py")
      with open(copy, "wb") as f:
        f.write(files.read_bytes(file))
      module = _import(copy)
  else:
    module = _import(file)
  if not callable(getattr(module, "get_config", None)):
    raise errors.ConfigError(f"--config {spec}: {file} defines no get_config()")
  return module.get_config(arg) if sep else module.get_config()
