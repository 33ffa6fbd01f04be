r"""Dataset summary from label files: images, patients and label counts per split, after the configured policies.

  python -m ms_cxr.data.summary --dataset=nih --root=/data/ChestX-ray14 [--config.data.FIELD=VALUE ...]

Prints one JSON object: `num_images`, `num_patients`, and per split `{num_images, num_patients, labels: {label:
{positive, negative, unknown}}}`. Only label files are read unless `--check_images`, which also opens every image
and counts the ones that cannot be decoded. Run from the repository root (the default config is
configs/densenet.py).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ms_cxr import cli
from ms_cxr.data import datasets, images
from ms_cxr.data.records import label_matrix

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', 'configs/densenet.py', 'Config whose data section is used.'
)
flags.DEFINE_string('dataset', None, 'synthetic | nih | chexpert (overrides config.data.dataset).')
flags.DEFINE_string('root', None, 'Dataset folder (overrides config.data.root).')
flags.DEFINE_bool('check_images', False, 'Also decode every image and count failures.')


def summarize(data_config, check_images: bool = False) -> dict:
  """Counts per split for `data_config` (the config's data section)."""
  result = {'dataset': data_config.dataset, 'splits': {}}
  all_images, all_patients = set(), set()
  for split in datasets.SPLITS:
    records = datasets.load_split(data_config, split)
    matrix = label_matrix(records, len(data_config.labels))
    known = ~np.isnan(matrix)
    entry = {
      'num_images': len(records),
      'num_patients': len({r.patient_id for r in records}),
      'labels': {
        label: {
          'positive': int(np.sum(known[:, k] & (matrix[:, k] >= 0.5))),
          'negative': int(np.sum(known[:, k] & (matrix[:, k] < 0.5))),
          'unknown': int(np.sum(~known[:, k])),
        }
        for k, label in enumerate(data_config.labels)
      },
    }
    if check_images:
      bad = []
      for r in records:
        try:
          images.load(r.image, (32,))
        except ValueError as e:
          bad.append(str(e))
      entry['unreadable_images'] = len(bad)
      entry['unreadable_examples'] = bad[:5]
    result['splits'][split] = entry
    all_images.update(r.image for r in records)
    all_patients.update(r.patient_id for r in records)
  result['num_images'] = len(all_images)
  result['num_patients'] = len(all_patients)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  with cli.user_errors():
    if FLAGS.dataset:
      config.data.dataset = FLAGS.dataset
      config.data.labels = datasets.default_labels(FLAGS.dataset)
    if FLAGS.root:
      config.data.root = FLAGS.root
    print(json.dumps(summarize(config.data, FLAGS.check_images), indent=2))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
