"""Imports TensorFlow for input and file I/O only: it must never claim an accelerator."""

from __future__ import annotations

import functools
import os


@functools.cache
def tf():
  """The tensorflow module, with every GPU/TPU hidden from it (JAX owns those)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # oneDNN's reordered float sums make TF's image ops differ run to run by an ulp.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow  # noqa: PLC0415  # TensorFlow loads on first use, not at import

  tensorflow.config.set_visible_devices([], "GPU")
  try:
    tensorflow.config.set_visible_devices([], "TPU")
  except (ValueError, RuntimeError):  # no TPU platform registered in tensorflow-cpu
    pass
  return tensorflow
