"""torchvision DenseNet -> Flax conversion, checked against PyTorch's own logits.

fixtures/densenet_tiny_torch.npz holds a torchvision-layout densenet_tiny (random weights and BatchNorm statistics),
two uint8 images and the logits PyTorch computed for them in eval mode (fixtures/make_densenet_fixture.py wrote it).
"""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from ms_cxr import models
from ms_cxr.models import convert

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'densenet_tiny_torch.npz'
NUM_CLASSES = 3  # the fixture's classifier
SIZE = 64  # the fixture's images


@pytest.fixture(scope='module')
def torch_reference():
  """(state dict, uint8 images [2, 64, 64, 1], torch logits [2, 3])."""
  with np.load(FIXTURE) as arrays:
    state_dict = {key: arrays[key] for key in arrays.files}
  return state_dict, state_dict.pop('images'), state_dict.pop('logits')


@functools.cache
def _model(norm, num_classes, sizes):
  """(jitted eval-mode apply, variable shapes) of densenet_tiny built as the config's `model` section says."""
  config = ml_collections.ConfigDict(
    dict(
      name='densenet_tiny',
      dtype='float32',
      bn_momentum=0.9,
      bn_epsilon=1e-5,
      norm=norm,
      remat=False,
    )
  )
  model = models.create_model(config, num_classes, sizes)
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  return jax.jit(functools.partial(model.apply, train=False, size_px=SIZE)), shapes


def _init(norm='batchnorm', num_classes=NUM_CLASSES, sizes=(SIZE,)):
  """(apply, variables): random stand-ins for `model.init`'s values, which the conversion only replaces.

  Compiling the real initialisers would take longer than this whole file; only the tree and shapes matter here.
  """
  apply, shapes = _model(norm, num_classes, tuple(sizes))
  rng = np.random.default_rng(0)
  # Positive everywhere, so the stand-in BatchNorm variances are valid too.
  return apply, jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)


def test_converted_model_gives_the_torch_logits(torch_reference):
  state_dict, images, torch_logits = torch_reference
  apply, variables = _init()
  converted = convert.torchvision_to_flax(state_dict, variables)
  logits = np.asarray(apply(converted, images))
  assert np.max(np.abs(logits - torch_logits)) <= 1e-4
  # Not by chance: the initial weights give other logits.
  assert np.max(np.abs(apply(variables, images) - torch_logits)) > 1.0


def test_every_ssbn_branch_gets_the_torch_batchnorm(torch_reference, tmp_path):
  state_dict, images, torch_logits = torch_reference
  apply, variables = _init('ssbn', sizes=(SIZE, 2 * SIZE))
  np.savez(tmp_path / 'weights.npz', **state_dict)
  converted, summary = convert.init_from_torchvision(str(tmp_path / 'weights.npz'), variables)
  logits = np.asarray(apply(converted, images))
  assert np.max(np.abs(logits - torch_logits)) <= 1e-4

  params, stats = converted['params'], converted['batch_stats']
  layer = 'denseblock3_denselayer1'
  for size in (SIZE, 2 * SIZE):
    branch = f'ssbn_{size}'
    np.testing.assert_array_equal(
      params['norm0'][branch]['scale'], state_dict['features.norm0.weight']
    )
    np.testing.assert_array_equal(
      stats['transition2_norm'][branch]['var'], state_dict['features.transition2.norm.running_var']
    )
    np.testing.assert_array_equal(
      stats[layer]['norm2'][branch]['mean'],
      state_dict[f'features.{layer.replace("_", ".")}.norm2.running_mean'],
    )
  # Both branches of every norm hold the same values, each in its own buffer (the train step donates them).
  flat = traverse_util.flatten_dict(converted)
  small, large = f'ssbn_{SIZE}', f'ssbn_{2 * SIZE}'
  branch_leaves = [path for path in flat if small in path]
  assert branch_leaves
  for path in branch_leaves:
    twin = flat[tuple(large if key == small else key for key in path)]
    np.testing.assert_array_equal(flat[path], twin)
    assert flat[path].unsafe_buffer_pointer() != twin.unsafe_buffer_pointer()
  # Each BatchNorm tensor fills two leaves.
  assert summary['leaves_copied'] == summary['tensors_copied'] + len(branch_leaves)


def test_classifier_for_other_labels_keeps_its_init(torch_reference, tmp_path):
  state_dict, _, _ = torch_reference
  _, variables = _init(num_classes=5)
  np.savez(tmp_path / 'weights.npz', **state_dict)
  converted, summary = convert.init_from_torchvision(str(tmp_path / 'weights.npz'), variables)
  np.testing.assert_array_equal(
    converted['params']['classifier']['kernel'], variables['params']['classifier']['kernel']
  )
  np.testing.assert_array_equal(
    converted['params']['conv0']['kernel'],
    state_dict['features.conv0.weight'].transpose(2, 3, 1, 0),
  )
  counters = [key for key in state_dict if key.endswith('num_batches_tracked')]
  assert summary == {
    'tensors_copied': len(state_dict) - len(counters) - 2,
    'leaves_copied': len(state_dict) - len(counters) - 2,
    'classifier_copied': False,
  }


def test_missing_extra_and_misshapen_keys_are_errors(torch_reference):
  state_dict, _, _ = torch_reference
  _, variables = _init()
  missing = dict(state_dict)
  del missing['features.denseblock2.denselayer1.conv2.weight']
  with pytest.raises(
    ValueError, match=r'weights\.pth .*1 missing keys: .*denselayer1\.conv2\.weight'
  ):
    convert.torchvision_to_flax(missing, variables, source='weights.pth')

  extra = dict(state_dict, **{'features.denseblock4.denselayer2.norm1.weight': np.ones(48)})
  with pytest.raises(ValueError, match=r'1 unused keys: features\.denseblock4\.denselayer2'):
    convert.torchvision_to_flax(extra, variables)

  misshapen = dict(state_dict, **{'features.conv0.weight': np.ones((32, 3, 7, 7), np.float32)})
  with pytest.raises(
    ValueError, match=re.escape('conv0.weight expected (16, 3, 7, 7) found (32, 3, 7, 7)')
  ):
    convert.torchvision_to_flax(misshapen, variables)


def test_old_style_and_dataparallel_keys_load(torch_reference, tmp_path):
  state_dict, _, _ = torch_reference
  # torchvision's model-zoo files predate 'norm1': they say 'norm.1' (and have no num_batches_tracked).
  old = {
    'module.' + re.sub(r'(denselayer\d+\.(?:norm|relu|conv))([12])\.', r'\1.\2.', key): value
    for key, value in state_dict.items()
    if not key.endswith('num_batches_tracked')
  }
  assert 'module.features.denseblock1.denselayer1.norm.1.weight' in old
  np.savez(tmp_path / 'old.npz', **old)
  loaded = convert.load_state_dict(str(tmp_path / 'old.npz'))
  assert loaded.keys() == {k for k in state_dict if not k.endswith('num_batches_tracked')}
  for key, value in loaded.items():
    np.testing.assert_array_equal(value, state_dict[key])


def test_init_from_npz_round_trips(torch_reference, tmp_path):
  state_dict, images, torch_logits = torch_reference
  np.savez(tmp_path / 'weights.npz', **state_dict)
  loaded = convert.load_state_dict(str(tmp_path / 'weights.npz'))
  assert loaded.keys() == state_dict.keys()
  apply, variables = _init()
  converted, summary = convert.init_from_torchvision(str(tmp_path / 'weights.npz'), variables)
  assert summary['classifier_copied']
  logits = np.asarray(apply(converted, images))
  assert np.max(np.abs(logits - torch_logits)) <= 1e-4


def test_unknown_or_unreadable_files_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r'weights\.h5: unknown state dict format'):
    convert.load_state_dict(str(tmp_path / 'weights.h5'))
  (tmp_path / 'broken.npz').write_bytes(b'not a zip file')
  with pytest.raises(ValueError, match=r'broken\.npz: cannot read'):
    convert.load_state_dict(str(tmp_path / 'broken.npz'))


def test_safetensors_round_trips(torch_reference, tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  state_dict, _, _ = torch_reference
  safetensors_numpy.save_file(state_dict, str(tmp_path / 'weights.safetensors'))
  loaded = convert.load_state_dict(str(tmp_path / 'weights.safetensors'))
  assert loaded.keys() == state_dict.keys()
  for key, value in loaded.items():
    np.testing.assert_array_equal(value, state_dict[key])


def test_torch_pth_round_trips(torch_reference, tmp_path):
  torch = pytest.importorskip('torch')
  state_dict, _, _ = torch_reference
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'weights.pth')
  loaded = convert.load_state_dict(str(tmp_path / 'weights.pth'))
  assert loaded.keys() == state_dict.keys()
  for key, value in loaded.items():
    np.testing.assert_array_equal(value, state_dict[key])


def test_msanet_backbone_starts_from_torchvision_and_its_heads_keep_their_init(
  torch_reference, tmp_path
):
  """MS-ANet's DenseNet backbone takes the torchvision weights; its CAM classifiers and fusion weights, which
  torchvision's DenseNet does not have, keep their initialisation instead of making the file not fit."""
  from configs import msanet as msanet_config

  state_dict, _, _ = torch_reference
  config = msanet_config.get_config('smoke')
  config.model.name = 'msanet_tiny'
  model = models.create_model(config.model, NUM_CLASSES, (SIZE,))
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)
  np.savez(tmp_path / 'weights.npz', **state_dict)
  converted, summary = convert.init_from_torchvision(str(tmp_path / 'weights.npz'), variables)

  before, after = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(converted)
  heads = [p for p in before if re.match(r'(classifier_block|fusion_block)\d+$', p[1])]
  assert {p[1] for p in heads} == {
    'classifier_block2',
    'classifier_block3',
    'classifier_block4',
    'fusion_block2',
    'fusion_block3',
  }
  for path in heads + [('params', 'classifier', 'kernel')]:
    np.testing.assert_array_equal(after[path], before[path])
  np.testing.assert_array_equal(
    after[('params', 'conv0', 'kernel')], state_dict['features.conv0.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    after[('batch_stats', 'norm5', 'mean')], state_dict['features.norm5.running_mean']
  )
  assert summary['classifier_copied'] is False


def test_an_msanet_whose_scales_end_early_takes_the_blocks_it_has(
  torch_reference, tmp_path, caplog
):
  """scales=(1, 2): no block 3 or 4, no norm5. The file's deeper layers are left out and logged, the blocks the
  model has are copied; a file missing a block the model has is still an error."""
  import logging

  from configs import msanet as msanet_config

  state_dict, _, _ = torch_reference
  config = msanet_config.get_config('smoke')
  config.model.name = 'msanet_tiny'
  config.model.msanet.scales = (1, 2)
  model = models.create_model(config.model, NUM_CLASSES, (SIZE,))
  images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), jnp.uint8)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  assert not any(
    name.startswith(('denseblock3', 'denseblock4', 'norm5')) for name in shapes['params']
  )
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), shapes)
  np.savez(tmp_path / 'weights.npz', **state_dict)
  with caplog.at_level(logging.INFO):
    converted, _ = convert.init_from_torchvision(str(tmp_path / 'weights.npz'), variables)
  after = traverse_util.flatten_dict(converted)
  np.testing.assert_array_equal(
    after[('batch_stats', 'transition2_norm', 'mean')],
    state_dict['features.transition2.norm.running_mean'],
  )
  assert 'the model ends at dense block 2' in caplog.text and 'features.denseblock3' in caplog.text

  del state_dict['features.denseblock2.denselayer1.conv1.weight']
  np.savez(tmp_path / 'short.npz', **state_dict)
  with pytest.raises(
    ValueError, match='1 missing keys: features.denseblock2.denselayer1.conv1.weight'
  ):
    convert.init_from_torchvision(str(tmp_path / 'short.npz'), variables)
