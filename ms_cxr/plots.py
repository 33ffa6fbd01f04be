"""Report figures (PNG, matplotlib without a display): ROC and precision-recall curves, reliability diagram,
attention-map overlays.

Curves have one panel per label with labelled axes and the label's AUROC / AP in the panel title; labels whose
known targets hold one class get an empty panel saying so. Files are written through a temporary name, so a
reader never sees half a PNG, and carry no timestamp, so the same predictions give the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')  # no display; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from ms_cxr import metrics  # noqa: E402
from ms_cxr.data.records import Box  # noqa: E402

_PNG_METADATA = {'Software': None}  # no matplotlib version in the file: same input, same bytes


def close(fig) -> None:
  """Frees a figure returned by a *_figure function without saving it."""
  plt.close(fig)


def _save(fig, path: str) -> None:
  tmp = path + '.tmp'
  fig.savefig(tmp, format='png', dpi=100, metadata=_PNG_METADATA)
  plt.close(fig)
  os.replace(tmp, path)


def _grid(num_panels: int, panel_inches: float = 2.6):
  cols = min(num_panels, 4)
  rows = math.ceil(num_panels / cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(panel_inches * cols, panel_inches * rows + 0.4), squeeze=False
  )
  for ax in axes.flat[num_panels:]:
    ax.set_visible(False)
  return fig, axes.flat


def _known(probs_k: np.ndarray, targets_k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  known = ~np.isnan(targets_k)
  y = targets_k[known] >= 0.5
  if y.all() or not y.any():
    return None
  return probs_k[known], y


def _one_class(ax) -> None:
  ax.text(0.5, 0.5, 'one class present:\nnot defined', ha='center', va='center', fontsize=8)


def roc_curves(
  path: str, probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], title: str = ''
) -> None:
  """Writes `roc_figure` to `path`."""
  _save(roc_figure(probs, targets, labels, title), path)


def _curve_panels(
  probs: np.ndarray,
  targets: np.ndarray,
  labels: Sequence[str],
  draw: Callable[[Any, np.ndarray, np.ndarray], str],
  *,
  xlabel: str,
  ylabel: str,
  title: str,
):
  """One panel per label: `draw(ax, y_true, scores)` plots a label with both classes present and returns the
  panel's figure of merit (shown under the label); a label with one class gets an empty panel saying so."""
  fig, axes = _grid(len(labels))
  for k, (ax, label) in enumerate(zip(axes, labels, strict=False)):
    known = _known(probs[:, k], targets[:, k])
    if known is None:
      _one_class(ax)
      ax.set_title(label, fontsize=9)
    else:
      ax.set_title(f'{label}\n{draw(ax, known[1], known[0])}', fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return fig


def roc_figure(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], title: str = ''):
  """One ROC panel per label: true positive rate (sensitivity) against false positive rate."""

  def draw(ax, y: np.ndarray, scores: np.ndarray) -> str:
    ax.plot([0, 1], [0, 1], color='0.7', linestyle='--', linewidth=0.8)
    fpr, tpr, _ = sk_metrics.roc_curve(y, scores)
    ax.plot(fpr, tpr, linewidth=1.4)
    return f'AUROC {sk_metrics.auc(fpr, tpr):.3f}'

  return _curve_panels(
    probs,
    targets,
    labels,
    draw,
    xlabel='False positive rate (1 - specificity)',
    ylabel='True positive rate (sensitivity)',
    title=title or 'ROC curves',
  )


def pr_curves(
  path: str, probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], title: str = ''
) -> None:
  """Writes `pr_figure` to `path`."""
  _save(pr_figure(probs, targets, labels, title), path)


def pr_figure(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str], title: str = ''):
  """One precision-recall panel per label, with the label's prevalence as the chance line."""

  def draw(ax, y: np.ndarray, scores: np.ndarray) -> str:
    precision, recall, _ = sk_metrics.precision_recall_curve(y, scores)
    prevalence = float(np.mean(y))
    ax.axhline(prevalence, color='0.7', linestyle='--', linewidth=0.8)
    ax.step(recall, precision, where='post', linewidth=1.4)
    ap = sk_metrics.average_precision_score(y, scores)
    return f'AP {ap:.3f} (prevalence {prevalence:.3f})'

  return _curve_panels(
    probs,
    targets,
    labels,
    draw,
    xlabel='Recall (sensitivity)',
    ylabel='Precision (PPV)',
    title=title or 'Precision-recall curves',
  )


def reliability_diagram(
  path: str, probs: np.ndarray, targets: np.ndarray, num_bins: int = 15, title: str = ''
) -> None:
  """Writes `reliability_figure` to `path`."""
  _save(reliability_figure(probs, targets, num_bins, title), path)


def reliability_figure(probs: np.ndarray, targets: np.ndarray, num_bins: int = 15, title: str = ''):
  """Observed positive rate against mean predicted probability per bin, pooled over labels, with counts."""
  curve = metrics.reliability_curve(probs, targets, num_bins)
  ece = metrics.expected_calibration_error(probs, targets, num_bins)
  fig, (ax, ax_counts) = plt.subplots(
    2, 1, figsize=(4.6, 5.6), sharex=True, gridspec_kw={'height_ratios': [3, 1]}
  )
  ax.plot([0, 1], [0, 1], color='0.6', linestyle='--', linewidth=0.8, label='perfect calibration')
  filled = curve.counts > 0
  ax.plot(
    curve.mean_predicted[filled],
    curve.observed_rate[filled],
    marker='o',
    linewidth=1.4,
    label='model',
  )
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel('Observed positive rate')
  ax.set_title(title or f'Reliability diagram (ECE {ece:.4f}, {num_bins} bins)', fontsize=10)
  ax.legend(fontsize=8, loc='upper left')
  ax_counts.bar(curve.bin_centers, curve.counts, width=1.0 / num_bins, color='0.5')
  ax_counts.set_yscale('log' if curve.counts.max() > 0 else 'linear')
  ax_counts.set_xlabel('Mean predicted probability')
  ax_counts.set_ylabel('Count')
  fig.tight_layout()
  return fig


def heatmap_overlay(
  path: str, image: np.ndarray, map_hw: np.ndarray, title: str, boxes: Sequence[Box] = ()
) -> None:
  """A grayscale image with a class-wise attention map (min-max normalised, upsampled) and any boxes on top."""
  size = image.shape[0]
  from ms_cxr import (
    localization,
  )  # localization imports nothing from here; kept local for import cost

  up = localization.upsample(map_hw, size)
  lo, hi = float(up.min()), float(up.max())
  normalised = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
  fig, ax = plt.subplots(figsize=(4.2, 4.5))
  ax.imshow(image, cmap='gray', vmin=0, vmax=255, extent=(0, 1, 1, 0))
  overlay = ax.imshow(normalised, cmap='jet', alpha=0.4, vmin=0, vmax=1, extent=(0, 1, 1, 0))
  for box in boxes:
    ax.add_patch(
      plt.Rectangle(
        (box.x0, box.y0),
        box.x1 - box.x0,
        box.y1 - box.y0,
        fill=False,
        edgecolor='lime',
        linewidth=1.5,
      )
    )
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=8)
  fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.03, label='attention (normalised)')
  fig.tight_layout()
  _save(fig, path)
