#!/usr/bin/env bash
# Runs ms_cxr.main on this machine: one process (CPU or one GPU), or N processes joined by jax.distributed -- the
# multi-host code path (per-process input shards, cross-process collectives and checkpoints) without a cluster.
#
#   launch/local.sh --config=configs/densenet.py:smoke --workdir=runs/smoke
#   launch/local.sh --num_processes=2 -- --config=configs/densenet.py:dataset=synthetic,smoke --workdir=runs/mp
#
# Arguments after `--` (all arguments without --num_processes) go to `python -m ms_cxr.main` (whose --mode defaults
# to train_and_evaluate). With N > 1, process i also gets --config.parallel.multihost=True,
# --config.parallel.coordinator_address=127.0.0.1:<free port>, --config.parallel.num_processes=N and
# --config.parallel.process_id=i; on CPU each process uses the devices XLA gives it (set
# XLA_FLAGS=--xla_force_host_platform_device_count=K for K per process). The script waits for all of them: when one
# fails, the others are stopped (SIGTERM, then SIGKILL after $KILL_GRACE seconds, default 10) and the script exits
# with the first failure's status; status 4 (preempted) is not a failure of one process -- all of them agreed to
# stop and are saving -- so the others are left to finish. SIGTERM/SIGINT to the script go to every process (they
# checkpoint and exit 4). $PYTHON (default python) runs the module.
set -euo pipefail

python=${PYTHON:-python}
grace=${KILL_GRACE:-10}
num_processes=1
args=()
while (($#)); do
  case $1 in
    --num_processes=*) num_processes=${1#*=}; shift ;;
    --num_processes) num_processes=${2:?--num_processes needs a value}; shift 2 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --num_processes=$num_processes must be a positive integer" >&2
  exit 2
fi

if ((num_processes == 1)); then
  exec "$python" -m ms_cxr.main "${args[@]}"
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < num_processes; i++)); do
  "$python" -m ms_cxr.main "${args[@]}" \
    --config.parallel.multihost=True \
    --config.parallel.coordinator_address="127.0.0.1:$port" \
    --config.parallel.num_processes="$num_processes" \
    --config.parallel.process_id="$i" &
  pids+=("$!")
done

running() {  # the pids still alive
  local pid
  for pid in "${pids[@]}"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
  done
}

stop_all() {  # SIGTERM, then SIGKILL whatever is still running after the grace period
  local alive
  alive=$(running)
  [[ -z $alive ]] && return 0
  # shellcheck disable=SC2086
  kill -TERM $alive 2>/dev/null || true
  for ((t = 0; t < grace * 10; t++)); do
    [[ -z $(running) ]] && return 0
    sleep 0.1
  done
  alive=$(running)
  # shellcheck disable=SC2086
  [[ -n $alive ]] && kill -KILL $alive 2>/dev/null || true
}

forward() {  # a signal to the script: every process checkpoints and stops
  local alive
  alive=$(running)
  # shellcheck disable=SC2086
  [[ -n $alive ]] && kill -TERM $alive 2>/dev/null || true
}
trap forward TERM INT

status=0
left=$num_processes
while ((left > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    if [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    rc=0
    wait "$pid" || rc=$?
    pids[i]=''
    left=$((left - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      # Status 4 (preempted): every process agreed to stop at the same step and is saving; let them finish.
      if ((rc != 4)); then
        echo "launch/local.sh: process $i exited with status $rc; stopping the others" >&2
        stop_all
      fi
    fi
  done
  if ((left > 0)); then sleep 0.2; fi
done
exit "$status"
