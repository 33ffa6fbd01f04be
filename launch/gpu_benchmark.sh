#!/usr/bin/env bash
# The accelerator figures of the README's benchmark section in one run on one GPU: the train step of DenseNet-121
# (configs/densenet.py) beside torchvision's (PyTorch AMP bfloat16, channels_last, cuDNN autotuner, fused Adam)
# and of SSBN (configs/ssbn.py), at 224, 448 and 896 px in bfloat16; then, as time allows, the same DenseNet step
# with XLA's own convolutions (model.pointwise_matmul and model.kernel_grad_matmul off, the formulations written
# for XLA:CPU) and in float32.
#
#   launch/gpu_benchmark.sh OUT_DIR [BATCH [FLAG ...]]    # BATCH: global batch, default 32
#
# FLAGs go to every run after its own (the last of a repeated flag wins): `--sizes=448`, `--repeats=3`,
# `--config.model.remat=true`.
#
# Writes OUT_DIR/benchmark.jsonl (every line of every run), OUT_DIR/benchmark.log (their stderr) and
# OUT_DIR/table.md (`python -m ms_cxr.benchmark --table`). One process per setting and config, all sizes in it:
# compile time dominates a GPU run. JAX's device peak memory is process-wide, so per size read `xla_peak_bytes`
# (torch's is reset per size). $BUDGET_S (default 540) bounds the whole script: each run gets what is left, a run
# that fails or runs out is logged and the next one starts (a failed run with torch beside it is run again
# without torch). $PYTHON (default python) runs the module, from the repository root.
set -uo pipefail

out=${1:?usage: launch/gpu_benchmark.sh OUT_DIR [BATCH [FLAG ...]]}
batch=${2:-32}
shift $(($# < 2 ? $# : 2))
extra=("$@")
python=${PYTHON:-python}
budget=${BUDGET_S:-540}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # the repository root: configs/ and ms_cxr/ from here
jsonl=$out/benchmark.jsonl
log=$out/benchmark.log
: >>"$jsonl"
start=$SECONDS

common=(--what=train --sizes=224,448,896 "--batch=$batch" --steps=10 --warmup=2 --repeats=5)
runs=(
  "densenet121 bf16 vs torch|--dtype=bfloat16 --torch --channels_last"
  "ssbn bf16|--config=configs/ssbn.py --dtype=bfloat16"
  "densenet121 bf16 xla convolutions|--dtype=bfloat16 --config.model.pointwise_matmul=false --config.model.kernel_grad_matmul=false"
  "densenet121 f32 vs torch|--dtype=float32 --torch --channels_last"
)

{
  echo "== $(date -u +%FT%TZ) batch $batch, budget ${budget}s"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} >>"$log" 2>&1

for run in "${runs[@]}"; do
  name=${run%%|*}
  read -r -a flags <<<"${run#*|}"
  left=$((budget - (SECONDS - start)))
  if ((left < 30)); then
    echo "== skipped (budget spent): $name" >>"$log"
    continue
  fi
  echo "== $(date -u +%T) $name: ${flags[*]} (${left}s left)" >>"$log"
  timeout --signal=TERM --kill-after=10 "$left" "$python" -m ms_cxr.benchmark "${common[@]}" "${flags[@]}" \
    "${extra[@]}" >>"$jsonl" 2>>"$log"
  status=$?
  echo "== $(date -u +%T) $name: exit $status" >>"$log"
  left=$((budget - (SECONDS - start)))
  if ((status != 0 && status != 124 && left >= 30)) && [[ " ${flags[*]} " == *" --torch "* ]]; then
    # torch beside JAX in one process failed: the JAX figures alone rather than none.
    jax_only=()
    for flag in "${flags[@]}"; do [[ $flag == --torch || $flag == --channels_last ]] || jax_only+=("$flag"); done
    echo "== $(date -u +%T) $name, again without torch: ${jax_only[*]} (${left}s left)" >>"$log"
    timeout --signal=TERM --kill-after=10 "$left" "$python" -m ms_cxr.benchmark "${common[@]}" "${jax_only[@]}" \
      "${extra[@]}" >>"$jsonl" 2>>"$log"
    echo "== $(date -u +%T) $name, without torch: exit $?" >>"$log"
  fi
done

"$python" -m ms_cxr.benchmark --table="$jsonl" >"$out/table.md" 2>>"$log"
cat "$out/table.md"
