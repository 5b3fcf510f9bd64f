"""End to end: fine-tuning through the real input pipeline, resuming after SIGKILL, NaN stops, eval."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import configs
from vit_jax import demo
from vit_jax import models
from vit_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """scikit-learn's handwritten digits (real data) as image folders, 32 px PNGs."""
  root = tmp_path_factory.mktemp("digits")
  demo.write_digit_folders(str(root), size=32)
  return str(root)


def tiny_config(folder, **kw):
  c = configs.base()
  c.dataset = "folder"
  c.folder = folder
  c.image_size = 16
  c.model.name = "ViT-Ti_16"
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


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory):
  """A tiny ViT pre-trained on digits 0-4, exported in the original .npz layout."""
  work = str(tmp_path_factory.mktemp("pre"))
  train.train_and_evaluate(tiny_config(os.path.join(digits, "a"), total_steps=60), work)
  return os.path.join(work, "final.npz")


def test_fine_tuning_from_a_checkpoint_learns(digits, pretrained, tmp_path):
  # Digits 5-9, at 24 px: position embeddings are resized 4x4 -> 6x6, the head is reset.
  cfg = tiny_config(os.path.join(digits, "b"), image_size=24, total_steps=150, pretrained=pretrained,
                    base_lr=0.05)
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
  from_npz = train.evaluate(cfg, str(tmp_path / "final.npz"), "test")
  from_orbax = train.evaluate(cfg, str(tmp_path), "test")
  assert from_npz["accuracy"] == test["accuracy"]
  assert from_orbax["accuracy"] == test["accuracy"]


def _train_cmd(config_args, workdir):
  return [sys.executable, "-m", "vit_jax.cli", "train", "--config", os.path.join(ROOT, "configs", "tiny.py"),
          "--workdir", workdir, *config_args]


def test_sigkill_then_rerun_resumes_to_the_same_params(digits, tmp_path):
  args = [f"--config.folder={os.path.join(digits, 'a')}", "--config.image_size=16",
          "--config.model.patch_size=4", "--config.total_steps=40", "--config.checkpoint_every=10",
          "--config.eval_every=40", "--config.log_every=10"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  straight = str(tmp_path / "straight")
  subprocess.run(_train_cmd(args, straight), env=env, check=True, capture_output=True, timeout=600)

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_train_cmd(args, killed), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "20")) and time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail("the run ended before it could be killed")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "final.npz"))
  rerun = subprocess.run(_train_cmd(args, killed), env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  a = checkpoint.load(os.path.join(straight, "final.npz"))
  b = checkpoint.load(os.path.join(killed, "final.npz"))
  flat_a, flat_b = checkpoint.flatten(a), checkpoint.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  # Exact by construction: the rerun restores the saved state bit for bit (float32 as is) and
  # runs the same compiled train step on the same batches (the input order and augmentation
  # seeds are functions of the step), on the same machine. Bit-equal in 5 runs here, under 4
  # XLA:CPU settings (YNNPACK, Eigen or oneDNN dots; max ISA AVX and AVX2).
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  # The rerun started from a checkpoint, not from scratch: step 10 was logged once, by the first run.
  steps_logged = [json.loads(l)["step"] for l in open(os.path.join(killed, "metrics.jsonl"))
                  if json.loads(l)["split"] == "train"]
  assert steps_logged.count(10) == 1 and steps_logged.count(40) == 1


def test_nan_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path):
  # A healthy run to step 10 (checkpointed), then the same run resumed with a learning
  # rate that blows up: training stops with a clear error and step 10 stays intact.
  folder = os.path.join(digits, "a")
  train.train_and_evaluate(tiny_config(folder, total_steps=10, checkpoint_every=10, eval_every=10),
                           str(tmp_path))
  before = checkpoint.flatten(checkpoint.load(str(tmp_path / "final.npz")))
  (tmp_path / "final.npz").unlink()
  cfg = tiny_config(folder, total_steps=30, checkpoint_every=5, eval_every=30, base_lr=1e9,
                    warmup_steps=1, decay_type="constant")
  with pytest.raises(train.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "final.npz")
  saved = sorted(int(os.path.basename(d)) for d in glob.glob(str(tmp_path / "checkpoints" / "*"))
                 if os.path.basename(d).isdigit())
  assert saved[-1] == 10, saved  # nothing was saved after the loss went bad
  setup, _ = train.make_setup(cfg)
  params = checkpoint.flatten(jax.device_get(train.load_params(setup, str(tmp_path))))
  for k, v in before.items():
    np.testing.assert_array_equal(np.asarray(params[k]), v, err_msg=k)


def test_eval_command_prints_metrics(digits, pretrained, tmp_path, capsys):
  from vit_jax import cli
  code = cli.main(["eval", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--checkpoint", pretrained,
                   f"--config.folder={os.path.join(digits, 'a')}", "--config.image_size=16",
                   "--config.model.hidden_size=48", "--config.model.mlp_dim=96",
                   "--config.model.num_heads=3", "--config.model.patch_size=4", "--split", "test"])
  out = capsys.readouterr().out
  assert code == 0
  row = json.loads(out.strip().splitlines()[-1])
  assert row["split"] == "test" and row["accuracy"] > 0.5 and row["count"] > 100


def test_train_command_errors_are_one_line(tmp_path, capsys):
  from vit_jax import cli
  code = cli.main(["train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", str(tmp_path),
                   "--config.folder=/nonexistent/folder"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "/nonexistent/folder" in err[0]


def test_sharded_predict_over_a_split_matches_evaluation(digits, pretrained, tmp_path):
  from vit_jax import infer
  cfg = tiny_config(os.path.join(digits, "a"))
  out = infer.predict_dataset(cfg, pretrained, str(tmp_path / "one.npz"), split="test", top_k=3)
  n = len(glob.glob(os.path.join(digits, "a", "test", "*", "*.png")))
  assert out["logits"].shape == (n, 5) and out["top_k"].shape == (n, 3) and len(out["labels"]) == n
  accuracy = float((out["logits"].argmax(-1) == out["labels"]).mean())
  # Ratios of counts. The predict and eval programs differ in the logits by rounding only,
  # 8e-6 of the largest logit (see below): 5e-5, against 0.016 for the closest top-2 gap.
  assert accuracy == pytest.approx(train.evaluate(cfg, pretrained, "test")["accuracy"])
  np.testing.assert_array_equal(out["top_k"][:, 0], out["logits"].argmax(-1))
  emb = infer.predict_dataset(cfg, pretrained, str(tmp_path / "emb.npz"), split="test", embeddings=True)
  assert emb["embeddings"].shape == (n, 48)
  # The same split over 4 devices (batches sharded) gives the same rows, in the same order.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)  # keeps the caller's XLA settings
  proc = subprocess.run(
      [sys.executable, "-m", "vit_jax.cli", "predict", "--checkpoint", pretrained, "--output",
       str(tmp_path / "four.npz"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
       f"--config.folder={os.path.join(digits, 'a')}", "--config.image_size=16",
       "--config.model.hidden_size=48", "--config.model.mlp_dim=96", "--config.model.num_heads=3",
       "--config.model.patch_size=4", "--config.eval_batch_size=32"],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = np.load(tmp_path / "four.npz")
  np.testing.assert_array_equal(four["labels"], out["labels"])
  # Batches of 8 per device instead of 32: other programs. fp32 bound: u * sqrt(K) summed
  # over the 21 matmuls, softmaxes and norms on the path (K = 16 to 96) = 8e-6 of the largest
  # logit (5.75). Measured: bit-equal with YNNPACK dots (the default), 1.1e-6 with Eigen's.
  np.testing.assert_allclose(four["logits"], out["logits"], rtol=0,
                             atol=1e-5 * float(np.abs(out["logits"]).max()))
  assert list(four["class_names"]) == [f"digit_{i}" for i in range(5)]
