#!/usr/bin/env bash
# Ship this checkout (git archive of VIT_JAX_REF, default HEAD) to every worker and
# install it there with jax[tpu] into ~/vit-jax-venv (Python >= 3.12, installed when
# the worker has none). Rerun it after changing the code; commit first, since only
# committed files are shipped.
#
#   PROJECT_ID=... ZONE=... TPU_NAME=... tpu/install.sh
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

require PROJECT_ID ZONE TPU_NAME

git -C "$VIT_JAX_ROOT" rev-parse --verify --quiet "$VIT_JAX_REF^{commit}" >/dev/null ||
  die "VIT_JAX_REF=$VIT_JAX_REF is not a commit of the git checkout at $VIT_JAX_ROOT"
if [[ "$VIT_JAX_REF" == HEAD && -n "$(git -C "$VIT_JAX_ROOT" status --porcelain --untracked-files=no)" ]]; then
  note "warning: uncommitted changes are not shipped (only $VIT_JAX_REF is)"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$VIT_JAX_ROOT" archive --format=tar.gz --prefix=vit-jax/ -o "$tmp/$REMOTE_TARBALL" "$VIT_JAX_REF"

note "copying $VIT_JAX_REF and the worker helper to every worker of $TPU_NAME"
tpu_vm scp "$tmp/$REMOTE_TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
tpu_vm scp "$VIT_JAX_ROOT/tpu/remote.sh" "$TPU_NAME:$REMOTE_HELPER" --worker=all
note "installing $JAX_TPU_SPEC and vit-jax on every worker"
on_workers all install "$JAX_TPU_SPEC" ${REMOTE_PYTHON:+"$REMOTE_PYTHON"}
