#!/usr/bin/env bash
# Stop the launched run on every worker (the TPU VM keeps running and billing:
# tpu/delete.sh deletes it). Needed before relaunching after one worker failed,
# since the others then wait for it.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... tpu/stop.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

require PROJECT_ID ZONE TPU_NAME
on_workers all stop
