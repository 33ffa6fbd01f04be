"""Model FLOPs counted from the jaxpr: exact against DenseNet's closed form, equal across formulations of one
convolution, through nested jaxprs; peak rates by device kind; the MFU arithmetic."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import densenet_flops

from ms_cxr import flops, models
from ms_cxr.models import densenet


def _model_and_shapes(name='densenet121', sizes=(224,), **model_fields):
  from configs import densenet as densenet_config

  config = densenet_config.get_config()
  config.model.name = name
  config.model.update(model_fields)
  model = models.create_model(config.model, len(config.data.labels), sizes)
  variables = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, sizes[0], sizes[0], 1), jnp.uint8), train=False
    )
  )
  return model, variables, len(config.data.labels)


def test_densenet121_forward_matches_the_closed_form():
  model, variables, labels = _model_and_shapes()
  counted = flops.forward_flops(model, variables, 224)
  assert counted == densenet_flops(densenet.PRESETS['densenet121'], 224, labels)
  assert counted / 1e9 == pytest.approx(5.204, abs=1e-3)
  # torchvision's order (convolution, then pool) would be 5.67 GFLOP: the commonly quoted 2.8-2.9 G MACs.
  assert densenet_flops(densenet.PRESETS['densenet121'], 224, labels, pool_first=False) / 1e9 == (
    pytest.approx(5.666, abs=1e-3)
  )
  # Four times the positions, four times the FLOPs (the classifier aside).
  assert flops.forward_flops(model, variables, 448) == densenet_flops(
    densenet.PRESETS['densenet121'], 448, labels
  )


@pytest.mark.parametrize('name', ['densenet_tiny', 'densenet_small'])
def test_formulations_of_one_convolution_count_the_same(name):
  """Products, taps (the CPU's 3x3 forward, behind a platform switch) and XLA's convolution are one function."""
  counts = set()
  for pointwise, kernel_grad in [(True, True), (False, False), (True, False)]:
    model, variables, labels = _model_and_shapes(
      name, pointwise_matmul=pointwise, kernel_grad_matmul=kernel_grad
    )
    counts.add(flops.forward_flops(model, variables, 64))
  assert counts == {densenet_flops(densenet.PRESETS[name], 64, labels)}


def test_ssbn_counts_as_densenet_and_msanet_adds_its_heads():
  plain, plain_vars, _ = _model_and_shapes('densenet_tiny', sizes=(32, 64))
  ssbn_model, ssbn_vars, _ = _model_and_shapes('densenet_tiny', sizes=(32, 64), norm='ssbn')
  assert flops.forward_flops(ssbn_model, ssbn_vars, 64) == flops.forward_flops(
    plain, plain_vars, 64
  )
  msanet, msanet_vars, _ = _model_and_shapes('msanet_tiny', sizes=(64,))
  assert flops.forward_flops(msanet, msanet_vars, 64) > flops.forward_flops(plain, plain_vars, 64)


def test_train_is_three_forwards_and_eval_counts_its_views():
  model, variables, _ = _model_and_shapes('densenet_tiny', sizes=(32,))
  forward = flops.forward_flops(model, variables, 32)
  assert flops.model_flops_per_image(model, variables, 32, what='train') == 3 * forward
  assert flops.model_flops_per_image(model, variables, 32, what='train', views=2) == 6 * forward
  assert flops.model_flops_per_image(model, variables, 32, what='eval', views=3) == 3 * forward
  assert flops.model_flops_per_image(model, variables, 32, what='eval') == forward


def test_nested_jaxprs_scans_conds_and_convolutions():
  a = jnp.zeros((2, 3))
  b = jnp.zeros((3, 5))
  assert flops.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 2 * 2 * 3 * 5
  # Batched product: batch x free x free x contracted.
  x = jnp.zeros((4, 2, 3))
  y = jnp.zeros((4, 3, 6))
  assert flops.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(x, y)) == 2 * 4 * 2 * 3 * 6

  @jax.jit
  def inner(u):
    return jax.checkpoint(lambda v: v @ b)(u)

  def scanned(u):
    return jax.lax.scan(lambda c, _: (c, inner(c)), u, None, length=7)[1]

  assert flops.jaxpr_flops(jax.make_jaxpr(scanned)(a)) == 7 * 2 * 2 * 3 * 5

  def branches(i, u):
    return jax.lax.switch(
      i, [lambda v: v @ jnp.zeros((3, 5)), lambda v: v @ b @ jnp.zeros((5, 5))], u
    )

  assert flops.jaxpr_flops(jax.make_jaxpr(branches)(0, a)) == 2 * 2 * 3 * 5 + 2 * 2 * 5 * 5

  # A 3x3 convolution, 4 -> 6 channels, over a 2 x 10 x 10 batch with 'SAME' padding; grouped in two.
  image = jnp.zeros((2, 10, 10, 4))
  for groups in (1, 2):
    kernel = jnp.zeros((3, 3, 4 // groups, 6))

    def conv(u, k, groups=groups):
      return jax.lax.conv_general_dilated(
        u, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups
      )

    assert flops.jaxpr_flops(jax.make_jaxpr(conv)(image, kernel)) == 2 * 2 * 10 * 10 * 6 * 9 * (
      4 // groups
    )

  def loop(u):
    return jax.lax.while_loop(lambda c: c[0, 0] < 3, lambda c: c @ jnp.eye(3), u)

  with pytest.raises(ValueError, match='while loop'):
    flops.jaxpr_flops(jax.make_jaxpr(loop)(jnp.zeros((3, 3))))


@pytest.mark.parametrize(
  'kind, dtype, peak',
  [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.4),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.0),
    ('NVIDIA H100 NVL', 'float32', 417.5),
    ('NVIDIA H200', 'bfloat16', 989.4),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156.0),
    ('TPU v5 lite', 'bfloat16', 197.0),
    ('TPU v5p', 'bfloat16', 459.0),
    ('TPU v4', 'float32', None),
    ('cpu', 'float32', None),
    (None, 'bfloat16', None),
  ],
)
def test_peak_by_device_kind(kind, dtype, peak):
  assert flops.peak_tflops(kind, dtype) == peak


def test_mfu_is_achieved_over_the_devices_peak():
  assert flops.mfu(5e9, 1000.0, 10.0, 1) == pytest.approx(0.5)
  assert flops.mfu(5e9, 1000.0, 10.0, 2) == pytest.approx(0.25)
  assert flops.mfu(5e9, 1000.0, None, 1) is None
  assert math.isclose(flops.mfu(1e12, 1.0, 1.0, 1), 1.0)
