#!/usr/bin/env bash
# Runs ms_cxr.main on every worker of a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts) through gcloud; the processes
# join with jax.distributed, which reads the workers and this host's id from the TPU metadata server.
#
#   launch/tpu_pod.sh --name=my-v4-32 --zone=us-central2-b [--project=P] [--repo=~/ms_cxr] [--python=python3] \
#     [--dry_run] -- --config=configs/ssbn.py:dataset=nih --config.data.root=/mnt/data/ChestX-ray14 \
#     --workdir=/mnt/runs/ssbn_nih --config.parallel.compilation_cache_dir=/mnt/runs/jax_cache
#
# Each worker needs the repository at --repo (default ~/ms_cxr) with its environment installed (`pip install -e .`
# and jax[tpu]), and the data, workdir and cache on a filesystem mounted at the same path on every worker (Filestore
# or a gcsfuse bucket). Arguments after `--` go to `python -m ms_cxr.main`, plus --config.parallel.multihost=True.
# --dry_run prints the gcloud command instead of running it. A preempted (spot) slice sends SIGTERM: the run saves
# a checkpoint and exits with status 4; rerun this command on the recreated slice to resume.
set -euo pipefail

name='' zone='' project='' repo='~/ms_cxr' python=python3 dry_run=0
args=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    --) shift; args=("$@"); break ;;
    *) echo "error: unknown argument $1 (launcher options, then -- and the ms_cxr.main arguments)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $name || -z $zone ]]; then
  echo 'error: --name=TPU_NAME and --zone=ZONE are required' >&2
  exit 2
fi

# The remote shell sees one string: quote every argument for it. A leading ~ in --repo stays unquoted so it expands
# to the remote home directory.
remote="cd \"${repo/#\~/\$HOME}\" && $python -m ms_cxr.main"
for arg in "${args[@]}" --config.parallel.multihost=True; do
  remote+=" $(printf '%q' "$arg")"
done
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command="$remote")
if [[ -n $project ]]; then cmd+=(--project "$project"); fi

if ((dry_run)); then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
