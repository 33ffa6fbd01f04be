"""Label vocabularies of the supported datasets, in model-output order."""

# ChestX-ray14 (Wang et al. 2017): the 14 findings, in the order of the original paper and of most
# codebases.
NIH_LABELS = (
  'Atelectasis',
  'Cardiomegaly',
  'Effusion',
  'Infiltration',
  'Mass',
  'Nodule',
  'Pneumonia',
  'Pneumothorax',
  'Consolidation',
  'Edema',
  'Emphysema',
  'Fibrosis',
  'Pleural_Thickening',
  'Hernia',
)

# CheXpert (Irvin et al. 2019): the 14 observations, in the column order of train.csv / valid.csv.
CHEXPERT_LABELS = (
  'No Finding',
  'Enlarged Cardiomediastinum',
  'Cardiomegaly',
  'Lung Opacity',
  'Lung Lesion',
  'Edema',
  'Consolidation',
  'Pneumonia',
  'Atelectasis',
  'Pneumothorax',
  'Pleural Effusion',
  'Pleural Other',
  'Fracture',
  'Support Devices',
)

# The five CheXpert competition labels.
CHEXPERT_COMPETITION_LABELS = (
  'Atelectasis',
  'Cardiomegaly',
  'Consolidation',
  'Edema',
  'Pleural Effusion',
)
