#!/usr/bin/env bash
# Build a TFDS dataset into the bucket once, from worker 0, before training (so
# that the workers of a pod slice do not all try to prepare it at the same time).
#
#   BUCKET=... PROJECT_ID=... ZONE=... TPU_NAME=... tpu/data.sh cifar10
#   MANUAL_DIR=gs://BUCKET/imagenet-manual ... tpu/data.sh imagenet2012
#
# TFDS_DATA_DIR defaults to gs://$BUCKET/tensorflow_datasets, as for train.sh.
# MANUAL_DIR: where a dataset that needs a manual download finds its files.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ $# -ne 1 || "$1" == -* ]]; then
  die "usage: tpu/data.sh DATASET (a TFDS name, e.g. cifar10 or imagenet2012)"
fi
dataset=$1
require PROJECT_ID ZONE TPU_NAME
if [[ -z "${TFDS_DATA_DIR:-}" ]]; then
  require BUCKET
fi
TFDS_DATA_DIR=${TFDS_DATA_DIR:-gs://$BUCKET/tensorflow_datasets}
[[ "$dataset" =~ ^[a-z0-9_]+(/[-a-zA-Z0-9_.]+)?(:[0-9.*]+)?$ ]] || die "DATASET='$dataset' is not a TFDS name"

note "preparing $dataset in $TFDS_DATA_DIR on worker 0 of $TPU_NAME"
if [[ -n "${MANUAL_DIR:-}" ]]; then
  on_workers 0 prepare "$dataset" "$TFDS_DATA_DIR" "$MANUAL_DIR"
else
  on_workers 0 prepare "$dataset" "$TFDS_DATA_DIR"
fi
