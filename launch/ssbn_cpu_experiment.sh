#!/usr/bin/env bash
# The SSBN paper's table in miniature, on a CPU: single-scale DenseNets at 64, 128 and 256 px (stand-ins for
# 224/448/896), the SSBN multi-scale model at 64+128+256, and the ensemble of the three single-scale models, all
# trained with the same step and image budget on the synthetic set, then tabulated side by side.
#
#   bash launch/ssbn_cpu_experiment.sh [OUT_DIR]      (about 20 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/ssbn_cpu}
main() { python -m ms_cxr.main "$@"; }

for size in 64 128 256; do
  main --config=configs/densenet.py:cpu,size=$size --workdir="$out/densenet_$size" --mode=train_and_evaluate
done
main --config=configs/ssbn.py:cpu --workdir="$out/ssbn" --mode=train_and_evaluate
main --config=configs/densenet.py:cpu,size=64 --workdir="$out/ensemble" --mode=evaluate \
  --config.eval.ensemble_workdirs="$out/densenet_64,$out/densenet_128,$out/densenet_256"
python -m ms_cxr.report "$out/densenet_64" "$out/densenet_128" "$out/densenet_256" "$out/ssbn" "$out/ensemble" \
  | tee "$out/table.md"
