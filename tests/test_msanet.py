"""MS-ANet: shapes per scale, CAM/stop-gradient contract, imbalance and focal losses, transforms, consistency."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms_cxr import attention_losses as al
from ms_cxr import losses
from ms_cxr.models import densenet, msanet, ssbn

K = 3


def _images(size, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (batch, size, size, 1)), jnp.uint8)


def _tiny(**kwargs):
  return msanet.MSANet(num_classes=K, **msanet.PRESETS['msanet_tiny'], **kwargs)


# Compiled whole: op-by-op dispatch of even the tiny network takes longer than compiling it once.
def _init(model, images):
  """(eval-mode outputs for `images`, variables)."""
  init = functools.partial(model.init_with_output, train=False)
  return jax.jit(init)(jax.random.key(0), images)


def _apply(model, variables, images, train=False):
  if train:
    return jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, images
    )
  return jax.jit(functools.partial(model.apply, train=False))(variables, images)


@pytest.fixture(scope='module')
def tiny():
  """(model, variables, eval-mode outputs on `_images(64)`)."""
  model = _tiny()
  out, variables = _init(model, _images(64))
  return model, variables, out


def _check_outputs(out, size, batch=2):
  # Tiny backbone: stem /4, then each transition halves: blocks 2, 3, 4 at size/8, /16, /32.
  grids = [size // 8, size // 16, size // 32]
  assert out['logits'].shape == (batch, K)
  assert [s.shape for s in out['scale_logits']] == [(batch, K)] * 3
  assert [c.shape for c in out['cams']] == [(batch, g, g, K) for g in grids]
  assert out['fused_cam'].shape == (batch, grids[0], grids[0], K)
  assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}


def test_outputs_per_scale_with_batchnorm_in_train_and_eval(tiny):
  model, variables, out = tiny
  _check_outputs(out, 64)
  out, state = _apply(model, variables, _images(64), train=True)
  _check_outputs(out, 64)
  assert jax.tree.structure(state['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_ssbn_backbone_runs_at_two_sizes():
  model = _tiny(norm=functools.partial(ssbn.SSBN, sizes=(64, 96)))
  out, variables = _init(model, _images(64))
  assert set(variables['params']['norm0']) == {'ssbn_64', 'ssbn_96'}
  _check_outputs(out, 64)
  # The other size's program is only traced: compiling a second one would double this test's time.
  apply = functools.partial(model.apply, train=False)
  _check_outputs(jax.eval_shape(apply, variables, _images(96)), 96)


def test_bfloat16_compute_gives_float32_outputs_close_to_float32(tiny):
  _, variables, reference = tiny
  out = _apply(_tiny(dtype=jnp.bfloat16), variables, _images(64))
  _check_outputs(out, 64)
  np.testing.assert_allclose(out['logits'], reference['logits'], atol=0.1)


def test_scale_logits_are_pooled_cams_and_fusion_starts_as_an_equal_mix(tiny):
  _, variables, out = tiny
  params = variables['params']
  for block, cam, logits in zip((2, 3, 4), out['cams'], out['scale_logits'], strict=True):
    bias = params[f'classifier_block{block}']['bias']
    np.testing.assert_allclose(logits, cam.mean(axis=(1, 2)) + bias, rtol=1e-5, atol=1e-6)
  # Mixing logits start at 0: every coarse-to-fine step is a 50/50 average.
  up = lambda m, g: jax.image.resize(m, (2, g, g, K), method='bilinear')
  cams = out['cams']
  expected = 0.5 * cams[0] + 0.5 * up(0.5 * cams[1] + 0.5 * up(cams[2], 4), 8)
  np.testing.assert_allclose(out['fused_cam'], expected, rtol=1e-5, atol=1e-6)


def _shapes(tree):
  return {
    jax.tree_util.keystr(path): x.shape for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_backbone_variables_have_densenet_paths_and_shapes():
  images = _images(64)
  mine, reference = (
    _shapes(jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images))
    for model in (_tiny(), densenet.DenseNet(num_classes=K, **densenet.PRESETS['densenet_tiny']))
  )
  # So DenseNet checkpoints (and ImageNet weights through them) load into the backbone one to one.
  backbone = {path: shape for path, shape in reference.items() if "['classifier']" not in path}
  assert backbone.items() <= mine.items()
  heads = {path for path in mine if path not in backbone}
  assert heads == {
    f"['params']['{name}']{leaf}"
    for name in ('classifier', 'classifier_block2', 'classifier_block3', 'classifier_block4')
    for leaf in ("['bias']", "['kernel']")
  } | {"['params']['fusion_block2']", "['params']['fusion_block3']"}


def test_attention_options_and_single_scale():
  images = _images(64)
  for kwargs in (
    dict(fusion='mean', attention_gate='softmax'),
    dict(attention_pooling='none'),
    dict(scales=(4,)),
  ):
    model = _tiny(**kwargs)
    # Shapes only: these paths need tracing, not running.
    out = jax.eval_shape(
      lambda m=model: m.apply(m.init(jax.random.key(0), images, train=False), images, train=False)
    )
    assert out['logits'].shape == (2, K)
    assert out['fused_cam'].shape == out['cams'][0].shape
  with pytest.raises(ValueError, match='scales'):
    jax.eval_shape(lambda: _tiny(scales=(3, 2)).init(jax.random.key(0), images, train=False))


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_consistency_loss_trains_the_backbone_but_no_cam_generator(tiny):
  model, variables, _ = tiny
  images = _images(64)
  params = {'scale': jnp.array([1.25, 1.5])}
  labels = jnp.array([[1.0, 0.0, jnp.nan], [0.0, 1.0, 1.0]])

  def loss_terms(params_):
    # Original and transformed images in one batch (one forward program to compile).
    batch = jnp.concatenate([images, al.transform_images(images, 'rescale', params)])
    out, _ = model.apply(
      {**variables, 'params': params_}, batch, train=True, mutable=['batch_stats']
    )
    consistency = 0.0
    for maps in (*out['cams'], out['fused_cam']):
      total, count = al.attention_consistency_sum(
        maps[2:], al.transform_maps(maps[:2], 'rescale', params)
      )
      consistency += total / count
    classification, count = losses.masked_bce_sum(out['logits'][:2], labels)
    for scale_logits in out['scale_logits']:
      classification += losses.masked_bce_sum(scale_logits[:2], labels)[0]
    return consistency, classification / count

  # Gradients of both terms from one forward pass.
  consistency_grads, classification_grads = jax.jit(jax.jacrev(loss_terms))(variables['params'])
  assert _norm(consistency_grads['conv0']) > 0
  assert _norm(consistency_grads['denseblock1_denselayer1']) > 0
  assert _norm(consistency_grads['fusion_block2']) > 0
  heads = ('classifier_block2', 'classifier_block3', 'classifier_block4', 'classifier')
  for head in heads:
    assert _norm(consistency_grads[head]) == 0.0, head
    # The classification losses do train them: the logits use the kernels unstopped.
    assert _norm(classification_grads[head]['kernel']) > 0, head


def test_densenet121_backbone_parameter_count():
  model = msanet.MSANet(num_classes=14, **msanet.PRESETS['msanet_densenet121'])
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 1), jnp.uint8), train=False)
  )
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  # DenseNet-121 without its classifier (6,968,206 - 14,350) + CAM heads on 512/1024/1024 channels
  # + the final classifier on the 512-channel finest features + 2 x (2 x 14) fusion logits.
  assert count(variables['params']) == 6_953_856 + 7_182 + 14_350 + 14_350 + 7_182 + 56 == 6_996_976
  assert count(variables['batch_stats']) == 83_648


# Losses.


def test_positive_rates_ignore_unknown_and_weights_follow_exp():
  labels = np.array([[1, 0, np.nan], [0, 0, np.nan], [1, np.nan, np.nan], [np.nan, 1, np.nan]])
  p = al.positive_rates(labels)
  np.testing.assert_allclose(p[:2], [2 / 3, 1 / 3])
  assert np.isnan(p[2])
  w_pos, w_neg = al.imbalance_weights(p)
  np.testing.assert_allclose(w_pos, [np.exp(1 / 3), np.exp(2 / 3), 1.0], rtol=1e-6)
  np.testing.assert_allclose(w_neg, [np.exp(2 / 3), np.exp(1 / 3), 1.0], rtol=1e-6)


def test_weighted_bce_matches_hand_computation():
  logits = jnp.array([[0.0, 2.0], [1.0, -1.0]])
  labels = jnp.array([[1.0, 0.0], [np.nan, 1.0]])
  w_pos, w_neg = jnp.array([2.0, 3.0]), jnp.array([0.5, 4.0])
  total, count = al.weighted_bce_sum(logits, labels, w_pos, w_neg)
  # [0,0]: positive, w_pos 2: 2 * log(1 + e^0) = 2 log 2
  # [0,1]: negative, w_neg 4: 4 * log(1 + e^2)
  # [1,0]: unknown, masked
  # [1,1]: positive, w_pos 3: 3 * log(1 + e^1)
  expected = 2 * np.log(2) + 4 * np.log1p(np.exp(2)) + 3 * np.log1p(np.e)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert float(count) == 3.0
  # Unit weights give the masked BCE; a NaN never reaches the gradient.
  ones = jnp.ones(2)
  np.testing.assert_allclose(
    al.weighted_bce_sum(logits, labels, ones, ones)[0],
    losses.masked_bce_sum(logits, labels)[0],
    rtol=1e-6,
  )
  grad = jax.grad(lambda z: al.weighted_bce_sum(z, labels, w_pos, w_neg)[0])(logits)
  assert np.all(np.isfinite(grad)) and float(grad[1, 0]) == 0.0


def test_focal_reduces_to_bce_at_gamma_zero_and_down_weights_easy_entries():
  logits = jnp.array([[3.0, -0.5], [0.2, 4.0]])
  labels = jnp.array([[1.0, np.nan], [0.0, 0.0]])
  focal, count = al.focal_bce_sum(logits, labels, gamma=0.0)
  bce, bce_count = losses.masked_bce_sum(logits, labels)
  np.testing.assert_allclose(focal, bce, rtol=1e-6)
  assert float(count) == float(bce_count) == 3.0
  assert float(al.focal_bce_sum(logits, labels, gamma=2.0)[0]) < float(bce)


# Transforms.


# Compiled, as in a train step (and faster than op-by-op); parameters are traced, `cval` is static.
_transform_maps = jax.jit(al.transform_maps, static_argnums=1, static_argnames='cval')
_transform_images = jax.jit(al.transform_images, static_argnums=1, static_argnames='cval')


def _ramp(batch=2, size=8, channels=2):
  return jnp.arange(batch * size * size * channels, dtype=jnp.float32).reshape(
    batch, size, size, channels
  )


def test_identity_parameters_give_identity():
  maps = _ramp()
  identities = {
    'rescale': {'scale': 1.0},
    'translate': {'dx': 0.0, 'dy': 0.0},
    'rotate': {'angle': 0.0},
    'hflip': {'flip': False},
  }
  for transform, params in identities.items():
    np.testing.assert_array_equal(_transform_maps(maps, transform, params), maps)
  images = _images(16)
  np.testing.assert_array_equal(_transform_images(images, 'rescale', {'scale': 1.0}), images)


def test_hflip_mirrors_and_twice_is_identity():
  maps = _ramp()
  flip = {'flip': jnp.array([True, False])}
  once = _transform_maps(maps, 'hflip', flip)
  np.testing.assert_array_equal(once[0], maps[0, :, ::-1])
  np.testing.assert_array_equal(once[1], maps[1])
  np.testing.assert_array_equal(_transform_maps(once, 'hflip', flip), maps)


def test_whole_pixel_translation_moves_values_exactly_and_is_resolution_independent():
  maps = _ramp(batch=1)
  # dx = 2/8: two pixels right; dy = -1/8: one pixel up; the vacated border is cval.
  moved = _transform_maps(maps, 'translate', {'dx': 0.25, 'dy': -0.125}, cval=-1.0)
  np.testing.assert_array_equal(moved[0, :7, 2:], maps[0, 1:, :6])
  assert np.all(moved[0, :, :2] == -1.0) and np.all(moved[0, 7] == -1.0)
  # The same parameters on a 2x coarser map: pooling then translating = translating then pooling.
  pool = lambda m: (
    jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4
  )
  params = {'dx': 0.25, 'dy': 0.5}
  np.testing.assert_allclose(
    _transform_maps(pool(maps), 'translate', params),
    pool(_transform_maps(maps, 'translate', params)),
    rtol=1e-6,
  )


def test_rescale_and_rotate_move_content_as_documented():
  # A single bright pixel right of the centre of a 9x9 map (centre pixel 4, 4).
  spot = jnp.zeros((1, 9, 9, 1)).at[0, 4, 6, 0].set(1.0)
  zoomed = _transform_maps(spot, 'rescale', {'scale': 2.0})
  assert np.unravel_index(np.argmax(zoomed), zoomed.shape)[1:3] == (4, 8)
  turned = _transform_maps(spot, 'rotate', {'angle': np.pi / 2})
  # +x towards +y: the spot two pixels right of the centre ends two pixels below it.
  assert np.unravel_index(np.argmax(turned), turned.shape)[1:3] == (6, 4)
  np.testing.assert_allclose(float(turned.max()), 1.0, atol=1e-5)


def test_transform_images_keeps_uint8_and_is_jittable():
  images = _images(16)
  params = al.random_transform_params(jax.random.key(0), 'rescale', 2)
  assert bool(jnp.all((params['scale'] >= 1.0) & (params['scale'] <= 1.25)))
  out = _transform_images(images, 'rescale', params)
  assert out.dtype == jnp.uint8 and out.shape == images.shape
  with pytest.raises(ValueError, match='transform'):
    al.transform_maps(_ramp(), 'shear', {})


# Consistency.


def _pixelwise_cam(images):
  """A 'model' whose CAM is a pixel-wise (linear) function of the image: it commutes with every transform."""
  x = images.astype(jnp.float32) / 255.0
  return jnp.concatenate([2 * x, -x], axis=-1)


def _positional_cam(images):
  """A 'model' whose CAM depends on absolute position: it does not commute with translations."""
  width = images.shape[2]
  return _pixelwise_cam(images) * jnp.arange(width, dtype=jnp.float32)[:, None] / width


@pytest.mark.parametrize(
  'transform,params',
  [('hflip', {'flip': True}), ('translate', {'dx': 3 / 16, 'dy': -2 / 16})],
)
def test_consistency_is_zero_for_a_commuting_model_and_positive_otherwise(transform, params):
  images = _images(16)
  transformed = _transform_images(images, transform, params)
  for cam_fn, zero in ((_pixelwise_cam, True), (_positional_cam, False)):
    total, count = al.attention_consistency_sum(
      cam_fn(transformed), _transform_maps(cam_fn(images), transform, params)
    )
    assert float(count) == 2 * 16 * 16 * 2
    assert (float(total) == 0.0) == zero, cam_fn.__name__


def test_consistency_under_rescale_for_a_linear_model_and_masking():
  images = jnp.asarray(
    np.random.default_rng(3).random((2, 16, 16, 1)), jnp.float32
  )  # float: no rounding
  params = {'scale': jnp.array([1.5, 1.25])}
  total, _ = al.attention_consistency_sum(
    _pixelwise_cam(_transform_images(images, 'rescale', params)),
    _transform_maps(_pixelwise_cam(images), 'rescale', params),
  )
  assert float(total) < 1e-10
  # A label mask counts only the chosen maps; a coarser second map is resized to the finer grid.
  a, b = jnp.ones((2, 4, 4, 2)), jnp.zeros((2, 2, 2, 2))
  mask = jnp.array([[1.0, 0.0], [0.0, 0.0]])[:, None, None, :]
  total, count = al.attention_consistency_sum(a, b, mask)
  assert (float(total), float(count)) == (16.0, 16.0)


def test_cross_scale_consistency():
  fine = jnp.full((1, 4, 4, 2), 2.0)
  coarse = jnp.full((1, 2, 2, 2), 2.0)
  total, count = al.cross_scale_consistency_sum([fine, coarse, coarse + 1])
  # Pairs (fine, coarse) 0, (fine, coarse+1) and (coarse, coarse+1) 1 per entry; 3 pairs x 32 entries.
  assert (float(total), float(count)) == (64.0, 96.0)


def test_msanet_trains_through_the_data_parallel_step_with_consistency():
  """The configured MS-ANet step on 2 devices: finite loss, consistency adds to it, classifiers still train."""
  from conftest import compiled_train_step, new_train_state

  from configs import msanet as msanet_config
  from ms_cxr import parallel, train

  config = msanet_config.get_config('smoke')
  labels = len(config.data.labels)
  dp = parallel.DataParallel.create('shard_map', 2)
  state = new_train_state(config, labels, config.data.sizes)
  rng = np.random.default_rng(0)
  batch = {
    'image_32': rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8),
    'labels': (rng.random((4, labels)) < 0.3).astype(np.float32),
  }
  results = {}
  for weight in (0.0, 1.0):
    terms = train.AttentionTerms(scale_weight=0.5, consistency_weight=weight, transform='rescale')
    step = compiled_train_step(dp, attention=terms)
    new_state, metrics = step(dp.replicate(state), dp.shard_batch(batch))
    results[weight] = (float(metrics['loss']), jax.device_get(new_state.params))
  assert np.isfinite(results[0.0][0]) and np.isfinite(results[1.0][0])
  assert results[1.0][0] != results[0.0][0]
  before = jax.device_get(state.params)
  for name in ('classifier', 'classifier_block2', 'classifier_block3', 'classifier_block4'):
    assert not np.array_equal(before[name]['kernel'], results[1.0][1][name]['kernel'])


@pytest.mark.parametrize('transform', ['rescale', 'translate'])
def test_consistency_transforms_are_the_same_on_one_or_two_devices(transform):
  """Each image's transform follows its row in the global batch, so a run resumed on another number of devices
  (or with micro-batches) draws what the uninterrupted run would have."""
  from conftest import compiled_train_step, new_train_state

  from configs import msanet as msanet_config
  from ms_cxr import parallel, train

  config = msanet_config.get_config('smoke')
  config.optim.name = (
    'sgd'  # an update linear in the gradient keeps float-level differences float-level
  )
  labels = len(config.data.labels)
  state = new_train_state(config, labels, config.data.sizes)
  rng = np.random.default_rng(0)
  batch = {
    'image_32': rng.integers(0, 256, (4, 32, 32, 1), dtype=np.uint8),
    'labels': (rng.random((4, labels)) < 0.3).astype(np.float32),
  }
  terms = train.AttentionTerms(scale_weight=0.5, consistency_weight=1.0, transform=transform)
  results = []
  for devices in (1, 2):
    dp = parallel.DataParallel.create('shard_map', devices)
    step = compiled_train_step(dp, attention=terms)
    new_state, metrics = step(dp.replicate(state), dp.shard_batch(batch))
    results.append((float(metrics['loss']), jax.device_get(dp.unreplicate(new_state).params)))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_consistency_leaves_out_what_a_translation_moves_out_of_the_frame():
  """A CAM that is not zero on black (a bias) commutes with a translation inside the frame only: T(CAM(x)) is the
  fill value where the frame moved away, CAM(T(x)) the bias on the black border. The frame mask leaves that out."""
  images = _images(16, batch=1)
  params = {
    'dx': jnp.array([2 / 16]),
    'dy': jnp.array([-4 / 16]),
  }  # fractions of the side: 2 and -4 px

  def cam(x):
    return _pixelwise_cam(x) + 1.0

  transformed = _transform_images(images, 'translate', params)
  maps = cam(images)
  unmasked, _ = al.attention_consistency_sum(
    cam(transformed), _transform_maps(maps, 'translate', params)
  )
  mask = al.frame_mask(maps, 'translate', params)
  total, count = al.attention_consistency_sum(
    cam(transformed), _transform_maps(maps, 'translate', params), mask
  )
  assert float(unmasked) > 1.0
  assert float(total) < 1e-10
  assert float(count) == (16 - 2) * (16 - 4) * 2  # the positions still inside, for both maps
  assert al.frame_mask(maps, 'rescale', {'scale': jnp.array([1.2])}) is None
