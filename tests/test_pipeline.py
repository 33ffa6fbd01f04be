"""The input pipeline's guarantees, on synthetic records at small sizes: multi-process shards that make up the
single-process batches, the same view of an image at every size, evaluation padded without losing or decoding
anything extra, and an iterator that resumes where it was saved."""

import itertools

import numpy as np
import pytest

from ms_cxr.data import datasets, pipeline


@pytest.fixture(scope='module')
def setup():
  from configs import base

  config = base.get_config()
  config.data.sizes = (24, 32)
  config.data.synthetic.update({'num_train': 20, 'num_val': 0, 'num_test': 11})
  config.data.prefetch_batches = 0
  config.train.global_batch_size = 4
  config.eval.batch_size = 4
  return config, datasets.load_split(config.data, 'train'), datasets.load_split(config.data, 'test')


def _take(dataset, n):
  return list(itertools.islice(iter(dataset), n))


def test_two_processes_split_the_single_process_batches(setup):
  config, train, _ = setup
  config = config.copy_and_resolve_references()
  config.train.multiscale = 'all'
  whole = _take(pipeline.train_dataset(train, config), 3)
  halves = [
    _take(pipeline.train_dataset(train, config, process_index=p, process_count=2), 3)
    for p in (0, 1)
  ]
  for step, batch in enumerate(whole):
    for key in ('index', 'labels', 'image_24', 'image_32'):
      joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key], err_msg=f'{key} of step {step}')


def test_all_sizes_of_an_example_see_the_same_view(setup):
  config, train, _ = setup
  config = config.copy_and_resolve_references()
  config.train.multiscale = 'all'
  config.data.augment.max_translate = (
    0.2  # a large shift: a view drawn per size would differ visibly
  )
  (batch,) = _take(pipeline.train_dataset(train, config), 1)
  small = batch['image_24'].astype(np.float32)
  large = batch['image_32'].astype(np.float32)
  # The 32 px view shrunk to 24 px is close to the 24 px view: the same rotation, shift and contrast.
  from ms_cxr.data import images

  shrunk = np.stack([images.resize(x[:, :, 0].astype(np.uint8), 24) for x in large])[..., None]
  assert (
    np.abs(shrunk - small).mean() < 15.0
  )  # about 5 here; views drawn per size differ by about 60


def test_evaluation_is_padded_to_whole_batches_and_keeps_every_image(setup):
  config, _, test = setup
  batches = _take(pipeline.eval_dataset(test, config), 10)
  assert len(batches) == 3  # 11 images in batches of 4
  index = np.concatenate([b['index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  assert index[valid].tolist() == list(range(11))
  assert index[~valid].tolist() == [-1]
  padding = batches[-1]['image_32'][~batches[-1]['valid']]
  assert padding.max() == 0  # not decoded
  # Two processes: disjoint halves of every batch, together the split once.
  shards = [
    _take(pipeline.eval_dataset(test, config, process_index=p, process_count=2), 10) for p in (0, 1)
  ]
  seen = [i for shard in shards for b in shard for i in b['index'].tolist() if i >= 0]
  assert sorted(seen) == list(range(11))


def test_the_train_iterator_resumes_from_its_saved_state(setup):
  config, train, _ = setup
  iterator = iter(pipeline.train_dataset(train, config))
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()
  expected = next(iterator)
  resumed = iter(pipeline.train_dataset(train, config))
  resumed.set_state(state)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_16_bit_images_get_one_rule_whatever_their_maximum(tmp_path):
  """A ramp reaching 4000 and the same ramp reaching 4200 come out alike (a peak guessed per image sent the
  second to 1/16 of the brightness); a flat image is black."""
  from PIL import Image

  from ms_cxr.data import images

  ramp = np.linspace(0.0, 1.0, 64)[None, :].repeat(8, axis=0)
  decoded = []
  for peak in (4000, 4200, 60000):
    path = tmp_path / f'ramp_{peak}.png'
    Image.fromarray((ramp * peak).astype(np.uint16)).save(path)
    with Image.open(path) as img:
      assert img.mode.startswith('I')
      decoded.append(images.to_uint8_grayscale(img))
  for pixels in decoded:
    assert (pixels.min(), pixels.max()) == (0, 255)
    assert np.abs(pixels.astype(int) - decoded[0]).max() <= 1
  flat = tmp_path / 'flat.png'
  Image.fromarray(np.full((4, 4), 1234, np.uint16)).save(flat)
  with Image.open(flat) as img:
    assert images.to_uint8_grayscale(img).max() == 0


def _png(path, samples, colour_type):
  """A PNG of 16-bit big-endian `samples` [h, w, channels], written by hand (Pillow writes no 16-bit colour)."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  height, width = samples.shape[:2]
  rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in samples)  # filter 0 on every row
  header = struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)
  path.write_bytes(
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(rows))
    + chunk(b'IEND', b'')
  )


def test_16_bit_colour_pngs_are_refused_by_name(tmp_path):
  """Pillow reads 16-bit colour PNGs as 8-bit, from the high byte: a 12-bit ramp would become 16 grey levels."""
  from ms_cxr.data import images

  ramp = np.linspace(0, 4095, 32).astype(np.uint16)[None, :, None].repeat(4, axis=0)
  grey = tmp_path / 'grey16.png'
  _png(grey, ramp, colour_type=0)
  pixels = images.load(str(grey), (32,))[32]
  assert (pixels.min(), pixels.max()) == (0, 255)  # 16-bit grayscale: read whole, stretched
  for name, channels, colour_type in [('rgb16.png', 3, 2), ('grey_alpha16.png', 2, 4)]:
    path = tmp_path / name
    _png(path, ramp.repeat(channels, axis=2), colour_type)
    with pytest.raises(ValueError, match=rf'^{path}: a 16-bit colour PNG'):
      images.load(str(path), (32,))
