"""Evaluation reports: localization scores, figures, the per-size and DeLong tables, attention maps, and every file
an evaluation of a synthetic run writes."""

import json

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, run_module
from PIL import Image

from configs import densenet
from ms_cxr import evaluate, localization, metrics, models, plots, report, train
from ms_cxr.data.records import Box, Record
from ms_cxr.errors import UserError


def _record(labels, boxes=(), name='a'):
  return Record(
    id=name, image='', labels=np.asarray(labels, np.float32), patient_id=name, boxes=boxes
  )


# --- localization ---------------------------------------------------------------------------------


def test_pointing_game_hit_miss_and_tolerance():
  box = Box('Nodule', 0.5, 0.5, 0.75, 0.75)  # the lower right quarter's upper left quarter
  peak_inside = np.zeros((8, 8), np.float32)
  peak_inside[5, 5] = 1.0  # centre (0.6875, 0.6875)
  peak_outside = np.zeros((8, 8), np.float32)
  peak_outside[1, 1] = 1.0  # centre (0.1875, 0.1875)
  peak_near = np.zeros((8, 8), np.float32)
  peak_near[6, 3] = 1.0  # centre x 0.4375 (0.0625 left of the box), y 0.8125 (0.0625 below)
  assert localization.pointing_hit(peak_inside, [box])
  assert not localization.pointing_hit(peak_outside, [box])
  assert not localization.pointing_hit(peak_near, [box])
  assert localization.pointing_hit(peak_near, [box], tolerance=0.07)
  # A flat map points nowhere: a miss, even over a box covering the whole image.
  assert localization.pointed_at(np.zeros((8, 8))) is None
  assert not localization.pointing_hit(np.ones((8, 8)), [Box('Nodule', 0.0, 0.0, 1.0, 1.0)])


def test_a_coarse_maps_edge_peak_points_at_its_cell_not_the_image_border():
  """A 2 x 2 map peaking in its top-left cell points at that cell's centre (0.25, 0.25). Upsampled bilinearly,
  the whole outer quarter of that cell is one tied plateau, whose first pixel is the image's corner."""
  coarse = np.array([[1.0, 0.2], [0.2, 0.0]], np.float32)
  assert localization.pointed_at(coarse) == (0.25, 0.25)
  around_the_centre = Box('Mass', 0.1, 0.1, 0.45, 0.45)
  assert localization.pointing_hit(coarse, [around_the_centre])
  up = localization.upsample(coarse, 224)
  assert (
    np.count_nonzero(up == up.max()) > 1000
  )  # the tie a pointing game on the upsampled map would break
  edge = np.zeros((7, 7), np.float32)
  edge[0, 3] = 1.0  # top edge, middle column: centre (1/14, 1/2)
  assert localization.pointed_at(edge) == pytest.approx((1 / 14, 0.5))


def test_iou_of_box_shaped_maps():
  box = Box('Mass', 0.25, 0.25, 0.75, 0.75)
  exact = localization.box_mask([box], 8).astype(np.float32)
  assert localization.iou(exact, [box], grid=8) == 1.0
  half = np.zeros((8, 8), np.float32)
  half[2:6, 2:4] = 1.0  # the box's left half: 8 of its 16 pixels
  assert localization.iou(half, [box], grid=8) == pytest.approx(0.5)
  # A flat map points nowhere: its thresholded mask is empty.
  assert localization.iou(np.zeros((8, 8), np.float32), [box], grid=8) == 0.0


def test_score_counts_only_present_boxed_labels():
  labels = ('Nodule', 'Mass')
  nodule = Box('Nodule', 0.0, 0.0, 0.5, 0.5)
  records = [
    _record([1, 0], (nodule,), 'hit'),  # scored: peak in the box
    _record([1, 0], (nodule,), 'miss'),  # scored: peak outside
    _record([0, 1], (nodule,), 'absent'),  # Nodule absent: its box is not scored; Mass has no box
    _record([1, 1], (), 'unboxed'),
  ]
  maps = np.zeros((4, 4, 4, 2), np.float32)
  maps[0, 0, 0, 0] = 1.0
  maps[1, 3, 3, 0] = 1.0
  assert localization.boxed_images(records, labels) == [0, 1]
  result = localization.score(maps, records, labels, grid=4)
  assert result['per_label']['Nodule']['num_images'] == 2
  assert result['per_label']['Nodule']['pointing_game'] == 0.5
  assert result['per_label']['Nodule']['flat_maps'] == 0
  assert result['per_label']['Mass'] is None
  assert result['labels_without_boxes'] == ['Mass']
  assert result['mean_pointing_game'] == 0.5
  with pytest.raises(ValueError, match=r'expected \[4, h, w, 2\]'):
    localization.score(maps[:3], records, labels)


# --- attention maps -------------------------------------------------------------------------------


def test_densenet_cam_averages_to_the_logits():
  config = densenet.get_config('smoke')
  model = models.create_model(config.model, 5, (64,))
  images = jax.random.randint(jax.random.key(1), (2, 64, 64, 1), 0, 256).astype(np.uint8)
  variables = model.init(jax.random.key(0), images, train=False)
  logits = model.apply(variables, images, train=False)
  cam = models.attention_maps(model, variables, images)
  assert cam.shape == (2, 2, 2, 5)  # 64 px / stride 32
  assert float(np.ptp(cam[0, :, :, 0])) > 0  # a map, not a constant
  np.testing.assert_allclose(cam.mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-5)


def test_test_time_views():
  images = np.arange(2 * 64 * 64).reshape(2, 64, 64, 1).astype(np.uint8)
  np.testing.assert_array_equal(train.tta_view(images, 'hflip')[:, :, ::-1], images)
  shifted = np.asarray(train.tta_view(images, 'shift'))
  np.testing.assert_array_equal(shifted[:, 2:, 2:], images[:, :-2, :-2])
  assert not shifted[:, :2].any() and not shifted[:, :, :2].any()
  zoomed = np.asarray(train.tta_view(np.full((1, 64, 64, 1), 7, np.uint8), 'zoom'))
  assert zoomed.shape == (1, 64, 64, 1) and (zoomed == 7).all()
  config = densenet.get_config('smoke')
  config.eval.tta = ('hflip,zoom',)  # how --config.eval.tta=hflip,zoom arrives
  assert train.tta_views(config) == ('hflip', 'zoom')
  with pytest.raises(ValueError, match='expected one of'):
    train.tta_view(images, 'flip')


# --- figures and tables ---------------------------------------------------------------------------


def _predictions(seed=0, n=80, k=3):
  rng = np.random.default_rng(seed)
  targets = (rng.random((n, k)) < 0.3).astype(np.float64)
  targets[:, 2] = 0.0  # one class only: an empty panel, no AUROC
  targets[::7, 0] = np.nan
  probs = np.clip(0.5 * targets + 0.5 * rng.random((n, k)), 0, 1)
  return np.nan_to_num(probs, nan=0.5), targets


@pytest.mark.parametrize(
  'figure, xlabel, ylabel',
  [
    (plots.roc_figure, 'False positive rate (1 - specificity)', 'True positive rate (sensitivity)'),
    (plots.pr_figure, 'Recall (sensitivity)', 'Precision (PPV)'),
  ],
)
def test_curve_figures_have_a_labelled_panel_per_label(figure, xlabel, ylabel):
  probs, targets = _predictions()
  fig = figure(probs, targets, ['A', 'B', 'C'])
  panels = [ax for ax in fig.axes if ax.get_visible()]
  assert len(panels) == 3
  assert all(ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel for ax in panels)
  auc = metrics.per_class_auroc(probs, targets, ['A', 'B', 'C'])['A']
  if figure is plots.roc_figure:
    assert panels[0].get_title() == f'A\nAUROC {auc:.3f}'
  assert panels[2].get_title() == 'C'  # one class present: no score in the title
  plots.close(fig)


def test_png_files_open_and_are_reproducible(tmp_path):
  probs, targets = _predictions()
  for name in ('a', 'b'):
    plots.roc_curves(str(tmp_path / f'roc_{name}.png'), probs, targets, ['A', 'B', 'C'])
    plots.reliability_diagram(str(tmp_path / f'rel_{name}.png'), probs, targets)
  assert (tmp_path / 'roc_a.png').read_bytes() == (tmp_path / 'roc_b.png').read_bytes()
  with Image.open(tmp_path / 'rel_a.png') as img:
    assert img.format == 'PNG' and img.size[0] > 300
  fig = plots.reliability_figure(probs, targets)
  assert [ax.get_xlabel() for ax in fig.axes] == ['', 'Mean predicted probability']
  assert fig.axes[0].get_ylabel() == 'Observed positive rate'
  plots.close(fig)


def test_per_size_table_names_the_winning_size():
  result = {
    'labels': ['A', 'B'],
    'fusion': 'mean_prob',
    'per_class_auroc': {'A': 0.8, 'B': 0.7},
    'mean_auroc': 0.75,
    'per_size': {
      '224': {'per_class_auroc': {'A': 0.7, 'B': 0.72}, 'mean_auroc': 0.71},
      '448': {'per_class_auroc': {'A': 0.75, 'B': 0.72}, 'mean_auroc': 0.735},
    },
  }
  lines = report.per_size_table(result).splitlines()
  assert lines[0] == '| label | 224 px | 448 px | fused (mean_prob) | best size |'
  assert lines[2] == '| A | 0.7000 | 0.7500 | 0.8000 | 448 px |'
  assert lines[3] == '| B | 0.7200 | 0.7200 | 0.7000 | 224 px |'  # a tie goes to the smaller size
  assert lines[-1] == '| labels won | 1 | 1 |  |  |'


def _write_run(folder, ids, probs, targets, labels):
  folder.mkdir(parents=True)
  evaluate.write_predictions(str(folder / 'predictions.csv'), ids, probs, targets, labels)


def test_compare_writes_the_delong_table(tmp_path):
  labels = ('A', 'B', 'C')
  probs_a, targets = _predictions(0)
  probs_b, _ = _predictions(1)
  ids = [f'img{i}' for i in range(len(targets))]
  _write_run(tmp_path / 'run_a' / 'eval' / 'test', ids, probs_a, targets, labels)
  # B's file lists the same images in another order: rows are matched by id.
  order = np.arange(len(ids))[::-1]
  _write_run(
    tmp_path / 'run_b' / 'eval' / 'test',
    [ids[i] for i in order],
    probs_b[order],
    targets[order],
    labels,
  )
  comparison = evaluate.compare(str(tmp_path / 'run_a'), str(tmp_path / 'run_b'))
  # predictions.csv stores repr(float): the test sees the same numbers the files hold.
  expected = metrics.delong_per_label(probs_a, probs_b, targets, labels)
  assert comparison['per_label']['C'] is None
  for label in ('A', 'B'):
    for key in ('auc_a', 'auc_b', 'z', 'p_value'):
      assert comparison['per_label'][label][key] == pytest.approx(expected[label][key], rel=1e-12)
  table = (tmp_path / 'run_a' / 'eval' / 'test' / 'delong_run_a_vs_run_b.md').read_text()
  assert f'{expected["A"]["p_value"]:.4g}' in table.splitlines()[2]
  saved = json.loads(
    (tmp_path / 'run_a' / 'eval' / 'test' / 'delong_run_a_vs_run_b.json').read_text()
  )
  assert saved['num_images'] == len(ids)

  _write_run(tmp_path / 'short' / 'eval' / 'test', ids[:-1], probs_b[:-1], targets[:-1], labels)
  with pytest.raises(UserError, match='cover different images'):
    evaluate.compare(str(tmp_path / 'run_a'), str(tmp_path / 'short'))
  flipped = targets.copy()
  flipped[0, 1] = 1.0 - flipped[0, 1]
  _write_run(tmp_path / 'other' / 'eval' / 'test', ids, probs_b, flipped, labels)
  with pytest.raises(UserError, match='different targets'):
    evaluate.compare(str(tmp_path / 'run_a'), str(tmp_path / 'other'))


# --- a whole evaluation ---------------------------------------------------------------------------


def _run_module(module: str, *args: str) -> None:
  """`python -m module args` from the checkout; it must succeed."""
  result = run_module(module, *args)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def msanet_run(tmp_path_factory):
  """The MS-ANet smoke run on the synthetic set (ChestX-ray14 label names), trained and evaluated."""
  workdir = tmp_path_factory.mktemp('runs') / 'msanet'
  _run_module(
    'ms_cxr.main',
    '--config=configs/msanet.py:dataset=synthetic,smoke',
    f'--workdir={workdir}',
    '--mode=train_and_evaluate',
  )
  return workdir


def test_msanet_smoke_run_writes_every_report_file(msanet_run):
  workdir = msanet_run
  out = workdir / 'eval' / 'test'
  for name in (
    'metrics.json',
    'predictions.csv',
    'table.md',
    'table.csv',
    'roc.png',
    'pr.png',
    'reliability.png',
    'localization.md',
    'attention_maps.npz',
  ):
    assert (out / name).is_file(), name
  heatmaps = sorted((out / 'heatmaps').glob('*.png'))
  assert heatmaps
  for path in [*heatmaps, out / 'roc.png']:
    with Image.open(path) as img:
      img.verify()
  saved = json.loads((out / 'metrics.json').read_text())
  for key in (
    'per_class_auroc_ci',
    'per_class_ap',
    'mean_auroc_ci',
    'operating_points_val_threshold',
  ):
    assert key in saved
  loc = saved['localization']
  assert set(loc['per_label']) == set(saved['labels'])
  assert sum(v['num_images'] for v in loc['per_label'].values() if v) > 0
  maps = np.load(out / 'attention_maps.npz')
  assert maps['maps'].shape[-1] == len(saved['labels'])
  assert list(maps['labels']) == saved['labels']

  # The standalone command re-evaluates the same checkpoint into another folder: identical metrics.
  _run_module('ms_cxr.evaluate', f'--workdir={workdir}', '--config.eval.name=again')
  assert (workdir / 'eval' / 'again' / 'metrics.json').read_bytes() == (
    out / 'metrics.json'
  ).read_bytes()
  # A pointing-game margin counts at least the same hits.
  _run_module(
    'ms_cxr.evaluate',
    f'--workdir={workdir}',
    '--config.eval.name=margin',
    '--config.eval.pointing_tolerance=0.1',
  )
  margin = json.loads((workdir / 'eval' / 'margin' / 'metrics.json').read_text())['localization']
  assert (loc['pointing_tolerance'], margin['pointing_tolerance']) == (0.0, 0.1)
  for label, entry in loc['per_label'].items():
    if entry:
      assert margin['per_label'][label]['pointing_game'] >= entry['pointing_game']


def _vindr_kaggle_root(root, num_images: int):
  """VinDr-CXR's Kaggle layout with the real labels of its first images; each image is the sample DICOM."""
  import gzip

  with gzip.open(SHARED_DATA / 'labels' / 'vinbigdata-train.csv.gz', 'rt') as f:
    lines = f.read().splitlines()
  by_image: dict[str, list[str]] = {}
  for line in lines[1:]:
    by_image.setdefault(line.split(',', 1)[0], []).append(line)

  def fits(rows):  # the stand-in DICOM is 1024 x 1024: keep images whose boxes lie inside it
    return all(float(v or 0) <= 1024 for row in rows for v in row.split(',')[4:])

  keep = [image for image, image_rows in by_image.items() if fits(image_rows)][:num_images]
  rows = [lines[0]] + [row for image in keep for row in by_image[image]]
  (root / 'train').mkdir(parents=True)
  (root / 'train.csv').write_text('\n'.join(rows) + '\n')
  (dicom,) = (SHARED_DATA / 'dicom' / 'siim_acr').glob('*.dcm')
  for image in keep:
    (root / 'train' / f'{image}.dicom').symlink_to(dicom)
  return root


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason='real test data not found beside the checkout')
def test_external_validation_on_vindr_writes_the_label_mapping(msanet_run, tmp_path):
  root = _vindr_kaggle_root(tmp_path / 'vindr', num_images=12)
  _run_module(
    'ms_cxr.evaluate',
    f'--workdir={msanet_run}',
    '--config.data.dataset=vindr',
    f'--config.data.root={root}',
    '--config.data.vindr.label_space=nih',
    '--config.eval.split=train',
    '--config.eval.val_thresholds=False',
    '--config.eval.name=vindr_external',
  )
  saved = json.loads((msanet_run / 'eval' / 'vindr_external' / 'metrics.json').read_text())
  assert saved['dataset'] == 'vindr'
  mapping = saved['label_mapping']
  assert mapping['to'] == 'nih'
  assert mapping['sources']['Effusion'] == ['Pleural effusion']
  assert mapping['sources']['Mass'] == mapping['sources']['Nodule'] == ['Nodule/Mass']
  assert mapping['unmapped'] == []
  assert saved['labels'] == list(densenet.get_config().data.labels)


def test_run_names_are_workdirs_and_unique():
  assert report.run_names(['runs/a/densenet_224', 'runs/ssbn/']) == ['densenet_224', 'ssbn']
  # A metrics.json is named by the workdir it was written in; equal names fall back to the paths given.
  assert report.run_names(['runs/x/eval/test/metrics.json', 'other/y.json']) == ['x', 'other']
  assert report.run_names(['runs/a/ssbn', 'runs/b/ssbn']) == ['runs/a/ssbn', 'runs/b/ssbn']


def test_localization_table_shows_each_runs_count_when_they_differ():
  def run(n, labels=('Mass', 'Nodule')):
    per_label = {
      label: {'num_images': n, 'pointing_game': 0.5, 'mean_iou': 0.25} for label in labels
    }
    return {
      'labels': list(labels),
      'localization': {'per_label': per_label, 'mean_pointing_game': 0.5, 'mean_iou': 0.25},
    }

  text = report.localization_table([('a', run(4)), ('b', run(4))])
  assert '| Mass | 4 | 0.500 | 0.250 | 0.500 | 0.250 |' in text
  assert (
    text.splitlines()[-1] == '| settings |  | margin ? | threshold ? | margin ? | threshold ? |'
  )
  tolerant = run(4)
  tolerant['localization'].update(pointing_tolerance=0.067, iou_threshold=0.5)
  text = report.localization_table([('a', tolerant), ('b', run(4))])
  assert text.splitlines()[-1].startswith(
    '| settings |  | margin 0.067 | threshold 0.5 | margin ? |'
  )
  text = report.localization_table([('a', run(4)), ('b', run(9))])
  assert '| Mass | 4 / 9 |' in text
  with pytest.raises(UserError, match="b has labels \\['Mass'\\]"):
    report.localization_table([('a', run(4)), ('b', run(4, ('Mass',)))])


def test_auroc_table_names_what_each_run_was_scored_on_when_the_runs_differ():
  def run(n, split='test'):
    return {
      'labels': ['Mass'],
      'per_class_auroc': {'Mass': 0.75},
      'mean_auroc': 0.75,
      'dataset': 'nih',
      'split': split,
      'num_images': n,
    }

  assert 'scored on' not in report.table([('a', run(900)), ('b', run(900))])
  lines = report.table([('a', run(900)), ('b', run(20))]).splitlines()
  assert lines[-2] == '| scored on | nih test, 900 images | nih test, 20 images |'


def test_an_ensembles_workdir_reports_its_ensemble_folder(tmp_path):
  ensemble = tmp_path / 'ensemble' / 'eval' / 'test_ensemble'
  ensemble.mkdir(parents=True)
  (ensemble / 'metrics.json').write_text(json.dumps({'mean_auroc': 0.8}))
  assert report.load_metrics(str(tmp_path / 'ensemble'))['mean_auroc'] == 0.8
  # A run with its own report: that one, not an ensemble evaluated into it.
  own = tmp_path / 'ensemble' / 'eval' / 'test'
  own.mkdir()
  (own / 'metrics.json').write_text(json.dumps({'mean_auroc': 0.7}))
  assert report.load_metrics(str(tmp_path / 'ensemble'))['mean_auroc'] == 0.7
  with pytest.raises(UserError, match='not found'):
    report.load_metrics(str(tmp_path / 'ensemble'), 'val')


@pytest.mark.parametrize(
  'args, message',
  [
    (['/nonexistent/run'], 'error: /nonexistent/run/eval/test/metrics.json not found'),
    (['--bogus', 'x'], "error: Unknown command line flag 'bogus'"),
    ([], 'error: give one or more workdirs'),
  ],
)
def test_report_command_errors_are_one_line_with_status_2(args, message):
  result = run_module('ms_cxr.report', *args)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(message)
