"""The people of the synthetic face set and the action units (AUs) they show.

A subject is a fixed set of numbers (`SubjectParams`): head shape, feature layout,
tones, hair and accessories, resting "confounder" AUs that mimic expression cues,
and a per-expression style (how strongly this person moves each AU). An image
adds per-image AU variation on top (`expression_aus`). Drawing all of that is
data_tools/synthetic_faces.py; writing a set of images is data_tools/synthetic.py.

Changing what any function here returns changes the rendered images: bump
`RENDER_VERSION` in data_tools/synthetic.py, or cached sets are silently reused.

`plan_subjects` decides which expressions each subject shows and how many images
of each (the confounded benchmark's per-subject subsets, skewed counts and
cohorts; see its docstring). It never changes who a person is or how an image
is drawn: a plan only selects which of the (seed, subject, expression, k) images
exist.
"""

import dataclasses
import math

import numpy as np

from dicefer_jax import contract

# Action units used, in vector order.
AUS = (1, 2, 4, 5, 6, 7, 9, 12, 15, 16, 20, 23, 26)
AU_INDEX = {au: i for i, au in enumerate(AUS)}
NUM_AUS = len(AUS)

# EMFACS prototypes: the action units of each basic expression (Ekman and Friesen).
PROTOTYPES = {
    "neutral": (),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "happiness": (6, 12),
    "sadness": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
}
# The AU that carries each expression; never dropped, so every image keeps its
# defining cue (dropping it would make the label noise, not a hard example).
CORE_AU = {"anger": 4, "disgust": 9, "fear": 20, "happiness": 12, "sadness": 15,
           "surprise": 26}
# AUs that real people add to a prototype (open-mouth anger, disgust with a
# frown, a laugh, ...). Each subject gets at most one habit per expression, which
# a classifier can learn for seen subjects only.
_HABITS = {
    "anger": (26, 9, 16),
    "disgust": (4, 7, 26),
    "fear": (15, 16),
    "happiness": (26, 5),
    "sadness": (7, 6, 16),
    "surprise": (16, 12),
}

# Salient resting traits that mimic an expression cue, and the AU each copies.
TRAIT_AU = {
    "resting_smile": 12,     # mouth corners up: happiness
    "downturned_mouth": 15,  # corners down: sadness, disgust
    "low_brows": 4,          # heavy low brows: anger, sadness
    "worried_brows": 1,      # oblique brows: sadness, fear
    "wide_eyes": 5,          # surprise, fear, anger
    "narrow_eyes": 7,        # anger, fear
    "cheek_bags": 6,         # happiness
    "thin_lips": 23,         # anger
    "parted_lips": 26,       # surprise, fear
}
_TRAITS = tuple(TRAIT_AU) + ("raised_brows", "nasolabial", "forehead_lines")

# Independent random streams (mixed into numpy SeedSequences with the user seed).
_SUBJECT_STREAM = 0x5B1EC7
_IMAGE_STREAM = 0x1A6E
# Who shows which expressions (plan_subjects): their own streams, so that the
# people and every image's pixels stay those of the balanced set.
_PLAN_STREAM = 0x9A1A
_COHORT_STREAM = 0xC040


@dataclasses.dataclass(frozen=True)
class SubjectParams:
  """Everything fixed about one synthetic person (canonical 112 px coordinates)."""

  subject_id: str
  index: int
  # Head shape.
  face_half_width: float
  jaw: float            # 1 = square jaw, lower = narrower, more pointed chin
  top_y: float          # top of the skull
  chin_y: float
  # Layout.
  eye_y: float
  eye_spacing: float    # half the distance between the eye centres
  eye_half_width: float
  eye_open: float       # half-height of the resting upper-lid opening
  canthal_tilt: float   # outer eye corner raised (+) or lowered (-), px
  iris_radius: float
  brow_gap: float       # eye centre to brow
  brow_thickness: float
  brow_length: float
  brow_arch: float
  nose_y: float         # nose base
  nose_half_width: float
  mouth_y: float        # lip line
  mouth_half_width: float
  upper_lip: float
  lower_lip: float
  # Tones (0..255 before lighting).
  skin: float
  background: float
  hair_tone: float
  brow_tone: float
  iris_tone: float
  lip_tone: float
  # Hair and accessories.
  hair_style: int       # 0 short, 1 side-swept, 2 long, 3 receding, 4 fringe
  hairline: float       # top of the skull to the hairline, px
  hair_volume: float
  hair_slant: float
  mustache: bool
  glasses: bool
  shade_side: int       # which side of the nose takes the bridge shadow
  # Identity confounders: a resting AU offset (things like a resting smile or
  # low heavy brows) drawn exactly like the expression's AU, plus wrinkles.
  rest_aus: tuple[float, ...]
  nasolabial: float
  forehead_lines: float
  # Per-expression AU multipliers (this person's way of showing it).
  style: tuple[tuple[float, ...], ...]


def _subject_rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, _SUBJECT_STREAM, index]))


def image_rng(seed: int, subject_index: int, expression: str,
              k: int) -> np.random.Generator:
  """The random stream of one image: depends on nothing but its coordinates."""
  return np.random.default_rng(np.random.SeedSequence(
      [seed, _IMAGE_STREAM, subject_index, contract.expression_index(expression), k]))


def _vertical_layout(r: np.random.Generator) -> tuple[float, ...]:
  """top_y, eye_y, nose_y, mouth_y, chin_y: proportions drawn, head centred."""
  u = r.uniform
  eye_y = u(47.0, 53.0)
  forehead = u(33.0, 39.0)
  nose_len = u(16.5, 21.0)
  mouth_gap = u(8.5, 11.5)
  chin_len = u(13.0, 17.0)
  top_y = eye_y - forehead
  nose_y = eye_y + nose_len
  mouth_y = nose_y + mouth_gap
  chin_y = mouth_y + chin_len
  # Centre the head vertically (as a face detector's crop would).
  dy = 57.0 - 0.5 * (top_y + chin_y)
  return tuple(v + dy for v in (top_y, eye_y, nose_y, mouth_y, chin_y))


def _resting_cues(r: np.random.Generator,
                  confounders: float) -> tuple[np.ndarray, float, float]:
  """The identity confounders: resting AUs, nasolabial depth, forehead lines.

  In AU units (an AU at 1.0 is a full-intensity expression; the subtlest
  expressions are 0.3). Everyone has some resting mouth curve and eye opening;
  most people also have one to three salient traits, each as large as a subtle
  expression, which is what misleads a classifier on strangers. The draws do
  not depend on `confounders`, which only scales the result, so the rest of the
  subject's stream (and who the person is) is the same for any value.
  """
  u = r.uniform
  rest = np.zeros(NUM_AUS)
  mouth_curve = float(np.clip(r.normal(0.0, 0.18), -0.4, 0.4))
  rest[AU_INDEX[12] if mouth_curve > 0 else AU_INDEX[15]] = abs(mouth_curve)
  eyes = float(np.clip(r.normal(0.0, 0.15), -0.35, 0.35))
  rest[AU_INDEX[5] if eyes > 0 else AU_INDEX[7]] = abs(eyes)
  nasolabial = float(np.clip(r.exponential(0.08), 0.0, 0.3))
  forehead_lines = float(np.clip(r.exponential(0.06), 0.0, 0.3))
  n_traits = int(r.choice(4, p=(0.15, 0.35, 0.35, 0.15)))
  for trait in r.choice(len(_TRAITS), size=n_traits, replace=False):
    strength = u(0.25, 0.6)
    name = _TRAITS[trait]
    if name == "nasolabial":
      nasolabial = max(nasolabial, strength)
    elif name == "forehead_lines":
      forehead_lines = max(forehead_lines, strength)
    elif name == "raised_brows":
      rest[AU_INDEX[1]] = max(rest[AU_INDEX[1]], 0.6 * strength)
      rest[AU_INDEX[2]] = max(rest[AU_INDEX[2]], strength)
    else:
      au = TRAIT_AU[name]
      rest[AU_INDEX[au]] = max(rest[AU_INDEX[au]], strength)
  rest = np.clip(rest * confounders, 0.0, 0.8)
  return rest, nasolabial * confounders, forehead_lines * confounders


def _expression_style(r: np.random.Generator) -> np.ndarray:
  """(expressions, AUs) multipliers: how this person produces each expression."""
  u = r.uniform
  style = np.zeros((len(contract.EXPRESSIONS), NUM_AUS))
  for e, name in enumerate(contract.EXPRESSIONS):
    for au in PROTOTYPES[name]:
      style[e, AU_INDEX[au]] = u(0.6, 1.2)
    if name in _HABITS and r.random() < 0.35:
      style[e, AU_INDEX[_HABITS[name][int(r.integers(len(_HABITS[name])))]]] = u(0.3, 0.6)
  for name, au in CORE_AU.items():
    e = contract.EXPRESSIONS.index(name)
    style[e, AU_INDEX[au]] = max(style[e, AU_INDEX[au]], 0.85)
  return style


def make_subject(index: int, seed: int, confounders: float = 1.0) -> SubjectParams:
  """Draws subject `index`; the same whatever the number of subjects asked for.

  `confounders` scales the resting cues only; every other trait (and so who the
  person is) is the same for any value.
  """
  # The order of the draws below is the subject's identity: reordering them
  # gives every seed different people.
  r = _subject_rng(seed, index)
  u = r.uniform
  top_y, eye_y, nose_y, mouth_y, chin_y = _vertical_layout(r)
  face_half_width = u(29.0, 37.0)
  skin = u(105.0, 215.0)
  # Background differs from skin enough to see the head outline.
  background = u(35.0, 225.0)
  if abs(background - skin) < 25.0:
    background = skin - 40.0 if skin > 130.0 else skin + 40.0
  hair_tone = u(15.0, 190.0) if r.random() < 0.85 else u(190.0, 235.0)
  hair_style = int(r.integers(0, 5))
  rest, nasolabial, forehead_lines = _resting_cues(r, confounders)
  style = _expression_style(r)

  return SubjectParams(
      subject_id=f"s{index:03d}",
      index=index,
      face_half_width=face_half_width,
      jaw=u(0.55, 0.9),
      top_y=top_y,
      chin_y=chin_y,
      eye_y=eye_y,
      eye_spacing=u(12.0, 16.5),
      eye_half_width=u(5.0, 7.0),
      eye_open=u(2.3, 3.2),
      canthal_tilt=u(-1.0, 1.2),
      iris_radius=u(2.6, 3.3),
      brow_gap=u(6.0, 8.5),
      brow_thickness=u(1.3, 3.2),
      brow_length=u(11.0, 15.5),
      brow_arch=u(0.3, 2.2),
      nose_y=nose_y,
      nose_half_width=u(4.0, 6.5),
      mouth_y=mouth_y,
      mouth_half_width=u(8.5, 13.5),
      upper_lip=u(1.3, 3.0),
      lower_lip=u(1.8, 3.8),
      skin=skin,
      background=background,
      hair_tone=hair_tone,
      brow_tone=min(skin - 45.0, hair_tone + u(0.0, 40.0)),
      iris_tone=u(15.0, 80.0),
      lip_tone=skin - u(22.0, 55.0),
      hair_style=hair_style,
      hairline=u(3.0, 9.0) if hair_style != 4 else u(14.0, 19.0),
      hair_volume=u(2.0, 7.0),
      hair_slant=u(-7.0, 7.0) if hair_style == 1 else 0.0,
      mustache=bool(r.random() < 0.12),
      glasses=bool(r.random() < 0.12),
      shade_side=1 if r.random() < 0.5 else -1,
      rest_aus=tuple(float(v) for v in rest),
      nasolabial=nasolabial,
      forehead_lines=forehead_lines,
      style=tuple(tuple(float(v) for v in row) for row in style),
  )


def make_subjects(num_subjects: int, seed: int,
                  confounders: float = 1.0) -> list[SubjectParams]:
  """The first `num_subjects` subjects for a seed (ids s000, s001, ...)."""
  return [make_subject(i, seed, confounders) for i in range(num_subjects)]


def expression_aus(subject: SubjectParams, expression: str, intensity: float,
                   rng: np.random.Generator, variation: bool = True) -> np.ndarray:
  """The AU intensities (before the subject's resting offsets) of one image.

  With `variation` off, exactly the subject's way of showing the expression at
  this intensity (no per-image jitter, dropout or micro-movements).
  """
  e = contract.expression_index(expression)
  aus = np.asarray(subject.style[e]) * intensity
  if not variation:
    return np.clip(aus, 0.0, 1.2)
  active = np.flatnonzero(aus)
  if active.size:
    # Each AU varies a little on its own: real AUs are not perfectly coupled.
    aus[active] *= rng.uniform(0.75, 1.2, size=active.size)
    # Occasional partial dropout: one non-core AU missing or nearly so.
    droppable = [i for i in active if AUS[i] != CORE_AU.get(expression)]
    if droppable and rng.random() < 0.3:
      aus[droppable[int(rng.integers(len(droppable)))]] *= rng.uniform(0.0, 0.2)
  # Micro-movements in any face, neutral included.
  if rng.random() < 0.4:
    aus[int(rng.integers(NUM_AUS))] += rng.uniform(0.0, 0.2)
  return np.clip(aus, 0.0, 1.2)


# ----------------------------------------------------------------------------
# Who shows which expressions, and how often (the confounded benchmark).

# The appearance attribute that the confounded cohort's expressions follow:
# glasses or long hair (hair_style 2). Both are large, dark-on-skin shapes (rims
# around both eyes; hair down both sides of the face to the image's edge) that
# stay plain at 64 and 48 px and survive per-image standardisation, lighting and
# blur, unlike skin or hair tone, which a random background and lighting
# gradient partly wash out. They are the renderer's own draws (about 12% and
# 20% of people, so about 30% have the attribute): the people are those of the
# balanced set.
ATTRIBUTE = "glasses or long hair"
# The expressions a confounded subject with the attribute favours; those without
# it favour the rest. The halves part the most confusable pairs (fear and
# surprise share AU1, 2, 5 and 26; sadness is the subtlest departure from
# neutral), so the attribute is a tempting tie-breaker for a classifier.
ATTRIBUTE_EXPRESSIONS = ("anger", "disgust", "fear", "sadness")
OTHER_EXPRESSIONS = tuple(e for e in contract.EXPRESSIONS
                          if e not in ATTRIBUTE_EXPRESSIONS)
# Each expression needs two subjects, or there is no same-expression pair of
# two different people for it.
MIN_SUBJECTS_PER_EXPRESSION = 2


def has_attribute(subject: SubjectParams) -> bool:
  """Whether the subject has the benchmark's appearance attribute (ATTRIBUTE)."""
  return bool(subject.glasses or subject.hair_style == 2)


def favoured_expressions(subject: SubjectParams) -> tuple[str, ...]:
  """The half of the expressions the subject's attribute value goes with."""
  return ATTRIBUTE_EXPRESSIONS if has_attribute(subject) else OTHER_EXPRESSIONS


@dataclasses.dataclass(frozen=True)
class SubjectPlan:
  """Which images of one subject a set holds.

  Attributes:
    subject_id: the subject's id (s000, ...).
    counts: images per expression, in contract.EXPRESSIONS order; 0 = not shown.
    pinned: in the confounded cohort, so always trained on (manifest split=train).
    attribute: has_attribute(subject).
  """

  subject_id: str
  counts: tuple[int, ...]
  pinned: bool
  attribute: bool

  @property
  def expressions(self) -> tuple[str, ...]:
    return tuple(e for e, n in zip(contract.EXPRESSIONS, self.counts) if n)


def round_half_up(x: float) -> int:
  """x rounded to the nearest integer, halves up (Python's round() goes to even)."""
  return int(math.floor(x + 0.5))


def clean_cohort(subjects: list[SubjectParams], clean_fraction: float,
                 seed: int) -> set[int]:
  """Indices of the clean cohort: round(clean_fraction x subjects) people.

  Drawn (seeded) within each attribute value in proportion to its size, so the
  attribute is as common among clean subjects as among confounded ones and
  only who shows what differs between the cohorts.
  """
  num_clean = round_half_up(clean_fraction * len(subjects))
  groups = ([s.index for s in subjects if has_attribute(s)],
            [s.index for s in subjects if not has_attribute(s)])
  with_attribute = round_half_up(num_clean * len(groups[0]) / max(len(subjects), 1))
  r = np.random.default_rng(np.random.SeedSequence([seed, _COHORT_STREAM]))
  clean = set()
  for group, n in zip(groups, (with_attribute, num_clean - with_attribute)):
    clean.update(int(i) for i in r.permutation(np.array(group, np.int64))[:n])
  return clean


def _expression_weights(subject: SubjectParams, confounded: bool,
                        attribute_strength: float) -> np.ndarray:
  """How likely the subject is to show each expression: 1 for the half its
  attribute favours, 1 - strength for the other half (all 1 when clean)."""
  if not confounded:
    return np.ones(len(contract.EXPRESSIONS))
  favoured = favoured_expressions(subject)
  return np.array([1.0 if e in favoured else 1.0 - attribute_strength
                   for e in contract.EXPRESSIONS])


def _draw_subset(r: np.random.Generator, weights: np.ndarray,
                 k: int) -> list[int]:
  """k expression indices drawn without replacement with prob. ~ weights.

  Efraimidis-Spirakis: the k largest keys u^(1/w) are a weighted sample. Ranked
  by log(u) / w, which orders alike without underflowing to ties for tiny w;
  weight-0 expressions rank last (-inf), in the order of their u, so they are
  drawn only when the others run out.
  """
  u = r.random(len(weights))
  with np.errstate(divide="ignore"):
    keys = np.where(weights > 0, np.log(u) / np.where(weights > 0, weights, 1.0),
                    -np.inf)
  # lexsort: the last key is the primary one.
  return [int(i) for i in np.lexsort((-u, -keys))[:k]]


def _cover_every_expression(subsets: list[list[int]],
                            weights: list[np.ndarray]) -> None:
  """Edits subsets in place until every expression has two subjects showing it.

  Deterministic: while an expression e (lowest index first) has fewer than two,
  one subject not showing e swaps one of its expressions f for e, where f is
  shown by more than two subjects (so f keeps two). The swap goes to the subject
  most willing to show e (highest weight, so confounded subjects keep their
  favoured half where possible), then the most-shown f, then the lowest subject
  index and slot. Such a swap exists whenever subjects x k >= 14 (the caller
  checks): e lacks shows, so some f has at least three, two of them by subjects
  without e. Each swap lowers the total shortfall by one, so it ends.
  """
  num = len(contract.EXPRESSIONS)
  while True:
    shows = np.bincount([e for subset in subsets for e in subset], minlength=num)
    lacking = np.flatnonzero(shows < MIN_SUBJECTS_PER_EXPRESSION)
    if not lacking.size:
      return
    e = int(lacking[0])
    candidates = [(-weights[i][e], -shows[f], i, j)
                  for i, subset in enumerate(subsets) if e not in subset
                  for j, f in enumerate(subset)
                  if shows[f] > MIN_SUBJECTS_PER_EXPRESSION]
    _, _, i, j = min(candidates)
    subsets[i][j] = e


def _image_counts(shares: np.ndarray, weights: np.ndarray, total: int) -> np.ndarray:
  """`total` images over the slots: one each, the rest by shares x weights
  (largest remainders, ties to the first slot)."""
  q = shares * weights
  q = q / q.sum() if q.sum() > 0 else shares / shares.sum()
  extra = total - len(shares)
  raw = extra * q
  counts = np.floor(raw).astype(np.int64)
  order = np.argsort(-(raw - counts), kind="stable")
  counts[order[:extra - int(counts.sum())]] += 1
  return 1 + counts


def plan_subjects(subjects: list[SubjectParams], images_per_cell: int, seed: int,
                  expressions_per_subject: int = 7, attribute_strength: float = 0.0,
                  clean_fraction: float = 0.4) -> list[SubjectPlan]:
  """Which expressions each subject shows, and how many images of each.

  With expressions_per_subject = 7 and attribute_strength = 0 (the defaults):
  every subject shows every expression images_per_cell times (the balanced set).
  Otherwise:
  - Cohorts (only when attribute_strength > 0): `clean_cohort` draws
    round(clean_fraction x subjects) clean subjects; the rest are the confounded
    cohort, pinned to training (SubjectPlan.pinned).
  - Weights: a confounded subject shows the half of the expressions its
    attribute favours (`favoured_expressions`) with weight 1, the other half
    with weight 1 - attribute_strength; a clean subject weighs all 7 alike.
  - Subset: each subject draws K = expressions_per_subject expressions without
    replacement with probability ~ weight (at strength 1 the other half is drawn
    only when the favoured half has fewer than K).
  - Counts: the subject's K x images_per_cell images are split over its K
    expressions: one image each, and the rest in proportion to a flat
    Dirichlet(1, ..., 1) share times the expression's weight (so at strength s
    an expression of the other half also gets (1 - s) of its share).
  - Cover: then `_cover_every_expression` makes every expression shown by at
    least two subjects (needs subjects x K >= 14 when K < 7).
  Every draw comes from the subject's own seeded stream, apart from the cohort
  draw and the cover, which look at all subjects; nothing depends on workers.
  """
  k = int(expressions_per_subject)
  num = len(contract.EXPRESSIONS)
  if k == num and attribute_strength == 0:
    return [SubjectPlan(s.subject_id, (int(images_per_cell),) * num, False,
                        has_attribute(s)) for s in subjects]
  clean = (clean_cohort(subjects, clean_fraction, seed) if attribute_strength > 0
           else {s.index for s in subjects})
  weights, subsets, shares = [], [], []
  for s in subjects:
    r = np.random.default_rng(np.random.SeedSequence([seed, _PLAN_STREAM, s.index]))
    w = _expression_weights(s, s.index not in clean, attribute_strength)
    weights.append(w)
    subsets.append(_draw_subset(r, w, k))
    shares.append(r.dirichlet(np.ones(k)))
  if k < num:
    _cover_every_expression(subsets, weights)
  plans = []
  for s, w, subset, share in zip(subjects, weights, subsets, shares):
    counts = np.zeros(num, np.int64)
    counts[subset] = _image_counts(share, w[subset], k * int(images_per_cell))
    plans.append(SubjectPlan(s.subject_id, tuple(int(n) for n in counts),
                             s.index not in clean, has_attribute(s)))
  return plans
