r"""MS-ANet (Xu, Li, Li 2021): multi-scale attention fused coarse to fine, attention consistency, imbalance weights.

Only the paper's abstract is public, so the design follows its closest published ancestor, Guo et al. CVPR 2019
(visual attention consistency under image transforms). From the paper: multi-scale attention maps fused
iteratively, a consistency loss under image transforms, class-imbalance handling, 14 ChestX-ray14 labels on the
official split (reported mean AUROC 0.850; 0.815 on CheXpert). Reconstructed, each a config field:
  * backbone DenseNet-121 (`model.name=msanet_densenet121`); scales = outputs of dense blocks 2, 3, 4
    (`model.msanet.scales`);
  * class-wise CAMs from 1x1 classifiers (stop-gradient on their weights inside the CAM), fused coarse to fine
    with learned per-class weights (`model.msanet.fusion`), the fused map re-weighting the finest features
    before pooling (`model.msanet.attention_pooling`, `attention_gate`);
  * loss: weighted BCE with w_pos = exp(1 - p_k), w_neg = exp(p_k) (`train.loss=weighted_bce`), plus the
    per-scale logits' loss (`train.scale_loss_weight`) and MSE between CAM(T(x)) and T(CAM(x)) with T a random
    rescale (`train.consistency_weight`, `train.consistency_transform`);
  * optimiser Adam 1e-4, batch 32, 224 px, as the DenseNet baselines.

Arguments: `dataset=synthetic|nih|chexpert` (default synthetic), `size=224`, `consistency=1.0`, `smoke`, and `cpu`:
the README's CPU experiment (msanet_small at 128 px, the DenseNet CPU experiment's budget: 240 steps of 16 images;
see launch/msanet_cpu_experiment.sh, which trains it with and without the consistency loss).

  python -m ms_cxr.main --config=configs/msanet.py:dataset=nih --config.data.root=/data/ChestX-ray14 \
    --workdir=runs/msanet_nih --mode=train_and_evaluate
"""

from configs import base
from ms_cxr import config_lib
from ms_cxr.data import datasets


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, dataset='synthetic', size=224, consistency=1.0, smoke=False, cpu=False
  )
  config_lib.refuse_with(arg, 'cpu', 'size')
  config = base.get_config()
  config.data.dataset = args.dataset
  config.data.labels = datasets.default_labels(args.dataset)
  config.data.sizes = (args.size,)
  config.model.name = 'msanet_densenet121'
  config.train.loss = 'weighted_bce'
  config.train.scale_loss_weight = 0.5
  config.train.consistency_weight = args.consistency
  config.train.consistency_transform = 'rescale'
  if args.cpu:
    base.apply_cpu_experiment(config)
    config.model.name = 'msanet_small'
    config.data.sizes = (128,)
    config.eval.heatmap_images = 8
  if args.smoke:
    config = base.apply_smoke(config)
  return config
