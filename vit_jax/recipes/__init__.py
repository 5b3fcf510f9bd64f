"""The training recipes that ship with the package: `--config NAME` picks one by its file name.

Each recipe is a small Python file with `get_config()`, starting from `vit_jax.configs.base()`.
The checkout's top-level `configs/` holds one-line files that import these, for users who
look there.
"""
from __future__ import annotations

import ast
import pathlib

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
