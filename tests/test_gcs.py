"""gs:// end to end, against a GCS emulator on a localhost port (conftest's `gcs_emulator`).

Every command runs with its files in a bucket: training writes all its outputs there, is killed
and resumed, evaluates, predicts and serves from there, and reads its images from there. Storage
faults (a missing bucket or object, storage going away mid-run) end in one line naming the path,
and lose no committed checkpoint.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests import data_fixtures as df
from vit_jax import cli
from vit_jax import errors
from vit_jax.config import config_args
from vit_jax.models import layout
from vit_jax.platform import files
from vit_jax.weights import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_JAX = os.path.join(os.path.dirname(sys.executable), "vit-jax")
# The tiny recipe at 16 px, 20 steps: checkpoints at 10 and 20, evaluations at 10 and 20.
TINY = [
  "--config",
  "tiny",
  "--config.image_size=16",
  "--config.model.patch_size=4",
  "--config.total_steps=20",
  "--config.warmup_steps=2",
  "--config.checkpoint_every=10",
  "--config.eval_every=10",
  "--config.log_every=5",
  "--config.batch_size=8",
  "--config.eval_batch_size=8",
]
FOLDER = {"train": {"a": 12, "b": 12}, "val": {"a": 4, "b": 4}, "test": {"a": 4, "b": 4}}


def _vit(*args, cwd=None, timeout=600):
  return subprocess.run(
    [VIT_JAX, *args],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _upload(local: str, url: str) -> None:
  """Every file under the local directory, to the same relative paths under `url`."""
  for parent, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(parent, name), local).replace(os.sep, "/")
      with files.atomic_write(f"{url}/{rel}") as f:
        f.write(open(os.path.join(parent, name), "rb").read())


def _params(url: str) -> dict:
  return layout.flatten(checkpoint.load(url))


@pytest.fixture(scope="module")
def bucket(gcs_emulator, tmp_path_factory):
  """A bucket holding an image folder at BUCKET/data; also returns the local copy."""
  url = gcs_emulator.bucket()
  local = str(tmp_path_factory.mktemp("folder"))
  df.write_folder(local, FOLDER)
  _upload(local, f"{url}/data")
  return url, local


@pytest.fixture(scope="module")
def straight(bucket, tmp_path_factory):
  """An uninterrupted run with its workdir and its data in the bucket."""
  url, _ = bucket
  cwd = str(tmp_path_factory.mktemp("cwd"))  # where a URL wrongly taken for a path would land
  run = _vit("train", *TINY, f"--config.folder={url}/data", "--workdir", f"{url}/straight", cwd=cwd)
  assert run.returncode == 0, run.stderr[-3000:]
  return f"{url}/straight", cwd


@pytest.mark.slow
def test_a_run_in_a_bucket_writes_every_output_there(straight):
  work, cwd = straight
  dirs, names = files.list_dir(work)
  assert {
    "config.json",
    "labels.txt",
    "metrics.jsonl",
    "best.npz",
    "best.json",
    "final.npz",
  } <= set(names)
  assert {"checkpoints", "tensorboard"} <= set(dirs), dirs
  assert files.list_dir(f"{work}/checkpoints")[0] == ["10", "20"]
  assert files.read_bytes(f"{work}/labels.txt").decode().split() == ["a", "b"]
  rows = [
    json.loads(line) for line in files.read_bytes(f"{work}/metrics.jsonl").decode().splitlines()
  ]
  assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [10, 20]
  # The TensorBoard events hold the same scalars.
  from vit_jax.platform import tf_setup

  tf = tf_setup.tf()
  (event_file,) = files.list_dir(f"{work}/tensorboard")[1]
  local = os.path.join(cwd, "..", "events")
  with open(local, "wb") as f:
    f.write(files.read_bytes(f"{work}/tensorboard/{event_file}"))
  tags = {
    (v.tag, e.step) for e in tf.compat.v1.train.summary_iterator(local) for v in e.summary.value
  }
  assert {("train/loss", 20), ("eval/accuracy", 10), ("eval/accuracy", 20)} <= tags
  assert os.listdir(cwd) == []


@pytest.mark.slow
def test_eval_reads_a_workdir_or_an_npz_in_a_bucket(straight, bucket):
  work, _ = straight
  url, _ = bucket
  common = [
    "--config",
    "tiny",
    "--config.image_size=16",
    "--config.model.patch_size=4",
    f"--config.folder={url}/data",
    "--config.eval_batch_size=8",
    "--split",
    "test",
  ]
  outs = []
  for ckpt in (work, f"{work}/final.npz"):
    run = _vit("eval", *common, "--checkpoint", ckpt)
    assert run.returncode == 0, run.stderr[-3000:]
    outs.append(json.loads(run.stdout.strip().splitlines()[-1]))
  # Orbax's step 20 and final.npz are the same params, evaluated by the same program.
  assert outs[0] == outs[1] and outs[0]["count"] == 8


@pytest.mark.slow
def test_predict_and_serve_from_a_bucket_give_what_local_files_give(straight, bucket, tmp_path):
  from tests.test_serve import b64
  from tests.test_serve import serving_command

  work, _ = straight
  url, local = bucket
  names = ["test/a/0000.png", "test/b/0001.png"]
  ckpt = tmp_path / "final.npz"
  ckpt.write_bytes(files.read_bytes(f"{work}/final.npz"))
  (tmp_path / "labels.txt").write_bytes(files.read_bytes(f"{work}/labels.txt"))
  remote = _vit(
    "predict",
    "--json",
    "--checkpoint",
    f"{work}/final.npz",
    "--labels",
    f"{work}/labels.txt",
    *[f"{url}/data/{n}" for n in names],
  )
  here = _vit(
    "predict",
    "--json",
    "--checkpoint",
    str(ckpt),
    "--labels",
    str(tmp_path / "labels.txt"),
    *[os.path.join(local, n) for n in names],
  )
  assert remote.returncode == 0 and here.returncode == 0, (
    remote.stderr[-3000:] + here.stderr[-3000:]
  )
  got = [json.loads(line)["predictions"] for line in remote.stdout.splitlines()]
  want = [json.loads(line)["predictions"] for line in here.stdout.splitlines()]
  assert got == want and len(got) == 2
  with serving_command(f"{work}/final.npz", "--labels", f"{work}/labels.txt", "--top-k", "2") as (
    _,
    server,
  ):
    body = {"input_data": [b64(os.path.join(local, n)) for n in names]}
    answer = httpx.post(f"{server}/score", json=body, timeout=60)
  assert answer.status_code == 200, answer.text
  for served, predicted in zip(answer.json(), want, strict=True):
    assert [p["label"] for p in served] == [p["label"] for p in predicted]
    # The server and predict may batch the two images differently, and XLA:CPU's float32
    # products then round differently. A probability's relative error is its logit's
    # absolute error: a few float32 ulps of a logit near 10 (ulp 9.5e-7). Measured 2.0e-6
    # on an AVX2-only AMD EPYC, within 1e-6 on an AVX-512 one.
    np.testing.assert_allclose(
      [p["score"] for p in served], [p["score"] for p in predicted], rtol=2e-5
    )


@pytest.mark.slow
def test_sigkill_after_the_first_checkpoint_in_a_bucket_then_rerun_resumes_to_the_same_params(
  straight, bucket
):
  work, _ = straight
  url, _ = bucket
  killed = f"{url}/killed"
  args = [
    *TINY,
    f"--config.folder={url}/data",
    "--workdir",
    killed,
    "--config.async_checkpointing=True",
  ]
  script = os.path.join(ROOT, "tests", "scripts", "train_killed_at_save.py")
  run = subprocess.run(
    [sys.executable, script, "after-save", "10", *args],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=600,
  )
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  assert files.list_dir(f"{killed}/checkpoints")[0] == ["10"]
  assert not files.exists(f"{killed}/final.npz")
  rerun = _vit("train", *args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {killed}/checkpoints at step 10" in rerun.stderr
  a, b = _params(f"{work}/final.npz"), _params(f"{killed}/final.npz")
  assert a.keys() == b.keys()
  for key in a:  # the same program on the same batches: bit-equal
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_training_on_a_multilabel_list_in_a_bucket(gcs, tmp_path):
  rows = ["path,labels,split"]
  for i in range(48):
    label, split = i % 3, ("train" if i < 30 else "val" if i < 39 else "test")
    with files.atomic_write(f"{gcs}/tagged/img/{i}.png") as f:
      f.write(df.encode(df.class_image(label, i, 16, 16)))
    rows.append(f"img/{i}.png,{df.CLASS_COLOURS[label]},{split}")
  with files.atomic_write(f"{gcs}/tagged/list.csv") as f:
    f.write(("\n".join(rows) + "\n").encode())
  run = _vit(
    "train",
    *TINY,
    "--config.dataset=multilabel",
    f"--config.multilabel_file={gcs}/tagged/list.csv",
    "--config.folder=None",
    "--config.best_metric=mAP",
    "--workdir",
    str(tmp_path / "work"),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  test = [json.loads(line) for line in run.stdout.splitlines() if '"split": "test"' in line]
  assert test and test[0]["count"] == 9
  assert (tmp_path / "work" / "labels.txt").read_text().split() == ["blue", "green", "red"]


def test_a_missing_bucket_or_object_is_one_line_naming_it(gcs, capsys, tmp_path):
  cases = [
    (
      ["predict", "--checkpoint", "gs://no-such-bucket/m.npz", str(tmp_path / "x.png")],
      "gs://no-such-bucket/m.npz: no such bucket gs://no-such-bucket",
    ),
    (
      ["predict", "--checkpoint", f"{gcs}/m.npz", str(tmp_path / "x.png")],
      f"{gcs}/m.npz: no such file",
    ),
    (
      ["train", *TINY, f"--config.folder={tmp_path}", "--workdir", "gs://no-such-bucket/run"],
      "no such bucket gs://no-such-bucket",
    ),
    (
      ["train", *TINY, f"--config.folder={gcs}/none", "--workdir", str(tmp_path / "w")],
      f"{gcs}/none: no such folder",
    ),
  ]
  df.write_folder(str(tmp_path), FOLDER)
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, (argv, err)


@contextlib.contextmanager
def _storage_down(emulator):
  emulator.stop()
  try:
    yield
  finally:
    emulator.restart()


@pytest.mark.slow
def test_storage_lost_mid_run_fails_in_one_line_and_the_last_checkpoint_restores(
  gcs_emulator, gcs, tmp_path, capsys
):
  local = str(tmp_path / "data")
  df.write_folder(local, FOLDER)
  work = f"{gcs}/run"
  # A metrics line every step: the step after the first checkpoint needs storage at once.
  args = [
    *TINY,
    f"--config.folder={local}",
    "--workdir",
    work,
    "--config.log_every=1",
    "--config.total_steps=40",
  ]
  proc = subprocess.Popen(
    [VIT_JAX, "train", *args],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  committed = f"{work}/checkpoints/10/commit_success.txt"
  deadline = time.monotonic() + 300
  while not files.exists(committed):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"no checkpoint at step 10:\n{proc.communicate()[1][-3000:]}")
    time.sleep(0.05)
  start = time.monotonic()
  with _storage_down(gcs_emulator):
    _, err = proc.communicate(timeout=600)
  failed_s = time.monotonic() - start
  told = [
    line
    for line in err.replace("\r", "\n").splitlines()
    if line.startswith("vit-jax train: error:")
  ]
  with capsys.disabled():
    print(f"\nstorage down: the run stopped after {failed_s:.0f} s with: {told}")
  assert proc.returncode == 2, err[-3000:]
  assert (
    len(told) == 1
    and told[0].startswith(f"vit-jax train: error: {work}/")
    and "storage error" in told[0]
  ), err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  # Storage is back: the checkpoint committed before the outage restores, and the run ends.
  assert files.list_dir(f"{work}/checkpoints")[0] == ["10"]
  rerun = _vit("train", *args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {work}/checkpoints at step 10" in rerun.stderr
  assert files.exists(f"{work}/final.npz")


def test_a_config_file_in_a_bucket_loads_with_its_argument(gcs):
  with files.atomic_write(f"{gcs}/configs/mine.py") as f:
    f.write(
      b"from vit_jax.config.recipes import tiny\n\n"
      b"def get_config(steps='7'):\n  c = tiny.get_config()\n  c.total_steps = int(steps)\n  "
      b"return c\n"
    )
  assert config_args.load_config(["--config", f"{gcs}/configs/mine.py"]).total_steps == 7
  assert (
    config_args.load_config(
      ["--config", f"{gcs}/configs/mine.py:12", "--config.seed=3"]
    ).total_steps
    == 12
  )
  with pytest.raises(errors.ConfigError, match="no such recipe or config file"):
    config_args.load_config(["--config", f"{gcs}/configs/none.py"])


def test_files_round_trip_byte_exact_whatever_their_last_bytes(gcs):
  """A file's bytes come back as written, whatever it ends with (e.g. a TFRecord's CRC)."""
  for i, tail in enumerate([b"\r", b"\n", b"\r\n", b"\n\r", b"--==0==", b""]):
    data = bytes(range(256)) + tail
    with files.atomic_write(f"{gcs}/blob{i}") as f:
      f.write(data)
    assert files.read_bytes(f"{gcs}/blob{i}") == data, tail


def test_a_storage_refusal_is_one_line_naming_the_path(gcs, monkeypatch):
  import gcsfs
  from gcsfs.retry import HttpError

  with files.atomic_write(f"{gcs}/x.npz") as f:
    f.write(b"PK")

  async def refuse(*args, **kwargs):
    raise HttpError({"code": 500, "message": "backend error\nmore detail"})

  monkeypatch.setattr(gcsfs.GCSFileSystem, "_cat_file", refuse)
  gcsfs.GCSFileSystem.clear_instance_cache()  # instances bind their sync methods when made
  with pytest.raises(
    files.StorageError, match=rf"^{gcs}/x.npz: storage error \(HttpError: backend error\)$"
  ):
    files.read_bytes(f"{gcs}/x.npz")
  # Through a command: one line, exit 2 (a user's storage, not a bug of ours).
  assert cli.main(["predict", "--checkpoint", f"{gcs}/x.npz", "x.png"]) == 2
  monkeypatch.undo()
  gcsfs.GCSFileSystem.clear_instance_cache()
