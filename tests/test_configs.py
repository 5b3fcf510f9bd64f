"""The config schema: declared once, every recipe within it, every key overridable, no reader
defaults.
"""

import ast
import os

import pytest

from vit_jax import cli
from vit_jax.config import config_args
from vit_jax.config import recipes
from vit_jax.config import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vit_jax")


def _flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if k in schema.SUBDICTS and not prefix:
      out.update(_flat(v, f"{k}."))
    else:
      out[prefix + k] = v
  return out


def _typed(field, value):
  """Whether `value` is of the field's declared type (None for optional fields)."""
  if value is None:
    return field.optional
  if field.type is float:
    return isinstance(value, float)
  return isinstance(value, field.type) and not (field.type is int and isinstance(value, bool))


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_sets_declared_keys_only_with_their_types(name):
  config = recipes.read(name)
  flat = _flat(config)
  assert set(flat) == set(schema.FIELDS)
  for key, value in flat.items():
    assert _typed(schema.FIELDS[key], value), (key, value)


def test_a_config_file_cannot_add_a_key(tmp_path):
  (tmp_path / "typo.py").write_text(
    "from vit_jax.config import schema\n\ndef get_config():\n"
    "  c = schema.base()\n  c.base_rate = 0.1\n  return c\n"
  )
  with pytest.raises(AttributeError, match='"base_rate" does not exist'):
    recipes.read(str(tmp_path / "typo.py"))


def _other_value(field):
  """A command-line value of the field's type that differs from its default."""
  if field.type is bool:
    return str(not field.default), (not field.default)
  if field.type is int:
    return "7", 7
  if field.type is float:
    return "0.25", 0.25
  if field.type is tuple:
    return "(0.1, 0.9)", (0.1, 0.9)
  return "some_value", "some_value"


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(schema.FIELDS))
def test_every_declared_key_is_overridable_and_keeps_its_type(key):
  field = schema.FIELDS[key]
  text, want = _other_value(field)
  config = config_args.load_config(["--config", "tiny", f"--config.{key}={text}"])
  got = _flat(config)[key]
  assert got == want and _typed(field, got), (key, got)
  if field.optional:  # None unsets it, in both spellings
    for args in ([f"--config.{key}=None"], [f"--config.{key}", "None"]):
      config = config_args.load_config(["--config", "tiny", f"--config.{key}={text}", *args])
      assert _flat(config)[key] is None
  else:
    with pytest.raises(
      ValueError, match=f"{key} is not optional; it takes a {field.type.__name__}"
    ):
      config_args.load_config(["--config", "tiny", f"--config.{key}=None"])


def test_a_wrong_type_is_a_one_line_error():
  with pytest.raises(ValueError, match="config tiny: .*batch_size"):
    config_args.load_config(["--config", "tiny", "--config.batch_size=lots"])
  with pytest.raises(ValueError, match="no field 'base_rate' to override"):
    config_args.load_config(["--config", "tiny", "--config.base_rate=0.1"])


def test_unset_pretrained_trains_from_scratch_in_the_folder_recipe():
  config = config_args.load_config(
    ["--config", "vit_folder", "--config.pretrained=None", "--config.folder=/data/flowers"]
  )
  assert config.pretrained is None and config.folder == "/data/flowers"


def test_help_config_lists_every_key_with_the_recipe_values(capsys):
  assert cli.main(["train", "--help-config", "--config", "tiny", "--config.base_lr=0.5"]) == 0
  out = capsys.readouterr().out
  for key in schema.FIELDS:
    assert f"  {key} " in out, key
  assert "0.5" in next(line for line in out.splitlines() if line.strip().startswith("base_lr "))
  assert cli.main(["eval", "--help-config"]) == 0  # no --config: the defaults
  assert "  model.head_bias_init " in capsys.readouterr().out


# -- no module reads a key that is not declared, or supplies a default of its own ---------------

_CONFIG_METHODS = {
  "to_dict",
  "to_json_best_effort",
  "lock",
  "unlock",
  "update",
  "items",
  "keys",
  "copy_and_resolve_references",
}


def _config_reads(tree):
  """(dotted key, line) for attribute reads on `config`, `self.config`, and `c = ...config`."""
  aliases = {"config"}
  for node in ast.walk(tree):  # `c = self.config` and the like
    if (
      isinstance(node, ast.Assign)
      and len(node.targets) == 1
      and isinstance(node.targets[0], ast.Name)
    ):
      src = ast.unparse(node.value)
      if src in ("self.config", "config", "setup.config", "self.setup.config"):
        aliases.add(node.targets[0].id)
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain, base = [], node
    while isinstance(base, ast.Attribute):
      chain.insert(0, base.attr)
      base = base.value
    if not isinstance(base, ast.Name):
      continue
    if (
      base.id == "self"
      and chain[:1] == ["config"]
      or base.id in ("setup",)
      and chain[:1] == ["config"]
    ):
      chain = chain[1:]
    elif base.id not in aliases:
      continue
    if chain:
      yield chain, node.lineno


def _modules():
  for dirpath, _, names in os.walk(PACKAGE):
    if os.path.basename(dirpath) == "recipes":
      continue  # recipes write keys; base() is locked, so a new one fails (tested above)
    for n in names:
      if n.endswith(".py") and n != "configs.py":
        yield os.path.join(dirpath, n)


def test_modules_read_declared_keys_only_and_never_with_a_default():
  undeclared, defaults, seen = [], [], set()
  for path in _modules():
    tree = ast.parse(open(path, encoding="utf-8").read())
    where = os.path.relpath(path, ROOT)
    for chain, line in _config_reads(tree):
      if chain[0] == "get":
        defaults.append(f"{where}:{line}")
        continue
      if chain[0] in _CONFIG_METHODS:
        continue
      key = ".".join(chain[:2]) if chain[0] in schema.SUBDICTS and len(chain) > 1 else chain[0]
      if key.split(".")[-1] in _CONFIG_METHODS:
        key = chain[0]
      seen.add(key)
      if key not in schema.FIELDS and key not in schema.SUBDICTS:
        undeclared.append(f"{where}:{line}: config.{key}")
  assert not undeclared, undeclared
  assert not defaults, f"config.get(...) with a default of its own: {defaults}"
  # The scan sees the readers: a scan that found nothing would pass vacuously.
  assert {
    "base_lr",
    "batch_size",
    "pretrained",
    "loss",
    "async_checkpointing",
    "checkpoint_every",
  } <= seen
