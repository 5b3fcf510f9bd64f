"""Test setup: CPU JAX, quiet TensorFlow, exact float32 matmuls for comparisons."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402  pylint: disable=wrong-import-position

# Parity and equality checks compare float32 results; XLA:CPU's default is
# already fp32, "highest" makes that explicit on every backend.
jax.config.update("jax_default_matmul_precision", "highest")
