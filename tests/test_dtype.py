"""--dtype: auto takes bf16 only where the hardware multiplies it natively; logits stay float32."""

import json

import jax
import numpy as np
import pytest

from vit_jax import cli
from vit_jax import errors
from vit_jax.apps import classifier
from vit_jax.platform import jax_setup


@pytest.mark.parametrize(
  "platform,flags,native",
  [
    ("cpu", {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, True),  # Sapphire Rapids
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, False),  # bf16 dot products, no matrix unit
    ("cpu", {"avx2"}, False),
    ("tpu", set(), True),
    ("gpu", set(), False),
  ],
)
def test_native_bf16(platform, flags, native):
  got, why = jax_setup.native_bf16(platform, flags)
  assert got is native and why


def test_auto_follows_the_machine_and_the_environment_sets_the_default(monkeypatch):
  monkeypatch.setattr(jax_setup, "native_bf16", lambda: (True, "this CPU has AMX bf16 tiles"))
  monkeypatch.delenv(jax_setup.DTYPE_ENV, raising=False)
  assert jax_setup.compute_dtype(None) == ("bfloat16", "auto: this CPU has AMX bf16 tiles")
  assert jax_setup.compute_dtype("float32") == ("float32", "asked for")
  monkeypatch.setattr(jax_setup, "native_bf16", lambda: (False, "this CPU has no bf16 matrix unit"))
  assert jax_setup.compute_dtype("auto")[0] == "float32"
  monkeypatch.setenv(jax_setup.DTYPE_ENV, "bfloat16")
  assert jax_setup.compute_dtype(None) == ("bfloat16", "asked for")
  monkeypatch.setenv(jax_setup.DTYPE_ENV, "fp8")
  with pytest.raises(
    errors.ConfigError, match="dtype 'fp8': choose one of auto, float32, bfloat16"
  ):
    jax_setup.compute_dtype(None)


def test_bf16_compute_casts_the_weights_once_and_keeps_float32_logits(imagenet_ckpt):
  x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  f32 = classifier.load_classifier(imagenet_ckpt, dtype="float32")
  bf16 = classifier.load_classifier(imagenet_ckpt, dtype="bfloat16")
  assert (f32.dtype, bf16.dtype) == ("float32", "bfloat16")
  assert {p.dtype for p in jax.tree_util.tree_leaves(bf16.params)} == {jax.numpy.dtype("bfloat16")}
  assert {p.dtype for p in jax.tree_util.tree_leaves(f32.params)} == {np.dtype("float32")}
  a, b = f32.logits(x), bf16.logits(x)
  assert b.dtype == np.float32
  # bf16 keeps 8 significant bits: logits of order 1 move by a few hundredths, not more.
  assert 0 < np.abs(a - b).max() < 0.1


def test_predict_takes_dtype(imagenet_ckpt, tmp_path, capsys):
  import data_fixtures as df

  image = df.write_file(str(tmp_path / "a.png"), df.encode(df.class_image(0, 0, 32, 32)))
  assert (
    cli.main(["predict", "--checkpoint", imagenet_ckpt, "--dtype", "bfloat16", "--json", image])
    == 0
  )
  assert len(json.loads(capsys.readouterr().out)["predictions"]) == 5
  with pytest.raises(SystemExit):
    cli.main(["predict", "--checkpoint", imagenet_ckpt, "--dtype", "half", image])


@pytest.mark.slow
def test_the_server_says_which_dtype_it_runs(imagenet_ckpt):
  import httpx

  from tests import test_serve
  from vit_jax.apps.serving import app as serve

  clf = classifier.load_classifier(imagenet_ckpt, dtype="bfloat16")
  with test_serve.running(serve.create_app(clf, test_serve.OPTIONS)) as url:
    assert httpx.get(f"{url}/metadata", timeout=60).json()["dtype"] == "bfloat16"
