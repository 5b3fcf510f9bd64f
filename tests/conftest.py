"""Test setup: CPU JAX, quiet TensorFlow, exact float32 matmuls for comparisons."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# The `vit-jax` command keeps compiled programs in ~/.cache; the tests compile afresh and
# write nothing there (test_cli checks the cache in a directory of its own).
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

# PyTorch's default build ships triton, whose import segfaults when TensorFlow has already
# loaded its libraries in the process (seen: a tf.image.resize, then `import transformers`,
# which imports triton through torch._dynamo). The parity and convert tests share the process
# with the others, so both are loaded first, where they are installed.
for _name in ("torch", "triton"):
  try:
    __import__(_name)
  except ImportError:
    pass
import jax  # noqa: E402  pylint: disable=wrong-import-position

# Parity and equality checks compare float32 results; XLA:CPU's default is
# already fp32, "highest" makes that explicit on every backend.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402  pylint: disable=wrong-import-position

import ckpt_fixtures  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def imagenet_ckpt(tmp_path_factory):
  """A tiny model with a 1000-class head (so ImageNet labels apply), in the original layout."""
  path = tmp_path_factory.mktemp("ckpt") / "tiny1000.npz"
  ckpt_fixtures.write_original(path, ckpt_fixtures.Spec(classes=1000, image_size=32))
  return str(path)
