"""ImageNet initialisation: torchvision DenseNet weights into the Flax DenseNet.

The ImageNet weights are torchvision's model-zoo files, downloaded by the user (nothing here fetches anything), e.g.
https://download.pytorch.org/models/densenet121-a639ec97.pth for DenseNet-121, or the same state dict saved as
.safetensors or .npz. `config.model.init_from` takes the file's path.

The Flax DenseNet (ms_cxr.models.densenet) keeps torchvision's names, so the mapping is one to one:

  Flax variable                                    torchvision state dict key
  params/conv0/kernel                              features.conv0.weight
  params/norm0/{scale,bias}                        features.norm0.{weight,bias}
  batch_stats/norm0/{mean,var}                     features.norm0.{running_mean,running_var}
  params/denseblock1_denselayer2/conv1/kernel      features.denseblock1.denselayer2.conv1.weight
  params/transition1_norm/scale                    features.transition1.norm.weight
  params/classifier/{kernel,bias}                  classifier.{weight,bias}

Convolution kernels go from OIHW to HWIO and the Linear weight [out, in] to a Dense kernel [in, out]. The
`num_batches_tracked` counters have no Flax counterpart and are ignored. With size-specific BatchNorm every
`ssbn_<size>` branch (e.g. params/norm0/ssbn_224/scale) starts from the same torchvision BatchNorm. The classifier
is copied only when its shape matches: ImageNet's 1000 classes against the model's labels leave it at its fresh
initialisation, as do MS-ANet's heads (`classifier_block<b>`, `fusion_block<b>`), which torchvision's DenseNet
does not have: its DenseNet backbone starts from the file like DenseNet's. Anything else that does not fit
(another architecture, a missing or unknown key) is an error.

The model normalises its inputs with ImageNet's mean and std, as torchvision's weights expect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

PyTree = Any

# torchvision's DenseNet loader renames keys of its older checkpoints (the model-zoo files among them):
# 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
_OLD_KEY = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$'
)
_SSBN_BRANCH = re.compile(r'^ssbn_\d+$')
# Heads of models built on the DenseNet backbone that torchvision's DenseNet does not have (MS-ANet's per-block
# CAM classifiers and fusion weights): kept at their initialisation, as the classifier is for other labels.
_OWN_HEAD = re.compile(r'^(?:classifier_block|fusion_block)\d+$')
# Flax flattens torchvision's nesting into one module name: denseblock1_denselayer2, transition1_norm.
_FLAT_MODULE = re.compile(r'^((?:denseblock|transition)\d+)_')
_LEAF_NAMES = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
_SHOWN = 5  # keys listed per kind of problem in an error message


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision DenseNet state dict as numpy arrays.

  Args:
    path: a .safetensors file (needs the `safetensors` package), a .pth/.pt file written by `torch.save` (needs
      torch; loaded with `weights_only=True`) or a .npz of arrays keyed like the state dict.

  Returns:
    {state dict key: array}, with a DataParallel 'module.' prefix removed and torchvision's old key style
    ('denselayer1.norm.1.weight') renamed to the current one ('denselayer1.norm1.weight').

  Raises:
    ValueError: naming the file, for an unknown extension, a missing reader package, a file that cannot be read,
      or contents that are not a flat mapping of names to tensors.
  """
  suffix = os.path.splitext(path)[1].lower()
  readers = {
    '.safetensors': _read_safetensors,
    '.pth': _read_torch,
    '.pt': _read_torch,
    '.npz': _read_npz,
  }
  if suffix not in readers:
    raise ValueError(
      f'{path}: unknown state dict format {suffix!r}; expected one of {tuple(readers)}'
    )
  try:
    raw = readers[suffix](path)
  except ModuleNotFoundError as e:
    raise ValueError(
      f'{path}: reading {suffix} files needs the {e.name!r} package (pip install {e.name}); '
      'or save the state dict as .npz'
    ) from e
  except Exception as e:  # numpy, torch and safetensors each raise their own types for a bad file
    raise ValueError(
      f'{path}: cannot read it as a {suffix} state dict ({type(e).__name__}: {e})'
    ) from e
  if not isinstance(raw, Mapping) or not all(isinstance(v, np.ndarray) for v in raw.values()):
    found = list(raw)[:_SHOWN] if isinstance(raw, Mapping) else type(raw).__name__
    raise ValueError(
      f'{path}: not a state dict (a flat mapping of names to tensors); found {found}'
    )

  state_dict = {}
  for key, value in raw.items():
    key = key.removeprefix('module.')
    match = _OLD_KEY.match(key)
    if match:
      key = match.group(1) + match.group(2)
    if key in state_dict:
      raise ValueError(f'{path}: {key!r} appears twice (once in the old or DataParallel key style)')
    state_dict[key] = value
  return state_dict


def torchvision_to_flax(
  state_dict: Mapping[str, np.ndarray], variables: PyTree, *, source: str = 'the state dict'
) -> PyTree:
  """Copies torchvision DenseNet weights into Flax DenseNet variables.

  Args:
    state_dict: torchvision key -> array, as `load_state_dict` returns it.
    variables: the Flax model's {'params': ..., 'batch_stats': ...} (e.g. from `model.init`); not modified.
    source: how error messages name the state dict (its file).

  Returns:
    A copy of `variables` with every backbone leaf taken from `state_dict`, and the classifier too when its
    shape matches (otherwise it keeps its value in `variables`, which is logged).

  Raises:
    ValueError: when the state dict does not fit the model: listing the first missing keys, unused keys,
      shape mismatches (expected against found, in torch layout) and model variables with no torchvision name.
  """
  return _convert(state_dict, variables, source)[0]


def init_from_torchvision(path: str, variables: PyTree) -> tuple[PyTree, dict[str, Any]]:
  """Loads a torchvision DenseNet file and converts it (`load_state_dict` then `torchvision_to_flax`).

  Args:
    path: the state dict file (.safetensors, .pth/.pt or .npz).
    variables: the Flax model's freshly initialised {'params': ..., 'batch_stats': ...}.

  Returns:
    (the new variables, a summary: 'tensors_copied' (torch tensors used), 'leaves_copied' (Flax leaves written;
    more than the tensors with SSBN) and 'classifier_copied' (False: the classifier kept its initialisation)).

  Raises:
    ValueError: naming the file, when it cannot be read or does not fit the model.
  """
  return _convert(load_state_dict(path), variables, path)


def _torch_key(path: tuple[str, ...]) -> str | None:
  """The state dict key of a flattened Flax variable path, or None when it has none."""
  collection, *modules, leaf = path
  name = _LEAF_NAMES.get((collection, leaf))
  # Every SSBN branch of a norm maps to the same torchvision BatchNorm.
  modules = [m for m in modules if not _SSBN_BRANCH.match(m)]
  if name is None or not modules:
    return None
  module = '.'.join([_FLAT_MODULE.sub(r'\1.', modules[0]), *modules[1:]])
  return f'{module}.{name}' if module == 'classifier' else f'features.{module}.{name}'


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that converts to `flax_shape`: OIHW for an HWIO kernel, [out, in] for [in, out]."""
  if len(flax_shape) == 4:
    height, width, fan_in, fan_out = flax_shape
    return (fan_out, fan_in, height, width)
  return tuple(reversed(flax_shape)) if len(flax_shape) == 2 else tuple(flax_shape)


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def _listing(items: list[str]) -> str:
  more = f', ... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else ''
  return ', '.join(items[:_SHOWN]) + more


def _deepest_block(names: Iterable[str]) -> int:
  """The largest N of the `denseblockN...` names (0 without any)."""
  numbers = [int(m[1]) for m in map(_DENSE_BLOCK.match, names) if m]
  return max(numbers, default=0)


_DENSE_BLOCK = re.compile(r'denseblock(\d+)')
_FILE_BLOCK = re.compile(r'(?:module\.)?features\.denseblock(\d+)\.')
_FILE_TRANSITION = re.compile(r'(?:module\.)?features\.transition(\d+)\.(\w+)')
_FILE_TAIL = re.compile(r'(?:module\.)?(?:features\.norm5\.|classifier\.)')


def _beyond_backbone(flat: Mapping[tuple[str, ...], Any], state_dict: Mapping[str, Any]) -> Any:
  """A predicate on the file's keys: whether a key belongs to a layer after the model's last dense block (the
  deeper blocks and transitions, the convolution of the last block's transition, norm5 and the classifier); never true
  when the model has every block the file has."""
  deepest = _deepest_block(path[1] for path in flat)
  in_file = max((int(m[1]) for m in map(_FILE_BLOCK.match, state_dict) if m), default=0)
  if not deepest or deepest >= in_file:
    return lambda key: False

  def beyond(key: str) -> bool:
    block, transition = _FILE_BLOCK.match(key), _FILE_TRANSITION.match(key)
    # The last block's transition: its norm gives the block's output, its convolution is not used.
    last = transition and int(transition[1]) == deepest and transition[2] == 'conv'
    return bool(
      (block and int(block[1]) > deepest)
      or (transition and int(transition[1]) > deepest)
      or last
      or _FILE_TAIL.match(key)
    )

  return beyond


def _convert(
  state_dict: Mapping[str, np.ndarray], variables: PyTree, source: str
) -> tuple[PyTree, dict[str, Any]]:
  """`torchvision_to_flax`, plus the summary `init_from_torchvision` returns."""
  flat = traverse_util.flatten_dict(variables)
  own_heads = {path for path in flat if any(_OWN_HEAD.match(name) for name in path[1:])}
  keys = {path: _torch_key(path) for path in flat if path not in own_heads}

  def fits(path):
    key = keys[path]
    return key in state_dict and np.shape(state_dict[key]) == _torch_shape(flat[path].shape)

  classifier = {path for path, key in keys.items() if key and key.startswith('classifier.')}
  copy_classifier = bool(classifier) and all(fits(path) for path in classifier)

  new, used, missing, mismatched = dict(flat), set(), {}, {}
  leaves_copied = 0
  for path, key in keys.items():
    if key is None or (path in classifier and not copy_classifier):
      continue
    if key not in state_dict:
      # A dict, not a set: SSBN branches repeat keys, and the listing keeps the model's order.
      missing[key] = None
    elif not fits(path):
      mismatched[key] = (_torch_shape(flat[path].shape), np.shape(state_dict[key]))
    else:
      # A fresh buffer per leaf, even where SSBN branches share a tensor: leaves sharing a buffer would be
      # freed twice when the train step donates the state.
      new[path] = jnp.array(_to_flax_layout(np.asarray(state_dict[key])), dtype=flat[path].dtype)
      used.add(key)
      leaves_copied += 1

  unused = [
    key
    for key in state_dict
    if key not in used
    and key not in mismatched
    and not key.endswith('.num_batches_tracked')
    and (copy_classifier or not key.startswith('classifier.'))
  ]
  # A backbone that ends before the file's last dense block (MS-ANet with `scales` ending early) has no use for
  # the deeper layers: they are left out, and logged, rather than a misfit.
  beyond = _beyond_backbone(flat, state_dict)
  deeper = [key for key in unused if beyond(key)]
  unused = [key for key in unused if not beyond(key)]
  unmapped = ['/'.join(path) for path, key in keys.items() if key is None]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing keys: {_listing(list(missing))}')
  if unused:
    problems.append(f'{len(unused)} unused keys: {_listing(unused)}')
  if mismatched:
    shapes = [f'{k} expected {want} found {got}' for k, (want, got) in mismatched.items()]
    problems.append(f'{len(mismatched)} shape mismatches: {_listing(shapes)}')
  if unmapped:
    problems.append(
      f'{len(unmapped)} model variables with no torchvision name: {_listing(unmapped)}'
    )
  if problems:
    raise ValueError(
      f'{source} does not fit the model ({"; ".join(problems)}); '
      'expected a torchvision DenseNet state dict of the same architecture'
    )

  if deeper:
    logging.info(
      '%s: the model ends at dense block %d; %d entries of deeper layers in the file not used: %s',
      source,
      _deepest_block(path[1] for path in flat),
      len(deeper),
      _listing(deeper),
    )
  if own_heads:
    logging.info(
      '%s: %d variables of heads torchvision does not have kept at their initialisation: %s',
      source,
      len(own_heads),
      _listing(['/'.join(path) for path in sorted(own_heads)]),
    )
  if classifier and not copy_classifier:
    wanted = next(_torch_shape(flat[p].shape) for p in classifier if p[-1] == 'kernel')
    found = (
      np.shape(state_dict['classifier.weight']) if 'classifier.weight' in state_dict else 'none'
    )
    logging.info(
      '%s: classifier kept at its initialisation (classifier.weight: %s in the file, %s in the model)',
      source,
      found,
      wanted,
    )
  summary = {
    'tensors_copied': len(used),
    'leaves_copied': leaves_copied,
    'classifier_copied': copy_classifier,
  }
  return traverse_util.unflatten_dict(new), summary


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return load_file(path)


def _read_torch(path: str) -> Any:
  import torch

  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state_dict, Mapping):
    return state_dict

  def to_numpy(value):
    if not isinstance(value, torch.Tensor):
      return value
    # numpy has no bfloat16; float32 holds it exactly.
    return (value.float() if value.dtype == torch.bfloat16 else value).detach().numpy()

  return {key: to_numpy(value) for key, value in state_dict.items()}


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as arrays:
    return {key: arrays[key] for key in arrays.files}
