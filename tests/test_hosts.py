"""A process lost from a multi-host run, and a preemption notice to one of two processes.

Two `vit-jax train` processes over jax.distributed on localhost, as on a pod slice: SIGKILL of
one after the first checkpoint ends the other with one line and exit status 75 within the
heartbeat timeout, and rerunning both resumes to the params of an uninterrupted run, bit for
bit; SIGTERM of one makes both save the same step and exit 0. Then the reading of the
coordination service's fatal errors, on texts jaxlib 0.12 wrote.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import data_fixtures
from vit_jax import errors
from vit_jax.models import layout
from vit_jax.training import hosts
from vit_jax.weights import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT = 10  # seconds; the default (60) would make these tests wait a minute
# What "within the heartbeat timeout" allows on top (measured: the survivor exits 7.4-11.9 s
# after the SIGKILL at 10 s when process 1 is lost, 1.0-1.3 s after it for process 0).
SLACK = 10
_ARGS = [
  "--config.image_size=16",
  "--config.model.patch_size=4",
  "--config.total_steps=40",
  "--config.checkpoint_every=10",
  "--config.eval_every=40",
  "--config.log_every=10",
  "--config.async_checkpointing=True",  # the default, which the tiny recipe turns off
]
# The line of docs/bad_input.md ("A lost host").
LOST_LINE = re.compile(
  r"vit-jax train: error: lost process (?P<lost>\d+) of 2(?: \((?P<about>[^)]*)\))?: "
  r"(?P<why>its coordination service is unreachable|no heartbeat for (?P<t>\d+) s); "
  r"the last committed checkpoint is step (?P<step>\d+) in (?P<dir>\S+): "
  r"rerun every process to resume from it \(details: (?P<log>\S+)\)"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("digits"))
  data_fixtures.write_digits(root, range(0, 5))
  return root


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def _argv(folder, workdir, port, i):
  return [
    sys.executable,
    "-m",
    "vit_jax.cli",
    "train",
    "--config",
    "tiny",
    "--workdir",
    workdir,
    f"--config.folder={folder}",
    *_ARGS,
    "--coordinator",
    f"127.0.0.1:{port}",
    "--num-processes",
    "2",
    "--process-id",
    str(i),
    "--heartbeat-timeout",
    str(HEARTBEAT),
  ]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Pair:
  """Two `vit-jax train` processes of one run, their stderr in files."""

  def __init__(self, folder, workdir, logs):
    self.folder, self.workdir, self.logs = folder, workdir, logs
    self.procs = []

  def start(self, done, timeout=600, attempts=3):
    """Starts both on a free port and returns once `done()`; starts them again on another port
    when the coordinator's was taken meanwhile. Any other failure fails the test."""
    for attempt in range(attempts):
      port = _free_port()
      self.err = [str(self.logs / f"{attempt}.{i}.err") for i in range(2)]
      self.procs = []
      for i in range(2):
        with open(self.err[i], "w") as err:
          self.procs.append(
            subprocess.Popen(
              _argv(self.folder, self.workdir, port, i),
              env=_env(),
              stdout=subprocess.DEVNULL,
              stderr=err,
            )
          )
      if self._watch(done, timeout):
        return self
      self.kill()
    pytest.fail(f"the port was taken on all {attempts} tries")

  def _watch(self, done, timeout):
    deadline = time.monotonic() + timeout
    while not done():
      for i, p in enumerate(self.procs):
        if p.poll() not in (None, 0):
          if p.returncode == 2 and "Address already in use" in self.stderr(i):
            return False
          self.kill()
          pytest.fail(f"process {i} ended ({p.returncode}):\n{self.stderr(i)[-3000:]}")
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"not done within {timeout} s:\n{self.stderr(0)[-3000:]}")
      time.sleep(0.02)
    return True

  def stderr(self, i):
    with open(self.err[i]) as f:
      return f.read()

  def wait(self, i, timeout):
    try:
      return self.procs[i].wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"process {i} still runs {timeout} s on:\n{self.stderr(i)[-3000:]}")

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _checkpointed(workdir, step):
  """Whether WORKDIR/checkpoints/STEP is committed (Orbax renames it into place)."""
  return lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _run_pair(folder, workdir, logs):
  """Both processes to the end; each one's stderr."""
  os.makedirs(logs, exist_ok=True)
  pair = Pair(folder, workdir, logs)
  pair.start(lambda: all(p.poll() == 0 for p in pair.procs))
  return [pair.stderr(i) for i in range(2)]


@pytest.fixture(scope="module")
def straight_pair(folder, tmp_path_factory):
  """The run of `_ARGS` on two processes, uninterrupted."""
  work = tmp_path_factory.mktemp("straight")
  _run_pair(folder, str(work / "run"), work)
  return str(work / "run")


def _final_params(workdir):
  return layout.flatten(checkpoint.load(os.path.join(workdir, "final.npz")))


def _processes_of(workdir):
  """Processes still running with WORKDIR in their command line (a supervised child is one)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if workdir.encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def _our_lines(stderr):
  """What a process printed besides its progress bar (whose updates end in carriage returns)."""
  return [line for line in stderr.splitlines() if line.strip() and not line.startswith("train:")]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["process_1_lost", "coordinator_lost"])
def test_sigkill_of_one_process_ends_the_other_with_one_line_and_the_rerun_resumes_exactly(
  folder, straight_pair, tmp_path, victim
):
  """SIGKILL of one of two processes (the command: its supervised child dies with it, as with a
  host that goes away) just after the first checkpoint is committed."""
  workdir = str(tmp_path / "run")
  pair = Pair(folder, workdir, tmp_path).start(_checkpointed(workdir, 10))
  survivor = 1 - victim
  try:
    killed_at = time.monotonic()
    pair.procs[victim].send_signal(signal.SIGKILL)
    code = pair.wait(survivor, HEARTBEAT + SLACK + 60)
    took = time.monotonic() - killed_at
  finally:
    pair.kill()
  err = pair.stderr(survivor)
  assert code == hosts.LOST_PROCESS_EXIT == 75, err[-3000:]
  assert took < HEARTBEAT + SLACK, took
  lines = _our_lines(err)
  assert len(lines) == 1, lines
  m = LOST_LINE.fullmatch(lines[0])
  assert m, lines[0]
  committed = ocp.step.latest_step_metadata(
    os.path.join(workdir, "checkpoints"), ocp.step.standard_name_format()
  ).step
  assert int(m["lost"]) == victim and int(m["step"]) == committed
  assert m["dir"] == os.path.join(workdir, "checkpoints")
  if victim == 0:
    assert m["about"] == "127.0.0.1, the coordinator" and m["t"] is None
  else:
    assert m["about"] is None and int(m["t"]) == HEARTBEAT
  # The traces are in the log the line names, not on the terminal.
  with open(m["log"]) as f:
    assert hosts._FATAL in f.read()
  assert "Check failure stack trace" not in err and "Traceback" not in err
  assert _processes_of(workdir) == []  # the lost command's child died with it
  assert not os.path.exists(os.path.join(workdir, "final.npz"))

  # Every process rerun: they resume from that checkpoint and end as the straight run did.
  resumed = _run_pair(folder, workdir, tmp_path / "rerun")
  assert f"resumed from {m['dir']} at step {committed}" in resumed[0]
  a, b = _final_params(straight_pair), _final_params(workdir)
  assert a.keys() == b.keys() and len(a) > 10
  # Exact: the rerun restores the saved state bit for bit and runs the same compiled steps on
  # the same batches (see test_train's SIGKILL test).
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_both_exit_0(folder, tmp_path):
  """A preemption notice to one process (the command passes it on to its child): JAX's
  preemption service brings both to the same step, which both save; both exit 0."""
  workdir = str(tmp_path / "run")
  pair = Pair(folder, workdir, tmp_path).start(_checkpointed(workdir, 10))
  try:
    sent_at = time.monotonic()
    pair.procs[1].send_signal(signal.SIGTERM)
    codes = [pair.wait(i, 120) for i in range(2)]
    took = time.monotonic() - sent_at
  finally:
    pair.kill()
  errs = [pair.stderr(i) for i in range(2)]
  assert codes == [0, 0], [e[-3000:] for e in errs]
  assert took < 30, took  # measured 4.9 s
  saved = [
    re.findall(r"vit-jax: preempted at step (\d+): checkpoint saved, exiting", e) for e in errs
  ]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = int(saved[0][0])
  committed = ocp.step.latest_step_metadata(
    os.path.join(workdir, "checkpoints"), ocp.step.standard_name_format()
  ).step
  assert committed == step and step < 40
  assert not os.path.exists(os.path.join(workdir, "final.npz"))
  assert _processes_of(workdir) == []


# What jaxlib 0.12's coordination service wrote to the survivor's log (trimmed), measured above.
_PROCESS_1_LOST = """\
jax.errors.JaxRuntimeError: UNKNOWN: Gloo all-reduce failed: [external/xla++third_party_ext+gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:27327: Connection reset by peer
E1207 18:14:54.660723    4034 coordination_service.cc:1518] [17968031779146878596] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1207 18:14:54.661283    4045 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.
*** Check failure stack trace: ***
"""  # noqa: E501
_COORDINATOR_LOST = """\
E1207 18:15:40.975120    4419 coordination_service_agent.cc:288] Polled an error from coordination service (this can be an error from this or another task).
F1207 18:15:40.975223    4419 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNAVAILABLE:Stream removed (Socket closed)
"""  # noqa: E501
# Of three processes, process 2 lost: what process 1 (neither it nor the coordinator) read.
_OF_THREE = """\
F1207 18:10:42.777086     380 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
2
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.
"""  # noqa: E501
# The shutdown barrier's version, when the survivor had got as far as exiting.
_AT_SHUTDOWN = """\
F1207 18:02:50.420074   28438 client.h:86] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: INTERNAL: Failed to disconnect from coordination service with status: INTERNAL: Shutdown barrier has failed.
Barrier result: 'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed, got preempted, or crashed unexpectedly.
"""  # noqa: E501


def _hosts(index, count=2):
  return hosts.multi_host("127.0.0.1:1234", count, index, heartbeat_timeout=7)


@pytest.mark.parametrize(
  "text,index,count,lost",
  [
    (_PROCESS_1_LOST, 0, 2, [1]),
    (_COORDINATOR_LOST, 1, 2, [0]),
    (_COORDINATOR_LOST, 2, 3, [0]),
    (_OF_THREE, 1, 3, [2]),
    (_AT_SHUTDOWN, 0, 2, [1]),
    ("F... JAX distributed service detected fatal errors. absl::Status: odd", 1, 2, [0]),
    ("F... JAX distributed service detected fatal errors. absl::Status: odd", 1, 3, []),
    ("E... Gloo all-reduce failed: Connection reset by peer", 0, 2, None),
  ],
  ids=[
    "process_1",
    "coordinator",
    "coordinator_of_three",
    "of_three",
    "at_shutdown",
    "of_two_unsaid",
    "unsaid",
    "none",
  ],
)
def test_the_lost_process_is_read_off_the_service_error(text, index, count, lost):
  assert hosts.lost_processes(text, _hosts(index, count)) == lost


def test_the_lost_line_names_the_process_the_checkpoint_and_the_log(tmp_path):
  ckpts = str(tmp_path / "checkpoints")
  os.makedirs(os.path.join(ckpts, "10"))
  os.makedirs(os.path.join(ckpts, "20.orbax-checkpoint-tmp-1"))  # being written: not committed
  line = hosts.lost_line("train", _hosts(0), [1], "/tmp/x.log", ckpts)
  assert LOST_LINE.fullmatch(line)
  assert line == (
    "vit-jax train: error: lost process 1 of 2: no heartbeat for 7 s; the last committed "
    f"checkpoint is step 10 in {ckpts}: rerun every process to resume from it "
    "(details: /tmp/x.log)"
  )
  line = hosts.lost_line("train", _hosts(1), [0], "/tmp/x.log", str(tmp_path / "none"))
  assert line.startswith(
    "vit-jax train: error: lost process 0 of 2 (127.0.0.1, the coordinator): its coordination "
    f"service is unreachable; no checkpoint committed in {tmp_path / 'none'} yet: rerun every "
    "process to start again"
  )
  assert hosts.lost_line("eval", _hosts(1), [0], "/tmp/x.log", None).endswith(
    "unreachable; rerun every process (details: /tmp/x.log)"
  )


def test_which_runs_are_multi_host(monkeypatch):
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert hosts.multi_host(None, None, None) is None
  assert hosts.multi_host("10.0.0.2:8476", 1, 0) is None  # one process: nothing to lose
  run = hosts.multi_host("10.0.0.2:8476", 4, 3)
  assert (run.count, run.index, run.names, run.heartbeat_timeout) == (4, 3, {0: "10.0.0.2"}, 60)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
  monkeypatch.setenv("TPU_WORKER_ID", "2")
  run = hosts.multi_host(None, None, None)
  assert (run.count, run.index, run.who(1)) == (4, 2, "process 1 of 4 (t1v-1)")
  assert run.who(0) == "process 0 of 4 (t1v-0, the coordinator)"


@pytest.mark.slow
def test_a_taken_coordinator_port_is_one_line_exit_2(tmp_path):
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    proc = subprocess.run(
      _argv(str(tmp_path), str(tmp_path / "run"), port, 0),
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
    )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert _our_lines(proc.stderr) == [
    m
    for m in _our_lines(proc.stderr)
    if m.startswith(f"vit-jax train: error: --coordinator 127.0.0.1:{port}: Address already in use")
  ]
  assert len(_our_lines(proc.stderr)) == 1


def test_a_taken_port_raised_in_python_is_the_same_one_line(monkeypatch):
  """On a loaded machine jaxlib may raise "Failed to start RPC server" for the taken port
  instead of aborting with the bind error in its log: the same one line, exit 2. With the
  port free, that error is not the user's and keeps its traceback."""
  import jax

  from vit_jax.training import sharding

  def refuse(**kwargs):
    raise jax.errors.JaxRuntimeError("UNKNOWN: Failed to start RPC server")

  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  monkeypatch.setenv("JAX_PLATFORMS", "")  # no gloo setting in this process's JAX config
  with socket.socket() as held:
    held.bind(("127.0.0.1", 0))
    held.listen()
    address = f"127.0.0.1:{held.getsockname()[1]}"
    with pytest.raises(
      errors.ConfigError, match=rf"^--coordinator {address}: Address already in use$"
    ):
      sharding.maybe_initialize_distributed(address, 2, 0)
  with pytest.raises(jax.errors.JaxRuntimeError, match="Failed to start RPC server"):
    sharding.maybe_initialize_distributed(address, 2, 0)  # the port is free again
  assert hosts.address_in_use(address) is False
