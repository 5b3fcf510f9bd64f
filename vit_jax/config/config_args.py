"""The `--config RECIPE_OR_FILE [--config.key=value ...]` arguments of the commands that take a
config.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vit_jax import errors
from vit_jax.config import recipes

if TYPE_CHECKING:
  import ml_collections


def load_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """A locked config from `--config RECIPE_OR_FILE [--config.key=value ...]`."""
  from absl import flags  # noqa: PLC0415  # 80 ms that `vit-jax --help` need not spend
  from ml_collections import config_flags  # noqa: PLC0415  # likewise

  spec, argv = _pop_spec(argv)
  argv, unset = _unset_args(argv)
  fv = flags.FlagValues()
  argv = ["vit-jax", *argv]
  config = recipes.read(spec)  # outside the try: a mistake inside a config file shows its traceback
  try:
    # sys_argv: the override flags are registered from this list, not from sys.argv.
    config_flags.DEFINE_config_dict(
      "config", config, flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    config = fv.config
    for key in unset:
      parent, _, name = key.rpartition(".")
      (config[parent] if parent else config)[name] = None
    return config
  except (KeyError, AttributeError) as e:
    # ml_collections' message holds the key in quotes and, for a near miss, 'Did you mean "x"'.
    text = str(e.args[0] if e.args else e)
    field = re.search(r"[\w.]+", text)
    near = re.search(r'Did you mean "([\w.]+)"', text)
    raise errors.ConfigError(
      f"config {spec}: no field {field.group(0) if field else text!r} to override"
      + (f" (did you mean {near.group(1)!r}?)" if near else "")
    ) from None
  except (flags.Error, TypeError) as e:
    raise errors.ConfigError(f"config {spec}: {str(e).splitlines()[0]}") from None


def config_spec(argv: Sequence[str]) -> str:
  """The `--config` value (a recipe name or a file, with an optional `:arg`) of these arguments."""
  return _pop_spec(argv)[0]


def _pop_spec(argv: Sequence[str]) -> tuple[str, list[str]]:
  """(the --config value, the other arguments)."""
  argv = list(argv)
  where = next(
    (i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None
  )
  if where is None:
    raise errors.ConfigError(
      "--config is required: a recipe name (e.g. vit_b16_cifar10) or a config file"
    )
  if argv[where] == "--config":
    if where + 1 == len(argv):
      raise errors.ConfigError(
        "--config needs a value: a recipe name (e.g. vit_b16_cifar10) or a config file"
      )
    spec = argv.pop(where + 1)
  else:
    spec = argv[where].split("=", 1)[1]
  del argv[where]
  return spec, argv


def print_schema(command: str, config_args: list[str]) -> int:
  """`--help-config`: every config key, with the values of `--config ...` when given."""
  from vit_jax.config import schema  # noqa: PLC0415  # ml_collections: 100 ms of start-up

  try:
    config = load_config(config_args) if config_args else None
  except ValueError as e:
    print(f"vit-jax {command}: error: {e}", file=sys.stderr)
    return 2
  print(
    "config keys (--config.KEY=VALUE; optional keys take "
    f"None){' and their values' if config else ''}:"
  )
  print(schema.describe(config))
  return 0


def _unset_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without the `--config.key=None` ones, those keys); only optional keys may be unset."""
  from vit_jax.config import schema  # noqa: PLC0415  # ml_collections: 100 ms of start-up

  rest, unset = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    spaced = "=" not in a and argv[i + 1 : i + 2] == ["None"]  # --config.key None
    if a.startswith("--config.") and (a.endswith("=None") or spaced):
      key = a[len("--config.") :].split("=", 1)[0]
      field = schema.FIELDS.get(key)
      if field is None:
        raise errors.ConfigError(
          f"--config.{key}=None: no such config field (vit-jax train --help-config lists them)"
        )
      if not field.optional:
        raise errors.ConfigError(
          f"--config.{key}=None: {key} is not optional; it takes a {field.type.__name__}"
        )
      unset.append(key)
      i += 2 if spaced else 1
      continue
    rest.append(a)
    i += 1
  return rest, unset


def recipes_help() -> str:
  """The packaged recipes, one a line, for the --help of commands that take --config."""
  rows = [f"  {n:<24}{recipes.summary(n)}" for n in recipes.names()]
  return "recipes (--config NAME; a path to a config file works too):\n" + "\n".join(rows)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(other arguments, the `--config FILE` and `--config.key=value` ones), so positionals stay
  apart.
  """
  other, config = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      config += argv[i : i + 2]
      i += 2
      continue
    (config if a.startswith("--config=") or a.startswith("--config.") else other).append(a)
    i += 1
  return other, config
