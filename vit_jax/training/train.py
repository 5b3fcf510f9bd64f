"""The training loop: `train_and_evaluate(config, workdir)`.

Every host runs this same program. Checkpoints (Orbax) hold the params, the
optimizer state and the step, which is also the input pipeline's position, so
rerunning the same command resumes where a run stopped. Saves are asynchronous
and atomic: an interrupted save never replaces the last complete one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from vit_jax import errors
from vit_jax.data import sources
from vit_jax.platform import files
from vit_jax.training import evaluation
from vit_jax.training import metric_writer
from vit_jax.training import state
from vit_jax.weights import checkpoint
from vit_jax.weights import head_record
from vit_jax.weights import registry

log = logging.getLogger(__name__)


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Training produced a NaN or Inf loss."""


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
  """Trains as `config` says, evaluating and checkpointing on the way; returns the final metrics
  (nothing when a preemption notice stopped the run: rerun to resume)."""
  run = _Run(config, workdir, mesh)
  train_state = run.restore_or_init()
  start, total = int(jax.device_get(train_state.step)), config.total_steps
  train_step = run.setup.jit_train_step()
  batches = run.data.train_iterator(run.setup.batch_sharding, start_step=start)
  # Closed on the way out of an error too, so that the error's line starts a line of its own.
  with run.progress(start) as progress, _Profile(workdir, start, config.profile_steps) as profile:
    for step in range(start + 1, total + 1):
      profile.before(step)
      train_state, step_metrics = train_step(train_state, next(batches), run.step_rng)
      profile.after(step, train_state)
      run.log(step, step_metrics, progress)
      if step % config.eval_every == 0 or step == total:
        run.evaluate(step, train_state)
      if run.save(step, train_state):
        return {}  # preempted: the checkpoint of this step is saved
  return run.finish(train_state)


class _Run:
  """One training run's parts: its Setup and data, its outputs in the workdir, and its logs."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh):
    self.config, self.workdir = config, workdir
    self.setup, self.data = state.prepare(config, mesh)
    info = self.data.info
    # What the exported .npz files' head scores, and its classes, recorded beside each.
    self.head = head_record.HeadRecord(
      "sigmoid" if self.setup.sigmoid_loss else "softmax",
      tuple(info.class_names) if info.class_names else None,
    )
    self.is_main = jax.process_index() == 0
    if self.is_main:
      with files.atomic_write(files.join(workdir, "config.json")) as f:
        f.write(config.to_json_best_effort(indent=2).encode())
      sources.write_class_names(info, workdir)
    self.writer = metric_writer.MetricWriter(workdir)
    self.mngr = state.checkpoint_manager(workdir, config)
    self.init_rng, self.step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    self.eval_step = self.setup.jit_eval_step()
    self.eval_sets = evaluation.eval_sets(config, self.setup, self.data)
    self.export = config.export_params
    if self.export not in ("raw", "ema") or (self.export == "ema" and config.ema_decay is None):
      raise errors.ConfigError(
        f"config.export_params {self.export!r} must be raw, or ema with config.ema_decay set"
      )
    self.best_set, self.best_metric = evaluation.parse_metric(config.best_metric, self.eval_sets)
    self.best_path = files.join(workdir, "best.json")
    self.best = (
      json.loads(files.read_bytes(self.best_path))["value"]
      if files.exists(self.best_path)
      else None
    )
    self.pending: dict[str, jax.Array] | None = None  # the last step's metrics, not yet checked
    self.t0, self.seen = time.perf_counter(), 0

  def restore_or_init(self):
    """The last checkpoint's state, or a fresh one (from `config.pretrained` when given)."""
    latest = self.mngr.latest_step()
    if latest is not None:
      log.info("resumed from %s at step %d", self.mngr.directory, latest)
      return state.restore(self.mngr, latest, self.setup)
    pretrained = None
    if self.config.pretrained:
      pretrained = checkpoint.load_pretrained(
        registry.resolve(self.config.pretrained),
        self.setup.model,
        reset_head=self.config.reset_head,
      )
    return self.setup.init_state(self.init_rng, pretrained)

  def progress(self, start: int):
    return tqdm(
      total=self.config.total_steps,
      initial=start,
      disable=not self.is_main,
      desc="train",
      unit="step",
      dynamic_ncols=True,
    )

  def log(self, step: int, step_metrics: dict[str, jax.Array], progress) -> None:
    """Checks the previous step's loss (while this one runs: no stall per step), and writes the
    training metrics every `log_every` steps."""
    if self.pending is not None:
      _check_finite(self.pending, step - 1)
    self.pending = step_metrics
    self.seen += self.config.batch_size
    if step % self.config.log_every == 0 or step == self.config.total_steps:
      vals = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      _check_finite(step_metrics, step)
      dt = time.perf_counter() - self.t0
      vals["images_per_sec"] = self.seen / dt if dt > 0 else 0.0
      self.writer.write(step, "train", vals)
      progress.set_postfix(
        loss=f"{vals['loss']:.4f}", lr=f"{vals['lr']:.2e}", img_s=f"{vals['images_per_sec']:.1f}"
      )
      self.t0, self.seen = time.perf_counter(), 0
    progress.update(1)

  def evaluate(self, step: int, train_state) -> None:
    """Every evaluation set's metrics, of the raw params and (when kept) of their average;
    `best.npz` when `best_metric` improved."""
    _check_finite(self.pending, step)
    results = self._eval_all(step, train_state, "eval")
    name = self.best_set + ("_ema" if self.export == "ema" else "")
    value = results[name][self.best_metric]
    # The metrics are the same on every host, so all hosts join the gather.
    if _better(self.best_metric, value, self.best):
      self.best = value
      self._export(self._exported(train_state), "best.npz")
      if self.is_main:
        with files.atomic_write(self.best_path) as f:
          record = {
            "step": step,
            "metric": self.config.best_metric,
            "value": value,
            "params": self.export,
          }
          f.write(json.dumps(record).encode())

  def _eval_all(
    self, step: int, train_state, split: str, write: bool = True
  ) -> dict[str, dict[str, Any]]:
    """{NAME: metrics, NAME_ema: metrics} of each evaluation set (the test split: `test`,
    `test_ema`), written as they come."""
    params = {"": train_state.params}
    if train_state.ema_params is not None:
      params["_ema"] = train_state.ema_params
    out = {}
    for eval_set in self.eval_sets:
      if split == "test" and eval_set.name != "eval":
        continue
      for suffix, p in params.items():
        name = ("test" if split == "test" else eval_set.name) + suffix
        out[name] = evaluation.run_eval(
          self.setup, eval_set.data, p, eval_set.split if split != "test" else "test", eval_set.step
        )
        if write:
          self.writer.write(step, name, out[name])
    return out

  def _exported(self, train_state):
    return train_state.ema_params if self.export == "ema" else train_state.params

  def save(self, step: int, train_state) -> bool:
    """An Orbax checkpoint every `checkpoint_every` steps or on a preemption notice; True when
    preempted (the checkpoint is then written: the run stops)."""
    preempted = self.mngr.reached_preemption(step)
    if step % self.config.checkpoint_every == 0 or preempted:
      _check_finite(self.pending, step)
      self.mngr.save(step, args=ocp.args.StandardSave(train_state), force=preempted)
      if preempted:
        self.mngr.wait_until_finished()
        log.warning("preempted at step %d: checkpoint saved, exiting", step)
    return preempted

  def finish(self, train_state) -> dict[str, Any]:
    """The last checkpoint, the final metrics (eval, and test when there is a test split) and
    `final.npz`."""
    total = self.config.total_steps
    if self.pending is not None:
      _check_finite(self.pending, total)
    if self.mngr.latest_step() != total:
      self.mngr.save(total, args=ocp.args.StandardSave(train_state), force=True)
    self.mngr.wait_until_finished()
    result = self._eval_all(total, train_state, "eval", write=False)  # evaluate() wrote these
    if self.data.info.num_examples.get("test"):
      result |= self._eval_all(total, train_state, "test")
    self._export(self._exported(train_state), "final.npz")
    skipped = self.data.decode_errors
    if skipped:
      log.warning("%d images could not be decoded and were skipped", skipped)
    self.writer.close()
    self.mngr.close()
    return result

  def _export(self, params, name: str) -> None:
    """WORKDIR/NAME in the original layout, with its head record (every host gathers)."""
    host = state.host_params(self.setup, params)
    if self.is_main:
      checkpoint.save(host, files.join(self.workdir, name))
      head_record.write(files.join(self.workdir, name), self.head)


def _better(metric: str, new: float, best: float | None) -> bool:
  if best is None:
    return True
  return new < best if metric == "loss" else new > best


def _check_finite(m: dict[str, jax.Array] | None, step: int) -> None:
  if m is None:
    return
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
    self.workdir = workdir
    self.first, self.last = start + 1 + self.AFTER, start + self.AFTER + steps
    self.local = None

  def __enter__(self) -> _Profile:
    return self

  def before(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      self.local = tempfile.mkdtemp(prefix="vit-jax-profile-")
      jax.profiler.start_trace(self.local)

  def after(self, step: int, train_state: Any) -> None:
    if step == self.last and self.local:
      jax.block_until_ready(train_state)  # the traced steps end inside the trace
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
