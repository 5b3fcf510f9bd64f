#!/usr/bin/env bash
# Delete the TPU VM or pod slice (with QUEUED=1: its queued resource, and the node
# with it). Checkpoints and logs are in the bucket and stay.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... tpu/delete.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

require PROJECT_ID ZONE TPU_NAME

if [[ "$QUEUED" == 1 ]]; then
  note "deleting queued resource $TPU_NAME and its TPU VM"
  queued delete "$TPU_NAME" --force --quiet
else
  note "deleting TPU VM $TPU_NAME"
  tpu_vm delete "$TPU_NAME" --quiet
fi
