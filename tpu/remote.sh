#!/usr/bin/env bash
# The worker side of the tpu/*.sh scripts. install.sh copies it to every TPU VM
# worker as ~/vit-jax-remote.sh; the other scripts run it there over ssh:
#
#   bash vit-jax-remote.sh install JAX_SPEC [PYTHON]   unpack ~/vit-jax.tar.gz, make the venv
#   bash vit-jax-remote.sh prepare DATASET DATA_DIR [MANUAL_DIR]   build a TFDS dataset
#   bash vit-jax-remote.sh launch PROGRAM ARG...       start detached, log to ~/vit-jax-train.log
#   bash vit-jax-remote.sh status                      running pid=N | finished exit=N | not started
#   bash vit-jax-remote.sh logs [LINES] [follow|nofollow]
#   bash vit-jax-remote.sh stop                        end the launched process group
#
# Paths can be moved with VIT_JAX_HOME (default: $HOME).
set -euo pipefail

base=${VIT_JAX_HOME:-$HOME}
src="$base/vit-jax"
venv="$base/vit-jax-venv"
tarball="$base/vit-jax.tar.gz"
log="$base/vit-jax-train.log"
pidfile="$base/vit-jax-train.pid"
exitfile="$base/vit-jax-train.exit"
host=$(hostname)
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

usage() {
  sed -n '2,12p' "$0" >&2
  exit 2
}

running_pid() {  # prints the pid of the launched process when it is still alive
  local pid
  [[ -f "$pidfile" ]] || return 1
  pid=$(<"$pidfile")
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # After a reboot the number may belong to another process: check it is ours.
  if [[ -r "/proc/$pid/cmdline" ]]; then
    local cmdline
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    [[ "$cmdline" == *" _run "* ]] || return 1
  fi
  printf '%s\n' "$pid"
}

cmd_install() {
  local spec=${1:?install needs the jax[tpu] requirement}
  local py=${2:-python3.11}
  if ! command -v "$py" >/dev/null 2>&1; then
    if [[ "$py" != python3.* || "$py" == */* ]]; then
      echo "$host: $py not found" >&2
      exit 1
    fi
    echo "$host: installing $py from the distribution's packages"
    # Right after boot, unattended upgrades may hold the dpkg lock: wait for it.
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq update
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y \
      "$py" "$py-venv" >/dev/null
  fi
  if running_pid >/dev/null; then
    echo "$host: a launched process is still running (pid $(running_pid)); run tpu/stop.sh first" >&2
    exit 1
  fi
  rm -rf "$src"
  tar -xzf "$tarball" -C "$base"
  [[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$spec" "$src"
  # The same version number may already be installed from an older tarball.
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$src"
  "$venv/bin/vit-jax" --help >/dev/null
  "$venv/bin/python" - "$host" <<'EOF'
import importlib.metadata as m
import sys

def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return "(not installed)"

print(f"{sys.argv[1]}: installed", ", ".join(f"{n} {version(n)}" for n in ("vit-jax", "jax", "libtpu")))
EOF
}

cmd_prepare() {
  local name=${1:?prepare needs a TFDS dataset name} data_dir=${2:?prepare needs a data_dir}
  local manual=${3:-}
  "${VIT_JAX_PYTHON:-$venv/bin/python}" - "$name" "$data_dir" "$manual" <<'EOF'
import sys
import tensorflow_datasets as tfds

name, data_dir, manual = sys.argv[1], sys.argv[2], sys.argv[3] or None
builder = tfds.builder(name, data_dir=data_dir)
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
print(f"{name} in {builder.data_dir}:")
for split, info in builder.info.splits.items():
  print(f"  {split}: {info.num_examples} examples")
EOF
}

cmd_launch() {
  [[ $# -ge 1 ]] || usage
  local pid program=$1
  shift
  if pid=$(running_pid); then
    echo "$host: already running (pid $pid); tpu/stop.sh ends it" >&2
    exit 1
  fi
  # A bare program name is looked up in the project's venv first.
  if [[ "$program" != */* && -x "$venv/bin/$program" ]]; then
    program="$venv/bin/$program"
  fi
  cd "$src"
  rm -f "$exitfile" "$pidfile"
  printf '=== %s %s: %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$host" "$program" "$*" >>"$log"
  # setsid: its own session and process group, so the ssh session ending (SIGHUP)
  # does not reach it, and stop can signal the whole group. No tty, no stdin.
  nohup setsid bash "$self" _run "$program" "$@" >>"$log" 2>&1 </dev/null &
  # _run records its pid once it leads its own session.
  local i rc=unknown watch=${VIT_JAX_LAUNCH_WATCH:-15}
  for ((i = 0; i < 100; i++)); do
    [[ -f "$pidfile" ]] && break
    sleep 0.1
  done
  if [[ ! -f "$pidfile" ]]; then
    echo "$host: the run did not start within 10 s; see $log" >&2
    exit 1
  fi
  # Watch the first seconds, so that a run failing at once (a bad override, a
  # missing file) is reported here rather than found later in the log.
  for ((i = 0; i < watch * 10; i++)); do
    running_pid >/dev/null || break
    sleep 0.1
  done
  if pid=$(running_pid); then
    echo "$host: started pid $pid (log: $log)"
    return 0
  fi
  [[ -f "$exitfile" ]] && rc=$(<"$exitfile")
  echo "$host: the run ended within ${watch} s with exit status $rc; the end of $log:" >&2
  tail -n 20 "$log" >&2
  [[ "$rc" == 0 ]] || exit 1
}

cmd__run() {  # internal: record our pid, run the program, then record its exit status
  local rc=0
  echo "$$" >"$pidfile.tmp"
  mv -f "$pidfile.tmp" "$pidfile"  # launch polls for it: never let it see a partial file
  "$@" || rc=$?
  echo "$rc" >"$exitfile"
  printf '=== %s %s: exit %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$host" "$rc"
  exit "$rc"
}

cmd_status() {
  local pid
  if pid=$(running_pid); then
    echo "$host: running pid=$pid"
  elif [[ -f "$exitfile" ]]; then
    echo "$host: finished exit=$(<"$exitfile")"
  elif [[ -f "$pidfile" ]]; then
    echo "$host: finished exit=unknown"
  else
    echo "$host: not started"
  fi
}

cmd_logs() {
  local lines=${1:-100} follow=${2:-follow}
  [[ "$lines" =~ ^[0-9]+$ ]] || usage
  if [[ ! -f "$log" ]]; then
    echo "$host: no log yet ($log)" >&2
    exit 1
  fi
  if [[ "$follow" == follow ]]; then
    exec tail -n "$lines" -F "$log"
  fi
  tail -n "$lines" "$log"
}

cmd_stop() {
  local pid i
  if ! pid=$(running_pid); then
    echo "$host: nothing running"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for ((i = 0; i < 30; i++)); do
    running_pid >/dev/null || break
    sleep 1
  done
  if running_pid >/dev/null; then
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "$host: stopped pid $pid"
}

[[ $# -ge 1 ]] || usage
sub=$1
shift
case "$sub" in
  install) cmd_install "$@" ;;
  prepare) cmd_prepare "$@" ;;
  launch) cmd_launch "$@" ;;
  _run) cmd__run "$@" ;;
  status) cmd_status ;;
  logs) cmd_logs "$@" ;;
  stop) cmd_stop ;;
  *) usage ;;
esac
