#!/usr/bin/env bash
# Create the TPU VM (v3-8, v4-8, v5litepod-8, ...) or pod slice (v3-32, v4-32, ...).
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... ACCELERATOR_TYPE=v3-8 tpu/create.sh
#
# SPOT=1: a Spot TPU. QUEUED=1: ask through a queued resource (named TPU_NAME,
# waited for until ACTIVE) instead of creating the node directly.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

require PROJECT_ID ZONE TPU_NAME ACCELERATOR_TYPE
version=$(runtime_version)

args=(--accelerator-type="$ACCELERATOR_TYPE")
# The VM's access to gs:// then depends only on its service account's IAM roles.
SCOPES=${SCOPES-https://www.googleapis.com/auth/cloud-platform}
if [[ -n "$SCOPES" ]]; then
  args+=(--scopes="$SCOPES")
fi
if [[ "$SPOT" == 1 ]]; then
  args+=(--spot)
fi
while IFS= read -r w; do args+=("$w"); done < <(_split_words "$CREATE_ARGS")

if [[ "$QUEUED" == 0 ]]; then
  note "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $version) in $ZONE"
  tpu_vm create "$TPU_NAME" --version="$version" "${args[@]}"
  exit 0
fi

note "requesting queued resource $TPU_NAME ($ACCELERATOR_TYPE, $version) in $ZONE"
queued create "$TPU_NAME" --node-id="$TPU_NAME" --runtime-version="$version" "${args[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
while :; do
  state=$(queued describe "$TPU_NAME" --format='value(state.state)')
  case "$state" in
    ACTIVE)
      note "queued resource $TPU_NAME is ACTIVE"
      break
      ;;
    FAILED | SUSPENDED)
      die "queued resource $TPU_NAME is $state (gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE)"
      ;;
  esac
  note "queued resource $TPU_NAME is ${state:-unknown}; checking again in ${POLL_SECONDS}s"
  sleep "$POLL_SECONDS"
done
