#!/usr/bin/env bash
# Start training on every worker at once: the same command everywhere, detached
# from the ssh session, each worker logging to ~/vit-jax-train.log. On a pod
# slice `vit-jax train` calls jax.distributed.initialize() itself; process 0
# writes the metrics, checkpoints and TensorBoard files to WORKDIR.
#
#   BUCKET=... PROJECT_ID=... ZONE=... TPU_NAME=... \
#     tpu/train.sh configs/vit_b16_cifar10.py [--config.key=value ...]
#
# WORKDIR (default gs://$BUCKET/runs/$RUN_NAME, RUN_NAME default CONFIGNAME-TPU_NAME):
# rerunning with the same WORKDIR resumes from its last checkpoint.
# TFDS_DATA_DIR (default gs://$BUCKET/tensorflow_datasets) is passed as --config.tfds_data_dir.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [[ $# -lt 1 || "$1" == -* ]]; then
  die "usage: tpu/train.sh CONFIG [--config.key=value ...] (CONFIG relative to the repository, e.g. configs/vit_b16_cifar10.py)"
fi
config=$1
shift
require PROJECT_ID ZONE TPU_NAME
if [[ -z "${WORKDIR:-}" || -z "${TFDS_DATA_DIR:-}" ]]; then
  require BUCKET
fi

config_file=${config%%:*}
if [[ "$config_file" == /* ]]; then
  die "give CONFIG relative to the repository root (e.g. configs/vit_b16_cifar10.py), not $config"
fi
[[ -f "$VIT_JAX_ROOT/$config_file" ]] || die "no config file $config_file in $VIT_JAX_ROOT"

own_data_dir=0
for a in "$@"; do
  case "$a" in
    --config.tfds_data_dir=*) own_data_dir=1 ;;
    --config.?*=*) ;;
    *) die "unexpected argument '$a': only --config.key=value overrides follow CONFIG" ;;
  esac
done

name=${config_file##*/}
RUN_NAME=${RUN_NAME:-${name%.py}-$TPU_NAME}
WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$RUN_NAME}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-gs://$BUCKET/tensorflow_datasets}
[[ "$WORKDIR" == gs://?* ]] ||
  die "WORKDIR=$WORKDIR: use a gs:// path, which every worker sees (a local directory is per worker)"

cmd=(vit-jax train --config "$config" --workdir "$WORKDIR")
if [[ "$own_data_dir" == 0 ]]; then
  cmd+=("--config.tfds_data_dir=$TFDS_DATA_DIR")
fi
cmd+=("$@")

note "launching on every worker of $TPU_NAME: ${cmd[*]}"
on_workers all launch "${cmd[@]}"
note "started; tpu/logs.sh follows worker 0, tpu/status.sh shows every worker"
