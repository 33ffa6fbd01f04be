"""The embedded default dataset `synthetic`: procedural chest radiographs with boxed findings.

It lets a researcher train and evaluate on a laptop CPU without downloading anything. Images are
made in two steps so that one case can be drawn at any resolution:

1. `describe_case(seed, index)` draws a `Case`, a resolution-independent description in image
   fractions ([0, 1], x to the right, y down; the patient's right is on the image left, as on a PA
   film).
   * Patient level, from (seed, patient) with `patient = index // images_per_patient`: thorax
     position and width, lung apex, costophrenic angles and diaphragm domes, mediastinum width,
     normal heart size, rib spacing, body habitus, lung-vessel pattern, a frailty score with
     per-finding predispositions, and a location template for every finding (so a lesion recurs
     at the same place on the patient's follow-up images). Cardiomegaly is decided here: it is
     chronic, hence identical on all of a patient's images.
   * Image level, from (seed, index): positioning shift, depth of inspiration, view (PA/AP),
     exposure and contrast, and which findings are present. Each finding is a logistic draw on
     the patient's predisposition, with co-occurrence: effusion is likelier with cardiomegaly and
     atelectasis likelier with effusion.
2. `render(case, size_px)` evaluates a density map made of smooth analytic shapes (soft tissue,
   mediastinum, spine, ribs, clavicles, heart, diaphragm domes, lungs) whose edges are defined in
   image fractions and never sharper than one pixel, so a render approximates the area average of
   a finer one. Lung texture (vessels radiating from the hila) is a fixed-size grid resampled to
   the output, and the per-pixel grain scales with the pixel size so it averages out on
   downscaling. A 64 px render therefore looks like a downscaled 896 px render of the same case.

Findings (`LABELS`) span a 20x range of sizes: Nodule (1.2-2% of the width), Mass (5-9%),
Atelectasis (a plate-like band or a collapsed-lobe wedge, with an elevated hemidiaphragm),
Consolidation (a patchy opacity 20-35% wide in one lung), Effusion (fluid with a meniscus blunting
a costophrenic angle), Pneumothorax (a dark rim without vessels at the apex and lateral edge, with a
thin pleural line) and Cardiomegaly (cardiothoracic ratio 0.57-0.66 against 0.42-0.48). Each present
finding carries a `Box` in image fractions.

Everything is deterministic from (seed, index) through `np.random.SeedSequence`; there is no global
random state.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ms_cxr.data.records import Box, Record

LABELS: tuple[str, ...] = (
  'Atelectasis',
  'Cardiomegaly',
  'Consolidation',
  'Effusion',
  'Mass',
  'Nodule',
  'Pneumothorax',
)
IMAGES_PER_PATIENT: int = 3

# Independent random streams; the stream id sits at a fixed position of the seed key so that no
# (patient, index) pair can collide with another stream's key.
_PATIENT_STREAM = 1
_IMAGE_STREAM = 2
_GRAIN_STREAM = 3
_FINDING_STREAM = 4
_TEXTURE_STREAM = 5
_EXPOSURE_STREAM = 6

_RETROCARDIAC_SHADOW = 0.85  # share of the lung's air behind the heart that the heart masks
_TEXTURE_GRID = 160  # side of the fixed grid the lung texture is drawn on before resampling
_REF_PREFIX = 'synthetic:'

# Logistic intercepts of the finding models, tuned so that the marginal prevalences come out near
# Effusion 0.28, Atelectasis 0.14, Cardiomegaly 0.14, Consolidation 0.10, Nodule 0.08, Mass 0.05
# and Pneumothorax 0.03.
_INTERCEPT = {
  'Cardiomegaly': -2.1,
  'Effusion': -1.55,
  'Atelectasis': -2.8,
  'Consolidation': -2.9,
  'Nodule': -4.2,
  'Mass': -5.0,
  'Pneumothorax': -4.0,
}
# How much the patient's frailty score raises each finding's logit.
_FRAILTY = {
  'Effusion': 0.8,
  'Atelectasis': 0.6,
  'Consolidation': 0.6,
  'Nodule': 0.0,
  'Mass': 0.3,
  'Pneumothorax': 0.0,
}
# Spread of the patient predisposition per finding: large for lesions that persist (nodule, mass).
_PREDISPOSITION = {
  'Effusion': 1.0,
  'Atelectasis': 1.0,
  'Consolidation': 1.0,
  'Nodule': 2.5,
  'Mass': 2.5,
  'Pneumothorax': 1.0,
}


@dataclasses.dataclass(frozen=True)
class Finding:
  """One finding of a case, in image fractions.

  Attributes:
    label: one of `LABELS`.
    side: -1 for the image-left lung (patient's right), +1 for the image-right lung.
    x, y: centre (Nodule, Mass, Consolidation, Atelectasis band), apex at the hilum (Atelectasis
      wedge), the point the lung collapses towards (Pneumothorax); `y` is the fluid level of an
      Effusion.
    rx, ry: radii (Nodule, Mass, Consolidation); half length and half thickness (Atelectasis
      band); length and half width at the base (Atelectasis wedge); `ry` is the meniscus height of
      an Effusion.
    angle: direction in radians (Atelectasis), phase of a Mass's lobulation.
    strength: share of the air displaced, or opacity, in [0, 1]; the cardiothoracic ratio for
      Cardiomegaly; the collapsed share of the lung for Pneumothorax.
    kind: 'band' or 'wedge' for Atelectasis, '' otherwise.
    box: (x0, y0, x1, y1) of the visible finding.
  """

  label: str
  side: int
  x: float
  y: float
  rx: float
  ry: float
  angle: float
  strength: float
  kind: str
  box: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Case:
  """A resolution-independent description of one synthetic radiograph (image fractions).

  Attributes:
    seed, patient, index: provenance; `render` draws the patient's vessel pattern from (seed,
      patient) and the image's grain from (seed, index).
    view: 'PA' or 'AP'.
    cx: x of the midline (spine).
    half_width: distance from the midline to the lateral lung edges.
    apex_y: y of the lung apices.
    base_y: y of the costophrenic angles.
    dome: height of each diaphragm dome above its costophrenic angle.
    mediastinum: half width of the upper mediastinum.
    heart_ctr: cardiothoracic ratio of the normal heart (Cardiomegaly replaces it).
    rib_spacing: posterior rib period at the apex (it grows towards the bases).
    rib_phase: rib pattern phase, (image-left, image-right), in periods.
    clavicle_y: y of the medial ends of the clavicles.
    body_width: half width of the torso's soft tissue at the shoulders.
    exposure, contrast, gamma: the film's response (offset, gain, curvature).
    grain: quantum noise std at 256 px (it scales with the pixel size).
    findings: the present findings.
  """

  seed: int
  patient: int
  index: int
  view: str
  cx: float
  half_width: float
  apex_y: float
  base_y: float
  dome: tuple[float, float]
  mediastinum: float
  heart_ctr: float
  rib_spacing: float
  rib_phase: tuple[float, float]
  clavicle_y: float
  body_width: float
  exposure: float
  contrast: float
  gamma: float
  grain: float
  findings: tuple[Finding, ...] = ()


# ------------------------------------------------------------------------------------------------
# Random draws


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(list(key)))


class _Draws:
  """Random numbers drawn in one numpy call, handed out in order (numpy is slow per call)."""

  def __init__(self, *key: int, n: int = 96):
    rng = _rng(*key)
    self._uniform = iter(rng.random(n).tolist())
    self._normal = iter(rng.standard_normal(n // 8).tolist())

  def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * next(self._uniform)

  def normal(self) -> float:
    return next(self._normal)


def _sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# Geometry shared by description and rendering


def _side_index(side: int) -> int:
  return (side + 1) // 2


def _inside(d: np.ndarray, width: float) -> np.ndarray:
  """Soft indicator of `d < 0`: 1 inside, 0 outside, a linear ramp `width` wide across d = 0."""
  t = d * (-1.0 / width)
  t += 0.5
  np.maximum(t, 0.0, out=t)
  return np.minimum(t, 1.0, out=t)


def _ellipse_distance(
  dx: np.ndarray, dy: np.ndarray, ax: float | np.ndarray, ay: float
) -> np.ndarray:
  """Approximate signed distance to an axis-aligned ellipse (first order, exact on the boundary)."""
  p2 = (dx / ax) ** 2
  q2 = (dy / ay) ** 2
  rho = np.sqrt(p2 + q2)
  grad = np.sqrt(p2 / (ax * ax) + q2 / (ay * ay))
  np.maximum(grad, 1e-6, out=grad)
  rho *= rho - 1.0
  rho /= grad
  return rho


def _edge(width: float, px: float) -> float:
  """An edge of intrinsic `width`, blurred by the pixel footprint (what area-averaging does)."""
  return math.hypot(width, 1.2 * px)


def _clip_box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
  return (max(0.0, float(x0)), max(0.0, float(y0)), min(1.0, float(x1)), min(1.0, float(y1)))


class _Geometry:
  """Thorax geometry of a case (image fractions), shared by describe and render.

  Each lung is an ellipse cut medially by the mediastinum and below by a parabolic diaphragm dome;
  the ellipse's lateral edge is near vertical where it meets the dome, which makes the sharp
  costophrenic angle. The heart is a tilted ellipse, a third of it right of the midline, whose
  lower half hides in the diaphragm. Cardiomegaly (the heart) and atelectasis (volume loss lifts
  the hemidiaphragm) change the geometry, so it is built from the anatomy plus those findings.
  """

  def __init__(self, case: Case, findings: tuple[Finding, ...]):
    by_label = {f.label: f for f in findings}
    self.cx = cx = case.cx
    self.half_width = w = case.half_width
    self.apex_y = case.apex_y
    self.mediastinum = case.mediastinum
    # Volume loss (atelectasis) lifts the hemidiaphragm of its side; the rest of the lung stays.
    base_y = [case.base_y, case.base_y]
    atelectasis = by_label.get('Atelectasis')
    if atelectasis is not None:
      base_y[_side_index(atelectasis.side)] -= 0.03 * atelectasis.strength
    self.base_y = tuple(base_y)  # the costophrenic angles
    self.ellipse = {}  # side -> lung ellipse (ex, ey, ax, ay)
    self.dome = {}  # side -> (peak x, peak y, curvature)
    # The ellipse reaches past the midline so the mediastinum cuts a straight medial border; its
    # equator sits above the base so the upper lobes are wide but the apex stays rounded.
    ey = case.base_y - 0.12
    for side in (-1, 1):
      self.ellipse[side] = (cx + side * (w - 0.06) / 2, ey, (w + 0.06) / 2, ey - case.apex_y)
      base, dome = base_y[_side_index(side)], case.dome[_side_index(side)]
      self.dome[side] = (cx + side * 0.45 * w, base - dome, dome / (0.55 * w) ** 2)
    hilum_y = case.apex_y + 0.42 * (case.base_y - case.apex_y)
    self.hilum = {side: (cx + side * (case.mediastinum + 0.035), hilum_y) for side in (-1, 1)}

    cardiomegaly = by_label.get('Cardiomegaly')
    ctr = case.heart_ctr if cardiomegaly is None else cardiomegaly.strength
    width = ctr * 2 * w
    self.heart_ry = ry = width * (0.5 if cardiomegaly is None else 0.44)
    self.heart_tilt = tilt = 0.15  # the apex leans to the image right and down
    self.heart_x = hx = cx + 0.1 * width
    # Extents from the centre, a third of the width right of the midline; the tilt widens the
    # ellipse by tilt * ry, which the radii make up for.
    self.heart_r = {
      side: math.sqrt(extent**2 - (tilt * ry) ** 2)
      for side, extent in ((-1, hx - (cx - width / 3)), (1, cx + 2 * width / 3 - hx))
    }
    self.heart_y = case.base_y - case.dome[1] - 0.03  # on the (unlifted) left hemidiaphragm
    visible_bottom = float(self.diaphragm(1, np.array(cx + 2 * width / 3)))
    self.heart_box = (
      cx - width / 3,
      self.heart_y - ry,
      cx + 2 * width / 3,
      min(visible_bottom, self.heart_y + ry),
    )

  def diaphragm(self, side: int, u: np.ndarray) -> np.ndarray:
    """y of the diaphragm of `side` at x = u: a parabolic dome laterally, flat under the heart."""
    peak_x, peak_y, curvature = self.dome[side]
    return peak_y + curvature * np.maximum(side * (u - peak_x), 0.0) ** 2

  def mediastinum_half_width(self, v: np.ndarray) -> np.ndarray:
    """The mediastinum widens from the thoracic inlet down to the hila."""
    t = np.minimum(np.maximum((v - self.apex_y) / 0.35, 0.0), 1.0)
    return self.mediastinum * (1.0 + 0.3 * t * t * (3.0 - 2.0 * t))

  def lung(self, side: int, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Soft mask of one lung (heart not cut out) at the grid u [1, n] x v [m, 1]."""
    ex, ey, ax, ay = self.ellipse[side]
    mask = _inside(_ellipse_distance(u - ex, v - ey, ax, ay), _edge(0.004, px))
    mask *= _inside(self.mediastinum_half_width(v) - side * (u - self.cx), _edge(0.006, px))
    mask *= _inside(v - self.diaphragm(side, u), _edge(0.003, px))
    return mask

  def heart(self, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Soft mask of the heart at the grid u [1, n] x v [m, 1]."""
    dy = v - self.heart_y
    dx = (u - self.heart_x) - self.heart_tilt * dy
    radius = np.where(dx > 0, self.heart_r[1], self.heart_r[-1])
    return _inside(_ellipse_distance(dx, dy, radius, self.heart_ry), _edge(0.004, px))

  def aerated(self, side: int, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Air share of the lung of `side`: the heart hides most, not all, of the lung behind it."""
    return self.lung(side, u, v, px) * (1.0 - _RETROCARDIAC_SHADOW * self.heart(u, v, px))

  def lung_box(self, side: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) holding the lung of `side`."""
    ex, _, ax, _ = self.ellipse[side]
    x0, x1 = sorted((self.cx + side * self.mediastinum, ex + side * ax))
    return x0, self.apex_y, x1, self.base_y[_side_index(side)]

  def lung_point(self, side: int, fy: float, fx: float, margin: float) -> tuple[float, float]:
    """A point of the lung of `side`, clear of the heart and `margin` inside the lung's edges.

    `fy` runs from near the apex (0) to near the base (1), `fx` from medial (0) to lateral (1).
    """
    ex, ey, ax, ay = self.ellipse[side]
    y = self.apex_y + 0.08 + fy * (self.base_y[_side_index(side)] - self.apex_y - 0.12)
    half = ax * math.sqrt(max(0.0, 1.0 - ((y - ey) / ay) ** 2))
    lateral = side * (ex - self.cx) + half - margin
    medial = float(self.mediastinum_half_width(y)) + margin
    dy = y - self.heart_y
    if abs(dy) < self.heart_ry:
      centre = self.heart_x + self.heart_tilt * dy
      reach = self.heart_r[side] * math.sqrt(1.0 - (dy / self.heart_ry) ** 2)
      medial = max(medial, side * (centre - self.cx) + reach + margin)
    medial = min(medial, lateral)
    x = self.cx + side * (medial + fx * (lateral - medial))
    return x, min(y, float(self.diaphragm(side, x)) - margin)


# ------------------------------------------------------------------------------------------------
# Finding shapes: soft masks in [0, 1], shared by the boxes (coarse grid) and the renderer.


def _local(f: Finding, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Coordinates along and across the finding's axis (`angle`), from (x, y)."""
  cos, sin = math.cos(f.angle), math.sin(f.angle)
  dx, dy = u - f.x, v - f.y
  return dx * cos + dy * sin, dy * cos - dx * sin


def _round_shape(f: Finding, u: np.ndarray, v: np.ndarray, px: float, lobulation: float):
  """A round opacity, thicker in the middle like a sphere; lobulated for masses."""
  dx, dy = u - f.x, v - f.y
  r = np.sqrt(dx * dx + dy * dy)
  radius = f.rx
  if lobulation:
    radius = f.rx * (1.0 + lobulation * np.cos(3.0 * np.arctan2(dy, dx) + f.angle))
  sphere = np.sqrt(np.clip(1.0 - (r / radius) ** 2, 0.0, 1.0))
  return _inside(r - radius, _edge(0.15 * f.rx, px)) * (0.4 + 0.6 * sphere)


def _atelectasis_shape(f: Finding, u: np.ndarray, v: np.ndarray, px: float):
  """A plate-like band (`rx` half long, `ry` half thick) or a collapsed-lobe wedge (apex at (x, y),
  pointing along `angle`, `rx` long, `ry` half wide at its base)."""
  along, across = _local(f, u, v)
  edge = _edge(0.004, px)
  if f.kind == 'band':
    return _inside(np.abs(along) - f.rx, _edge(0.01, px)) * _inside(np.abs(across) - f.ry, edge)
  taper = f.ry / f.rx
  sides = (np.abs(across) - taper * along) / math.sqrt(1.0 + taper * taper)
  return _inside(-along, edge) * _inside(along - f.rx, _edge(0.02, px)) * _inside(sides, edge)


def _effusion_shape(g: _Geometry, f: Finding, u: np.ndarray, v: np.ndarray, px: float):
  """Fluid below level `y`, climbing the lateral chest wall in a meniscus `ry` high."""
  lateral = np.minimum(np.maximum(f.side * (u - g.cx) / g.half_width, 0.0), 1.0)
  return _inside(f.y - f.ry * lateral * lateral - v, _edge(0.025, px))


def _pneumothorax_distance(g: _Geometry, f: Finding, u: np.ndarray, v: np.ndarray):
  """Signed distance to the collapsed lung: the lung ellipse shrunk by `strength` towards (x, y)."""
  ex, ey, ax, ay = g.ellipse[f.side]
  keep = 1.0 - f.strength
  cx, cy = f.x + keep * (ex - f.x), f.y + keep * (ey - f.y)
  return _ellipse_distance(u - cx, v - cy, keep * ax, keep * ay)


def _shape(g: _Geometry, f: Finding, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
  """The finding's soft mask; for Pneumothorax the air rim between chest wall and collapsed lung."""
  if f.label == 'Nodule':
    return _round_shape(f, u, v, px, lobulation=0.0)
  if f.label == 'Mass':
    return _round_shape(f, u, v, px, lobulation=0.12)
  if f.label == 'Consolidation':
    return _inside(_ellipse_distance(u - f.x, v - f.y, f.rx, f.ry), _edge(0.03, px))
  if f.label == 'Atelectasis':
    return _atelectasis_shape(f, u, v, px)
  if f.label == 'Effusion':
    return _effusion_shape(g, f, u, v, px)
  if f.label == 'Pneumothorax':
    return 1.0 - _inside(_pneumothorax_distance(g, f, u, v), _edge(0.002, px))
  raise ValueError(f'no shape for {f.label!r}')


def _patchiness(case: Case, f: Finding, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Consolidation is patchy: denser blobs (acini filling unevenly) over a fainter haze."""
  draws = _Draws(case.seed, _FINDING_STREAM, case.index, LABELS.index(f.label), n=24)
  patches = np.zeros(np.broadcast_shapes(u.shape, v.shape), np.float32)
  for _ in range(7):
    angle, reach = draws.uniform(0, 2 * math.pi), 0.6 * math.sqrt(draws.uniform())
    bx, by = f.x + reach * f.rx * math.cos(angle), f.y + reach * f.ry * math.sin(angle)
    size = draws.uniform(0.3, 0.55) * min(f.rx, f.ry)
    patches += np.exp((-0.5 / size**2) * ((u - bx) ** 2 + (v - by) ** 2))
  return 0.45 + 0.55 * np.minimum(patches, 1.0)


def _extent(g: _Geometry, f: Finding) -> tuple[float, float, float, float]:
  """A box surely holding the finding's shape (where the renderer evaluates it)."""
  if f.label in ('Nodule', 'Mass'):
    r = 1.15 * f.rx + 0.01
    return _clip_box(f.x - r, f.y - r, f.x + r, f.y + r)
  if f.label == 'Consolidation':
    return _clip_box(f.x - f.rx - 0.04, f.y - f.ry - 0.04, f.x + f.rx + 0.04, f.y + f.ry + 0.04)
  if f.label == 'Atelectasis':
    tip_x, tip_y = f.x + f.rx * math.cos(f.angle), f.y + f.rx * math.sin(f.angle)
    # A wedge runs from its apex (x, y) to the tip; a band is centred on (x, y).
    tail_x, tail_y = (2 * f.x - tip_x, 2 * f.y - tip_y) if f.kind == 'band' else (f.x, f.y)
    m = f.ry + 0.03
    return _clip_box(
      min(tip_x, tail_x) - m, min(tip_y, tail_y) - m, max(tip_x, tail_x) + m, max(tip_y, tail_y) + m
    )
  if f.label == 'Cardiomegaly':
    return g.heart_box
  x0, y0, x1, y1 = g.lung_box(f.side)  # Effusion, Pneumothorax
  return _clip_box(x0 - 0.01, y0 - 0.01, x1 + 0.01, y1 + 0.01)


def _box(g: _Geometry, f: Finding) -> tuple[float, float, float, float]:
  """The visible finding's bounding box: analytic for round ones and the heart, else where the
  shape lies over aerated lung, found on a coarse grid."""
  if f.label in ('Nodule', 'Mass'):
    r = f.rx * (1.12 if f.label == 'Mass' else 1.0)  # a mass's lobules reach 12% further
    return _clip_box(f.x - r, f.y - r, f.x + r, f.y + r)
  if f.label == 'Cardiomegaly':
    return _clip_box(*g.heart_box)
  x0, y0, x1, y1 = _extent(g, f)
  grid = 24
  u = np.linspace(x0, x1, grid)[None, :]
  v = np.linspace(y0, y1, grid)[:, None]
  shape = _shape(g, f, u, v, 0.0) > 0.5
  visible = shape & (g.aerated(f.side, u, v, 0.0) > 0.35)
  # A shape wholly hidden behind the heart (rare) is boxed where it lies.
  rows, cols = np.nonzero(visible if visible.any() else shape)
  dx, dy = (x1 - x0) / (grid - 1), (y1 - y0) / (grid - 1)
  return _clip_box(
    x0 + dx * (cols.min() - 0.5),
    y0 + dy * (rows.min() - 0.5),
    x0 + dx * (cols.max() + 0.5),
    y0 + dy * (rows.max() + 0.5),
  )


# ------------------------------------------------------------------------------------------------
# Description


@dataclasses.dataclass(frozen=True)
class _Patient:
  """What is fixed for all of a patient's images."""

  anatomy: dict[str, float]  # Case fields before the image's positioning
  risk: dict[str, float]  # logit offset per finding: frailty plus predisposition
  cardiothoracic: float  # the enlarged heart's ratio if the patient has cardiomegaly, else 0
  template: dict[str, tuple[float, ...]]  # per finding: uniforms fixing side, place, size, shape


def _draw_patient(seed: int, patient: int) -> _Patient:
  d = _Draws(seed, _PATIENT_STREAM, patient)
  anatomy = {
    'cx': d.uniform(0.485, 0.515),
    'half_width': d.uniform(0.33, 0.4),
    'apex_y': d.uniform(0.09, 0.15),
    'base_y': d.uniform(0.7, 0.79),
    'dome_left': d.uniform(0.1, 0.14),  # the patient's right hemidiaphragm sits higher
    'dome_right': d.uniform(0.08, 0.11),
    'mediastinum': d.uniform(0.045, 0.06),
    'heart_ctr': d.uniform(0.42, 0.48),
    'rib_spacing': d.uniform(0.058, 0.07),
    'rib_phase_left': d.uniform(),
    'rib_phase_right': d.uniform(),
    'clavicle_y': d.uniform(0.15, 0.2),
    'body_width': d.uniform(0.52, 0.62),
  }
  frailty = d.normal()
  cardiomegaly = d.uniform() < _sigmoid(_INTERCEPT['Cardiomegaly'] + frailty)
  cardiothoracic = d.uniform(0.57, 0.66)
  risk = {k: _FRAILTY[k] * frailty + s * d.normal() for k, s in _PREDISPOSITION.items()}
  template = {label: tuple(d.uniform() for _ in range(6)) for label in LABELS}
  return _Patient(anatomy, risk, cardiothoracic if cardiomegaly else 0.0, template)


def _present(p: _Patient, d: _Draws) -> set[str]:
  """Which findings the image shows: logistic draws with co-occurrence."""
  present = {'Cardiomegaly'} if p.cardiothoracic else set()

  def draw(label: str, boost: float = 0.0) -> None:
    if d.uniform() < _sigmoid(_INTERCEPT[label] + p.risk[label] + boost):
      present.add(label)

  draw('Effusion', 1.8 * ('Cardiomegaly' in present))
  draw('Atelectasis', 1.5 * ('Effusion' in present))
  draw('Consolidation', 0.6 * ('Effusion' in present))
  draw('Nodule')
  draw('Mass')
  draw('Pneumothorax')
  return present


def _side(template: tuple[float, ...]) -> int:
  return -1 if template[0] < 0.5 else 1


def _place(g: _Geometry, label: str, t: tuple[float, ...], d: _Draws, strength: float) -> Finding:
  """A finding (box still empty) from the patient's template `t`, jittered with `d`."""
  side = _side(t)
  scale, jx, jy = d.uniform(0.9, 1.1), d.uniform(-0.008, 0.008), d.uniform(-0.008, 0.008)

  def finding(x, y, rx, ry, angle=0.0, kind='', value=strength) -> Finding:
    return Finding(label, side, x, y, rx, ry, angle, value, kind, (0.0, 0.0, 0.0, 0.0))

  if label == 'Nodule':
    r = 0.006 + 0.004 * t[3]  # 1.2-2% of the width across
    x, y = g.lung_point(side, t[1], 0.15 + 0.7 * t[2], r + 0.01)
    return finding(x + jx, y + jy, r, r)
  if label == 'Mass':
    r = scale * (0.025 + 0.02 * t[3])  # 5-9% across
    x, y = g.lung_point(side, t[1], 0.2 + 0.6 * t[2], r + 0.01)
    return finding(x + jx, y + jy, r, r, angle=2 * math.pi * t[4])
  if label == 'Consolidation':
    rx = scale * (0.1 + 0.07 * t[3])  # 20-35% across
    x, y = g.lung_point(side, 0.15 + 0.7 * t[1], 0.3 + 0.4 * t[2], 0.03)
    return finding(x + jx, y + jy, rx, rx * (0.8 + 0.5 * t[4]))
  if label == 'Atelectasis':
    if t[5] < 0.6:  # a plate-like band in a lower zone
      x, y = g.lung_point(side, 0.55 + 0.35 * t[1], 0.3 + 0.4 * t[2], 0.04)
      half_length, half_thickness = scale * (0.05 + 0.04 * t[3]), 0.005 + 0.006 * t[4]
      return finding(x + jx, y + jy, half_length, half_thickness, 0.6 * (t[2] - 0.5), 'band')
    hx, hy = g.hilum[side]
    if t[1] < 0.5:  # upper lobe collapse: a wedge from the hilum up towards the apex
      angle = -math.pi / 2 + side * (0.25 + 0.25 * t[2])
      length = (hy - g.apex_y - 0.03) / abs(math.sin(angle))
    else:  # lower lobe collapse: a wedge from the hilum down to the base
      angle = math.pi / 2 - side * (0.3 + 0.3 * t[2])
      length = g.base_y[_side_index(side)] - hy
    return finding(hx, hy, length, scale * (0.04 + 0.03 * t[3]), angle, 'wedge')
  if label == 'Effusion':
    level = g.base_y[_side_index(side)] - scale * (0.05 + 0.17 * t[1])
    return finding(g.cx, level, 0.0, 0.06 + 0.08 * t[2])
  if label == 'Pneumothorax':  # the lung collapses towards a point below its hilum
    hx, hy = g.hilum[side]
    return finding(hx, hy + 0.12, 0.0, 0.0, value=0.13 + 0.2 * t[1])
  raise ValueError(f'cannot place {label!r}')


def _describe(seed: int, index: int, patient: int, p: _Patient) -> Case:
  d = _Draws(seed, _IMAGE_STREAM, index)
  a = p.anatomy
  view = 'AP' if d.uniform() < 0.25 else 'PA'
  dx, dy, inspiration = d.uniform(-0.025, 0.025), d.uniform(-0.02, 0.02), d.uniform(-0.02, 0.02)
  case = Case(
    seed=seed,
    patient=patient,
    index=index,
    view=view,
    cx=a['cx'] + dx,
    half_width=a['half_width'],
    apex_y=a['apex_y'] + dy,
    base_y=a['base_y'] + dy + inspiration,
    dome=(a['dome_left'], a['dome_right']),
    mediastinum=a['mediastinum'],
    # An AP film magnifies the heart (it lies further from the detector).
    heart_ctr=a['heart_ctr'] * (1.06 if view == 'AP' else 1.0),
    rib_spacing=a['rib_spacing'],
    rib_phase=(a['rib_phase_left'], a['rib_phase_right']),
    clavicle_y=a['clavicle_y'] + dy - (0.03 if view == 'AP' else 0.0),
    body_width=a['body_width'],
    exposure=d.uniform(-0.05, 0.05),
    contrast=d.uniform(0.9, 1.15) * (0.92 if view == 'AP' else 1.0),
    gamma=d.uniform(-0.25, 0.25),
    grain=d.uniform(0.006, 0.014),
  )
  present = _present(p, d)
  strength = {label: d.uniform(0.5, 1.0) for label in LABELS}
  strength['Effusion'] = 0.75 + 0.25 * strength['Effusion']  # fluid displaces nearly all air
  strength['Cardiomegaly'] = p.cardiothoracic
  # Cardiomegaly and atelectasis change the thorax the other findings are placed in; the geometry
  # depends only on their side and strength, known before they are placed.
  stubs = {
    label: Finding(label, side, 0.0, 0.0, 0.0, 0.0, 0.0, strength[label], '', (0.0,) * 4)
    for label, side in (('Atelectasis', _side(p.template['Atelectasis'])), ('Cardiomegaly', 1))
    if label in present
  }
  g = _Geometry(case, tuple(stubs.values()))
  findings = []
  for label in LABELS:
    if label in present:
      if label == 'Cardiomegaly':
        f = stubs[label]
      else:
        f = _place(g, label, p.template[label], d, strength[label])
      findings.append(dataclasses.replace(f, box=_box(g, f)))
  return dataclasses.replace(case, findings=tuple(findings))


def describe_case(seed: int, index: int, images_per_patient: int = IMAGES_PER_PATIENT) -> Case:
  """Draws the resolution-independent description of image `index` of the synthetic set.

  Args:
    seed: dataset seed.
    index: image index (>= 0); its patient is `index // images_per_patient`.
    images_per_patient: consecutive images drawn per patient.

  Returns:
    The `Case`, deterministic in (seed, index, images_per_patient).
  """
  if index < 0 or images_per_patient < 1:
    raise ValueError(
      f'need index >= 0 and images_per_patient >= 1, got {index}, {images_per_patient}'
    )
  patient = index // images_per_patient
  return _describe(seed, index, patient, _draw_patient(seed, patient))


# ------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=64)
def _resample_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
  """Linear-interpolation taps between two pixel-centred grids over [0, 1]: (index, weight), each
  [taps, n_out].

  The hat kernel is as wide as the coarser grid's pixel, so downsampling averages (no aliasing)
  and upsampling interpolates. Taps rather than a matrix product: BLAS threads stall badly when
  the training process holds the CPU cores.
  """
  out = (np.arange(n_out) + 0.5) / n_out
  grid = (np.arange(n_in) + 0.5) / n_in
  w = np.clip(1.0 - np.abs(out[:, None] - grid[None, :]) * min(n_in, n_out), 0.0, None)
  w /= w.sum(axis=1, keepdims=True)
  first = np.argmax(w > 0, axis=1)
  taps = int((w > 0).sum(axis=1).max())
  index = first[None, :] + np.arange(taps)[:, None]
  valid = index < n_in
  index = np.minimum(index, n_in - 1)
  weight = np.where(valid, w[np.arange(n_out)[None, :], index], 0.0).astype(np.float32)
  index.setflags(write=False)
  weight.setflags(write=False)
  return index, weight


def _resample(field: np.ndarray, n: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
  """`field` resampled to n x n pixels (only `rows` x `cols` of it)."""
  # Columns first, on the few rows of `field`; the row pass then gathers whole (contiguous) rows.
  index, weight = (a[:, cols] for a in _resample_taps(n, field.shape[1]))
  wide = sum(field[:, i] * w for i, w in zip(index, weight, strict=True))
  index, weight = (a[:, rows] for a in _resample_taps(n, field.shape[0]))
  return sum(wide[i] * w[:, None] for i, w in zip(index, weight, strict=True))


def _polar_lookup(grid: np.ndarray, phi: np.ndarray, r: np.ndarray, r_max: float) -> np.ndarray:
  """Bilinear lookup of grid[angle, radius] (angle periodic, radius clamped to [0, r_max])."""
  na, nr = grid.shape
  a = (phi + math.pi) * (na / (2 * math.pi))
  a0 = np.floor(a)
  ta = a - a0
  a0 = a0.astype(np.intp) % na
  a1 = (a0 + 1) % na
  b = np.clip(r * ((nr - 1) / r_max), 0.0, nr - 1.001)
  b0 = b.astype(np.intp)
  tb = b - b0
  near = grid[a0, b0] * (1 - tb) + grid[a0, b0 + 1] * tb
  far = grid[a1, b0] * (1 - tb) + grid[a1, b0 + 1] * tb
  return near * (1 - ta) + far * ta


def _lung_markings(case: Case, g: _Geometry) -> np.ndarray:
  """Share of lung air displaced by vessels and interstitium, on a fixed grid.

  Vessels are the zero crossings of a random field in polar coordinates around each hilum that
  varies fast with angle and slowly with radius, so they run radially and branch; a smooth warp of
  the angle bends them, and they fade towards the periphery as real lung markings do. The pattern
  is the patient's own (seeded by patient, not image).
  """
  n = _TEXTURE_GRID
  c = ((np.arange(n) + 0.5) / n).astype(np.float32)
  rng = _rng(case.seed, _TEXTURE_STREAM, case.patient)
  bend = 0.2 * _resample(rng.standard_normal((6, 6), np.float32), n)
  out = 0.04 * _resample(rng.standard_normal((48, 48), np.float32), n)  # reticular texture
  split = min(n, max(0, round(g.cx * n)))
  for side, cols in ((-1, slice(0, split)), (1, slice(split, n))):
    hx, hy = g.hilum[side]
    dx, dy = side * (c[None, cols] - hx), c[:, None] - hy
    r = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx) + bend[:, cols]
    field = _polar_lookup(rng.standard_normal((40, 4), np.float32), phi, r, 0.6)
    field += 0.6 * _polar_lookup(rng.standard_normal((96, 6), np.float32), phi, r, 0.6)
    lines = np.clip(1.0 - np.abs(field) / 0.45, 0.0, 1.0) ** 2
    out[:, cols] += lines * (0.5 * np.exp(-r / 0.18) + 0.05) + 0.4 * np.exp(-((r / 0.04) ** 2))
  return out


def _window(n: int, box: tuple[float, float, float, float]):
  """The rows and columns of an n-px image covering `box`, and their pixel-centre coordinates."""
  x0, y0, x1, y1 = box
  c0, c1 = max(0, math.floor(x0 * n)), min(n, math.ceil(x1 * n))
  r0, r1 = max(0, math.floor(y0 * n)), min(n, math.ceil(y1 * n))
  u = ((np.arange(c0, c1, dtype=np.float32) + 0.5) / n)[None, :]
  v = ((np.arange(r0, r1, dtype=np.float32) + 0.5) / n)[:, None]
  return (slice(r0, r1), slice(c0, c1)), u, v


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Soft union of two masks."""
  return 1.0 - (1.0 - a) * (1.0 - b)


def _soft_tissue(case: Case, g: _Geometry, n: int, px: float) -> np.ndarray:
  """The torso (a cylinder, thicker downwards), the spine and the trachea."""
  c = (np.arange(n, dtype=np.float32) + 0.5) / n
  u, v = c[None, :], c[:, None]
  t = np.clip(v / 0.22, 0.0, 1.0)
  half = 0.12 + (case.body_width - 0.12) * (1.0 - (1.0 - t) ** 2)  # neck widening to shoulders
  inner = 1.0 - ((u - g.cx) / half) ** 2  # chord length through the cylinder, squared
  density = _inside(-inner, 2.0 * _edge(0.01, px) / case.body_width)  # d(inner)/dx = 2 / half
  np.maximum(inner, 0.0, out=inner)
  density *= 0.38 + 0.06 * v + 0.1 * np.sqrt(inner)
  # Spine: vertebral bodies and darker disc spaces, faint behind the mediastinum; the trachea,
  # an air column down to the carina.
  win, uw, vw = _window(n, (g.cx - 0.04, 0.0, g.cx + 0.04, 1.0))
  mid = np.abs(uw - g.cx)
  period = 0.042
  phase = np.abs((vw - g.apex_y) / period % 1.0 - 0.5)
  vertebrae = 0.6 + 0.4 * _inside(phase - 0.38, _edge(0.004, px) / period)
  carina = g.hilum[1][1] - 0.05
  density[win] += (0.05 * vertebrae) * _inside(mid - 0.03, _edge(0.004, px))
  density[win] -= (0.1 * _inside(vw - carina, 0.02)) * _inside(mid - 0.013, _edge(0.005, px))
  return density


def _ribs(case: Case, g: _Geometry, n: int, px: float):
  """Ribs and clavicles over the thoracic cage: (window, density in the window)."""
  w = g.half_width
  top, bottom = min(case.clavicle_y - 0.1, g.apex_y - 0.06), case.base_y + 0.02
  win, u, v = _window(n, (g.cx - 1.2 * w, top, g.cx + 1.2 * w, bottom))
  out = np.zeros((v.shape[0], u.shape[1]), np.float32)
  x = np.abs(u - g.cx) / w
  phase = np.where(u < g.cx, case.rib_phase[0], case.rib_phase[1])
  fade = _inside(np.abs(v - (top + bottom) / 2) - (bottom - top) / 2 + 0.03, 0.06)
  # Posterior ribs leave the spine almost flat and bend down laterally; anterior ribs (fainter,
  # their cartilage invisible medially) climb laterally. The rib period grows towards the bases:
  # s(v) = tau - growth * tau^2 / 2 with tau in apical periods, and a rib's drop `offset` at
  # lateral position x shifts its phase by offset * ds/dv (first order).
  growth = 0.025
  for spacing, offset, width, density, medial_end in (
    (case.rib_spacing, 0.22 * x * x - 0.07 * x, 0.17, 0.06, 0.0),
    (1.3 * case.rib_spacing, 0.03 * x * x - 0.1 * x, 0.14, 0.035, 0.45),
  ):
    tau = (v - top) / spacing
    s = offset * ((growth * tau - 1.0) / spacing)
    s += tau - 0.5 * growth * tau * tau
    s += phase
    s -= np.floor(s)
    s -= 0.5
    band = _inside(np.abs(s, out=s) - width, _edge(0.004, px) / spacing)
    band *= (density * fade) * (_inside(x - 1.06, 0.08) * _inside(medial_end - x, 0.1))
    out += band
  # Clavicles: from the sternal notch out and up to the shoulders.
  centre = case.clavicle_y - 0.08 * x + 0.02 * x * x
  span = _inside(0.1 - x, 0.03) * _inside(x - 0.9, 0.06)
  out += (0.15 * span) * _inside(np.abs(v - centre) - 0.011, _edge(0.004, px))
  return win, out


def render(case: Case, size_px: int) -> np.ndarray:
  """Draws a case as a grayscale radiograph (bright = dense), at any resolution.

  Args:
    case: a description from `describe_case` (possibly edited, e.g. findings removed).
    size_px: output side in pixels.

  Returns:
    uint8 [size_px, size_px].
  """
  n = int(size_px)
  if n < 8:
    raise ValueError(f'size_px must be >= 8, got {size_px}')
  px = 1.0 / n
  g = _Geometry(case, case.findings)
  density = _soft_tissue(case, g, n, px)

  # Lungs, each on its own side of the midline.
  w, bottom = g.half_width, case.base_y + 0.01
  lung = np.zeros((n, n), np.float32)
  for side, box in (
    (-1, (g.cx - w - 0.02, g.apex_y - 0.02, g.cx, bottom)),
    (1, (g.cx, g.apex_y - 0.02, g.cx + w + 0.02, bottom)),
  ):
    win, uw, vw = _window(n, box)
    lung[win] = np.maximum(lung[win], g.lung(side, uw, vw, px))

  # Mediastinum, aortic knob, heart and the abdomen below the domes form one water-dense
  # silhouette, so the heart merges into the mediastinum above and the diaphragm below.
  solid = np.zeros((n, n), np.float32)
  win, uw, vw = _window(n, (g.cx - 0.12, 0.0, g.cx + 0.12, 1.0))
  solid[win] = _inside(np.abs(uw - g.cx) - g.mediastinum_half_width(vw), _edge(0.008, px))
  solid[win] *= _inside(g.apex_y - 0.03 - vw, 0.05)  # fading into the neck
  win, uw, vw = _window(n, (0.0, min(p[1] for p in g.dome.values()) - 0.01, 1.0, 1.0))
  diaphragm = np.where(uw < g.cx, g.diaphragm(-1, uw), g.diaphragm(1, uw))
  below = 1.0 - _inside(vw - diaphragm, _edge(0.003, px))
  solid[win] = _union(solid[win], below * _inside(np.abs(uw - g.cx) - w, 0.2))
  knob_x, knob_y = g.cx + g.mediastinum + 0.004, g.hilum[1][1] - 0.08
  win, uw, vw = _window(n, (knob_x - 0.04, knob_y - 0.04, knob_x + 0.04, knob_y + 0.04))
  knob = _inside(np.sqrt((uw - knob_x) ** 2 + (vw - knob_y) ** 2) - 0.022, _edge(0.006, px))
  solid[win] = _union(solid[win], knob)
  lung[win] *= 1.0 - knob
  win, uw, vw = _window(n, g.heart_box)
  heart = g.heart(uw, vw, px)
  solid[win] = _union(solid[win], heart)
  lung[win] *= 1.0 - _RETROCARDIAC_SHADOW * heart
  density[win] += 0.05 * heart  # the heart is thicker than the mediastinum above it
  density += 0.22 * solid

  # Ribs show best against the lungs' air; over soft tissue they are fainter.
  win, ribs = _ribs(case, g, n, px)
  density[win] += ribs * (0.5 + 0.5 * lung[win])
  # The gastric air bubble under the left hemidiaphragm.
  bx, by, _ = g.dome[1]
  by += 0.045
  win, uw, vw = _window(n, (bx - 0.06, by - 0.04, bx + 0.06, by + 0.04))
  density[win] -= 0.08 * _inside(_ellipse_distance(uw - bx, vw - by, 0.045, 0.025), _edge(0.01, px))

  fill, rim = _draw_findings(case, g, n, px, density, lung)

  # Air: deepest centrally and at the apices (the bases are overlapped by soft tissue).
  win, uw, vw = _window(n, (g.cx - w - 0.02, g.apex_y - 0.02, g.cx + w + 0.02, bottom))
  lateral = np.minimum(np.abs(uw - g.cx) / w, 1.0)
  depth = (0.38 - 0.08 * np.clip((vw - g.apex_y) / (bottom - g.apex_y), 0.0, 1.0)) * (
    1.0 - 0.3 * lateral**4
  )
  markings = _resample(_lung_markings(case, g), n, *win)
  markings *= 1.0 - rim[win]
  air = lung[win] * depth
  air *= 1.0 - fill[win]
  air *= 1.0 - markings
  air *= 1.0 + 0.4 * rim[win]
  density[win] -= air
  return _expose(case, density)


def _draw_findings(
  case: Case, g: _Geometry, n: int, px: float, density: np.ndarray, lung: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Adds nodules, masses and pleural lines to `density`; returns the share of lung air displaced
  by fluid or collapse, and the pneumothorax rim (pleural air without lung markings)."""
  fill = np.zeros((n, n), np.float32)
  rim = np.zeros((n, n), np.float32)
  for f in case.findings:
    if f.label == 'Cardiomegaly':
      continue  # drawn as the heart
    win, uw, vw = _window(n, _extent(g, f))
    if f.label in ('Nodule', 'Mass'):
      opacity = 0.35 if f.label == 'Nodule' else 0.25
      density[win] += (opacity * f.strength) * _shape(g, f, uw, vw, px)
    elif f.label == 'Pneumothorax':
      d = _pneumothorax_distance(g, f, uw, vw)
      rim[win] = np.maximum(rim[win], 1.0 - _inside(d, _edge(0.002, px)))
      density[win] += 0.08 * lung[win] * _inside(np.abs(d) - 0.0012, _edge(0.001, px))
    else:
      shape = f.strength * _shape(g, f, uw, vw, px)
      if f.label == 'Consolidation':
        shape *= _patchiness(case, f, uw, vw)
      fill[win] = _union(fill[win], shape)
  return fill, rim


def _expose(case: Case, density: np.ndarray) -> np.ndarray:
  """The film's response to `density` (overwritten): uneven exposure, gain, offset, curvature
  and quantum noise, as uint8."""
  n = density.shape[0]
  # Uneven exposure (anode heel effect, scatter): smooth profiles down and across the film.
  c = (np.arange(n) + 0.5) / n
  knots = np.linspace(0.0, 1.0, 6)
  heel = 0.025 * _rng(case.seed, _EXPOSURE_STREAM, case.index).standard_normal((2, 6))
  image = density
  image += np.interp(c, knots, heel[0]).astype(np.float32)[:, None]
  image += np.interp(c, knots, heel[1]).astype(np.float32)[None, :]
  image *= case.contrast
  image += case.exposure
  np.clip(image, 0.0, 1.0, out=image)
  image += case.gamma * image * (1.0 - image)
  # Quantum noise, uniform with std `grain` at 256 px (uniform draws are 5x faster than normal
  # ones, and look the same). Its std scales with the pixel size, so it averages out on
  # downscaling.
  grain = _rng(case.seed, _GRAIN_STREAM, case.index, n).random((n, n), np.float32)
  grain -= 0.5
  grain *= case.grain * math.sqrt(12.0) * n / 256
  image += grain
  np.clip(image, 0.0, 1.0, out=image)
  image *= 255.0
  image += 0.5
  return image.astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Records and references


def image_ref(seed: int, index: int, images_per_patient: int = IMAGES_PER_PATIENT) -> str:
  """The `Record.image` reference of a synthetic image: 'synthetic:<seed>:<index>'.

  A non-default `images_per_patient` is appended (':<images_per_patient>'), since it decides which
  patient, hence which anatomy, the image belongs to.
  """
  ref = f'{_REF_PREFIX}{seed}:{index}'
  return ref if images_per_patient == IMAGES_PER_PATIENT else f'{ref}:{images_per_patient}'


def load(ref: str, size_px: int) -> np.ndarray:
  """Renders the image behind an `image_ref` reference.

  Args:
    ref: 'synthetic:<seed>:<index>' or 'synthetic:<seed>:<index>:<images_per_patient>'.
    size_px: output side in pixels.

  Returns:
    uint8 [size_px, size_px].

  Raises:
    ValueError: if `ref` is malformed (the message quotes it).
  """
  fields = ref[len(_REF_PREFIX) :].split(':') if ref.startswith(_REF_PREFIX) else []
  try:
    if len(fields) not in (2, 3):
      raise ValueError
    seed, index, per_patient = [int(x) for x in fields] + [IMAGES_PER_PATIENT] * (3 - len(fields))
    case = describe_case(seed, index, per_patient)
  except ValueError:
    raise ValueError(
      f'malformed synthetic image reference {ref!r}; expected '
      "'synthetic:<seed>:<index>' or 'synthetic:<seed>:<index>:<images_per_patient>'"
    ) from None
  return render(case, size_px)


def make_records(
  seed: int, start: int, count: int, images_per_patient: int = IMAGES_PER_PATIENT
) -> list[Record]:
  """Records of synthetic images `start .. start + count - 1` (described, not rendered).

  Args:
    seed: dataset seed.
    start: first image index (>= 0).
    count: number of images.
    images_per_patient: consecutive indices sharing a patient.

  Returns:
    Records with float32 0/1 labels in `LABELS` order, one `Box` per present finding, and
    `image = image_ref(seed, index, images_per_patient)` for `load`.
  """
  if start < 0 or count < 0 or images_per_patient < 1:
    raise ValueError(
      'need start >= 0, count >= 0 and images_per_patient >= 1, got '
      f'{start}, {count}, {images_per_patient}'
    )
  records = []
  patient, p = -1, None
  for index in range(start, start + count):
    if index // images_per_patient != patient:  # draw each patient once, not once per image
      patient = index // images_per_patient
      p = _draw_patient(seed, patient)
    case = _describe(seed, index, patient, p)
    labels = np.zeros(len(LABELS), np.float32)
    for f in case.findings:
      labels[LABELS.index(f.label)] = 1.0
    records.append(
      Record(
        id=f'synth_{index:08d}',
        image=image_ref(seed, index, images_per_patient),
        labels=labels,
        patient_id=f'synth_p{patient:06d}',
        study_id=f'synth_s{index:08d}',
        view=case.view,
        boxes=tuple(Box(f.label, *f.box) for f in case.findings),
      )
    )
  return records
