"""The benchmark command: JSON lines with the documented keys and sane values, both input routes on the real
samples, and one-line errors for bad flags. A tiny DenseNet at 32 px keeps every run short."""

import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, densenet_flops, run_module
from PIL import Image

from ms_cxr import benchmark, hugepages
from ms_cxr.errors import UserError
from ms_cxr.models import densenet

TINY = ('--config.model.name=densenet_tiny', '--sizes=32', '--batch=4', '--steps=2', '--warmup=1')
STEP_KEYS = {
  'what',
  'framework',
  'model',
  'size',
  'batch',
  'dtype',
  'remat',
  'steps',
  'warmup',
  'repeats',
  'images_per_sec',
  'images_per_sec_repeats',
  'step_time_ms',
  'step_time_ms_repeats',
  'cpu_ms_per_image',
  'cpu_ms_per_image_repeats',
  'cpu_utilisation',
  'model_flops_per_image',
  'model_tflops_per_sec',
  'peak_tflops_per_device',
  'mfu',
  'compile_time_s',
  'first_step_s',
  'host_rss_peak_bytes',
  'host_maxrss_bytes',
  'host_maxrss_delta_bytes',
  'device_peak_bytes_in_use',
  'xla_argument_bytes',
  'xla_output_bytes',
  'xla_temp_bytes',
  'xla_alias_bytes',
  'xla_peak_bytes',
  'platform',
  'device_kind',
  'device_count',
  'jax_version',
  'jaxlib_version',
  'flax_version',
  'cpu_count',
  'cpu_affinity',
  'threads',
  'host_memory',
  'load_average_start',
  'load_average_end',
  'timestamp',
}
NIH_SAMPLE = SHARED_DATA / 'nih'
needs_shared_data = pytest.mark.skipif(
  not NIH_SAMPLE.is_dir(),
  reason=f'real samples not found at {NIH_SAMPLE} (they live beside the checkout)',
)


def _benchmark(*args):
  return run_module('ms_cxr.benchmark', *args)


def _tiny_config(**model):
  from configs import densenet

  config = densenet.get_config()
  config.model.name = 'densenet_tiny'
  config.model.update(model)
  return config


def _check_timing(record, repeats):
  """Positive rates, the median of the repeats, and rate x step time = batch (the same repeat is the median)."""
  assert len(record['images_per_sec_repeats']) == len(record['step_time_ms_repeats']) == repeats
  assert all(r > 0 and math.isfinite(r) for r in record['images_per_sec_repeats'])
  assert record['images_per_sec'] == statistics.median(record['images_per_sec_repeats'])
  assert record['step_time_ms'] == statistics.median(record['step_time_ms_repeats'])
  for rate, ms in zip(
    record['images_per_sec_repeats'], record['step_time_ms_repeats'], strict=True
  ):
    assert rate * ms == pytest.approx(1000.0 * record['batch'])
  # CPU time of the same windows: positive, and at most every CPU busy for the whole window.
  assert len(record['cpu_ms_per_image_repeats']) == repeats
  assert record['cpu_ms_per_image'] == statistics.median(record['cpu_ms_per_image_repeats'])
  assert all(c > 0 for c in record['cpu_ms_per_image_repeats'])
  assert 0 < record['cpu_utilisation'] <= os.cpu_count() + 0.5


def _check_environment(record):
  assert record['jax_version'] == jax.__version__
  assert record['cpu_count'] == os.cpu_count()
  assert 1 <= record['cpu_affinity'] <= os.cpu_count()
  assert record['threads']['xla_cpu_threads'] == record['cpu_affinity']
  # The command re-executed itself with glibc's huge-page tunable where that applies (ms_cxr/hugepages.py).
  assert record['host_memory']['transparent_hugepages'] == hugepages.thp_mode()
  tunables = record['host_memory']['GLIBC_TUNABLES'] or ''
  if hugepages.why_not(os.environ, platform.libc_ver(), hugepages.thp_mode()) is None:
    assert 'glibc.malloc.hugetlb=1' in tunables
  else:
    assert tunables == os.environ.get('GLIBC_TUNABLES', '')
  assert len(record['load_average_start']) == len(record['load_average_end']) == 3
  stamp = datetime.datetime.fromisoformat(record['timestamp'])
  assert stamp.tzinfo is not None
  assert abs(datetime.datetime.now(datetime.UTC) - stamp) < datetime.timedelta(hours=1)
  assert record['host_rss_peak_bytes'] > 2**20 and record['host_maxrss_bytes'] > 2**20


def test_train_prints_one_json_line_per_size_with_the_settings_echoed():
  result = _benchmark(*TINY, '--repeats=3', '--torch', '--peak_tflops=0.5')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
  record = lines[0]
  assert STEP_KEYS <= set(record)
  assert (record['what'], record['framework'], record['model']) == ('train', 'jax', 'densenet_tiny')
  assert (record['size'], record['batch'], record['dtype'], record['remat']) == (
    32,
    4,
    'float32',
    False,
  )
  assert (record['steps'], record['warmup'], record['repeats']) == (2, 1, 3)
  assert record['num_params'] == 8900  # densenet_tiny with the synthetic set's 7 labels
  _check_timing(record, 3)
  assert record['compile_time_s'] > 0 and record['first_step_s'] > 0
  assert math.isfinite(record['loss']) and record['loss'] > 0
  # Model FLOPs of a train step: 3 forward passes; the utilisation against the given peak.
  tiny = densenet.PRESETS['densenet_tiny']
  assert record['model_flops_per_image'] == 3 * densenet_flops(tiny, 32, 7)
  assert record['model_tflops_per_sec'] == pytest.approx(
    record['model_flops_per_image'] * record['images_per_sec'] / 1e12
  )
  assert record['peak_tflops_per_device'] == 0.5
  assert record['mfu'] == pytest.approx(record['model_tflops_per_sec'] / 0.5)
  # One device by default, CPU: no device memory statistics, but XLA's analysis of the compiled step.
  assert (record['platform'], record['device_count']) == ('cpu', 1)
  assert record['device_peak_bytes_in_use'] is None
  assert record['xla_temp_bytes'] > 0
  assert record['xla_argument_bytes'] > 4 * 8900  # float32 params, optimizer state, the batch
  assert record['xla_peak_bytes'] == (
    record['xla_argument_bytes']
    + record['xla_output_bytes']
    + record['xla_temp_bytes']
    - record['xla_alias_bytes']
  )
  assert record['xla_alias_bytes'] > 0  # the donated state
  _check_environment(record)
  if importlib.util.find_spec('torch') is None:
    # Without torch: the JAX line alone, and one line on stderr saying how to install it.
    assert len(lines) == 1
    notes = [line for line in result.stderr.splitlines() if line.startswith('note: ')]
    assert len(notes) == 1 and 'pip install torch torchvision' in notes[0]
  else:
    assert [(r['what'], r.get('framework')) for r in lines] == [
      ('train', 'jax'),
      ('train', 'torch'),
      ('ratio', None),
    ]
    _check_timing(lines[1], 3)
    assert lines[1]['num_params'] == 8900  # the same blocks in torchvision's DenseNet
    # torch's FLOP counter: torchvision's transitions convolve before they pool.
    assert lines[1]['model_flops_per_image'] == 3 * densenet_flops(tiny, 32, 7, pool_first=False)
    assert lines[1]['mfu'] == pytest.approx(lines[1]['model_tflops_per_sec'] / 0.5)
    assert (lines[2]['jax_mfu'], lines[2]['torch_mfu']) == (record['mfu'], lines[1]['mfu'])
    assert lines[2]['jax_over_torch'] == pytest.approx(
      record['images_per_sec'] / lines[1]['images_per_sec']
    )


def test_eval_on_two_devices_in_process():
  records = []
  options = benchmark.Options(
    what='eval', sizes=(32,), batch=4, steps=2, warmup=1, repeats=3, num_devices=2
  )
  returned = benchmark.run(_tiny_config(), options, emit=records.append)
  assert returned == records and len(records) == 1
  record = records[0]
  assert STEP_KEYS <= set(record)
  assert (record['what'], record['size'], record['batch'], record['loss']) == ('eval', 32, 4, None)
  assert (record['device_count'], record['devices_available']) == (2, jax.device_count())
  _check_timing(record, 3)
  assert record['xla_alias_bytes'] == 0  # the eval step donates nothing
  # One forward pass per image; no peak rate is known for a CPU, so no utilisation.
  assert record['model_flops_per_image'] == densenet_flops(densenet.PRESETS['densenet_tiny'], 32, 7)
  assert (record['peak_tflops_per_device'], record['mfu']) == (None, None)
  assert json.loads(json.dumps(record)) == record  # plain JSON values


def test_dtype_and_remat_flags_reach_the_model():
  options = benchmark.Options(
    what='eval', sizes=(32,), batch=4, steps=1, warmup=0, repeats=1, dtype='bfloat16', remat=True
  )
  (record,) = benchmark.run(_tiny_config(), options, emit=lambda r: None)
  assert (record['dtype'], record['remat'], record['model']) == ('bfloat16', True, 'densenet_tiny')
  assert (record['steps'], record['warmup'], record['repeats']) == (1, 0, 1)
  assert record['images_per_sec'] > 0 and record['xla_temp_bytes'] > 0


def test_eval_runs_the_configured_test_time_views_and_counts_their_flops():
  config = _tiny_config()
  config.eval.tta = ('hflip', 'zoom')
  options = benchmark.Options(what='eval', sizes=(32,), batch=4, steps=1, warmup=0, repeats=1)
  (record,) = benchmark.run(config, options, emit=lambda r: None)
  tiny = densenet.PRESETS['densenet_tiny']
  assert record['model_flops_per_image'] == 3 * densenet_flops(tiny, 32, 7)
  config.eval.tta = ('flip',)
  with pytest.raises(UserError, match='config.eval.tta'):
    benchmark.run(config, options, emit=lambda r: None)


def test_msanet_with_consistency_counts_the_transformed_copies():
  from configs import msanet
  from ms_cxr import flops, models

  config = msanet.get_config('smoke')
  assert config.train.consistency_weight > 0
  options = benchmark.Options(what='train', sizes=(32,), batch=4, steps=1, warmup=0, repeats=1)
  (record,) = benchmark.run(config, options, emit=lambda r: None)
  model = models.create_model(config.model, len(config.data.labels), (32,))
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.uint8), train=False)
  )
  assert record['model_flops_per_image'] == 6 * flops.forward_flops(model, variables, 32)


def test_configure_keeps_each_sizes_accumulation_and_adds_new_sizes():
  from configs import ssbn

  config = ssbn.get_config()
  config.train.accum_steps = (1, 2, 4)
  configured = benchmark.configure(
    config, benchmark.Options(sizes=(32, 448), batch=16, dtype='bfloat16', remat=True), (32, 448)
  )
  assert configured.data.sizes == (32, 224, 448, 896)
  assert configured.train.accum_steps == (1, 1, 2, 4)
  assert configured.train.global_batch_size == configured.eval.batch_size == 16
  assert (configured.model.dtype, configured.model.remat) == ('bfloat16', True)
  assert configured.parallel.num_devices == 1
  assert config.data.sizes == (224, 448, 896)  # the original is unchanged


@needs_shared_data
def test_input_reads_the_1024px_samples_natively_and_prepared():
  result = _benchmark(
    '--what=input',
    '--sizes=32',
    '--workers=0',
    '--batch=4',
    '--steps=2',
    '--warmup=1',
    '--repeats=3',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [(r['route'], r['size'], r['workers']) for r in records] == [
    ('native', 32, 0),
    ('prepared', 32, 0),
  ]
  for record in records:
    assert record['what'] == 'input' and record['framework'] == 'grain'
    assert record['num_images'] == 3  # the three samples at ChestX-ray14's native 1024 px
    assert record['native_px'] == [1024]
    assert (record['batch'], record['steps'], record['warmup']) == (4, 2, 1)
    assert record['augment'] is True
    assert record['startup_time_s'] > 0
    _check_timing(record, 3)
    _check_environment(record)
    assert record['device_kind'] is None  # host work only
  native, prepared = records
  assert (native['prepared_px'], native['prepare_time_s']) == (None, None)
  assert prepared['prepared_px'] == 32 and prepared['prepare_time_s'] > 0


@needs_shared_data
def test_find_images_picks_by_native_side():
  by_side = {
    px: [s.name for s in benchmark.find_images(str(NIH_SAMPLE), px, 32)] for px in (1024, 512)
  }
  assert by_side == {
    1024: ['00000001_000.png', '00000002_000.png', '00000013_003.png'],
    512: ['00027426_000.png'],
  }
  assert len(benchmark.find_images(str(NIH_SAMPLE), 0, 32)) == 19
  assert len(benchmark.find_images(str(NIH_SAMPLE), 0, 5)) == 5
  with pytest.raises(UserError, match='no readable image of 2048 px'):
    benchmark.find_images(str(NIH_SAMPLE), 2048, 32)


def test_input_on_a_plain_folder_of_images(tmp_path):
  rng = np.random.default_rng(0)
  for name in ('b.png', 'a.png', 'sub/c.jpg'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(tmp_path / name)
  Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / 'small.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  sources = benchmark.find_images(str(tmp_path), 48, 32)
  assert [os.path.relpath(s.path, tmp_path) for s in sources] == ['a.png', 'b.png', 'sub/c.jpg']
  options = benchmark.Options(
    what='input',
    sizes=(16, 24),
    batch=2,
    steps=1,
    warmup=0,
    repeats=1,
    workers=(0,),
    data_root=str(tmp_path),
    native_px=48,
  )
  records = benchmark.run(_tiny_config(), options, emit=lambda r: None)
  assert [(r['route'], r['size'], r['num_images']) for r in records] == [
    ('native', 16, 3),
    ('native', 24, 3),
    ('prepared', 16, 3),
    ('prepared', 24, 3),
  ]
  assert all(r['prepared_px'] == 24 for r in records[2:])


@pytest.mark.parametrize(
  'args, message',
  [
    (('--what=nope',), 'error: flag --what=nope: value should be one of <train|eval|input>'),
    (('--sizes=224,0',), 'error: --sizes has [0]; every size must be a positive number of pixels'),
    (('--sizes=-8',), 'error: --sizes has [-8]; every size must be a positive number of pixels'),
    (('--sizes=big',), 'error: --sizes=big must be a comma-separated list of integers'),
    (('--batch=0',), 'error: --batch=0 must be positive'),
    (('--peak_tflops=0',), 'error: --peak_tflops=0.0 must be positive'),
    (
      ('--what=input', '--torch'),
      'error: --torch / --reference apply to --what=train or --what=eval, not input',
    ),
    (
      ('--torch', '--num_devices=2'),
      'error: --torch / --reference compare one device with one: expected --num_devices=1, got 2',
    ),
    (
      ('--what=input', '--data_root=/nonexistent/folder'),
      "error: --data_root='/nonexistent/folder' is not a folder",
    ),
  ],
)
def test_bad_flags_are_one_line_errors_with_exit_2(args, message):
  result = _benchmark(*args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stdout == ''
  assert result.stderr.strip() == message


def test_unknown_config_field_is_a_one_line_error():
  result = _benchmark('--config.model.nmae=densenet_tiny')
  assert result.returncode == 2
  assert result.stderr.strip() == (
    "error: --config.model.nmae: the config has no field 'nmae'. "
    'Did you mean "name" instead of "nmae"?'
  )


def test_a_stuck_input_pipeline_ends_with_exit_3_instead_of_hanging():
  code = (
    'import threading\n'
    'from ms_cxr import benchmark\n'
    'def stuck():\n'
    '  threading.Event().wait()\n'
    '  yield\n'
    "with benchmark._Watchdog(0.5, 'route prepared, 32 px, 2 workers') as watchdog:\n"
    '  watchdog.next(stuck())\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == benchmark.EXIT_STALLED == 3
  assert result.stderr.strip() == (
    'error: the input pipeline gave no batch for 0.5 s (route prepared, 32 px, 2 workers); it looks stuck'
  )


def test_torch_reference_covers_plain_densenets_only():
  from configs import msanet, ssbn
  from ms_cxr import benchmark_torch

  assert benchmark_torch.unsupported(_tiny_config()) is None
  assert benchmark_torch.unsupported(ssbn.get_config()) == (
    "config.model.norm='ssbn': torchvision has plain BatchNorm only"
  )
  assert benchmark_torch.unsupported(msanet.get_config()).endswith('has no torchvision counterpart')


def _step_record(framework, images_per_sec, **fields):
  record = {
    'what': 'train',
    'framework': framework,
    'model': 'densenet121' if framework == 'jax' else 'torchvision.models.DenseNet(densenet121)',
    'norm': 'batchnorm',
    'device_kind': 'NVIDIA H200',
    'device_count': 1,
    'size': 448,
    'batch': 32,
    'dtype': 'bfloat16',
    'remat': False,
    'images_per_sec': images_per_sec,
    'model_tflops_per_sec': 62.45,
    'mfu': 0.0631,
    'xla_peak_bytes': 12.5e9 if framework == 'jax' else None,
    'compile_time_s': 41.2 if framework == 'jax' else None,
  }
  record.update(fields)
  return record


def test_table_puts_each_setting_beside_its_reference(tmp_path):
  records = [
    _step_record('jax', 1000.0),
    _step_record('torch', 800.0, mfu=0.05),
    {'what': 'ratio', 'size': 448, 'jax_over_torch': 1.25},
    _step_record('jax', 250.0, size=896, norm='ssbn', mfu=None, model_tflops_per_sec=None),
    _step_record('jax', 900.0, pointwise_matmul=False, kernel_grad_matmul=False),
  ]
  lines = benchmark.markdown_table(records).splitlines()
  assert len(lines) == 5
  assert lines[2] == (
    '| train | densenet121 | 1 x NVIDIA H200 | 448 | 32 | bfloat16 | no | products | 1000.0 | 62.5 | 6.3% | 800.0 '
    '| 5.0% | 1.25 | 12.50 | 41 |'
  )
  assert lines[3] == (
    '| train | densenet121 (ssbn) | 1 x NVIDIA H200 | 896 | 32 | bfloat16 | no | products | 250.0 | - | - | - '
    '| - | - | 12.50 | 41 |'
  )
  # The same setting again, with XLA's convolutions and no reference line after it.
  assert lines[4] == (
    '| train | densenet121 | 1 x NVIDIA H200 | 448 | 32 | bfloat16 | no | XLA | 900.0 | 62.5 | 6.3% | - | - | - '
    '| 12.50 | 41 |'
  )
  # From the command line, on a file of JSON lines; a line that is not a record is named.
  path = tmp_path / 'bench.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  result = _benchmark(f'--table={path}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == lines
  path.write_text(json.dumps(records[0]) + '\n{"images_per_sec": 3\n')
  result = _benchmark(f'--table={path}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {path} line 2: not a JSON line')
