"""End to end: fine-tuning through the input pipeline, resuming after SIGKILL, NaN stops, eval."""

import glob
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import data_fixtures
from vit_jax.config import schema
from vit_jax.data import sources as data_sources
from vit_jax.models import layout
from vit_jax.training import evaluation
from vit_jax.training import state
from vit_jax.training import train
from vit_jax.weights import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """scikit-learn's handwritten digits (real data) as image folders, 32 px PNGs."""
  root = tmp_path_factory.mktemp("digits")
  # Pre-training on 0-4 (a), fine-tuning on 5-9 (b), as the demo does.
  data_fixtures.write_digits(str(root / "a"), range(0, 5))
  data_fixtures.write_digits(str(root / "b"), range(5, 10))
  return str(root)


def tiny_config(folder, **kw):
  c = schema.base()
  c.dataset = "folder"
  c.folder = folder
  c.image_size = 16
  c.model.name = None
  c.model.update(dict(hidden_size=48, mlp_dim=96, num_heads=3, num_layers=2, patch_size=4))
  c.augment.update(dict(inception_crop=False, hflip=False))
  c.batch_size, c.eval_batch_size = 32, 32
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 5, 30
  c.shuffle_buffer = 256
  c.log_every, c.eval_every, c.checkpoint_every = 5, 15, 10
  c.async_checkpointing = False
  c.best_metric = "accuracy"
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.slow
def test_a_run_makes_its_dataset_source_once(tmp_path, monkeypatch):
  """Three evaluations, the test split and the training stream all read one source."""
  root = str(tmp_path / "data")
  data_fixtures.write_folder(
    root, {"train": {"a": 8, "b": 8}, "val": {"a": 3, "b": 2}, "test": {"a": 2, "b": 3}}
  )
  made = []
  real = data_sources.make_source
  monkeypatch.setattr(data_sources, "make_source", lambda c: made.append(c) or real(c))
  cfg = tiny_config(
    root,
    total_steps=4,
    warmup_steps=1,
    eval_every=2,
    log_every=2,
    checkpoint_every=4,
    batch_size=8,
    eval_batch_size=8,
  )
  result = train.train_and_evaluate(cfg, str(tmp_path / "work"))
  assert (result["eval"]["count"], result["test"]["count"]) == (5, 5)
  assert len(made) == 1


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory):
  """A tiny ViT pre-trained on digits 0-4, exported in the original .npz layout."""
  work = str(tmp_path_factory.mktemp("pre"))
  train.train_and_evaluate(tiny_config(os.path.join(digits, "a"), total_steps=60), work)
  return os.path.join(work, "final.npz")


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_learns(digits, pretrained, tmp_path):
  # Digits 5-9, at 24 px: position embeddings are resized 4x4 -> 6x6, the head is reset.
  cfg = tiny_config(
    os.path.join(digits, "b"), image_size=24, total_steps=150, pretrained=pretrained, base_lr=0.05
  )
  result = train.train_and_evaluate(cfg, str(tmp_path))
  test = result["test"]
  assert test["count"] == len(glob.glob(os.path.join(digits, "b", "test", "*", "*.png")))
  assert test["accuracy"] > 0.8, test  # chance is 0.2
  # What a run leaves behind.
  assert (tmp_path / "labels.txt").read_text().split() == [f"digit_{i}" for i in range(5, 10)]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in rows} >= {"train", "eval", "test"}
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  final = checkpoint.load(str(tmp_path / "final.npz"))
  assert final["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 48)
  assert os.path.exists(tmp_path / "best.npz")
  # evaluate() on the exported file and on the Orbax checkpoint gives the same numbers: both
  # keep the float32 params as they are, and the eval step is the same program on the same
  # images, so the counts are equal.
  from_npz = evaluation.evaluate(cfg, str(tmp_path / "final.npz"), "test")
  from_orbax = evaluation.evaluate(cfg, str(tmp_path), "test")
  assert from_npz["accuracy"] == test["accuracy"]
  assert from_orbax["accuracy"] == test["accuracy"]


def _train_cmd(config_args, workdir):
  return [
    sys.executable,
    "-m",
    "vit_jax.cli",
    "train",
    "--config",
    os.path.join(ROOT, "configs", "tiny.py"),
    "--workdir",
    workdir,
    *config_args,
  ]


_KILL_ARGS = [
  "--config.image_size=16",
  "--config.model.patch_size=4",
  "--config.total_steps=40",
  "--config.checkpoint_every=10",
  "--config.eval_every=40",
  "--config.log_every=10",
  "--config.async_checkpointing=True",
]  # the default, which the tiny recipe turns off


def _final_params(workdir):
  return layout.flatten(checkpoint.load(os.path.join(workdir, "final.npz")))


@pytest.fixture(scope="module")
def straight_run(digits, tmp_path_factory):
  """The 40-step run of `_KILL_ARGS`, uninterrupted."""
  work = str(tmp_path_factory.mktemp("straight"))
  args = [f"--config.folder={os.path.join(digits, 'a')}", *_KILL_ARGS]
  subprocess.run(
    _train_cmd(args, work),
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    check=True,
    capture_output=True,
    timeout=600,
  )
  return work


@pytest.mark.slow
@pytest.mark.parametrize("when,resume_step", [("after-save", 20), ("mid-save", 10)])
def test_sigkill_during_an_async_save_then_rerun_resumes_to_the_same_params(
  digits, straight_run, tmp_path, when, resume_step
):
  """Killed just after step 20's checkpoint is committed, or while it is being written.

  A save cut short must not count: the rerun starts from step 10, the last committed one.
  """
  args = [f"--config.folder={os.path.join(digits, 'a')}", *_KILL_ARGS]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  killed = str(tmp_path / "killed")
  script = os.path.join(ROOT, "tests", "scripts", "train_killed_at_save.py")
  run = subprocess.run(
    [sys.executable, script, when, "20", "--config", "tiny", "--workdir", killed, *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  ckpts = os.listdir(os.path.join(killed, "checkpoints"))
  assert ("20" in ckpts) == (when == "after-save"), ckpts
  assert not os.path.exists(os.path.join(killed, "final.npz"))

  rerun = subprocess.run(
    _train_cmd(args, killed), env=env, capture_output=True, text=True, timeout=600
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {os.path.join(killed, 'checkpoints')} at step {resume_step}" in rerun.stderr
  a, b = _final_params(straight_run), _final_params(killed)
  assert a.keys() == b.keys()
  # Exact by construction: the rerun restores the saved state bit for bit (float32 as is) and
  # runs the same compiled train step on the same batches (the input order and augmentation
  # seeds are functions of the step), on the same machine. Bit-equal in 5 runs here, under 4
  # XLA:CPU settings (YNNPACK, Eigen or oneDNN dots; max ISA AVX and AVX2).
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The first run logged 10, 20 and maybe more (training goes on while a save is written) before
  # it was killed; the rerun logs from resume_step on.
  steps_logged = [
    json.loads(line)["step"]
    for line in open(os.path.join(killed, "metrics.jsonl"))
    if json.loads(line)["split"] == "train"
  ]
  rerun_part = list(range(resume_step + 10, 41, 10))
  first = steps_logged[: len(steps_logged) - len(rerun_part)]
  assert len(first) >= 2 and first == list(range(10, 10 * len(first) + 1, 10)), steps_logged
  assert steps_logged[len(first) :] == rerun_part, steps_logged


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path):
  # A healthy run to step 10 (checkpointed), then the same run resumed with a learning
  # rate that blows up: training stops with a clear error and step 10 stays intact.
  folder = os.path.join(digits, "a")
  train.train_and_evaluate(
    tiny_config(folder, total_steps=10, checkpoint_every=10, eval_every=10), str(tmp_path)
  )
  before = layout.flatten(checkpoint.load(str(tmp_path / "final.npz")))
  (tmp_path / "final.npz").unlink()
  cfg = tiny_config(
    folder,
    total_steps=30,
    checkpoint_every=5,
    eval_every=30,
    base_lr=1e9,
    warmup_steps=1,
    decay_type="constant",
  )
  with pytest.raises(train.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "final.npz")
  saved = sorted(
    int(os.path.basename(d))
    for d in glob.glob(str(tmp_path / "checkpoints" / "*"))
    if os.path.basename(d).isdigit()
  )
  assert saved[-1] == 10, saved  # nothing was saved after the loss went bad
  setup, _ = state.prepare(cfg)
  params = layout.flatten(jax.device_get(state.load_params(setup, str(tmp_path))))
  for k, v in before.items():
    np.testing.assert_array_equal(np.asarray(params[k]), v, err_msg=k)


@pytest.mark.slow
def test_eval_command_prints_metrics(digits, pretrained, tmp_path, capsys):
  from vit_jax import cli

  code = cli.main(
    [
      "eval",
      "--config",
      os.path.join(ROOT, "configs", "tiny.py"),
      "--checkpoint",
      pretrained,
      f"--config.folder={os.path.join(digits, 'a')}",
      "--config.image_size=16",
      "--config.model.hidden_size=48",
      "--config.model.mlp_dim=96",
      "--config.model.num_heads=3",
      "--config.model.patch_size=4",
      "--split",
      "test",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0
  row = json.loads(out.strip().splitlines()[-1])
  assert row["split"] == "test" and row["accuracy"] > 0.5 and row["count"] > 100


def test_train_command_errors_are_one_line(tmp_path, capsys):
  from vit_jax import cli

  code = cli.main(
    [
      "train",
      "--config",
      os.path.join(ROOT, "configs", "tiny.py"),
      "--workdir",
      str(tmp_path),
      "--config.folder=/nonexistent/folder",
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "/nonexistent/folder" in err[0]


@pytest.mark.slow
def test_sharded_predict_over_a_split_matches_evaluation(digits, pretrained, tmp_path):
  from vit_jax.apps import split_predictions

  cfg = tiny_config(os.path.join(digits, "a"))
  out = split_predictions.predict_dataset(
    cfg, pretrained, str(tmp_path / "one.npz"), split="test", top_k=3
  )
  n = len(glob.glob(os.path.join(digits, "a", "test", "*", "*.png")))
  assert out["logits"].shape == (n, 5) and out["top_k"].shape == (n, 3) and len(out["labels"]) == n
  accuracy = float((out["logits"].argmax(-1) == out["labels"]).mean())
  # Ratios of counts. The predict and eval programs differ in the logits by rounding only,
  # 8e-6 of the largest logit (see below): 5e-5, against 0.016 for the closest top-2 gap.
  assert accuracy == pytest.approx(evaluation.evaluate(cfg, pretrained, "test")["accuracy"])
  np.testing.assert_array_equal(out["top_k"][:, 0], out["logits"].argmax(-1))
  emb = split_predictions.predict_dataset(
    cfg, pretrained, str(tmp_path / "emb.npz"), split="test", embeddings=True
  )
  assert emb["embeddings"].shape == (n, 48)
  # The same split over 4 devices (batches sharded) gives the same rows, in the same order.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)  # keeps the caller's XLA settings
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "vit_jax.cli",
      "predict",
      "--checkpoint",
      pretrained,
      "--output",
      str(tmp_path / "four.npz"),
      "--config",
      os.path.join(ROOT, "configs", "tiny.py"),
      f"--config.folder={os.path.join(digits, 'a')}",
      "--config.image_size=16",
      "--config.model.hidden_size=48",
      "--config.model.mlp_dim=96",
      "--config.model.num_heads=3",
      "--config.model.patch_size=4",
      "--config.eval_batch_size=32",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = np.load(tmp_path / "four.npz")
  np.testing.assert_array_equal(four["labels"], out["labels"])
  # Batches of 8 per device instead of 32: other programs. fp32 bound: u * sqrt(K) summed
  # over the 21 matmuls, softmaxes and norms on the path (K = 16 to 96) = 8e-6 of the largest
  # logit (5.75). Measured: bit-equal with YNNPACK dots (the default), 1.1e-6 with Eigen's.
  np.testing.assert_allclose(
    four["logits"], out["logits"], rtol=0, atol=1e-5 * float(np.abs(out["logits"]).max())
  )
  assert list(four["class_names"]) == [f"digit_{i}" for i in range(5)]


# Today's regularisation, every piece on: the resumed run must still see the same random draws.
REGULARISED = {
  "model.drop_path_rate": 0.1,
  "ema_decay": 0.9,
  "export_params": "ema",  # final.npz holds the average: its resume is checked too
  "augment.mixup_alpha": 0.2,
  "augment.cutmix_alpha": 1.0,
  "augment.randaug_layers": 2,
  "augment.randaug_magnitude": 10.0,
  "augment.erase_prob": 0.25,
}


@pytest.mark.slow
@pytest.mark.parametrize(
  "changes",
  [{}, {"model.scan": True, "model.remat": True, "model.dtype": "bfloat16"}, REGULARISED],
  ids=["plain", "scan_remat_bf16", "regularised"],
)
def test_preemption_saves_and_exits_then_the_rerun_ends_like_a_straight_run(
  digits, tmp_path, monkeypatch, caplog, changes
):
  def cfg():
    c = tiny_config(
      os.path.join(digits, "a"),
      total_steps=30,
      checkpoint_every=10,
      eval_every=30,
      log_every=5,
      async_checkpointing=True,
    )
    for key, value in changes.items():
      parent, _, leaf = key.rpartition(".")
      (c[parent] if parent else c)[leaf] = value
    return c

  straight = train.train_and_evaluate(cfg(), str(tmp_path / "straight"))
  losses = [
    json.loads(line)["loss"]
    for line in open(tmp_path / "straight" / "metrics.jsonl")
    if json.loads(line)["split"] == "train"
  ]
  if changes is not REGULARISED:  # with all of it on, 30 steps learn little: this run is for resume
    # It learns: the loss falls well below its start (chance level is ln 5 = 1.61), and the
    # held-out accuracy is far above chance (0.2).
    assert losses[-1] < 0.7 * losses[0], losses
    assert straight["test"]["accuracy"] > 0.6, straight

  # The preemption notice comes at step 15, between two regular saves.
  monkeypatch.setattr(ocp.CheckpointManager, "reached_preemption", lambda self, step: step == 15)
  assert train.train_and_evaluate(cfg(), str(tmp_path / "pre")) == {}
  assert sorted(os.listdir(tmp_path / "pre" / "checkpoints")) == ["10", "15"]
  assert not os.path.exists(tmp_path / "pre" / "final.npz")
  monkeypatch.undo()
  with caplog.at_level(logging.INFO, logger="vit_jax.training.train"):
    resumed = train.train_and_evaluate(cfg(), str(tmp_path / "pre"))
  assert f"resumed from {tmp_path / 'pre' / 'checkpoints'} at step 15" in caplog.text
  # Exact: the same compiled steps on the same batches from the restored state (see the
  # SIGKILL test above).
  a, b = _final_params(str(tmp_path / "straight")), _final_params(str(tmp_path / "pre"))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert resumed == straight


@pytest.mark.slow
@pytest.mark.parametrize("change", ["model", "optimizer"])
def test_resuming_with_another_config_is_a_clear_error(digits, tmp_path, change):
  folder = os.path.join(digits, "a")
  train.train_and_evaluate(tiny_config(folder, total_steps=10, eval_every=10), str(tmp_path))
  other = tiny_config(folder, total_steps=20, eval_every=10)
  if change == "model":
    other.model.mlp_dim = 64
  else:
    other.optimizer = "adam"
  with pytest.raises(
    ValueError,
    match=r"checkpoints/10: this checkpoint was written with another "
    r"model or optimizer config .*use a new --workdir",
  ):
    train.train_and_evaluate(other, str(tmp_path))


@pytest.mark.slow
def test_resuming_on_another_mesh_restores_the_same_params_resharded(digits, tmp_path):
  """Written on 4 devices as pure data parallelism, resumed on a 2x2 data x model mesh."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)  # keeps the caller's XLA settings
  script = os.path.join(ROOT, "tests", "scripts", "resume_on_another_mesh.py")
  proc = subprocess.run(
    [sys.executable, script, os.path.join(digits, "a"), str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from {tmp_path / 'checkpoints'} at step 10" in proc.stderr


@pytest.mark.slow
def test_profile_steps_writes_a_trace_of_those_steps(digits, tmp_path):
  folder = os.path.join(digits, "a")
  cfg = tiny_config(folder, total_steps=12, eval_every=12, checkpoint_every=12, profile_steps=3)
  train.train_and_evaluate(cfg, str(tmp_path))
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  # The trace names the jitted training step it recorded.
  assert b"jit_step" in open(traces[0], "rb").read()
  # A run that ends inside the traced steps still writes its trace.
  cfg = tiny_config(folder, total_steps=6, eval_every=6, checkpoint_every=6, profile_steps=50)
  train.train_and_evaluate(cfg, str(tmp_path / "short"))
  assert glob.glob(
    str(tmp_path / "short" / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb")
  )


# The README's parameter-group recipes, as a user types them (tests/test_readme checks the text).
PROBE = [
  '--config.lr_mults=(("head/.*", 1.0), (".*", 0.0))',
  "--config.augment.inception_crop=False",
  "--config.augment.hflip=0.0",
]
HEAD_ONLY = [
  '--config.lr_mults=(("(head|pre_logits|Transformer/encoder_norm)/.*", 1.0), (".*", 0.0))'
]
LAYER_DECAY = ["--config.layer_decay=0.7"]


@pytest.mark.slow
@pytest.mark.parametrize(
  "flags,trains",
  [
    (PROBE, ("head/",)),
    (HEAD_ONLY, ("head/", "Transformer/encoder_norm/")),
    (LAYER_DECAY, ("",)),
  ],
  ids=["linear_probe", "head_only", "layer_decay"],
)
def test_parameter_groups_from_the_command_line(digits, pretrained, tmp_path, flags, trains):
  """Fine-tuning on digits 5-9 from the model pre-trained on 0-4: what is frozen stays bit for
  bit as pre-trained, the rest moves, and the run evaluates."""
  from vit_jax import cli

  common = [
    f"--config.folder={os.path.join(digits, 'b')}",
    f"--config.pretrained={pretrained}",
    "--config.image_size=16",
    "--config.model.hidden_size=48",
    "--config.model.mlp_dim=96",
    "--config.model.num_heads=3",
    "--config.model.patch_size=4",
    "--config.total_steps=20",
    "--config.base_lr=0.05",
  ]
  tiny = ["train", "--config", os.path.join(ROOT, "configs", "tiny.py")]
  code = cli.main([*tiny, "--workdir", str(tmp_path), *common, *flags])
  assert code == 0
  before = layout.flatten(checkpoint.load(pretrained))
  after = _final_params(str(tmp_path))
  for name, value in after.items():
    if name.startswith("head/"):
      continue  # re-initialised for the new classes
    moved = not np.array_equal(value, before[name])
    assert moved == name.startswith(trains), name
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any(r["split"] == "test" and r["count"] > 100 for r in rows)
  if flags is LAYER_DECAY:
    # Against the same run without it: the embeddings (0.7^3 = 0.34) move much less, the last
    # block (0.7) less. The update itself is checked against timm's in test_training_parity.
    assert cli.main([*tiny, "--workdir", str(tmp_path / "plain"), *common]) == 0
    plain = _final_params(str(tmp_path / "plain"))
    moved = lambda p, k: float(np.abs(p[k] - before[k]).sum())
    ratio = {k: moved(after, k) / moved(plain, k) for k in before if not k.startswith("head/")}
    median = lambda prefixes: float(
      np.median([v for k, v in ratio.items() if k.startswith(prefixes)])
    )
    # Measured medians: 0.37 (embeddings, d^3 = 0.34), 0.51 (block 0, d^2), 0.72 (block 1, d).
    assert median(("embedding/", "cls", "Transformer/posembed")) < 0.45
    assert 0.4 < median("Transformer/encoderblock_0/") < 0.6
    assert 0.6 < median("Transformer/encoderblock_1/") < 0.85
