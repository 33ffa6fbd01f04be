#!/usr/bin/env bash
# MS-ANet on a CPU: the same model (msanet_small, 128 px, synthetic set) trained with and without the attention-
# consistency loss under the same budget (240 steps of 16 images), then the per-label AUROC side by side and the
# pointing-game hit rate / IoU of each model's fused attention maps against the synthetic findings' boxes.
# Heatmap overlays land in OUT_DIR/*/eval/test/heatmaps/.
#
#   bash launch/msanet_cpu_experiment.sh [OUT_DIR]      (about 4 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/msanet_cpu}
for weight in 1.0 0.0; do
  name=$([ "$weight" = 0.0 ] && echo without_consistency || echo with_consistency)
  python -m ms_cxr.main --config=configs/msanet.py:cpu,consistency=$weight --workdir="$out/$name" \
    --mode=train_and_evaluate
done
python -m ms_cxr.report "$out/with_consistency" "$out/without_consistency" | tee "$out/table.md"
python -m ms_cxr.report --localization "$out/with_consistency" "$out/without_consistency" \
  | tee "$out/localization.md"
