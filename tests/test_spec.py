"""ModelSpec: the one owner of which model a name, fields, a file or an HF config means."""

import ast
import os
import types

import jax.numpy as jnp
import pytest

from tests import ckpt_fixtures as cf
from vit_jax import errors
from vit_jax import models
from vit_jax.config import config_args
from vit_jax.models import layout
from vit_jax.models import spec
from vit_jax.training import steps
from vit_jax.weights import checkpoint

TI16 = dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12, patch_size=16)
PACKAGE = os.path.join(os.path.dirname(__file__), "..", "vit_jax")


def _tree(s: cf.Spec) -> dict:
  """The Linen-named tree of a file in the original layout (what checkpoint.load returns)."""
  return layout.unflatten({cf.linen_key(k): v for k, v in cf.original_arrays(s).items()})


def test_from_params_reads_every_field_and_names_the_variant():
  tree = _tree(
    cf.Spec(
      hidden=192,
      mlp=768,
      heads=3,
      layers=12,
      patch=16,
      image_size=384,
      classes=1000,
      pre_logits=None,
    )
  )
  got = spec.ModelSpec.from_params(tree)
  assert got == spec.ModelSpec(**TI16, image_size=384, num_classes=1000)
  assert got.name == "ViT-Ti_16" and str(got) == "ViT-Ti_16"


@pytest.mark.slow
def test_a_custom_width_has_no_name_and_still_builds_the_model_its_file_fits(tmp_path):
  path = tmp_path / "odd.npz"
  cf.write_original(path, cf.Spec(hidden=48, heads=2, mlp=64, layers=3, pre_logits=8, cls=False))
  tree = checkpoint.load(str(path))
  got = spec.ModelSpec.from_params(tree, str(path))
  assert got.name is None and str(got).startswith(
    "custom ViT (hidden 48, MLP 64, 2 heads, 3 layers"
  )
  assert (got.representation_size, got.classifier, got.num_classes, got.image_size) == (
    8,
    "gap",
    10,
    32,
  )
  model = models.build(got)
  assert model.spec == got
  params = checkpoint.load_pretrained(tree, model)
  assert model.apply({"params": params}, jnp.zeros((1, 32, 32, 3))).shape == (1, 10)


def test_from_params_names_the_file_when_it_is_not_a_vit():
  with pytest.raises(errors.CheckpointError, match=r"^x\.npz: cannot tell the model"):
    spec.ModelSpec.from_params({"embedding": {"kernel": jnp.zeros((4, 4, 3, 8))}}, "x.npz")


def test_from_fields_by_name_by_fields_and_the_mistakes():
  assert spec.ModelSpec.from_fields("b/16", num_classes=5).name == "ViT-B_16"
  # Overriding one field of a variant makes a model that is no longer that variant.
  assert spec.ModelSpec.from_fields("B/16", num_layers=6).name is None
  assert spec.ModelSpec.from_fields(None, **TI16).name == "ViT-Ti_16"
  with pytest.raises(errors.ConfigError, match=r"missing \['num_layers', 'patch_size'\]"):
    spec.ModelSpec.from_fields(None, hidden_size=64, mlp_dim=128, num_heads=2)
  with pytest.raises(errors.ConfigError, match="unknown model field"):
    spec.ModelSpec.from_fields("B/16", hiden_size=3)
  with pytest.raises(errors.ConfigError, match="not divisible by the patch size 16 of ViT-B_16"):
    spec.ModelSpec.from_fields("B/16", image_size=225)
  with pytest.raises(errors.ConfigError, match="does not split into 5 heads"):
    spec.ModelSpec.from_fields("B/16", num_heads=5)
  with pytest.raises(errors.ConfigError, match="'cls'"):
    spec.ModelSpec.from_fields("B/16", classifier="cls")


def test_from_hf_config():
  hf = types.SimpleNamespace(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_hidden_layers=3,
    patch_size=8,
    image_size=32,
    num_labels=7,
    hidden_act="gelu",
    num_channels=3,
    qkv_bias=True,
  )
  assert spec.ModelSpec.from_hf_config(hf) == spec.ModelSpec(
    hidden_size=64,
    mlp_dim=128,
    num_heads=2,
    num_layers=3,
    patch_size=8,
    image_size=32,
    num_classes=7,
    gelu_approximate=False,
  )
  with pytest.raises(errors.ConfigError, match="hidden_act 'relu'"):
    spec.ModelSpec.from_hf_config(types.SimpleNamespace(**{**vars(hf), "hidden_act": "relu"}))


def test_build_keeps_the_spec_and_takes_only_runtime_options():
  s = spec.ModelSpec.from_fields("Ti/16", image_size=32, num_classes=3)
  model = models.build(s, dtype=jnp.bfloat16, scan=True)
  assert model.spec == s and model.scan and model.dtype == jnp.bfloat16
  with pytest.raises(errors.ConfigError, match="unknown model option"):
    models.build(s, num_layers=2)


def test_a_config_without_a_variant_name_gives_every_field():
  tiny = config_args.load_config(["--config", "tiny"])
  assert tiny.model.name is None
  model = steps.model_from_config(tiny, 10)
  assert (model.hidden_size, model.num_layers, model.patch_size, model.image_size) == (64, 2, 8, 32)
  # Unsetting the name of a recipe that gives no fields is a one-line mistake, not a fake base.
  b16 = config_args.load_config(["--config", "vit_b16_cifar10", "--config.model.name=None"])
  with pytest.raises(errors.ConfigError, match="needs every architecture field"):
    steps.model_from_config(b16, 10)


def test_only_spec_py_knows_the_variant_table():
  """The reverse lookup from fields to a name, and the table itself, have one owner."""
  for name in sorted(os.listdir(PACKAGE)):
    if not name.endswith(".py") or name == "spec.py":
      continue
    tree = ast.parse(open(os.path.join(PACKAGE, name)).read())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
      n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
    }
    assert not used & {"VARIANTS", "canonical_name"}, f"vit_jax/{name} reads the variant table"
