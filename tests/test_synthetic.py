"""Tests of the embedded synthetic dataset: determinism, grouping, prevalences, boxes, rendering."""

import collections
import dataclasses
import re

import numpy as np
import pytest

from ms_cxr.data import synthetic
from ms_cxr.data.records import Record

TARGET_PREVALENCE = {
  'Atelectasis': 0.14,
  'Cardiomegaly': 0.14,
  'Consolidation': 0.10,
  'Effusion': 0.28,
  'Mass': 0.05,
  'Nodule': 0.08,
  'Pneumothorax': 0.03,
}


@pytest.fixture(scope='module')
def records() -> list[Record]:
  return synthetic.make_records(seed=0, start=0, count=6000)


def _label_matrix(records):
  return np.stack([r.labels for r in records])


def _first_case_with(records, label, alone=True):
  """The first case whose only finding is `label` (or which has it, if not `alone`)."""
  k = synthetic.LABELS.index(label)
  for r in records:
    if r.labels[k] == 1 and (not alone or r.labels.sum() == 1):
      return synthetic.describe_case(0, int(r.id.removeprefix('synth_')))
  raise AssertionError(f'no record with {label}')


def _area_downscale(image, factor):
  n = image.shape[0] // factor
  return image.reshape(n, factor, n, factor).mean(axis=(1, 3))


def test_labels_are_the_seven_findings_in_order():
  assert synthetic.LABELS == (
    'Atelectasis',
    'Cardiomegaly',
    'Consolidation',
    'Effusion',
    'Mass',
    'Nodule',
    'Pneumothorax',
  )
  assert synthetic.IMAGES_PER_PATIENT == 3


def test_same_seed_and_index_give_identical_case_pixels_and_labels():
  a, b = synthetic.describe_case(7, 41), synthetic.describe_case(7, 41)
  assert a == b
  np.testing.assert_array_equal(synthetic.render(a, 96), synthetic.render(b, 96))
  ra, rb = synthetic.make_records(7, 40, 3), synthetic.make_records(7, 40, 3)
  for x, y in zip(ra, rb, strict=True):
    np.testing.assert_array_equal(x.labels, y.labels)
    assert (x.id, x.image, x.patient_id, x.boxes) == (y.id, y.image, y.patient_id, y.boxes)


def test_different_seed_gives_different_images_and_labels():
  a, b = synthetic.describe_case(0, 41), synthetic.describe_case(1, 41)
  assert a.cx != b.cx
  assert np.abs(synthetic.render(a, 64).astype(int) - synthetic.render(b, 64)).mean() > 1.0
  la = _label_matrix(synthetic.make_records(0, 0, 300))
  lb = _label_matrix(synthetic.make_records(1, 0, 300))
  assert (la != lb).any(axis=1).mean() > 0.2


def test_make_records_from_a_mid_patient_start_matches_a_full_run():
  full = synthetic.make_records(3, 0, 20)
  tail = synthetic.make_records(3, 10, 10)
  for x, y in zip(full[10:], tail, strict=True):
    np.testing.assert_array_equal(x.labels, y.labels)
    assert (x.id, x.patient_id, x.boxes, x.view) == (y.id, y.patient_id, y.boxes, y.view)


def test_record_fields(records):
  r = records[123]
  assert r.id == 'synth_00000123'
  assert r.image == synthetic.image_ref(0, 123) == 'synthetic:0:123'
  assert r.patient_id == 'synth_p000041'
  assert r.labels.dtype == np.float32 and r.labels.shape == (7,)
  labels = _label_matrix(records)
  assert set(np.unique(labels)) == {0.0, 1.0}
  assert {r.view for r in records} == {'PA', 'AP'}
  assert len({r.study_id for r in records}) == len(records)


@pytest.mark.parametrize('per_patient', [1, 3, 5])
def test_images_of_a_patient_share_id_and_cardiomegaly(per_patient):
  records = synthetic.make_records(0, 0, 600, images_per_patient=per_patient)
  groups = collections.defaultdict(list)
  for index, r in enumerate(records):
    groups[r.patient_id].append(index)
  assert len(groups) == 600 // per_patient
  cardiomegaly = synthetic.LABELS.index('Cardiomegaly')
  for patient_id, indices in groups.items():
    assert indices == list(range(indices[0], indices[0] + per_patient))
    assert patient_id == f'synth_p{indices[0] // per_patient:06d}'
    assert len({records[i].labels[cardiomegaly] for i in indices}) == 1
  # The same patient's images share anatomy up to a small positioning shift.
  a, b = synthetic.describe_case(0, 6, 3), synthetic.describe_case(0, 7, 3)
  assert a.half_width == b.half_width and abs(a.cx - b.cx) < 0.06


def test_prevalences_are_near_targets_with_co_occurrence(records):
  labels = _label_matrix(records)
  prevalence = dict(zip(synthetic.LABELS, labels.mean(axis=0), strict=True))
  for label, target in TARGET_PREVALENCE.items():
    assert 0.01 < prevalence[label] < 0.35, (label, prevalence[label])
    assert abs(prevalence[label] - target) < max(0.015, 0.25 * target), (label, prevalence[label])
  column = {label: labels[:, k] == 1 for k, label in enumerate(synthetic.LABELS)}
  effusion, cardiomegaly, atelectasis = (
    column['Effusion'],
    column['Cardiomegaly'],
    column['Atelectasis'],
  )
  assert effusion[cardiomegaly].mean() > 1.5 * effusion[~cardiomegaly].mean()
  assert atelectasis[effusion].mean() > 1.5 * atelectasis[~effusion].mean()


def test_boxes_are_inside_the_image_and_exactly_one_per_positive_label(records):
  for r in records:
    positives = [label for label, y in zip(synthetic.LABELS, r.labels, strict=True) if y == 1]
    assert sorted(b.label for b in r.boxes) == sorted(positives), r.id
    for b in r.boxes:
      assert 0.0 <= b.x0 < b.x1 <= 1.0 and 0.0 <= b.y0 < b.y1 <= 1.0, (r.id, b)


def test_finding_sizes_span_more_than_twentyfold(records):
  sizes = collections.defaultdict(list)
  for r in records:
    for b in r.boxes:
      sizes[b.label].append(np.sqrt((b.x1 - b.x0) * (b.y1 - b.y0)))
  median = {label: float(np.median(s)) for label, s in sizes.items()}
  assert 0.012 <= min(sizes['Nodule']) and max(sizes['Nodule']) <= 0.021
  assert 0.045 <= median['Mass'] <= 0.09
  assert max(median.values()) / median['Nodule'] >= 20, median


def test_cardiomegaly_enlarges_the_heart_beyond_a_cardiothoracic_ratio_of_055(records):
  k = synthetic.LABELS.index('Cardiomegaly')
  for r in records[:600]:
    case = synthetic.describe_case(0, int(r.id.removeprefix('synth_')))
    if r.labels[k]:
      (heart,) = [b for b in r.boxes if b.label == 'Cardiomegaly']
      assert (heart.x1 - heart.x0) / (2 * case.half_width) > 0.55
    else:
      assert case.heart_ctr < 0.52


def test_renders_look_like_a_chest_radiograph():
  case = dataclasses.replace(synthetic.describe_case(0, 0), findings=())
  rendered = synthetic.render(case, 128)
  assert rendered.dtype == np.uint8 and rendered.shape == (128, 128)
  image = rendered.astype(float)
  row = int(0.4 * 128)
  mediastinum = image[row, int(case.cx * 128)]
  lungs = [image[row, int((case.cx + s * case.half_width / 2) * 128)] for s in (-1, 1)]
  abdomen = image[int(0.9 * 128), int(case.cx * 128) + 10]
  assert mediastinum > max(lungs) + 60 and abdomen > max(lungs) + 60


@pytest.mark.parametrize('small', [64, 128])
def test_a_small_render_matches_a_downscaled_large_render(records, small):
  case = _first_case_with(records, 'Consolidation', alone=False)
  large = synthetic.render(case, 896).astype(float)
  low = synthetic.render(case, small).astype(float)
  r = np.corrcoef(_area_downscale(large, 896 // small).ravel(), low.ravel())[0, 1]
  assert r > 0.98


@pytest.mark.parametrize('label', synthetic.LABELS)
def test_a_finding_changes_pixels_inside_its_box(records, label):
  size = 256
  case = _first_case_with(records, label)
  (finding,) = case.findings
  with_finding = synthetic.render(case, size).astype(float)
  without = synthetic.render(dataclasses.replace(case, findings=()), size).astype(float)
  diff = np.abs(with_finding - without)
  inside = np.zeros((size, size), bool)
  x0, y0, x1, y1 = finding.box
  inside[int(y0 * size) : int(np.ceil(y1 * size)), int(x0 * size) : int(np.ceil(x1 * size))] = True
  assert diff[inside].mean() > 2.0, diff[inside].mean()
  assert diff[inside].mean() > 8 * diff[~inside].mean(), (diff[inside].mean(), diff[~inside].mean())
  if label != 'Atelectasis':  # whose volume loss lifts the whole hemidiaphragm, by design
    assert diff[inside].sum() > 0.6 * diff.sum(), (diff[inside].sum(), diff.sum())


def test_load_renders_the_referenced_image():
  np.testing.assert_array_equal(
    synthetic.load('synthetic:5:17', 64), synthetic.render(synthetic.describe_case(5, 17), 64)
  )
  record = synthetic.make_records(5, 17, 1, images_per_patient=4)[0]
  assert record.image == 'synthetic:5:17:4'
  np.testing.assert_array_equal(
    synthetic.load(record.image, 64), synthetic.render(synthetic.describe_case(5, 17, 4), 64)
  )


@pytest.mark.parametrize(
  'ref',
  [
    'synthetic:1',
    'synthetic:a:2',
    'synthetic:1:2:3:4',
    'synthetic:1:-2',
    'synthetic:1:2:0',
    'x.png',
  ],
)
def test_load_rejects_a_malformed_ref_naming_it(ref):
  with pytest.raises(ValueError, match=re.escape(repr(ref))):
    synthetic.load(ref, 32)
