"""Sharded inference over a whole dataset split: logits, top-k classes or embeddings to .npz.

Batches are sharded over every device of every host, exactly as in evaluation;
each host writes the rows it read (process 0 to OUTPUT, process i > 0 to
OUTPUT with a `.host{i}` suffix before `.npz`), padding rows dropped.
"""

from __future__ import annotations

import io
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax.platform import files
from vit_jax.training import sharding
from vit_jax.training import state


def _host_path(output: str) -> str:
  if jax.process_index() == 0:
    return output
  root, ext = os.path.splitext(output)
  return f"{root}.host{jax.process_index()}{ext or '.npz'}"


def predict_dataset(
  config: ml_collections.ConfigDict,
  checkpoint_path: str,
  output: str,
  *,
  split: str = "test",
  embeddings: bool = False,
  top_k: int = 5,
) -> dict[str, Any]:
  """Runs the model over `split` and writes this host's results; returns what was written."""
  setup, data = state.prepare(config)
  info = data.info
  params = state.load_params(setup, checkpoint_path)
  fn = setup.jit_predict(embedding=embeddings)
  outs, labels = [], []
  for batch in data.eval_iterator(split, setup.batch_sharding):
    keep = sharding.local_rows(batch["mask"]).astype(bool)
    outs.append(sharding.local_rows(fn(params, batch["image"]))[keep].astype(np.float32))
    labels.append(sharding.local_rows(batch["label"])[keep])
  dim = (
    (setup.model.representation_size or setup.model.hidden_size) if embeddings else info.num_classes
  )
  values = np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)
  result: dict[str, Any] = {
    "embeddings" if embeddings else "logits": values,
    "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int32),
  }
  if not embeddings and not info.multilabel:
    k = min(top_k, values.shape[-1])
    result["top_k"] = np.argsort(-values, axis=-1, kind="stable")[:, :k].astype(np.int32)
  if info.class_names:
    result["class_names"] = np.asarray(info.class_names)
  buf = io.BytesIO()
  np.savez(buf, **result)
  with files.atomic_write(_host_path(output)) as f:
    f.write(buf.getvalue())
  return result
