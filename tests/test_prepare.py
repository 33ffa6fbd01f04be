"""Prepared ArrayRecord datasets: native records and pixels survive the round trip through TFDS shards.

Real samples are read in place beside the checkout (../shared/data); every output goes to tmp_path.
"""

import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from ms_cxr.data import datasets, images, prepare
from ms_cxr.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
NIH_SAMPLE = SHARED_DATA / 'nih'
CHEXPERT_ROOT = SHARED_DATA / 'chexpert'
SIZE = 64

needs_shared_data = pytest.mark.skipif(
  not SHARED_DATA.is_dir(),
  reason=f'real test data not found at {SHARED_DATA} (it lives beside the checkout)',
)


def _data_config(dataset: str, root: str | os.PathLike = '', **fields) -> ml_collections.ConfigDict:
  """The default `data` section for `dataset` (what configs/base.py plus a dataset choice give)."""
  from configs import base

  data = base.get_config().data
  data.dataset = dataset
  data.root = os.fspath(root)
  data.labels = datasets.default_labels(dataset)
  data.update(fields)
  return data


def _assert_round_trip(out, data_config, splits, size=SIZE):
  """read_prepared equals the native reader field by field, and every image equals images.load at `size`."""
  for split in splits:
    native = datasets.load_split(data_config, split)
    prepared = prepare.read_prepared(out, split, labels=data_config.labels)
    assert [r.id for r in prepared] == [r.id for r in native]
    for got, want in zip(prepared, native, strict=True):
      assert got.image.startswith(prepare.REF_PREFIX)
      np.testing.assert_array_equal(got.labels, want.labels)  # NaN == NaN here
      assert got.labels.dtype == np.float32
      assert (got.patient_id, got.study_id, got.view) == (want.patient_id, want.study_id, want.view)
      assert got.boxes == want.boxes
      pixels = prepare.load_prepared(got.image)
      expected = images.load(want.image, (size,))[size]
      assert pixels.dtype == np.uint8 and pixels.shape == (size, size)
      np.testing.assert_array_equal(pixels, expected)


@needs_shared_data
def test_nih_sample_round_trip(tmp_path):
  """The 19 real NIH images (1024/512/256/128 px, one RGB) at 64 px, every split."""
  data = _data_config('nih', NIH_SAMPLE)
  manifest = prepare.prepare(data, tmp_path, size=SIZE, progress=False)
  assert {s: e['num_examples'] for s, e in manifest['splits'].items()} == {
    'train': 10,
    'val': 2,
    'test': 7,
  }
  on_disk = json.loads((tmp_path / prepare.MANIFEST).read_text())
  assert on_disk == manifest
  assert on_disk['size'] == SIZE and on_disk['labels'] == list(data.labels)
  assert on_disk['data_config']['root'] == os.fspath(NIH_SAMPLE)
  _assert_round_trip(tmp_path, data, datasets.SPLITS)


@needs_shared_data
def test_chexpert_sample_through_the_command_line(tmp_path):
  """CheXpert's sample has only the valid set (split 'test'); views and labels set by config overrides."""
  labels = ('Edema', 'Atelectasis', 'Pleural Effusion')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'ms_cxr.data.prepare',
      '--dataset=chexpert',
      f'--root={CHEXPERT_ROOT}',
      f'--out={tmp_path}',
      f'--size={SIZE}',
      '--splits=test',
      '--num_workers=2',
      "--config.data.chexpert.views=('frontal','lateral')",
      f'--config.data.labels={labels!r}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'prepared chexpert at 64 px' in result.stdout
  data = _data_config('chexpert', CHEXPERT_ROOT, labels=labels)
  data.chexpert.views = ('frontal', 'lateral')
  assert len(prepare.read_prepared(tmp_path, 'test', labels=labels)) == 118
  _assert_round_trip(tmp_path, data, ['test'])

  # A subset of the labels, reordered, comes back in the order asked for.
  native = datasets.load_split(data, 'test')
  subset = prepare.read_prepared(tmp_path, 'test', labels=('Atelectasis', 'Edema'))
  np.testing.assert_array_equal(
    np.stack([r.labels for r in subset]), np.stack([r.labels[[1, 0]] for r in native])
  )
  manifest = str(tmp_path / prepare.MANIFEST)
  with pytest.raises(ValueError, match='Cardiomegaly') as error:
    prepare.read_prepared(tmp_path, 'test', labels=('Edema', 'Cardiomegaly'))
  assert manifest in str(error.value)
  with pytest.raises(ValueError, match="split 'train' was not prepared") as error:
    prepare.read_prepared(tmp_path, 'train', labels=labels)
  assert manifest in str(error.value)


def test_synthetic_round_trip_and_overwrite(tmp_path):
  data = _data_config('synthetic')
  data.synthetic.update({'num_train': 9, 'num_val': 3, 'num_test': 4})
  manifest = prepare.prepare(data, tmp_path, size=32, progress=False)
  assert [manifest['splits'][s]['num_examples'] for s in datasets.SPLITS] == [9, 3, 4]
  _assert_round_trip(tmp_path, data, datasets.SPLITS, size=32)
  assert any(r.boxes for r in prepare.read_prepared(tmp_path, 'train', labels=data.labels))

  with pytest.raises(ValueError, match='already holds a preparation'):
    prepare.prepare(data, tmp_path, size=32, progress=False)
  data.synthetic.num_train = 6
  prepare.prepare(data, tmp_path, size=32, splits=('train',), overwrite=True, progress=False)
  assert len(prepare.read_prepared(tmp_path, 'train', labels=data.labels)) == 6
  assert not (tmp_path / 'index-test.jsonl').exists()  # the old preparation is gone entirely
  with pytest.raises(ValueError, match="split 'test' was not prepared"):
    prepare.read_prepared(tmp_path, 'test', labels=data.labels)


def test_a_config_that_trains_from_a_preparation_prepares_from_the_originals(tmp_path):
  """data.prepared_dir in the config is not where a preparation reads from; and after an overwrite at another
  size, this process reads the new shards, not the readers it had open on the old ones."""
  data = _data_config('synthetic')
  data.synthetic.update({'num_train': 4, 'num_val': 0, 'num_test': 2})
  prepare.prepare(data, tmp_path, size=16, splits=('test',), progress=False)
  first = prepare.read_prepared(tmp_path, 'test', labels=data.labels)
  assert prepare.load_prepared(first[0].image).shape == (
    16,
    16,
  )  # a reader now open on the 16 px shard

  data.prepared_dir = os.fspath(tmp_path)
  prepare.prepare(data, tmp_path, size=32, splits=('test',), overwrite=True, progress=False)
  data.prepared_dir = ''
  _assert_round_trip(tmp_path, data, ('test',), size=32)  # every image from the originals, at 32 px
  assert prepare.read_manifest(tmp_path)['size'] == 32


def test_overwrite_keeps_the_old_preparation_until_the_new_one_is_complete(tmp_path):
  data = _data_config('synthetic')
  data.synthetic.update({'num_train': 5, 'num_val': 0, 'num_test': 2})
  prepare.prepare(data, tmp_path, size=32, progress=False)
  before = (tmp_path / prepare.MANIFEST).read_text()

  # A wrong root fails before anything is replaced.
  with pytest.raises(UserError, match='nowhere'):
    prepare.prepare(
      _data_config('nih', tmp_path / 'nowhere'), tmp_path, size=32, overwrite=True, progress=False
    )
  assert (tmp_path / prepare.MANIFEST).read_text() == before
  assert len(prepare.read_prepared(tmp_path, 'train', labels=data.labels)) == 5

  # So does an image that cannot be read: the failing build never reaches OUT.
  def fail(ref, size):
    raise ValueError(f'{ref}: cannot be read')

  original = prepare.encode_png
  prepare.encode_png = fail
  try:
    with pytest.raises(ValueError, match='cannot be read'):
      prepare.prepare(data, tmp_path, size=32, overwrite=True, progress=False)
  finally:
    prepare.encode_png = original
  assert (tmp_path / prepare.MANIFEST).read_text() == before
  assert not (tmp_path / prepare.STAGING).exists()
  assert len(prepare.read_prepared(tmp_path, 'test', labels=data.labels)) == 2


def test_leftovers_of_a_killed_preparation_need_no_overwrite(tmp_path):
  """Without a manifest there is no finished preparation: what a killed run left is replaced."""
  (tmp_path / prepare.STAGING / 'prepared_cxr').mkdir(parents=True)
  (tmp_path / 'index-train.jsonl').write_text('{"id": "stale"}\n')
  (tmp_path / prepare.BUILDER_NAME / 'stale').mkdir(parents=True)
  data = _data_config('synthetic')
  data.synthetic.update({'num_train': 3, 'num_val': 0, 'num_test': 0})
  prepare.prepare(data, tmp_path, size=32, splits=('train',), progress=False)
  assert [r.id for r in prepare.read_prepared(tmp_path, 'train', labels=data.labels)] == [
    r.id for r in datasets.load_split(data, 'train')
  ]
  assert not (tmp_path / prepare.BUILDER_NAME / 'stale').exists()
  assert not (tmp_path / prepare.STAGING).exists()


def test_a_preparation_is_read_only_under_its_own_data_settings(tmp_path):
  data = _data_config('synthetic', sizes=(32,))
  data.synthetic.update({'num_train': 4, 'num_val': 0, 'num_test': 0})
  prepare.prepare(data, tmp_path / 'prepared', size=32, splits=('train',), progress=False)
  data.prepared_dir = str(tmp_path / 'prepared')
  data.root = '/moved'  # the root may differ: the data may have moved
  assert len(datasets.load_split(data, 'train')) == 4
  manifest = re.escape(str(tmp_path / 'prepared' / prepare.MANIFEST))

  changed = data.copy_and_resolve_references()
  changed.split_seed = 7
  with pytest.raises(UserError, match=f'{manifest}: .*data.split_seed: 0 there, 7 here'):
    datasets.load_split(changed, 'train')
  changed = data.copy_and_resolve_references()
  changed.synthetic.num_train = 5
  with pytest.raises(UserError, match="data.synthetic: .*'num_train': 4.*'num_train': 5"):
    datasets.load_split(changed, 'train')
  changed = data.copy_and_resolve_references()
  changed.dataset = 'nih'
  with pytest.raises(UserError, match="data.dataset: 'synthetic' there, 'nih' here"):
    datasets.load_split(changed, 'train')
  changed = data.copy_and_resolve_references()
  changed.sizes = (16, 64)
  with pytest.raises(
    UserError, match=f'{manifest}: images were prepared at 32 px, smaller than the 64 px'
  ):
    datasets.load_split(changed, 'train')


@needs_shared_data
def test_corrupt_image_names_the_file(tmp_path):
  root = tmp_path / 'nih'
  (root / 'images').mkdir(parents=True)
  for name in (
    'Data_Entry_2017_v2020.csv',
    'BBox_List_2017.csv',
    'train_val_list.txt',
    'test_list.txt',
  ):
    (root / name).symlink_to(NIH_SAMPLE / name)
  names = sorted(p.name for p in (NIH_SAMPLE / 'images').iterdir())
  broken = names[len(names) // 2]
  for name in names:
    if name != broken:
      (root / 'images' / name).symlink_to(NIH_SAMPLE / 'images' / name)
  data = (NIH_SAMPLE / 'images' / broken).read_bytes()
  (root / 'images' / broken).write_bytes(data[: len(data) // 2])

  out = tmp_path / 'out'
  with pytest.raises(ValueError, match=re.escape(str(root / 'images' / broken))):
    prepare.prepare(_data_config('nih', root), out, size=SIZE, progress=False)
  # Nothing half-written is left behind, so the next run needs no `overwrite`.
  assert not (out / prepare.MANIFEST).exists()
  assert not (out / prepare.BUILDER_NAME).exists()
  assert not (out / prepare.STAGING).exists()
  assert not list(out.glob('index-*.jsonl'))

  # With skip_bad the image is left out of its split, index and shards alike, and named in the manifest.
  data = _data_config('nih', root, skip_bad=True)
  native = {split: datasets.load_split(data, split) for split in datasets.SPLITS}
  manifest = prepare.prepare(data, out, size=SIZE, progress=False)
  bad_split = next(s for s, rs in native.items() if any(r.image.endswith(broken) for r in rs))
  for split, records in native.items():
    entry = manifest['splits'][split]
    kept = [r.id for r in records if not r.image.endswith(broken)]
    assert [r.id for r in prepare.read_prepared(out, split, labels=data.labels)] == kept
    assert entry['num_examples'] == len(kept)
    if split == bad_split:
      assert len(entry['skipped']) == 1 and str(root / 'images' / broken) in entry['skipped'][0]
    else:
      assert entry['skipped'] == []


def test_load_prepared_in_a_spawned_process(tmp_path):
  """Records pickle as plain data; a fresh process opens the shards itself (as a Grain worker would)."""
  data = _data_config('synthetic')
  data.synthetic.update({'num_train': 6, 'num_val': 0, 'num_test': 0})
  manifest = prepare.prepare(data, tmp_path, size=32, splits=('train', 'val'), progress=False)
  # TFDS cannot write an empty split: the manifest lists it with no shards, and it reads back empty.
  assert manifest['splits']['val'] == {
    'num_examples': 0,
    'index': 'index-val.jsonl',
    'shards': [],
    'skipped': [],
  }
  assert prepare.read_prepared(tmp_path, 'val', labels=data.labels) == []
  records = prepare.read_prepared(tmp_path, 'train', labels=data.labels)
  refs = [r.image for r in records]
  here = [prepare.load_prepared(ref) for ref in refs]  # fills this process's reader cache first
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    there = pool.map(prepare.load_prepared, refs)
    ids = pool.map(_record_id, records)
  for a, b in zip(here, there, strict=True):
    np.testing.assert_array_equal(a, b)
  assert ids == [r.id for r in records]


def _record_id(record):
  return record.id


def test_references(tmp_path):
  shard = tmp_path / 'odd:dir' / 'shard.array_record-00000-of-00001'
  ref = prepare.make_ref(shard, 12)
  assert ref == f'arrayrecord:{shard}:12'
  assert prepare.parse_ref(ref) == (str(shard), 12)
  for bad in ('arrayrecord:', 'arrayrecord:/x', 'arrayrecord:/x:', 'arrayrecord:/x:-1', '/x:1'):
    with pytest.raises(ValueError, match='is not an image reference'):
      prepare.parse_ref(bad)
  with pytest.raises(ValueError, match=re.escape(f'{shard}: prepared shard is missing')):
    prepare.load_prepared(ref)
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path / prepare.MANIFEST} is missing')):
    prepare.read_prepared(tmp_path, 'train', labels=())


@pytest.mark.skipif(not (SHARED_DATA / 'nih').is_dir(), reason='../shared/data is not present')
def test_prepared_and_native_routes_yield_identical_batches(tmp_path):
  """Training batches (shuffled, augmented) are the same from ArrayRecord shards as from the native files, read
  in this process or by worker processes."""
  from configs import densenet
  from ms_cxr.data import datasets as datasets_lib
  from ms_cxr.data import pipeline

  config = densenet.get_config('dataset=nih,size=64')
  config.data.root = str(SHARED_DATA / 'nih')
  config.train.global_batch_size = 4
  config.data.prefetch_batches = 0
  prepare.prepare(config.data, str(tmp_path / 'prepared'), size=64, progress=False)
  native = datasets_lib.load_split(config.data, 'train')
  config.data.prepared_dir = str(tmp_path / 'prepared')
  prepared = datasets_lib.load_split(config.data, 'train')
  assert [r.id for r in prepared] == [r.id for r in native]
  assert prepared[0].image.startswith('arrayrecord:')
  native_it = iter(pipeline.train_dataset(native, config))
  prepared_it = iter(pipeline.train_dataset(prepared, config))
  # Two Grain worker processes, each with several reader threads starting on prepared images at once.
  config.data.num_workers = 2
  workers_it = iter(pipeline.train_dataset(prepared, config))
  try:
    for _ in range(3):
      a, b, c = next(native_it), next(prepared_it), next(workers_it)
      assert sorted(a) == sorted(b) == sorted(c)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
  finally:
    workers_it.close()


def test_a_split_of_which_no_image_reads_is_a_one_line_error(tmp_path, monkeypatch):
  def fail(ref, size):
    raise ValueError(f'{ref}: cannot be read')

  monkeypatch.setattr(prepare, 'encode_png', fail)
  data = _data_config('synthetic', skip_bad=True)
  data.synthetic.update({'num_train': 3, 'num_val': 0, 'num_test': 0})
  with pytest.raises(
    ValueError, match=r'none of the 3 train images could be read, e\.g\. .*cannot be read'
  ):
    prepare.prepare(data, tmp_path, size=32, splits=('train',), progress=False)
  assert not (tmp_path / prepare.MANIFEST).exists()


def test_a_manifest_from_before_split_seed_is_read_with_its_seed(tmp_path):
  data = _data_config('synthetic', sizes=(32,))
  data.synthetic.update({'num_train': 3, 'num_val': 0, 'num_test': 0})
  prepare.prepare(data, tmp_path, size=32, splits=('train',), progress=False)
  manifest = json.loads((tmp_path / prepare.MANIFEST).read_text())
  del manifest['data_config']['split_seed']  # as written before the field existed
  (tmp_path / prepare.MANIFEST).write_text(json.dumps(manifest))
  data.prepared_dir = str(tmp_path)
  assert len(datasets.load_split(data, 'train')) == 3
