"""A process lost from a multi-host run: one line and exit status 75, instead of an abort.

On several hosts (`--coordinator`, or a TPU pod slice) every process of `train`, `eval` and
`fewshot` keeps a connection to JAX's coordination service, which process 0 runs. When one
process dies (SIGKILL, an out-of-memory kill, a host that goes away), the others learn it in
one of two ways, and both end in an abort from C++ (LOG(FATAL), SIGABRT, screens of stack
traces) that no Python code in that process can catch or outlive:

- process 0 is lost: the others' clients find the service gone within a second (measured
  0.06-0.4 s after the SIGKILL) and abort at once;
- another process is lost: the service misses its heartbeats for `--heartbeat-timeout`
  seconds, then tells every other process, which aborts (measured: 7.4-11.9 s after the
  SIGKILL at 10 s, 53 s at 60 s, 100 s at JAX's default of 100 s). On a CPU a collective with
  the lost process fails earlier still (gloo: "Connection reset by peer", raised in Python);
  on a TPU it waits for the service.

So on several hosts the command supervises itself: `supervise` starts the same command again
as a child process that does the work, and waits for it. The child's file descriptor 2, where
the C++ runtime logs, is a log file; its Python output (the progress bar, log lines, one-line
errors, tracebacks) still goes to the terminal, through a copy of the parent's stderr. When
the child ends in the coordination service's fatal error, the parent reads in its log which
process was lost and prints one line, naming that process, the last committed checkpoint and
the log, and exits with `LOST_PROCESS_EXIT`. In the child, an error raised by a failed
collective (`waiting_for_the_service`) goes to the log, and the child waits for the service's
verdict (at most the heartbeat timeout and `VERDICT_MARGIN` seconds) before it reports the
error as a bug.

Measured on 2 processes over localhost (2 CPU cores, jax 0.12.0.1, gloo), SIGKILL of one
after the first checkpoint, `--heartbeat-timeout 10`: see docs/bad_input.md ("A lost host").

Tried first, and why not:
- `missed_heartbeat_callback`: jaxlib's client takes a Python callable for the fatal error
  (jax.distributed.initialize passes none), but jaxlib 0.12 cannot hand it the error: the
  call ends in std::bad_cast and std::terminate, an abort again;
- a watchdog thread, with heartbeats of its own through the service's key-value store: when
  process 0 dies, the others abort within 0.1-0.4 s, before such a thread could report;
- `jax_enable_recoverability`: keeps process 0 alive when another process dies, but not the
  others when process 0 dies.

The parent starts no JAX backend (on a TPU VM the child must be the one process that opens the
TPU). The child dies with the parent (PR_SET_PDEATHSIG: a SIGKILL of the command
kills both, as when the host goes away); SIGINT and SIGTERM (a preemption notice) are passed on
to it, once: it runs in its own process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from collections.abc import Sequence

import vit_jax
from vit_jax import errors

# sysexits.h's EX_TEMPFAIL: a temporary failure, which rerunning is expected to get past.
LOST_PROCESS_EXIT = 75
# Seconds. A client sends a heartbeat every half of it, and one that has not got through (after
# gRPC's retries) within that half is fatal: 30 s is far more than a healthy TPU VM needs on a
# data-centre network. A TPU VM is not live-migrated: one under maintenance or preempted is
# gone, and its replacement takes minutes, while every other host of the slice waits, billed,
# for this long: less than JAX's 100 s default, which buys nothing more.
DEFAULT_HEARTBEAT_TIMEOUT = 60
# How much longer than the heartbeat timeout a child with a failed collective waits for the
# service's verdict (measured: it comes 7.4-11.9 s after the loss at 10 s, 53 s at 60 s).
VERDICT_MARGIN = 10

# In the child: the file descriptor of the parent's stderr, for its Python output.
_TERMINAL_FD = "VIT_JAX_TERMINAL_FD"
_SUPERVISED = False  # this process is the child of `supervise`

# What the coordination service's fatal errors say (jaxlib 0.12).
_FATAL = "JAX distributed service detected fatal errors"
_UNHEALTHY = re.compile(r"stopped sending heartbeats\):\s*([\d,\s]*\d)")
_TIMED_OUT = re.compile(r"Task (\d+) heartbeat timeout")
_NO_LEADER = re.compile(r"Failed to send RPC to coordination service|leader task")
_PORT_TAKEN = re.compile(r"Error in bind for address '[^']*:(\d+)': Address already in use")


@dataclasses.dataclass(frozen=True)
class Hosts:
  """The processes of a multi-host run, as far as a process knows before JAX starts."""

  count: int | None
  index: int | None  # this process's
  names: dict[int, str]  # host names by process index, where known
  coordinator: str | None  # host:port, where given
  heartbeat_timeout: int

  def who(self, index: int) -> str:
    """How the line names a process: 'process I of N (HOST, the coordinator)', as known."""
    about = [self.names.get(index, "")] + (["the coordinator"] if index == 0 else [])
    about = [a for a in about if a]
    return (
      f"process {index}"
      + (f" of {self.count}" if self.count else "")
      + (f" ({', '.join(about)})" if about else "")
    )


def multi_host(
  coordinator: str | None,
  num_processes: int | None,
  process_id: int | None,
  heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> Hosts | None:
  """The run's hosts when it runs on several (`--coordinator`, or a TPU pod slice); else None."""
  if coordinator:
    if num_processes is not None and num_processes < 2:
      return None
    host = coordinator.rsplit(":", 1)[0].strip("[]")
    return Hosts(num_processes, process_id, {0: host}, coordinator, heartbeat_timeout)
  names = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(names) < 2:
    return None
  worker = os.environ.get("TPU_WORKER_ID", "")
  index = int(worker) if worker.isdigit() else None
  return Hosts(len(names), index, dict(enumerate(names)), None, heartbeat_timeout)


def supervised_child() -> bool:
  """True in the child of `supervise`, which then sends its Python output to the terminal."""
  global _SUPERVISED
  fd = os.environ.pop(_TERMINAL_FD, None)
  if fd is not None:
    _SUPERVISED = True
    sys.stderr = open(int(fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
  return _SUPERVISED


def supervise(
  argv: Sequence[str], command: str, hosts: Hosts, checkpoints: str | None = None
) -> int:
  """Runs `vit-jax ARGV` in a child process and returns its exit status; a lost process is
  one line on stderr and `LOST_PROCESS_EXIT`. `checkpoints`: the run's Orbax directory."""
  me = "" if hosts.index is None else f"p{hosts.index}-"
  fd, log = tempfile.mkstemp(prefix=f"vit-jax-{command}-{me}", suffix=".log")
  terminal = os.dup(_stderr_fd())
  env = dict(os.environ)
  env[_TERMINAL_FD] = str(terminal)
  root = os.path.dirname(os.path.dirname(os.path.abspath(vit_jax.__file__)))
  if os.path.basename(root) not in ("site-packages", "dist-packages"):
    # A checkout, maybe imported by path: the child runs this same code.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  child: subprocess.Popen | None = None
  pending: list[int] = []

  def forward(signum, frame):
    if child is None:
      pending.append(signum)  # passed on once the child exists
    elif child.poll() is None:
      child.send_signal(signum)

  main = threading.current_thread() is threading.main_thread()  # where handlers can be set
  forwarded = (signal.SIGINT, signal.SIGTERM) if main else ()
  previous = {s: signal.signal(s, forward) for s in forwarded}
  try:
    try:
      child = subprocess.Popen(
        [sys.executable, "-m", "vit_jax", *argv],
        env=env,
        stderr=fd,
        pass_fds=(terminal,),
        process_group=0,  # signals reach it once, from here
        preexec_fn=functools.partial(_die_with_parent, os.getpid(), _prctl()),
      )
    finally:
      os.close(fd)
      os.close(terminal)
    for signum in pending:
      forward(signum, None)
    status = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  if status == 0 and os.path.getsize(log) == 0:
    os.remove(log)  # nothing to keep
  return _report(status, command, hosts, log, checkpoints)


@contextlib.contextmanager
def waiting_for_the_service(heartbeat_timeout: int) -> Iterator[None]:
  """In the child of `supervise`: an error that may come from a lost process (a failed
  collective) goes to the log, and the service's verdict is awaited before it is raised."""
  try:
    yield
  except Exception as e:
    if not _SUPERVISED or isinstance(e, errors.UserError):
      raise
    wait = heartbeat_timeout + VERDICT_MARGIN
    with open(2, "w", closefd=False) as log:
      traceback.print_exc(file=log)
      print(
        f"vit-jax: waiting up to {wait} s for the coordination service to tell whether "
        "another process was lost",
        file=log,
        flush=True,
      )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:  # the service's fatal error ends the process here
      time.sleep(0.5)
    raise


def lost_processes(log_text: str, hosts: Hosts) -> list[int] | None:
  """The processes the coordination service's fatal error names ([] when it names none);
  None when the text holds no such error."""
  if _FATAL not in log_text:
    return None
  lost = {int(n) for m in _UNHEALTHY.finditer(log_text) for n in re.findall(r"\d+", m[1])}
  lost |= {int(n) for n in _TIMED_OUT.findall(log_text)}
  if not lost and _NO_LEADER.search(log_text):
    lost = {0}  # the service runs in process 0
  lost.discard(hosts.index)
  if not lost and hosts.count == 2 and hosts.index is not None:
    lost = {1 - hosts.index}  # of two, the other one
  return sorted(lost)


def last_committed_step(checkpoints: str) -> int | None:
  """The newest checkpoint step whose writing finished (Orbax's latest_step)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415  # only when reporting: the parent runs no JAX

  try:
    latest = ocp.step.latest_step_metadata(checkpoints, ocp.step.standard_name_format())
  except (OSError, ValueError):
    return None
  return None if latest is None else latest.step


def lost_line(
  command: str, hosts: Hosts, lost: list[int], log: str, checkpoints: str | None
) -> str:
  """The one line that reports a lost process."""
  if lost == [0]:
    what = f"lost {hosts.who(0)}: its coordination service is unreachable"
  elif lost:
    what = f"lost {', '.join(hosts.who(i) for i in lost)}: no heartbeat for "
    what += f"{hosts.heartbeat_timeout} s"
  else:
    what = "lost another process"
  if checkpoints is None:
    rerun = "rerun every process"
  else:
    step = last_committed_step(checkpoints)
    rerun = (
      f"the last committed checkpoint is step {step} in {checkpoints}: "
      "rerun every process to resume from it"
      if step is not None
      else f"no checkpoint committed in {checkpoints} yet: rerun every process to start again"
    )
  return f"vit-jax {command}: error: {what}; {rerun} (details: {log})"


def _report(status: int, command: str, hosts: Hosts, log: str, checkpoints: str | None) -> int:
  """The command's exit status for the child's, with one line where the child could not say."""
  if status in (0, 2, 130):
    return status  # the child said what there was to say
  text = _tail(log)
  port = _PORT_TAKEN.search(text)
  if port and hosts.coordinator and hosts.coordinator.endswith(f":{port[1]}"):
    _say(
      f"vit-jax {command}: error: --coordinator {hosts.coordinator}: "
      f"Address already in use (details: {log})"
    )
    return 2
  lost = lost_processes(text, hosts)
  if lost is not None:
    _say(lost_line(command, hosts, lost, log, checkpoints))
    return LOST_PROCESS_EXIT
  if status < 0:  # a signal other than the service's abort: a crash, or a kill from outside
    name = signal.Signals(-status).name
    _say(f"vit-jax {command}: error: the process ended by {name} (details: {log})")
    return 128 - status
  return status


def address_in_use(address: str) -> bool:
  """Whether another socket listens at host:port (the coordinator's), so that the coordination
  service cannot. The C++ runtime says so only in its log; in Python, jaxlib raises "Failed to
  start RPC server" for this and other causes (seen for this one on a loaded machine, where the
  abort with the bind error in the log is the usual end)."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  try:
    with socket.create_server((host, int(port)), family=family):
      return False
  except OSError as e:
    return e.errno == errno.EADDRINUSE


def _tail(path: str, size: int = 1 << 16) -> str:
  """The end of a log file, where the fatal error is."""
  with open(path, "rb") as f:
    f.seek(max(0, os.fstat(f.fileno()).st_size - size))
    return f.read().decode("utf-8", "replace")


def _say(line: str) -> None:
  # A carriage return first: the child may have left a progress bar's line unfinished.
  clear = "\x1b[K" if sys.stderr.isatty() else ""
  print(f"\r{clear}{line}", file=sys.stderr, flush=True)


def _stderr_fd() -> int:
  try:
    return sys.stderr.fileno()
  except (AttributeError, OSError, ValueError):
    return 2


def _prctl():
  """libc's prctl (Linux), looked up before the fork; None elsewhere."""
  try:
    return ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None


def _die_with_parent(parent: int, prctl) -> None:
  """In the child before exec: SIGKILL when the parent dies, as when the host is lost."""
  if prctl is None:
    return
  prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent:  # it died before the line above
    os._exit(1)
