"""Metrics to TensorBoard event files and to `metrics.jsonl`, from process 0 only."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax

from vit_jax.platform import files
from vit_jax.platform import tf_setup


class MetricWriter:
  """Scalars to `workdir/tensorboard/` and one JSON line per write to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = files.join(workdir, "metrics.jsonl")
    self._events = files.join(workdir, "tensorboard")
    self._local = None
    if self.enabled:
      self._tf = tf_setup.tf()
      if files.is_remote(workdir):
        # TensorFlow's writer would reach gs:// through its own client, which cannot be
        # pointed at another endpoint: it writes here, and each flush uploads the file whole.
        self._local = tempfile.mkdtemp(prefix="vit-jax-events-")
      self._tb = self._tf.summary.create_file_writer(self._local or self._events)

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    """Scalar values under `split/name`; lists (per-class metrics) go to the JSON line only."""
    if not self.enabled:
      return
    scalars = {
      k: float(v)
      for k, v in values.items()
      if isinstance(v, (int, float)) or getattr(v, "ndim", 1) == 0
    }
    with self._tb.as_default(step=step):
      for k, v in scalars.items():
        self._tf.summary.scalar(f"{split}/{k}", v)
    self._tb.flush()
    self._upload_events()
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update({k: (v if k not in scalars else scalars[k]) for k, v in values.items()})
    files.append_text(self._jsonl, json.dumps(row, default=float) + "\n")

  def _upload_events(self) -> None:
    if self._local is not None:
      files.copy_dir(self._local, self._events)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._upload_events()
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None
