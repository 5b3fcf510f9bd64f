"""The README as a guide: short, and every command and code block in it works.

The demo's own lines (explain, fewshot) run end to end in tests/test_demo.py; the
parameter-group flags run in tests/test_train.py.
"""

import os
import re
import shlex

import ckpt_fixtures
import numpy as np
import pytest
import test_train

from vit_jax import cli
from vit_jax.config import config_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_readme_is_short_and_complete():
  assert len(README.splitlines()) <= 450
  # A figure still to be filled in: a capitalised name in the prose (outside code).
  prose = re.sub(r"```.*?```|`[^`]*`", "", README, flags=re.S)
  assert not re.search(r"\b[A-Z]{3,}_[A-Z_]{3,}\b", prose), "placeholder"
  for link in re.findall(r"\]\(((?:docs|tpu)/[^)#]+)\)", README):
    assert os.path.exists(os.path.join(ROOT, link)), link


def _commands():
  for block in _blocks("bash"):
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
      line = line.split("  #")[0].strip()
      for part in re.split(r"\s*(?:&&|\|)\s*", line):
        if part.startswith("vit-jax ") and "..." not in part:
          yield part


@pytest.mark.parametrize("line", sorted(set(_commands())))
def test_every_command_in_the_readme_parses(line):
  """Each `vit-jax ...` line's flags exist, and its config and overrides load."""
  argv = shlex.split(line, comments=True)[1:]
  argv, rest = config_args.split_args(argv)
  if "--help-config" in argv:  # main answers it before the command's own flags are required
    assert cli.COMMANDS[argv[0]].config == "required", line
  else:
    cli.build_parser().parse_args(argv)  # exits on an unknown flag
  if rest:
    config_args.load_config(rest)


def test_the_parameter_group_flags_are_the_tested_ones():
  text = README.replace("\\\n", " ")
  for flags in (test_train.PROBE, test_train.HEAD_ONLY, test_train.LAYER_DECAY):
    for flag in flags:
      key, _, value = flag.partition("=")
      assert f"{key}={shlex.quote(value) if '(' in value else value}" in text, flag


@pytest.mark.slow
def test_the_python_api_block_runs(tmp_path):
  (block,) = [b for b in _blocks("python") if "load_pretrained" in b]
  path = str(tmp_path / "tiny.npz")
  ckpt_fixtures.write_original(path, ckpt_fixtures.Spec(classes=1000, image_size=32))
  os.chdir(tmp_path)
  code = block.replace('"ViT-B_16/i21k+i1k-224"', repr(path))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
  assert scope["logits"].shape == (2, 1000) and scope["features"].shape == (2, 192)
  assert os.path.exists(tmp_path / "out.npz")
  # The NNX step trained the module: its head moved off the loaded params.
  from flax import nnx

  trained = nnx.to_pure_dict(nnx.state(scope["nnx_model"], nnx.Param))
  assert np.isfinite(float(scope["loss"]))
  assert not np.array_equal(trained["head"]["kernel"], scope["params"]["head"]["kernel"])


def test_ci_runs_the_readmes_test_command():
  (command,) = re.findall(r"pip install -e '\.\[test\]' && (python -m pytest[^\n]*)", README)
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    assert f.read().strip().splitlines()[-1] == command
