"""DICOM decoding on the real SIIM-ACR chest DICOM beside the checkout (../shared/data) and on small files the
tests write with pydicom into tmp_path (MONOCHROME1, 12-bit with rescale and windows, signed, VOI LUT, damaged).
"""

import ast
import pathlib
import re

import numpy as np
import pydicom
import pytest
from packaging.specifiers import SpecifierSet
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
  ExplicitVRLittleEndian,
  JPEGLSLossless,
  SecondaryCaptureImageStorage,
  generate_uid,
)

from ms_cxr.data import dicom

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
SAMPLES = sorted((SHARED_DATA / 'dicom' / 'siim_acr').glob('*.dcm'))

needs_sample = pytest.mark.skipif(
  not SAMPLES,
  reason=f'real DICOM sample not found under {SHARED_DATA} (it lives beside the checkout)',
)


def _write(path: pathlib.Path, pixels: np.ndarray, **attributes) -> pathlib.Path:
  """Writes an uncompressed single-frame grayscale DICOM (12 bits stored in 16) with extra attributes."""
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
  ds.PixelRepresentation = int(pixels.dtype.kind == 'i')
  for name, value in attributes.items():
    setattr(ds, name, value)
  ds.PixelData = pixels.astype(pixels.dtype.newbyteorder('<')).tobytes()
  ds.save_as(path, enforce_file_format=True)
  return path


@pytest.fixture(scope='module')
def sample() -> pathlib.Path:
  if not SAMPLES:
    pytest.skip(f'real DICOM sample not found under {SHARED_DATA}')
  return SAMPLES[0]


@pytest.fixture(scope='module')
def decoded(sample) -> np.ndarray:
  return dicom.read_dicom(sample)


@needs_sample
def test_sample_decodes_to_full_range_uint8(sample, decoded):
  assert decoded.shape == (1024, 1024)
  assert decoded.dtype == np.uint8
  # No window in the file: min-max stretch of the stored 0..254.
  assert decoded.min() == 0 and decoded.max() == 255
  assert dicom.read_size(sample) == (1024, 1024)


@needs_sample
def test_sample_lungs_are_dark(decoded):
  # Regions chosen by looking at the image (PA view, patient's right lung on the image's left).
  right_lung = decoded[300:600, 220:360].mean()
  left_lung = decoded[260:560, 680:840].mean()
  mediastinum = decoded[300:700, 480:560].mean()
  assert max(right_lung, left_lung) < 140
  assert mediastinum > 190
  assert mediastinum - max(right_lung, left_lung) > 60


@needs_sample
def test_monochrome1_copy_decodes_to_the_same_image(tmp_path, sample, decoded):
  ds = pydicom.dcmread(sample)
  ds.decompress()
  peak = 2**ds.BitsStored - 1
  ds.PixelData = (peak - ds.pixel_array.astype(np.int32)).astype(np.uint8).tobytes()
  ds.PhotometricInterpretation = 'MONOCHROME1'
  path = tmp_path / 'monochrome1.dcm'
  ds.save_as(path)
  inverted = dicom.read_dicom(path)
  assert inverted.dtype == np.uint8
  assert np.abs(inverted.astype(np.int16) - decoded.astype(np.int16)).max() <= 1


@pytest.mark.parametrize('photometric', ['MONOCHROME2', 'MONOCHROME1'])
def test_twelve_bit_rescale_and_first_window(tmp_path, photometric):
  stored = np.array([[0, 512, 712, 912], [1312, 2000, 4095, 1112]], np.uint16)
  path = _write(
    tmp_path / 'ct_like.dcm',
    stored,
    PhotometricInterpretation=photometric,
    RescaleSlope=2,
    RescaleIntercept=-1024,
    # The first window is used: value v = 2 * stored - 1024; LINEAR with c = 1000.5, w = 2001 maps v <= 0 to 0,
    # v > 2000 to 255 and v in between to v / 2000 * 255 (e.g. stored 712 -> v 400 -> 51).
    WindowCenter=[1000.5, 40],
    WindowWidth=[2001, 400],
  )
  expected = np.array([[0, 0, 51, 102], [204, 255, 255, 153]], np.uint8)
  if photometric == 'MONOCHROME1':
    expected = 255 - expected
  np.testing.assert_array_equal(dicom.read_dicom(path), expected)


def test_signed_without_window_is_min_max_stretched(tmp_path):
  path = _write(tmp_path / 'signed.dcm', np.array([[-100, 60], [220, 300]], np.int16))
  # (v + 100) / 400 * 255.
  np.testing.assert_array_equal(dicom.read_dicom(path), [[0, 102], [204, 255]])


def test_voi_lut_sequence_is_preferred_and_scaled_by_its_entries(tmp_path):
  lut = Dataset()
  # 1024 entries from input 1000, nominally 16 bits but holding 0..4092 (a common writer quirk).
  lut.add_new(0x00283002, 'US', [1024, 1000, 16])  # LUT Descriptor
  lut.add_new(0x00283006, 'US', list(range(0, 4096, 4)))  # LUT Data
  path = _write(
    tmp_path / 'voi_lut.dcm',
    np.array([[0, 1000, 1341], [1682, 2023, 4095]], np.uint16),
    VOILUTSequence=Sequence([lut]),
    WindowCenter=40,
    WindowWidth=400,
  )
  # Input 1341 -> entry 341 -> 1364 -> 1364 / 4092 * 255 = 85.
  np.testing.assert_array_equal(dicom.read_dicom(path), [[0, 0, 85], [170, 255, 255]])


@needs_sample
def test_truncated_file_names_the_file(tmp_path, sample):
  path = tmp_path / 'truncated.dcm'
  path.write_bytes(sample.read_bytes()[: sample.stat().st_size // 2])
  with pytest.raises(ValueError, match=r'truncated\.dcm: the file is truncated'):
    dicom.read_dicom(path)


def test_truncated_uncompressed_file_names_file_and_syntax(tmp_path):
  path = _write(tmp_path / 'full.dcm', np.zeros((64, 64), np.uint16))
  cut = tmp_path / 'cut.dcm'
  cut.write_bytes(path.read_bytes()[:-4000])
  with pytest.raises(ValueError, match=r'cut\.dcm: cannot decode .*Explicit VR Little Endian'):
    dicom.read_dicom(cut)


@needs_sample
def test_undecodable_transfer_syntax_is_named(tmp_path, sample):
  ds = pydicom.dcmread(sample)
  # The JPEG Baseline stream relabelled as JPEG-LS: no installed decoder can read it as that.
  ds.file_meta.TransferSyntaxUID = JPEGLSLossless
  path = tmp_path / 'jpegls.dcm'
  ds.save_as(path)
  with pytest.raises(ValueError, match=r'jpegls\.dcm: cannot decode .*JPEG-LS Lossless'):
    dicom.read_dicom(path)


def test_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match=r'absent\.dcm: no such file'):
    dicom.read_dicom(tmp_path / 'absent.dcm')

  text = tmp_path / 'notes.dcm'
  text.write_text('not a DICOM file\n' * 20)
  with pytest.raises(ValueError, match=r'notes\.dcm: not a DICOM file'):
    dicom.read_dicom(text)

  path = _write(tmp_path / 'header_only.dcm', np.zeros((2, 2), np.uint16))
  ds = pydicom.dcmread(path)
  del ds.PixelData
  ds.save_as(path)
  with pytest.raises(ValueError, match=r'header_only\.dcm: no pixel data'):
    dicom.read_dicom(path)

  frames = _write(tmp_path / 'frames.dcm', np.zeros((4, 2), np.uint16), NumberOfFrames=2)
  with pytest.raises(ValueError, match=r'frames\.dcm: 2 frames'):
    dicom.read_dicom(frames)

  colour = _write(
    tmp_path / 'colour.dcm', np.zeros((2, 2), np.uint16), PhotometricInterpretation='RGB'
  )
  with pytest.raises(ValueError, match=r"colour\.dcm: PhotometricInterpretation 'RGB'"):
    dicom.read_dicom(colour)

  lut = Dataset()
  lut.add_new(0x00283002, 'US', [16, 0, 16])  # LUT Descriptor, but no LUT Data
  no_data = _write(
    tmp_path / 'no_lut_data.dcm', np.zeros((2, 2), np.uint16), VOILUTSequence=Sequence([lut])
  )
  with pytest.raises(
    ValueError, match=r'no_lut_data\.dcm: cannot apply the Modality / VOI LUT \(KeyError'
  ):
    dicom.read_dicom(no_data)


@pytest.mark.parametrize(
  'window',
  [
    dict(WindowCenter='', WindowWidth=''),  # present, empty
    dict(WindowCenter=None, WindowWidth=None),
    dict(WindowCenter=2000, WindowWidth=''),
    dict(WindowCenter='', WindowWidth=400),
    dict(WindowCenter=['', 40], WindowWidth=['', 400]),  # the first pair is the one used
    dict(WindowCenter=10, WindowWidth=0),  # width < 1 is not a window
    dict(WindowCenter=10, WindowWidth=0.5),
  ],
)
def test_empty_or_unusable_window_falls_back_to_min_max(tmp_path, window):
  stored = np.array([[0, 800], [2400, 4000]], np.uint16)
  # No usable window: v / 4000 * 255, as without the tags.
  expected = [[0, 51], [153, 255]]
  np.testing.assert_array_equal(dicom.read_dicom(_write(tmp_path / 'plain.dcm', stored)), expected)
  np.testing.assert_array_equal(
    dicom.read_dicom(_write(tmp_path / 'window.dcm', stored, **window)), expected
  )


@pytest.mark.parametrize(
  'photometric, shape, inverted',
  [
    ('MONOCHROME2', None, False),
    ('MONOCHROME2', 'IDENTITY', False),
    ('MONOCHROME2', 'INVERSE', True),
    ('MONOCHROME1', None, True),
    # The DX Image module requires INVERSE with MONOCHROME1: it is the same inversion, not a second one.
    ('MONOCHROME1', 'INVERSE', True),
  ],
)
def test_presentation_lut_shape_inverse(tmp_path, photometric, shape, inverted):
  stored = np.array([[0, 800], [2400, 4000]], np.uint16)
  attributes = {'PhotometricInterpretation': photometric}
  if shape is not None:
    attributes['PresentationLUTShape'] = shape
  expected = np.array([[0, 51], [153, 255]], np.uint8)
  if inverted:
    expected = 255 - expected
  np.testing.assert_array_equal(
    dicom.read_dicom(_write(tmp_path / 'shape.dcm', stored, **attributes)), expected
  )


def test_setup_requires_the_pydicom_this_module_imports():
  # dicom.py imports pydicom.pixels and the tests write with save_as(enforce_file_format=...): pydicom 3.0 on.
  tree = ast.parse((REPO / 'setup.py').read_text())
  requirements = [
    node.value
    for node in ast.walk(tree)
    if isinstance(node, ast.Constant)
    and isinstance(node.value, str)
    and re.match(r'pydicom\b', node.value)
  ]
  assert len(requirements) == 1, requirements
  specifier = SpecifierSet(requirements[0].removeprefix('pydicom'))
  assert not specifier.contains('2.4.4') and specifier.contains('3.0.0'), requirements[0]
