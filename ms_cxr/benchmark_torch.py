"""torchvision's DenseNet train or eval step, the optional reference of `python -m ms_cxr.benchmark --torch`.

torch and torchvision are not dependencies of the project; install them into a separate environment (see
`INSTALL_HINT`). The reference mirrors the JAX step of ms_cxr.benchmark: the same DenseNet blocks as the configured
preset (densenet121 is torchvision's densenet121), the same batch of random uint8 grayscale images turned into
ImageNet-normalised 3-channel input inside the step, the same number of labels, `BCEWithLogitsLoss`, the configured
optimizer (adam, adamw or sgd with its learning rate, betas, momentum and weight decay; no gradient clipping) and
`model.remat` as torchvision's `memory_efficient` (checkpointed dense layers). bfloat16 runs under
`torch.autocast`. The model runs on CUDA when JAX runs on a GPU and torch sees one (cuDNN's autotuner on, the
optimizer's fused CUDA kernel: torch at its best in eager mode), else on the CPU with `torch.set_num_threads` set
to XLA's thread count. Its model FLOPs are counted by `torch.utils.flop_counter` (2 x the multiply-adds of the
convolutions and matrix products of one forward pass; x 3 for a train step), as ms_cxr/flops.py counts the JAX
model's; torchvision's transitions pool after their 1x1 convolution, so its count is the larger.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np

INSTALL_HINT = (
  'To add the torchvision reference, install torch into a separate environment: python3 -m venv TORCHVENV && '
  'TORCHVENV/bin/pip install -e . && TORCHVENV/bin/pip install torch torchvision '
  '--index-url https://download.pytorch.org/whl/cpu, then run TORCHVENV/bin/python -m ms_cxr.benchmark --torch'
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LABEL_RATE = 0.2


def unavailable() -> str | None:
  """Why torch and torchvision cannot be used here, or None when they import."""
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except Exception as e:  # a broken install raises more than ImportError
    return f'torch/torchvision do not import ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
  return None


def unsupported(config: ml_collections.ConfigDict) -> str | None:
  """Why the configured model has no torchvision counterpart, or None."""
  from ms_cxr.models import densenet

  if config.model.name not in densenet.PRESETS:
    return f'config.model.name={config.model.name!r} has no torchvision counterpart'
  if config.model.norm != 'batchnorm':
    return f'config.model.norm={config.model.norm!r}: torchvision has plain BatchNorm only'
  return None


class TorchStep:
  """torchvision's DenseNet at one size on one synthetic batch, stepped `steps` at a time."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    what: str,
    size: int,
    *,
    channels_last: bool = False,
    num_threads: int = 1,
  ):
    import jax
    import torch
    import torchvision

    from ms_cxr.models import densenet

    self.what = what
    self.torch_version = torch.__version__
    self.torchvision_version = torchvision.__version__
    use_cuda = jax.default_backend() == 'gpu' and torch.cuda.is_available()
    self.device = torch.device('cuda' if use_cuda else 'cpu')
    self.device_kind = torch.cuda.get_device_name(0) if use_cuda else 'cpu'
    if use_cuda:
      torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms for these shapes
      torch.cuda.reset_peak_memory_stats()
    else:
      torch.set_num_threads(num_threads)
    self.num_threads = torch.get_num_threads()
    torch.manual_seed(config.train.seed)

    preset = densenet.PRESETS[config.model.name]
    num_labels = len(config.data.labels)
    self.model = torchvision.models.DenseNet(
      growth_rate=preset['growth_rate'],
      block_config=tuple(preset['block_sizes']),
      num_init_features=preset['num_init_features'],
      bn_size=preset['bn_size'],
      num_classes=num_labels,
      memory_efficient=bool(config.model.remat),
    ).to(self.device)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = self.model.to(memory_format=self.memory_format)
    self.model_name = f'torchvision.models.DenseNet({config.model.name})'
    self.num_params = sum(p.numel() for p in self.model.parameters())

    batch = config.train.global_batch_size
    rng = np.random.default_rng([config.train.seed, size])
    images = rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8)
    labels = (rng.random((batch, num_labels)) < _LABEL_RATE).astype(np.float32)
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
    self.labels = torch.from_numpy(labels).to(self.device)
    self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
    self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
    self.autocast_dtype = torch.bfloat16 if config.model.dtype == 'bfloat16' else None
    self.loss_fn = torch.nn.BCEWithLogitsLoss()
    self.optimizer = _optimizer(torch, config.optim, self.model.parameters(), fused=use_cuda)
    self.flops_per_image = self._forward_flops(size) * (3 if what == 'train' else 1)
    self.loss = None
    if what == 'train':
      self.model.train()
    else:
      self.model.eval()

  def _forward_flops(self, size: int) -> int:
    """FLOPs of one image's forward pass (inference mode), by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros((1, 3, size, size), device=self.device).contiguous(
      memory_format=self.memory_format
    )
    self.model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      self.model(image)
    return int(counter.get_total_flops())

  def device_memory(self) -> dict[str, int | None]:
    """`device_*` memory figures of the benchmark's records: torch's CUDA allocator (None on the CPU)."""
    import torch

    if self.device.type != 'cuda':
      return {
        'device_peak_bytes_in_use': None,
        'device_bytes_in_use': None,
        'device_bytes_limit': None,
      }
    return {
      'device_peak_bytes_in_use': int(torch.cuda.max_memory_allocated()),
      'device_bytes_in_use': int(torch.cuda.memory_allocated()),
      'device_bytes_limit': int(torch.cuda.get_device_properties(0).total_memory),
    }

  def _inputs(self) -> Any:
    x = self.images.float().div(255.0).expand(-1, 3, -1, -1)
    x = (x - self.mean) / self.std
    return x.contiguous(memory_format=self.memory_format)

  def _step(self) -> None:
    import torch

    autocast = torch.autocast(
      self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
    )
    if self.what == 'train':
      self.optimizer.zero_grad(set_to_none=True)
      with autocast:
        logits = self.model(self._inputs())
      loss = self.loss_fn(logits.float(), self.labels)
      loss.backward()
      self.optimizer.step()
      self.loss = loss.detach()
    else:
      with torch.inference_mode(), autocast:
        self.model(self._inputs())

  def run(self, steps: int) -> float:
    """Runs `steps` steps and waits for the device; returns the seconds."""
    import torch

    start = time.perf_counter()
    for _ in range(steps):
      self._step()
    if self.device.type == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start

  def last_loss(self) -> float | None:
    return None if self.loss is None else float(self.loss)


def _optimizer(torch: Any, optim: ml_collections.ConfigDict, params: Any, *, fused: bool) -> Any:
  """The configured optimizer at its base learning rate (a schedule changes the values, not the cost); `fused`:
  Adam's and AdamW's one-kernel CUDA implementation."""
  lr = optim.learning_rate
  kwargs = {'fused': True} if fused else {}
  if optim.name == 'adamw':
    return torch.optim.AdamW(
      params, lr=lr, betas=(optim.b1, optim.b2), weight_decay=optim.weight_decay, **kwargs
    )
  if optim.name == 'sgd':
    return torch.optim.SGD(
      params,
      lr=lr,
      momentum=optim.momentum,
      nesterov=optim.nesterov,
      weight_decay=optim.weight_decay,
    )
  # adam: classic L2 added to the gradient, as the project's adam.
  return torch.optim.Adam(
    params, lr=lr, betas=(optim.b1, optim.b2), weight_decay=optim.weight_decay, **kwargs
  )
