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

# The oldest Python that vit-jax and jax 0.12 support.
min_major=3
min_minor=12

# py_version PY: PY's version as MAJOR.MINOR, or nothing when PY does not run.
py_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# new_enough VERSION: whether MAJOR.MINOR is at least min_major.min_minor.
new_enough() {
  [[ "$1" =~ ^([0-9]+)\.([0-9]+)$ ]] || return 1
  ((BASH_REMATCH[1] > min_major || (BASH_REMATCH[1] == min_major && BASH_REMATCH[2] >= min_minor)))
}

# find_python: the first new enough Python on PATH, the newest name first.
find_python() {
  local py
  for py in python3.13 python3.12 python3; do
    if command -v "$py" >/dev/null 2>&1 && new_enough "$(py_version "$py")"; then
      printf '%s\n' "$py"
      return 0
    fi
  done
  return 1
}

apt_updated=0

# apt_install PACKAGE...: install with apt-get as root, reading the package lists
# first (a fresh VM's are stale). Right after boot, unattended upgrades may hold
# the dpkg lock: wait for it rather than fail.
apt_install() {
  local -a apt=(sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq)
  if [[ "$apt_updated" == 0 ]]; then
    "${apt[@]}" update || return 1
    apt_updated=1
  fi
  "${apt[@]}" install -y "$@" >/dev/null
}

# install_python NAME: install python3.N and its venv module with apt.
install_python() {
  local py=$1
  echo "$host: installing $py"
  # Ubuntu 24.04 packages python3.12. Ubuntu 22.04 (the tpu-ubuntu2204-base,
  # v2-alpha-tpuv5-lite and v2-alpha-tpuv6e images) stops at 3.11; there the
  # deadsnakes PPA has it. apt's "unable to locate" is expected there: not shown.
  apt_install "$py" "$py-venv" 2>/dev/null && return 0
  echo "$host: $py is not in the distribution's packages; adding the deadsnakes PPA"
  if ! command -v add-apt-repository >/dev/null 2>&1; then
    apt_install software-properties-common || return 1
  fi
  # -n: the package lists are read by apt_install, which waits for the dpkg lock.
  sudo add-apt-repository -y -n ppa:deadsnakes/ppa >/dev/null || return 1
  apt_updated=0
  apt_install "$py" "$py-venv"
}

fail() {
  echo "$host: $*" >&2
  exit 1
}

cmd_install() {
  local spec=${1:?install needs the jax[tpu] requirement}
  local py=${2:-} need="$min_major.$min_minor" version have out
  if running_pid >/dev/null; then
    fail "a launched process is still running (pid $(running_pid)); run tpu/stop.sh first"
  fi
  if [[ -n "$py" ]]; then
    # Chosen by the user (REMOTE_PYTHON): that one or an error, never another one.
    if [[ "$py" =~ ^python([0-9]+\.[0-9]+)$ ]] && ! new_enough "${BASH_REMATCH[1]}"; then
      fail "REMOTE_PYTHON=$py: vit-jax needs Python >= $need (unset REMOTE_PYTHON to have python$need installed)"
    fi
    if ! command -v "$py" >/dev/null 2>&1; then
      # A bare name such as python3.13 is also the name of its apt package.
      [[ "$py" =~ ^python3\.[0-9]+$ ]] ||
        fail "REMOTE_PYTHON=$py not found (give the name or path of a Python >= $need on the workers)"
      install_python "$py" ||
        fail "could not install $py with apt, nor from the deadsnakes PPA: install it on the workers, or unset REMOTE_PYTHON"
    fi
    version=$(py_version "$py")
    [[ -n "$version" ]] || fail "REMOTE_PYTHON=$py does not run as a Python (asked for its version)"
    new_enough "$version" || fail "REMOTE_PYTHON=$py is Python $version; vit-jax needs Python >= $need"
  elif ! py=$(find_python); then
    echo "$host: no Python >= $need found (looked for python3.13, python3.12, python3)"
    install_python "python$need" ||
      fail "could not install python$need with apt, nor from the deadsnakes PPA: install a Python >= $need on the workers and set REMOTE_PYTHON to its name"
    py=$(find_python) || fail "python$need was installed but does not run as Python >= $need"
  fi
  version=$(py_version "$py")
  rm -rf "$src"
  tar -xzf "$tarball" -C "$base"
  # A venv made with another Python (an older setup's 3.11, or a Python removed
  # since) is made again: its packages were built for that interpreter.
  if [[ -e "$venv" ]]; then
    have=$(py_version "$venv/bin/python")
    if [[ "$have" != "$version" ]]; then
      echo "$host: making $venv again with $py ($version): it has ${have:+Python }${have:-a Python that no longer runs}"
      rm -rf "$venv"
    fi
  fi
  if [[ ! -e "$venv" ]] && ! out=$("$py" -m venv "$venv" 2>&1); then
    rm -rf "$venv"
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) apart, in pythonX.Y-venv.
    if [[ "$out" != *ensurepip* ]]; then
      printf '%s\n' "$out" >&2
      fail "$py -m venv $venv failed"
    fi
    echo "$host: installing python$version-venv, which $py -m venv needs"
    apt_install "python$version-venv" ||
      fail "could not install python$version-venv with apt, which $py -m venv needs"
    "$py" -m venv "$venv" || fail "$py -m venv $venv failed"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$spec" "$src"
  # The same version number may already be installed from an older tarball.
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$src"
  "$venv/bin/vit-jax" --help >/dev/null
  "$venv/bin/python" - "$host" <<'EOF'
import importlib.metadata as m
import platform
import sys

def version(name):
  try:
    return m.version(name)
  except m.PackageNotFoundError:
    return "(not installed)"

print(f"{sys.argv[1]}: installed on Python {platform.python_version()}:",
      ", ".join(f"{n} {version(n)}" for n in ("vit-jax", "jax", "libtpu")))
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
