r"""Multi-scale DenseNet-121 with size-specific BatchNorm (SSBN, Pereira et al. 2023): the paper's multi-scale row.

One DenseNet-121 sees each radiograph at 224, 448 and 896 px; every weight is shared except the BatchNorm layers,
which keep a scale/shift and running statistics per size (`ssbn_224`, `ssbn_448`, `ssbn_896`). Training cycles
through the sizes (`train.multiscale=round_robin`; `random` and `all` are the alternatives), and evaluation reports
each size alone and the fusion of the three (`eval.fusion`, mean probability by default).

Arguments: `dataset=synthetic|nih|chexpert` (default synthetic), `sizes=224+448+896`, `smoke`, `cpu` (the CPU
experiment of the README: densenet_small at 64/128/256 px).

Multi-scale row on CheXpert (7,135,502 parameters with 14 labels):

  python -m ms_cxr.main --config=configs/ssbn.py:dataset=chexpert \
    --config.data.root=/data/chexpert --workdir=runs/ssbn_chexpert --mode=train_and_evaluate

Single-scale rows: configs/densenet.py:dataset=chexpert,size=224 (and 448, 896). The ensemble row evaluates the
three single-scale runs together:

  python -m ms_cxr.main --config=configs/densenet.py:dataset=chexpert --mode=evaluate \
    --config.data.root=/data/chexpert --workdir=runs/ensemble_chexpert \
    --config.eval.ensemble_workdirs=runs/densenet_chexpert_224,runs/densenet_chexpert_448,runs/densenet_chexpert_896
"""

from configs import base
from ms_cxr import config_lib
from ms_cxr.data import datasets


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dataset='synthetic', sizes='224+448+896', smoke=False, cpu=False)
  config = base.get_config()
  config.data.dataset = args.dataset
  config.data.labels = datasets.default_labels(args.dataset)
  config_lib.refuse_with(arg, 'cpu', 'sizes')
  try:
    config.data.sizes = tuple(int(s) for s in args.sizes.split('+'))
  except ValueError:
    raise ValueError(
      f"config argument sizes={args.sizes!r}: expected sizes in px joined by '+', e.g. 224+448+896"
    ) from None
  config.model.name = 'densenet121'
  config.model.norm = 'ssbn'
  config.train.multiscale = 'round_robin'
  if args.cpu:
    base.apply_cpu_experiment(config)
    config.data.sizes = (64, 128, 256)
  if args.smoke:
    config = base.apply_smoke(config)
  return config
