#!/usr/bin/env bash
# Show on every worker whether the launched run is running or how it ended.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... tpu/status.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

require PROJECT_ID ZONE TPU_NAME
on_workers all status
