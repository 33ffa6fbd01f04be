r"""Prepared datasets: a dataset's splits as ArrayRecord shards of pre-resized PNG images, written with TFDS.

  python -m ms_cxr.data.prepare --dataset=nih|chexpert|vindr|synthetic --root=DIR --out=OUT \
    [--size=896] [--splits=train,val,test] [--num_workers=N] [--overwrite] \
    [--config=configs/FILE.py[:ARGS]] [--config.data.FIELD=VALUE ...]

The `data` section comes from `--config` (default configs/base.py, or an experiment's file so that the splits match
its training run) with `--config.data.*` overrides; `--dataset` switches it to that dataset and its default labels
unless `--config.data.labels` is given, and `--root` sets `data.root`.

Each split is read with `datasets.load_split` under that `data` config, so a prepared split holds exactly the
records (and order) the native reader returns. Every image goes through `images.load(ref, (size,))`: the same
decoding and the same square resize (the aspect ratio is not kept; area-averaging when shrinking, bilinear when
growing) as training on the native files, then lossless PNG (PIL, zlib level 6). Training at a smaller size resizes
the prepared image again, so there the pixels differ slightly from a direct resize of the original (e.g. 1024 -> 896
-> 448 instead of 1024 -> 448); at `size` itself they are identical.

TensorFlow is not needed. TFDS's `GeneratorBasedBuilder` writes ArrayRecord files without it as long as no feature
has to encode through TensorFlow: the `Image` feature is given PNG bytes (it would call TensorFlow to encode a
numpy array), and every other feature is text or a numpy tensor. (The builder also sets `code_path = None` to step
around a TFDS 4.9.10 bug that needs the `importlib_resources` backport; see the class.)

Examples are written in split order (`disable_shuffling`), so the k-th record of a split is the k-th example across
its shards; the Grain pipeline shuffles by itself.

Everything is built in OUT/.partial/ and moved into place once complete, the manifest last, so a previous
preparation in OUT (replaced only with `--overwrite`) survives any failure of the new one, and a run that was
killed leaves no manifest (killed during the final moves, not the earlier preparation either: never a mix of
two), only files that the next run replaces without being asked. An image that cannot be read
stops the preparation, or with `data.skip_bad` is left out of its split and named in the manifest.

Layout of OUT:
  manifest.json                          dataset, `data` config, size, labels, and per split its count, index
                                         file, shards (paths relative to OUT) and the messages of images
                                         skipped; written last, so its presence means the preparation finished
  index-<split>.jsonl                    one JSON line per example, in split order: the record's fields without
                                         pixels (so reading a split back does not read the shards)
  prepared_cxr/<dataset>/1.0.0/          the TFDS dataset: dataset_info.json, features.json and
                                         prepared_cxr-<split>.array_record-NNNNN-of-NNNNN shards; also readable
                                         with `tfds.builder_from_directory(...).as_data_source()`

Per example the shards hold `image` (PNG, uint8 [size, size, 1]), `id`, `source` (the native image reference),
`labels` (float32 [K], NaN = unknown), `patient_id`, `study_id`, `view`, and `boxes` (a sequence of `label` and
`box`, float64 (x0, y0, x1, y1) image fractions).

Training reads a preparation (`data.prepared_dir`) only under the `data` settings it was made with (the dataset,
its own section such as `data.chexpert`, `data.split_seed` and `data.val_fraction`, which decide the records and their
labels; the root may have moved) and at sizes up to the prepared one: otherwise an error names the fields.

Reading back: `read_prepared(OUT, split, labels=...)` returns the split's `Record`s with `image` set to a reference
`arrayrecord:<absolute shard path>:<position>` (the path is everything between the prefix and the last colon), and
`load_prepared(ref)` decodes one such reference to uint8 [size, size]. A split that has no records is listed in the
manifest with count 0 and no shards (TFDS cannot write an empty split).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from array_record.python import array_record_module
from PIL import Image

from ms_cxr import cli, config_lib
from ms_cxr.data import datasets, images
from ms_cxr.data.records import Box, Record
from ms_cxr.errors import UserError

FORMAT = 'ms_cxr.prepared/1'
MANIFEST = 'manifest.json'
REF_PREFIX = 'arrayrecord:'
BUILDER_NAME = 'prepared_cxr'
# PIL's default level: on 1024-px NIH images resized to 896, files 16% smaller than level 1 for 4x the encoding
# time (77 vs 19 ms); decoding, which training repeats, takes the same 7 ms.
PNG_COMPRESS_LEVEL = 6
# The `data` fields besides the dataset's own section (data.nih, data.chexpert, ...) that decide which records a
# split holds, in what order and with what labels; a preparation is read only under the values it was made with.
RECORD_FIELDS = ('dataset', 'split_seed', 'val_fraction')
# The folder inside OUT that a preparation is built in, and moved out of once complete.
STAGING = '.partial'
# Random access reads one record at a time: no read-ahead, as Grain's ArrayRecord source does.
_READER_OPTIONS = 'readahead_buffer_size:0'


def prepare(
  data_config: ml_collections.ConfigDict,
  out_dir: str | os.PathLike,
  *,
  size: int = 896,
  splits: Sequence[str] = datasets.SPLITS,
  num_workers: int = 0,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Writes the prepared splits and the manifest into `out_dir`.

  Args:
    data_config: the `data` section of a config (dataset, root, labels and the reader options).
    out_dir: output folder (created if missing).
    size: side of the stored square images (the largest size training will ask for).
    splits: which of train | val | test to prepare.
    num_workers: processes that decode, resize and encode images (0 = this process).
    overwrite: replace a previous preparation in `out_dir` (its manifest, index files and `prepared_cxr/`
      folder); otherwise one there is an error.
    progress: show a progress bar per split.

  Returns:
    The manifest (also written to `out_dir/manifest.json`).

  Raises:
    ValueError: naming the file of an image that cannot be read, or `out_dir` already holding a preparation.
    UserError: a bad config or unreadable label files (from `datasets.load_split`).
  """
  out = pathlib.Path(out_dir).resolve()
  if size < 1:
    raise ValueError(f'size must be a positive number of pixels, got {size}')
  unknown = [split for split in splits if split not in datasets.SPLITS]
  if unknown:
    raise ValueError(f'splits {unknown} are unknown; expected some of {datasets.SPLITS}')
  if (out / MANIFEST).exists() and not overwrite:
    raise ValueError(
      f'{out / MANIFEST} exists: {out} already holds a preparation '
      '(--overwrite, overwrite=True, replaces it)'
    )
  if data_config.get('prepared_dir'):
    # An experiment's config that trains from a preparation names it; a preparation is made from the originals.
    logging.info(
      'prepare: reading %s at %r, not data.prepared_dir=%r',
      data_config.dataset,
      data_config.root,
      data_config.prepared_dir,
    )
    data_config = data_config.copy_and_resolve_references()
    data_config.prepared_dir = ''
  # Everything is read and written before anything of a previous preparation is touched: a wrong root or an
  # unreadable image leaves it as it was.
  records = {split: datasets.load_split(data_config, split) for split in splits}
  if not any(records.values()):
    raise ValueError(
      f'splits {list(splits)} of {data_config.dataset} at {data_config.root!r} have no records'
    )
  out.mkdir(parents=True, exist_ok=True)
  staging = out / STAGING
  shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
  staging.mkdir()
  try:
    manifest = _write(data_config, staging, records, size, num_workers, progress)
    # The manifest goes first and comes back last: a stop in between leaves no finished preparation (which the
    # next run replaces without `overwrite`), never the index of one beside the shards of another.
    for path in [out / MANIFEST] + [out / _index_name(split) for split in datasets.SPLITS]:
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
    shutil.rmtree(out / BUILDER_NAME, ignore_errors=True)
    for split in records:
      (staging / _index_name(split)).replace(out / _index_name(split))
    (staging / BUILDER_NAME).replace(out / BUILDER_NAME)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    # Readers this process opened on the shards replaced (same paths, new files) would read the old ones.
    _drop_shards(os.fspath(out))
  # Written last and renamed into place: a manifest exists only for a finished preparation.
  text = json.dumps(manifest, indent=2) + '\n'
  partial = out / f'{MANIFEST}.partial'
  partial.write_text(text)
  partial.replace(out / MANIFEST)
  return json.loads(text)  # as `read_manifest` will see it (lists, not tuples)


def _write(
  data_config: ml_collections.ConfigDict,
  out: pathlib.Path,
  records: dict[str, list[Record]],
  size: int,
  num_workers: int,
  progress: bool,
) -> dict:
  """Writes the TFDS dataset and the index files into `out`; returns the manifest.

  With `data_config.skip_bad`, an image that cannot be read is left out of its split (index and shards alike)
  and its message listed under the split's `skipped` in the manifest; otherwise it stops the preparation.
  """
  labels = tuple(data_config.labels)
  with _png_encoder(num_workers) as encode, tempfile.TemporaryDirectory() as downloads:
    builder = _PreparedBuilder(
      records={split: r for split, r in records.items() if r},
      size=size,
      num_labels=len(labels),
      encode=encode,
      skip_bad=bool(data_config.skip_bad),
      progress=progress,
      description=f'{data_config.dataset} at {size} px, labels {list(labels)}',
      data_dir=os.fspath(out),
      config=data_config.dataset,
      file_format='array_record',
    )
    # TFDS wants a download folder; nothing is downloaded.
    builder.download_and_prepare(download_dir=downloads)
  tfds_dir = pathlib.Path(builder.data_dir)

  manifest_splits = {}
  for split, split_records in records.items():
    skipped = builder.skipped.get(split, {})
    if skipped:
      split_records = [r for r in split_records if r.image not in skipped]
      logging.warning(
        'prepare: %d %s image(s) of %s could not be read and were left out, e.g. %s',
        len(skipped),
        split,
        data_config.dataset,
        next(iter(skipped.values())),
      )
    _write_index(out / _index_name(split), split_records)
    shards = []
    if split_records:
      info = builder.info.splits[split]
      shards = [
        {'file': os.fspath((tfds_dir / name).relative_to(out)), 'num_examples': int(length)}
        for name, length in zip(info.filenames, info.shard_lengths, strict=True)
      ]
      _check_order(out, shards, split_records)
    manifest_splits[split] = {
      'num_examples': len(split_records),
      'index': _index_name(split),
      'shards': shards,
      'skipped': list(skipped.values()),
    }
  return {
    'format': FORMAT,
    'dataset': data_config.dataset,
    'size': size,
    'labels': list(labels),
    'data_config': data_config.to_dict(),
    'tfds_dir': os.fspath(tfds_dir.relative_to(out)),
    'splits': manifest_splits,
  }


def read_manifest(out_dir: str | os.PathLike) -> dict:
  """Reads and checks `out_dir/manifest.json`.

  Raises:
    ValueError: naming the manifest when it is missing, not JSON, or of another format.
  """
  path = pathlib.Path(out_dir) / MANIFEST
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise ValueError(f'{path} is missing: {out_dir} holds no finished preparation') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: cannot read the manifest ({e})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ValueError(f'{path}: not a manifest of format {FORMAT!r}')
  return manifest


def check_config(
  manifest: dict, manifest_path: pathlib.Path, data_config: ml_collections.ConfigDict
) -> None:
  """Checks that a preparation holds what `data_config` would read natively, at its largest size or more.

  The fields that decide a split's records and labels (`RECORD_FIELDS` and the dataset's own section, e.g.
  `data.chexpert`) must be those the preparation was made with; the root may differ (data moved), and so may the
  label list, as long as the manifest has every label asked for (checked by `read_prepared`).

  Raises:
    ValueError: naming the manifest and each field that differs, with both values.
  """
  # A manifest written before data.split_seed existed: its data.seed chose the split.
  prepared = config_lib.upgrade_written({'data': manifest.get('data_config') or {}})['data']
  current = json.loads(json.dumps(data_config.to_dict()))  # tuples as lists, as in the manifest
  fields = [*RECORD_FIELDS, current.get('dataset')]
  differ = [
    f'data.{field}: {prepared.get(field)!r} there, {current.get(field)!r} here'
    for field in fields
    if field in current and prepared.get(field) != current.get(field)
  ]
  if differ:
    raise ValueError(
      f"{manifest_path}: the preparation was made under other data settings than this run's ("
      + '; '.join(differ)
      + '): its records or labels would not be the ones asked for. Prepare again with these settings '
      '(`--config.data.FIELD=VALUE`), or set them back.'
    )
  largest = max(data_config.sizes)
  if largest > manifest['size']:
    raise ValueError(
      f'{manifest_path}: images were prepared at {manifest["size"]} px, smaller than the {largest} px this run '
      f'asks for (data.sizes {tuple(data_config.sizes)}); they would be upsampled. Prepare at --size={largest} '
      'or more.'
    )


def read_prepared(
  out_dir: str | os.PathLike,
  split: str,
  *,
  labels: Sequence[str],
  data_config: ml_collections.ConfigDict | None = None,
) -> list[Record]:
  """A prepared split's records, equal to the native reader's except that `image` points into the shards.

  Args:
    out_dir: the folder `prepare` wrote.
    split: train | val | test.
    labels: label names in the order wanted; any subset or reordering of the manifest's labels.
    data_config: the reading run's `data` section; given, the preparation must match it (`check_config`).

  Returns:
    Records in split order with `image` = `arrayrecord:<absolute shard path>:<position>` (see `load_prepared`).

  Raises:
    ValueError: naming the file at fault: the manifest (missing, split not prepared, labels it does not have,
      made under other data settings or at a smaller size than `data_config`'s), the index (unreadable, count
      mismatch) or a missing shard.
  """
  out = pathlib.Path(out_dir).resolve()
  manifest = read_manifest(out)
  manifest_path = out / MANIFEST
  if data_config is not None:
    check_config(manifest, manifest_path, data_config)
  if split not in manifest['splits']:
    raise ValueError(
      f'{manifest_path}: split {split!r} was not prepared; it has {sorted(manifest["splits"])}'
    )
  missing = [name for name in labels if name not in manifest['labels']]
  if missing:
    raise ValueError(
      f'{manifest_path}: labels {missing} were not prepared; it has {manifest["labels"]}'
    )
  columns = np.asarray([manifest['labels'].index(name) for name in labels], np.int64)
  entry = manifest['splits'][split]
  refs = []
  for shard in entry['shards']:
    path = out / shard['file']
    if not path.is_file():
      raise ValueError(f'{path}: shard of split {split!r} is missing (listed in {manifest_path})')
    refs.extend(make_ref(path, position) for position in range(shard['num_examples']))
  index_path = out / entry['index']
  records = _read_index(index_path)
  if len(records) != len(refs) or len(records) != entry['num_examples']:
    raise ValueError(
      f'{index_path}: {len(records)} records, but {manifest_path} lists {entry["num_examples"]} '
      f'and its shards hold {len(refs)}'
    )
  return [
    dataclasses.replace(record, image=ref, labels=record.labels[columns])
    for record, ref in zip(records, refs, strict=True)
  ]


def make_ref(shard: str | os.PathLike, position: int) -> str:
  """The image reference of record `position` of an ArrayRecord shard: `arrayrecord:<shard>:<position>`."""
  return f'{REF_PREFIX}{os.fspath(shard)}:{position}'


def parse_ref(ref: str) -> tuple[str, int]:
  """Splits `arrayrecord:<shard>:<position>` into (shard, position); the shard path may contain colons.

  Raises:
    ValueError: naming the reference when it is malformed.
  """
  shard, _, position = ref.removeprefix(REF_PREFIX).rpartition(':')
  if not ref.startswith(REF_PREFIX) or not shard or not position.isdigit():
    raise ValueError(f'{ref!r} is not an image reference {REF_PREFIX}<shard path>:<position>')
  return shard, int(position)


def load_prepared(ref: str) -> np.ndarray:
  """Decodes one prepared image: uint8 grayscale [size, size] at the size it was prepared at.

  Readers are opened on first use and cached per process (and per shard); a forked child starts with an empty
  cache, and nothing here is pickled, so Grain worker processes open their own. Safe to call from threads.

  Args:
    ref: `arrayrecord:<shard path>:<position>`, as `read_prepared` returns it.

  Raises:
    ValueError: naming the shard when it is missing, unreadable, shorter than `position`, or holds no
      grayscale PNG there.
  """
  path, position = parse_ref(ref)
  reader, features = _open_shard(path)
  if position >= reader.num_records():
    raise ValueError(f'{path}: has {reader.num_records()} records, no record {position}')
  try:
    example = features.deserialize_example_np(
      reader.read([position])[0], decoders={'image': tfds.decode.SkipDecoding()}
    )
    with Image.open(io.BytesIO(example['image'])) as img:
      img.load()
      if img.mode != 'L' or img.size[0] != img.size[1]:
        raise ValueError(f'a {img.mode} image of {img.size[0]}x{img.size[1]} px')
      return np.asarray(img, np.uint8)
  except (OSError, SyntaxError, ValueError, RuntimeError) as e:
    raise ValueError(f'{path}: record {position} is not a prepared image ({e})') from None


def encode_png(ref: str, size: int) -> bytes:
  """Reads a native image reference at `size` (as training would) and returns it as grayscale PNG bytes.

  Raises:
    ValueError: naming the file when it cannot be read.
  """
  buffer = io.BytesIO()
  Image.fromarray(images.load(ref, (size,))[size]).save(
    buffer, format='PNG', compress_level=PNG_COMPRESS_LEVEL
  )
  return buffer.getvalue()


def _encode_or_message(ref: str, size: int) -> bytes | str:
  """`encode_png`, or the message naming the file when it cannot be read (with `data.skip_bad`)."""
  try:
    return encode_png(ref, size)
  except ValueError as e:
    return str(e)


class _PreparedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder over records already read: one example per record, in record order."""

  name = BUILDER_NAME
  # No code path: there are no download checksums to find beside the code, and looking for them fails in
  # TFDS 4.9.10 on Python >= 3.9 without the `importlib_resources` backport (tensorflow/datasets#11212).
  code_path = None
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Pre-resized grayscale PNG images with the record fields.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=dataset) for dataset in datasets.DATASETS]

  def __init__(
    self,
    *,
    records: dict[str, list[Record]],
    size: int,
    num_labels: int,
    encode: Callable[[Callable[[str], bytes], Sequence[str]], Iterable[bytes]],
    skip_bad: bool,
    progress: bool,
    description: str,
    **kwargs,
  ):
    # Set before the base constructor, which calls `_info`.
    self._records = records
    self._size = size
    self._num_labels = num_labels
    self._encode = encode
    self._skip_bad = skip_bad
    # {split: {native image reference: message}} of images left out (with `skip_bad`).
    self.skipped: dict[str, dict[str, str]] = {}
    self._progress = progress
    self._description = description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
      builder=self,
      description=self._description,
      disable_shuffling=True,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(self._size, self._size, 1), encoding_format='png'),
          'id': text,
          'source': text,
          'labels': tfds.features.Tensor(shape=(self._num_labels,), dtype=np.float32),
          'patient_id': text,
          'study_id': text,
          'view': text,
          'boxes': tfds.features.Sequence(
            {
              'label': text,
              # Raw bytes keep float64 exactly (the default encoding stores float32).
              'box': tfds.features.Tensor(shape=(4,), dtype=np.float64, encoding='bytes'),
            }
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._records}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    records = self._records[split]
    bar = tqdm.tqdm(
      total=len(records),
      desc=f'{split} at {self._size} px',
      unit=' img',
      disable=not self._progress,
      file=sys.stderr,
    )
    with bar:
      encode = _encode_or_message if self._skip_bad else encode_png
      pngs = self._encode(functools.partial(encode, size=self._size), [r.image for r in records])
      skipped = self.skipped.setdefault(split, {})
      key = 0
      for record, png in zip(records, pngs, strict=True):
        bar.update()
        if isinstance(png, str):
          skipped[record.image] = png
          continue
        yield key, _example(record, png)
        key += 1
    if not key:
      raise ValueError(
        f'none of the {len(records)} {split} images could be read, e.g. {next(iter(skipped.values()))}'
      )


@contextlib.contextmanager
def _png_encoder(num_workers: int):
  """Yields map(fn, items): in order, in this process or in `num_workers` spawned processes."""
  if num_workers <= 0:
    yield map
    return
  # Spawn, not fork: the caller may hold threads (TFDS, JAX) that a forked child would inherit broken. An executor,
  # not a Pool: a worker that dies raises BrokenProcessPool where a Pool would replace it and wait forever.
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
    yield functools.partial(executor.map, chunksize=4)


def _example(record: Record, png: bytes) -> dict:
  return {
    'image': png,
    'id': record.id,
    'source': record.image,
    'labels': np.asarray(record.labels, np.float32),
    'patient_id': record.patient_id,
    'study_id': record.study_id,
    'view': record.view,
    'boxes': [
      {'label': b.label, 'box': np.asarray([b.x0, b.y0, b.x1, b.y1], np.float64)}
      for b in record.boxes
    ],
  }


def _index_name(split: str) -> str:
  return f'index-{split}.jsonl'


def _write_index(path: pathlib.Path, records: Sequence[Record]) -> None:
  """One JSON object per record (labels as numbers or null for NaN; floats written exactly)."""
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      line = {
        'id': r.id,
        'source': r.image,
        'labels': [None if math.isnan(v) else v for v in np.asarray(r.labels, np.float32).tolist()],
        'patient_id': r.patient_id,
        'study_id': r.study_id,
        'view': r.view,
        'boxes': [[b.label, float(b.x0), float(b.y0), float(b.x1), float(b.y1)] for b in r.boxes],
      }
      f.write(json.dumps(line) + '\n')


def _read_index(path: pathlib.Path) -> list[Record]:
  records = []
  try:
    with open(path, encoding='utf-8') as f:
      for line in f:
        row = json.loads(line)
        records.append(
          Record(
            id=row['id'],
            image=row['source'],
            labels=np.asarray([math.nan if v is None else v for v in row['labels']], np.float32),
            patient_id=row['patient_id'],
            study_id=row['study_id'],
            view=row['view'],
            boxes=tuple(Box(*box) for box in row['boxes']),
          )
        )
  except FileNotFoundError:
    raise ValueError(f'{path} is missing') from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: cannot read the index (line {len(records) + 1}: {e})') from None
  return records


def _check_order(out: pathlib.Path, shards: Sequence[dict], records: Sequence[Record]) -> None:
  """Checks that each shard's first and last example are the records the index says (TFDS kept the order)."""
  features = tfds.features.FeatureConnector.from_config(os.fspath((out / shards[0]['file']).parent))
  start = 0
  for shard in shards:
    path = out / shard['file']
    reader = array_record_module.ArrayRecordReader(os.fspath(path), _READER_OPTIONS)
    try:
      for position in {0, shard['num_examples'] - 1}:
        example = features.deserialize_example_np(
          reader.read([position])[0], decoders={'image': tfds.decode.SkipDecoding()}
        )
        expected = records[start + position].id
        if example['id'].decode() != expected:
          raise AssertionError(
            f'{path}: record {position} is {example["id"]!r}, expected {expected!r}'
          )
    finally:
      reader.close()
    start += shard['num_examples']


# Per-process cache of open shards: {path: (reader, features)}. Rebuilt empty in a forked child, whose inherited
# readers would share file offsets with the parent and whose lock might be held by a thread that did not fork.
_shards: dict[str, tuple[array_record_module.ArrayRecordReader, tfds.features.FeaturesDict]] = {}
_shards_lock = threading.Lock()


def _forget_shards() -> None:
  global _shards, _shards_lock
  _shards = {}
  _shards_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_shards)


def _drop_shards(folder: str) -> None:
  """Closes and forgets this process's cached readers and features of the shards under `folder`."""
  prefix = os.path.join(folder, '')
  with _shards_lock:
    for path in [p for p in _shards if p.startswith(prefix)]:
      reader, _ = _shards.pop(path)
      with contextlib.suppress(Exception):
        reader.close()
  _features.cache_clear()


def _open_shard(
  path: str,
) -> tuple[array_record_module.ArrayRecordReader, tfds.features.FeaturesDict]:
  entry = _shards.get(path)
  if entry is not None:
    return entry
  with _shards_lock:
    entry = _shards.get(path)
    if entry is None:
      entry = _shards[path] = (_open_reader(path), _features(os.path.dirname(path)))
  return entry


def _open_reader(path: str) -> array_record_module.ArrayRecordReader:
  if not os.path.isfile(path):
    raise ValueError(f'{path}: prepared shard is missing')
  try:
    return array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
  except (OSError, RuntimeError, ValueError) as e:
    raise ValueError(f'{path}: cannot open the ArrayRecord shard ({e})') from None


@functools.cache
def _features(tfds_dir: str) -> tfds.features.FeaturesDict:
  try:
    return tfds.features.FeatureConnector.from_config(tfds_dir)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
      f'{tfds_dir}: cannot read features.json of the prepared dataset ({e})'
    ) from None


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  base_config = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'base.py'
  flags.DEFINE_enum(
    'dataset', None, datasets.DATASETS, "Dataset; default: the config's data.dataset."
  )
  flags.DEFINE_string('root', None, "Dataset root as downloaded; default: the config's data.root.")
  flags.DEFINE_string('out', None, 'Output folder for the manifest, index files and shards.')
  flags.DEFINE_integer('size', 896, 'Side of the stored square images: the largest training size.')
  flags.DEFINE_list('splits', list(datasets.SPLITS), 'Splits to prepare.')
  flags.DEFINE_integer(
    'num_workers', os.cpu_count() or 1, 'Image encoding processes; 0 = this one.'
  )
  flags.DEFINE_bool('overwrite', False, 'Replace a previous preparation in --out.')
  config_flags.DEFINE_config_file(
    'config',
    os.fspath(base_config) if base_config.is_file() else None,
    'Config file whose data section is used (default: configs/base.py); override fields with '
    '--config.data.FIELD=VALUE.',
  )
  flags.mark_flags_as_required(['out'])


def _data_config(flag_values) -> ml_collections.ConfigDict:
  """The config's data section with --dataset and --root applied (a --config.data.labels override is kept)."""
  from ml_collections import config_flags

  config = flag_values.config
  if config is None:
    raise UserError('--config is required here (configs/base.py was not found beside the package)')
  if flag_values.dataset and flag_values.dataset != config.data.dataset:
    config.data.dataset = flag_values.dataset
    # The file's labels belong to its own dataset; explicit --config.data.labels is re-applied below.
    config.data.labels = datasets.default_labels(flag_values.dataset)
    config.update_from_flattened_dict(config_flags.get_override_values(flag_values['config']))
  if flag_values.root is not None:
    config.data.root = flag_values.root
  return config.data


def _main(argv) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  flag_values = flags.FLAGS
  # Our own bar counts images against a known total; TFDS's would only count up.
  tfds.disable_progress_bar()
  try:
    data_config = _data_config(flag_values)
    manifest = prepare(
      data_config,
      flag_values.out,
      size=flag_values.size,
      splits=flag_values.splits,
      num_workers=flag_values.num_workers,
      overwrite=flag_values.overwrite,
    )
  except (UserError, ValueError) as e:
    cli.fail(str(e))
  counts = ', '.join(f'{s} {e["num_examples"]}' for s, e in manifest['splits'].items())
  print(f'prepared {manifest["dataset"]} at {manifest["size"]} px into {flag_values.out}: {counts}')


if __name__ == '__main__':
  from absl import app

  # Defining --config with a default file already parses it with the overrides on the command line.
  with cli.flag_errors():
    _define_flags()
  app.run(_main, flags_parser=cli.parse_flags)
