"""Fine-tuning and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config,
checkpoint)`.

Every host runs this same program. Checkpoints (Orbax) hold the params, the
optimizer state and the step, which is also the input pipeline's position, so
rerunning the same command resumes where a run stopped. Saves are asynchronous
and atomic: an interrupted save never replaces the last complete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from vit_jax import data as input_pipeline
from vit_jax import errors
from vit_jax.platform import files
from vit_jax.training import evaluation
from vit_jax.training import metric_writer
from vit_jax.weights import checkpoint
from vit_jax.weights import head_record
from vit_jax.weights import registry

log = logging.getLogger(__name__)


# `vit_jax.training.train.evaluate` predates the evaluation module; it stays an alias.
evaluate = evaluation.evaluate


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Training produced a NaN or Inf loss."""


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints,
    create=True,
    save_interval_steps=config.checkpoint_every,
    enable_async_checkpointing=config.async_checkpointing,
  )
  root = workdir if files.is_remote(workdir) else os.path.abspath(workdir)
  return ocp.CheckpointManager(files.join(root, "checkpoints"), options=options)


def _better(metric: str, new: float, best: float | None) -> bool:
  if best is None:
    return True
  return new < best if metric == "loss" else new > best


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
  """Trains as `config` says, evaluating and checkpointing on the way; returns the final metrics."""
  setup, data = evaluation.prepare(config, mesh)
  info = data.info
  # What the exported .npz files' head scores, and its classes, recorded beside each.
  head = head_record.HeadRecord(
    "sigmoid" if setup.sigmoid_loss else "softmax",
    tuple(info.class_names) if info.class_names else None,
  )
  is_main = jax.process_index() == 0
  if is_main:
    with files.atomic_write(files.join(workdir, "config.json")) as f:
      f.write(config.to_json_best_effort(indent=2).encode())
    input_pipeline.write_class_names(info, workdir)
  writer = metric_writer.MetricWriter(workdir)
  mngr = _checkpoint_manager(workdir, config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  latest = mngr.latest_step()
  if latest is not None:
    state = evaluation.restore(mngr, latest, setup)
    log.info("resumed from %s at step %d", mngr.directory, latest)
  else:
    pretrained = None
    if config.pretrained:
      pretrained = checkpoint.load_pretrained(
        registry.resolve(config.pretrained), setup.model, reset_head=config.reset_head
      )
    state = setup.init_state(init_rng, pretrained)
  start = int(jax.device_get(state.step))
  total = config.total_steps
  train_step = setup.jit_train_step()
  eval_step = setup.jit_eval_step()
  best_metric = config.best_metric
  best_path = files.join(workdir, "best.json")
  best = json.loads(files.read_bytes(best_path))["value"] if files.exists(best_path) else None

  batches = data.train_iterator(setup.batch_sharding, start_step=start)
  log_every, eval_every = config.log_every, config.eval_every
  pending, t0, seen = None, time.perf_counter(), 0
  step = start
  # Closed on the way out of an error too, so that the error's line starts a line of its own.
  with (
    _progress(start, total, is_main) as progress,
    _Profile(workdir, start, config.profile_steps) as profile,
  ):
    for step in range(start + 1, total + 1):
      batch = next(batches)
      profile.before(step)
      state, m = train_step(state, batch, step_rng)
      profile.after(step, state)
      # Check the previous step's loss while this one runs: no stall per step.
      if pending is not None:
        _check_finite(pending, step - 1)
      pending = m
      seen += config.batch_size
      if step % log_every == 0 or step == total:
        vals = {k: float(v) for k, v in jax.device_get(m).items()}
        _check_finite(m, step)
        dt = time.perf_counter() - t0
        vals["images_per_sec"] = seen / dt if dt > 0 else 0.0
        writer.write(step, "train", vals)
        progress.set_postfix(
          loss=f"{vals['loss']:.4f}", lr=f"{vals['lr']:.2e}", img_s=f"{vals['images_per_sec']:.1f}"
        )
        t0, seen = time.perf_counter(), 0
      progress.update(1)
      if step % eval_every == 0 or step == total:
        _check_finite(m, step)
        result = evaluation.run_eval(setup, data, state.params, "eval", eval_step)
        writer.write(step, "eval", result)
        # The metrics are the same on every host, so all hosts join the gather.
        if _better(best_metric, result[best_metric], best):
          best = result[best_metric]
          host = evaluation.host_params(setup, state.params)
          if is_main:
            checkpoint.save(host, files.join(workdir, "best.npz"))
            head_record.write(files.join(workdir, "best.npz"), head)
            with files.atomic_write(best_path) as f:
              f.write(json.dumps({"step": step, "metric": best_metric, "value": best}).encode())
      preempted = mngr.reached_preemption(step)
      if step % config.checkpoint_every == 0 or preempted:
        _check_finite(m, step)
        mngr.save(step, args=ocp.args.StandardSave(state), force=preempted)
        if preempted:
          mngr.wait_until_finished()
          log.warning("preempted at step %d: checkpoint saved, exiting", step)
          return {}
  if pending is not None:
    _check_finite(pending, step)
  if mngr.latest_step() != total:
    mngr.save(total, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  final = evaluation.host_params(setup, state.params)
  result = {"eval": evaluation.run_eval(setup, data, state.params, "eval", eval_step)}
  if info.num_examples.get("test"):
    result["test"] = evaluation.run_eval(setup, data, state.params, "test", eval_step)
    writer.write(total, "test", result["test"])
  if is_main:
    checkpoint.save(final, files.join(workdir, "final.npz"))
    head_record.write(files.join(workdir, "final.npz"), head)
  skipped = input_pipeline.decode_errors()
  if skipped:
    log.warning("%d images could not be decoded and were skipped", skipped)
  writer.close()
  mngr.close()
  return result


def _check_finite(m: dict[str, jax.Array], step: int) -> None:
  loss = float(jax.device_get(m["loss"]))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
      f"loss is {loss} at step {step}; stopping. The last checkpoint "
      "saved before this step is intact; lower base_lr or check the data"
    )


class _Profile:
  """A jax.profiler trace of `steps` training steps, copied to WORKDIR/profile (local or gs://)."""

  # Steps 1-4 after a (re)start hold the compilation and the input pipeline's warm-up.
  AFTER = 4

  def __init__(self, workdir: str, start: int, steps: int):
    self.workdir, self.first, self.last = (
      workdir,
      start + 1 + self.AFTER,
      start + self.AFTER + steps,
    )
    self.local = None

  def __enter__(self) -> _Profile:
    return self

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      self.local = tempfile.mkdtemp(prefix="vit-jax-profile-")
      jax.profiler.start_trace(self.local)

  def after(self, step: int, state: Any) -> None:
    if step == self.last and self.local:
      jax.block_until_ready(state)  # the traced steps end inside the trace
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    dest = files.join(self.workdir, "profile")
    files.copy_dir(self.local, dest, recursive=True)
    shutil.rmtree(self.local, ignore_errors=True)
    self.local = None
    log.info(
      "profile of steps %d-%d written to %s (tensorboard --logdir %s, Profile tab)",
      self.first,
      self.last,
      dest,
      dest,
    )

  def __exit__(self, *exc) -> None:
    if self.local:  # the run ended (or failed) inside the traced steps
      self._stop()


def _progress(start: int, total: int, enabled: bool):

  return tqdm(
    total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
  )
