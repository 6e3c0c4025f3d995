#!/usr/bin/env bash
# Fetch this commit's DVC-tracked data, checkpoints and results, then mark them up to date for
# Snakemake so it does not retrain what was just downloaded.
#
#   scripts/dvc_pull.sh [DVC PULL ARGS...] [-- SNAKEMAKE ARGS...]
#   scripts/dvc_pull.sh                          # everything, from the default remote
#   scripts/dvc_pull.sh -r shared pretrain       # one stage's outputs from remote "shared"
#   scripts/dvc_pull.sh -- --configfile config/paper.yaml
#
# Why the touch: `dvc pull` writes files in arbitrary order with fresh modification times, so an
# input can look newer than the output computed from it and Snakemake's mtime trigger would rerun
# the job. `snakemake --touch` walks the DAG in order and touches each job's outputs after its
# inputs, which restores "outputs newer than inputs"; jobs whose outputs were not pulled are left
# to run (a warning names them). Run it before changing config.yaml: the touch accepts the outputs
# as they are, whatever settings made them (DVC's dvc.lock records which ones did).
set -euo pipefail
cd "$(dirname "$0")/.."

dvc_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    dvc_args+=("$1")
    shift
done
[ "${1:-}" = "--" ] && shift

dvc pull "${dvc_args[@]}"
snakemake --profile profiles/default --touch "$@"
