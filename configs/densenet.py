r"""DenseNet-121 at one input size with standard BatchNorm: the single-scale rows of the SSBN
paper's table.

Arguments (after the colon): `dataset=synthetic|nih|chexpert|vindr` (default synthetic), `size=224|448|896`,
`smoke` (a <2 minute run on a CPU), `demo` (the README's CPU demo: a small DenseNet at 128 px, ~10 minutes),
`cpu` (the README's SSBN experiment: densenet_small, the same budget as configs/ssbn.py:cpu; pair with size=64|128|256).

Single-scale row at 448 px on ChestX-ray14:

  python -m ms_cxr.main --config=configs/densenet.py:dataset=nih,size=448 \
    --config.data.root=/data/ChestX-ray14 --workdir=runs/densenet_nih_448 --mode=train_and_evaluate

CPU demo on the embedded synthetic set:

  python -m ms_cxr.main --config=configs/densenet.py:demo --workdir=runs/demo --mode=train_and_evaluate
"""

from configs import base
from ms_cxr import config_lib
from ms_cxr.data import datasets


def get_config(arg=None):
  args = config_lib.parse_arg(
    arg, dataset='synthetic', size=224, smoke=False, demo=False, cpu=False
  )
  config_lib.refuse_with(arg, 'demo', 'size')
  config = base.get_config()
  config.data.dataset = args.dataset
  config.data.labels = datasets.default_labels(args.dataset)
  config.data.sizes = (args.size,)
  config.model.name = 'densenet121'
  if args.demo:
    # Sized for a 2-core CPU: ~10 minutes, mean AUROC well above 0.8 on the synthetic test split.
    config.model.name = 'densenet_small'
    config.data.sizes = (128,)
    config.train.global_batch_size = 32
    config.train.num_steps = 450
    config.train.log_every_steps = 25
    config.train.eval_every_steps = 225
    config.ckpt.every_steps = 225
    config.data.synthetic.num_val = 300
    config.optim.learning_rate = 2e-3
    config.optim.schedule = 'cosine'
    config.optim.warmup_steps = 50
  if args.cpu:
    base.apply_cpu_experiment(config)
  if args.smoke:
    config = base.apply_smoke(config)
  return config
