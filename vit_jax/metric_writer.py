"""Metrics to TensorBoard event files and to `metrics.jsonl`, from process 0 only."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax

from vit_jax import files


class MetricWriter:
  """Scalars to `workdir/tensorboard/` and one JSON line per write to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    if self.enabled:
      from vit_jax import tf_setup  # pylint: disable=import-outside-toplevel
      self._tf = tf_setup.tf()
      self._tb = self._tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    """Scalar values under `split/name`; lists (per-class metrics) go to the JSON line only."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) or
               getattr(v, "ndim", 1) == 0}
    with self._tb.as_default(step=step):
      for k, v in scalars.items():
        self._tf.summary.scalar(f"{split}/{k}", v)
    self._tb.flush()
    row = {"step": int(step), "split": split, "time": round(time.time(), 3)}
    row.update({k: (v if k not in scalars else scalars[k]) for k, v in values.items()})
    line = json.dumps(row, default=float) + "\n"
    if files.is_remote(self._jsonl):
      with self._tf.io.gfile.GFile(self._jsonl, "a") as f:
        f.write(line)
    else:
      with open(self._jsonl, "a", encoding="utf-8") as f:
        f.write(line)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
