# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for the tpu/*.sh scripts. Sourced, not run.
#
# Every setting is an environment variable; tpu/README.md lists them all.
# Required ones are checked by each script with `require`, which stops with a
# one-line error naming what is missing before any gcloud command runs.
# Written for bash 3.2 too (the macOS /bin/bash): no associative arrays, no
# mapfile, and empty arrays are expanded with ${a[@]+"${a[@]}"}.

set -euo pipefail

VIT_JAX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=${0##*/}

# Optional settings with their defaults.
SPOT=${SPOT:-0}                       # 1: a Spot TPU (cheaper, can be preempted)
QUEUED=${QUEUED:-0}                   # 1: create/delete through a queued resource
DRY_RUN=${DRY_RUN:-0}                 # 1: print the gcloud commands instead of running them
JAX_TPU_SPEC=${JAX_TPU_SPEC:-"jax[tpu]==0.12.0.1"}
# Empty: each worker picks its own Python >= 3.12 (installing python3.12 if it has none),
# since the TPU VM images differ in which Pythons they carry.
REMOTE_PYTHON=${REMOTE_PYTHON:-}
VIT_JAX_REF=${VIT_JAX_REF:-HEAD}      # git ref that install.sh ships to the workers
POLL_SECONDS=${POLL_SECONDS:-60}      # queued-resource and wait polling interval
CREATE_ARGS=${CREATE_ARGS:-}          # extra flags for the create command, split on spaces
SSH_ARGS=${SSH_ARGS:-}                # extra flags for every ssh/scp, e.g. --internal-ip

# Where things live on each worker, relative to the login user's home directory.
REMOTE_HELPER=vit-jax-remote.sh
REMOTE_TARBALL=vit-jax.tar.gz

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

# require VAR...: every named variable must be set and non-empty.
require() {
  local v missing=""
  for v in "$@"; do
    if [[ -z "${!v:-}" ]]; then
      missing="${missing:+$missing, }$v"
    fi
  done
  if [[ -n "$missing" ]]; then
    die "missing required environment variable(s): $missing (export them; see tpu/README.md)"
  fi
  validate
}

# Format checks on whatever is set, so typos fail here and not after a slice is paid for.
validate() {
  if [[ -n "${TPU_NAME:-}" && ! "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    die "TPU_NAME='$TPU_NAME': use lowercase letters, digits and hyphens, starting with a letter"
  fi
  if [[ -n "${ACCELERATOR_TYPE:-}" && ! "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then
    die "ACCELERATOR_TYPE='$ACCELERATOR_TYPE' is not an accelerator type such as v3-8, v4-32 or v5litepod-8"
  fi
  if [[ -n "${BUCKET:-}" ]]; then
    BUCKET=${BUCKET#gs://}
    BUCKET=${BUCKET%/}
    if [[ ! "$BUCKET" =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]]; then
      die "BUCKET='$BUCKET' is not a bucket name (give it as my-bucket or gs://my-bucket)"
    fi
  fi
  local flag
  for flag in SPOT QUEUED DRY_RUN; do
    if [[ "${!flag}" != 0 && "${!flag}" != 1 ]]; then
      die "$flag='${!flag}': use 0 or 1"
    fi
  done
  # A name such as python3.11 left over from an older setup: refuse it here rather
  # than on every worker after the checkout has been shipped.
  if [[ "$REMOTE_PYTHON" =~ ^python3\.([0-9]+)$ ]] && ((BASH_REMATCH[1] < 12)); then
    die "REMOTE_PYTHON=$REMOTE_PYTHON: vit-jax needs Python >= 3.12 (unset REMOTE_PYTHON to let the workers pick or install one)"
  fi
  if [[ ! "$POLL_SECONDS" =~ ^[0-9]+$ ]]; then
    die "POLL_SECONDS='$POLL_SECONDS' is not a number of seconds"
  fi
}

# The runtime (software) version for an accelerator type, unless RUNTIME_VERSION is set.
runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    printf '%s\n' "$RUNTIME_VERSION"
    return
  fi
  case "$ACCELERATOR_TYPE" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default runtime version for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" ;;
  esac
}

# shq ARG: ARG quoted for a POSIX shell on the worker (unchanged when it needs no quotes).
shq() {
  if [[ "$1" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$1"
  else
    local q="'" escaped="'\\''"
    printf "'%s'" "${1//$q/$escaped}"
  fi
}

# remote_cmd WORD...: one command line for the worker's shell.
remote_cmd() {
  local out="" w
  for w in "$@"; do
    out="${out:+$out }$(shq "$w")"
  done
  printf '%s' "$out"
}

# Every gcloud call goes through here: DRY_RUN=1 prints it (copy-pasteable) instead.
gcloud_run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local a line="+ gcloud"
    for a in "$@"; do
      line="$line $(shq "$a")"
    done
    printf '%s\n' "$line"
    return 0
  fi
  gcloud "$@"
}

_split_words() {  # _split_words STRING: the words of STRING, one per line (no globbing)
  local w
  local -a words=()
  read -r -a words <<<"$1" || true
  for w in ${words[@]+"${words[@]}"}; do
    printf '%s\n' "$w"
  done
}

# tpu_vm SUBCOMMAND ARG...: gcloud compute tpus tpu-vm SUBCOMMAND ARG... --project --zone.
tpu_vm() {
  local sub=$1
  shift
  local -a extra=()
  if [[ "$sub" == ssh || "$sub" == scp ]]; then
    local w
    while IFS= read -r w; do extra+=("$w"); done < <(_split_words "$SSH_ARGS")
  fi
  gcloud_run compute tpus tpu-vm "$sub" "$@" --project="$PROJECT_ID" --zone="$ZONE" \
    ${extra[@]+"${extra[@]}"}
}

# queued SUBCOMMAND ARG...: gcloud compute tpus queued-resources SUBCOMMAND ARG... --project --zone.
queued() {
  local sub=$1
  shift
  gcloud_run compute tpus queued-resources "$sub" "$@" --project="$PROJECT_ID" --zone="$ZONE"
}

# on_workers WORKER COMMAND-WORD...: run the remote helper's command on worker(s) WORKER.
on_workers() {
  local worker=$1
  shift
  tpu_vm ssh "$TPU_NAME" --worker="$worker" --command="$(remote_cmd bash "$REMOTE_HELPER" "$@")"
}
