"""Versions that belong together: the JAX and libtpu pins against jax's own `[tpu]` extra."""

import importlib.metadata
import pathlib
import re
import tomllib

from packaging.requirements import Requirement

from vit_jax.platform import jax_setup

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  out = {}
  for line in extras["aot"]:
    req = Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==", line  # an exact pair
    out[req.name] = spec.version
  return out


def test_the_aot_extra_pins_a_pair_that_jax_tpu_asks_for():
  pins = _pins()
  assert pins["jax"] == pins["jaxlib"]
  # The pinned jax is what the test extra installs: its metadata is the reference.
  assert importlib.metadata.version("jax") == pins["jax"]
  wanted = [
    Requirement(r)
    for r in importlib.metadata.requires("jax")
    if Requirement(r).name == "libtpu" and 'extra == "tpu"' in r
  ]
  assert wanted and all(r.specifier.contains(pins["libtpu"]) for r in wanted), wanted
  assert jax_setup.libtpu_mismatch() is None  # the installed pair


def test_tpu_workers_install_the_same_jax():
  spec = re.search(r'JAX_TPU_SPEC:-"([^"]+)"', (ROOT / "tpu" / "env.sh").read_text()).group(1)
  assert spec == f"jax[tpu]=={_pins()['jax']}"


def test_a_mismatched_libtpu_gets_a_warning_naming_the_pair():
  requires = ['libtpu==0.0.53.*; extra == "tpu"', "jaxlib<=0.12.1,>=0.12.1"]
  msg = jax_setup.libtpu_mismatch(requires, jax_version="0.12.1", libtpu="0.0.50.1")
  assert msg.startswith("libtpu 0.0.50.1 is not the one jax 0.12.1 pairs with")
  assert "libtpu==0.0.53.*" in msg and "jax[tpu]==0.12.1" in msg
  assert jax_setup.libtpu_mismatch(requires, jax_version="0.12.1", libtpu="0.0.53.2") is None
