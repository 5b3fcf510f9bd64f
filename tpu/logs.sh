#!/usr/bin/env bash
# Stream the training log of one worker (default 0, the one that logs metrics).
# Ctrl-C stops the streaming, not the training.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... tpu/logs.sh [WORKER]
#
# LOG_LINES (default 100): how many earlier lines to show first. FOLLOW=0: print and exit.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

worker=${1:-0}
LOG_LINES=${LOG_LINES:-100}
FOLLOW=${FOLLOW:-1}
require PROJECT_ID ZONE TPU_NAME
[[ "$worker" =~ ^[0-9]+$ ]] || die "usage: tpu/logs.sh [WORKER], WORKER a number (0 is the first)"
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || die "LOG_LINES=$LOG_LINES is not a number"
[[ "$FOLLOW" == 0 || "$FOLLOW" == 1 ]] || die "FOLLOW=$FOLLOW: use 0 or 1"

mode=follow
if [[ "$FOLLOW" == 0 ]]; then
  mode=nofollow
fi
on_workers "$worker" logs "$LOG_LINES" "$mode"
