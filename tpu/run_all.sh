#!/usr/bin/env bash
# Everything in one go: create the TPU, install, prepare DATASET if set, start
# training, then follow worker 0's log (Ctrl-C leaves the run and the TPU running);
# or, with DELETE_WHEN_DONE=1, wait until the run ends and delete the TPU.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... ACCELERATOR_TYPE=v3-8 BUCKET=... [DATASET=cifar10] \
#     [DELETE_WHEN_DONE=1] tpu/run_all.sh configs/vit_b16_cifar10.py [--config.key=value ...]
#
# If a step before the launch fails, the TPU is deleted when DELETE_WHEN_DONE=1,
# and otherwise left for you to look at (tpu/delete.sh deletes it).
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

here="$VIT_JAX_ROOT/tpu"
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-0}
[[ "$DELETE_WHEN_DONE" == 0 || "$DELETE_WHEN_DONE" == 1 ]] || die "DELETE_WHEN_DONE=$DELETE_WHEN_DONE: use 0 or 1"
require PROJECT_ID ZONE TPU_NAME ACCELERATOR_TYPE
if [[ -z "${WORKDIR:-}" || -z "${TFDS_DATA_DIR:-}" ]]; then
  require BUCKET
fi
# Check the training arguments before paying for a slice.
if ! err=$(DRY_RUN=1 bash "$here/train.sh" "$@" 2>&1 >/dev/null); then
  printf '%s\n' "$err" >&2
  exit 2
fi

created=0
launched=0
finish() {
  local rc=$?
  if [[ "$rc" != 0 && "$created" == 1 ]]; then
    if [[ "$launched" == 0 && "$DELETE_WHEN_DONE" == 1 ]]; then
      note "a step failed: deleting $TPU_NAME"
      bash "$here/delete.sh" || note "deleting failed: run tpu/delete.sh"
    else
      note "$TPU_NAME is still there (and billed): tpu/status.sh, tpu/logs.sh, tpu/delete.sh"
    fi
  fi
}
trap finish EXIT

bash "$here/create.sh"
created=1
bash "$here/install.sh"
if [[ -n "${DATASET:-}" ]]; then
  bash "$here/data.sh" "$DATASET"
fi
bash "$here/train.sh" "$@"
launched=1

if [[ "$DELETE_WHEN_DONE" == 0 ]]; then
  bash "$here/logs.sh" 0
  exit 0
fi

if [[ "$DRY_RUN" == 1 ]]; then
  bash "$here/delete.sh"
  exit 0
fi
note "waiting for the run to end (checking worker 0 every ${POLL_SECONDS}s), then deleting $TPU_NAME"
unreachable=0
while :; do
  sleep "$POLL_SECONDS"
  if state=$(on_workers 0 status); then
    unreachable=0
    case "$state" in
      *"running pid="*) continue ;;
    esac
    note "run ended: $state"
    break
  fi
  unreachable=$((unreachable + 1))
  if [[ "$unreachable" -ge 3 ]]; then
    note "worker 0 did not answer 3 times in a row (preempted?)"
    break
  fi
done
bash "$here/delete.sh"
