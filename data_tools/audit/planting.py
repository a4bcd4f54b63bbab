"""Known problems planted in a copy of a face set, and how well the audit finds them.

`plant_problems` copies a clean face set and spoils chosen images the way real
sets are spoiled: blurred frames, dark, over-exposed and black frames, faces
off centre or cut by the border, exact and near duplicates (under the same and
under another label) and swapped labels. `planted.csv` records, per spoiled
image, which finding kinds the audit must raise (`required`) and which it may
raise without being wrong (`allowed`: a black frame has no face either, and
no sharp detail). `score_findings` then gives per kind precision (share of the
kind's findings that are planted problems of that kind) and recall (share of
planted problems of that kind that were found). Images not planted are
assumed clean: any finding on them counts against precision.
"""

import csv
import dataclasses
import os
import shutil
from typing import Sequence

import cv2
import numpy as np

from data_tools.audit import findings as F
from dicefer_jax import contract, fileio
from dicefer_jax.errors import DataError

PLANTED_NAME = "planted.csv"

# How many images of each problem are planted (per 1,000 clean images the
# default is about 1.5% each; see `default_counts`).
PROBLEMS = ("blur", "dark", "bright", "black", "off_centre", "cut_off",
            "exact_duplicate", "near_duplicate", "cross_label_duplicate",
            "swapped_label")


@dataclasses.dataclass(frozen=True)
class Planted:
  path: str
  problem: str
  required: tuple[str, ...]
  allowed: tuple[str, ...] = ()
  source: str = ""   # the image a duplicate copies


def default_counts(num_images: int) -> dict[str, int]:
  n = max(2, round(0.015 * num_images))
  return {p: n for p in PROBLEMS}


def _png(image: np.ndarray) -> bytes:
  ok, encoded = cv2.imencode(".png", image)
  if not ok:
    raise DataError("could not encode a planted image as PNG")
  return encoded.tobytes()


def _shift(image, dx, dy):
  m = np.float32([[1, 0, dx], [0, 1, dy]])
  return cv2.warpAffine(image, m, image.shape[::-1], borderMode=cv2.BORDER_REPLICATE)


def _spoil(problem: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A spoiled copy of a uint8 (H, W) face."""
  side = image.shape[0]
  if problem == "blur":
    return cv2.GaussianBlur(image, (0, 0), rng.uniform(2.5, 4.0))
  if problem == "dark":
    return np.clip(image.astype(np.float32) * rng.uniform(0.05, 0.12), 0, 255).astype(np.uint8)
  if problem == "bright":
    return np.clip(image.astype(np.float32) * 0.4 + rng.uniform(190, 215), 0, 255
                   ).astype(np.uint8)
  if problem == "black":
    return np.zeros_like(image) + np.uint8(rng.integers(0, 4))
  if problem == "off_centre":
    # A crop made around the wrong point: the face 30-40% of the side away,
    # still wholly in view.
    angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.28) * side
    return _shift(image, r * np.cos(angle), r * np.sin(angle))
  if problem == "cut_off":
    # Half the face outside the frame: sideways or downwards.
    d = rng.uniform(0.42, 0.5) * side * rng.choice([-1, 1])
    return _shift(image, d, 0) if rng.random() < 0.5 else _shift(image, 0, abs(d))
  if problem == "near_duplicate":
    noisy = image.astype(np.float32) + rng.normal(0, 3, image.shape) + rng.uniform(-8, 8)
    return np.clip(noisy, 0, 255).astype(np.uint8)
  raise ValueError(problem)


def plant_problems(src_dir: str, out_dir: str, *, seed: int = 0,
                   counts: dict[str, int] | None = None) -> list[Planted]:
  """Copies the face set at src_dir to out_dir with planted problems.

  Spoiled images replace their originals (same path); duplicates are new
  files `<expression>/dup_<n>.png` beside their sources; swapped labels change
  only the manifest. Every planted image and every duplicate's source is
  chosen from different clean images, so each carries one problem.

  Returns:
    The planted problems (also written to out_dir/planted.csv).

  Raises:
    DataError: out_dir exists and is not empty (nothing is overwritten), or
      the set is too small for the counts.
  """
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise DataError(f"{out_dir} is not empty: plant into a new directory")
  records = contract.read_manifest(src_dir)
  counts = dict(default_counts(len(records)) if counts is None else counts)
  unknown = set(counts) - set(PROBLEMS)
  if unknown:
    raise DataError(f"unknown problems {sorted(unknown)}: use {', '.join(PROBLEMS)}")
  duplicate_kinds = ("exact_duplicate", "near_duplicate", "cross_label_duplicate")
  # Each duplicate needs a clean source besides the copy itself.
  needed = sum(counts.values()) + sum(counts.get(k, 0) for k in duplicate_kinds)
  if needed > len(records):
    raise DataError(f"{len(records)} images cannot carry {needed} planted problems")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(records))
  for r in records:
    os.makedirs(os.path.join(out_dir, os.path.dirname(r.path)), exist_ok=True)
    shutil.copyfile(os.path.join(src_dir, r.path), os.path.join(out_dir, r.path))
  new_records = list(records)
  planted, cursor, dup_number = [], 0, 0
  image_problems = {"blur": (F.BLUR,), "dark": (F.EXPOSURE,), "bright": (F.EXPOSURE,),
                    "black": (F.EXPOSURE,), "off_centre": (F.FRAMING,),
                    "cut_off": (F.FRAMING,)}
  # A frame with no picture left also has no face and no sharp detail.
  allowed = {"dark": (F.BLUR, F.FRAMING), "bright": (F.BLUR, F.FRAMING),
             "black": (F.BLUR, F.FRAMING), "blur": (F.FRAMING,)}
  for problem in PROBLEMS:
    for _ in range(counts.get(problem, 0)):
      i = int(order[cursor])
      cursor += 1
      r = records[i]
      if problem in image_problems:
        image = cv2.imread(os.path.join(src_dir, r.path), cv2.IMREAD_GRAYSCALE)
        fileio.write_bytes_atomic(os.path.join(out_dir, r.path), _png(_spoil(problem, image, rng)))
        planted.append(Planted(r.path, problem, image_problems[problem],
                               allowed.get(problem, ())))
      elif problem == "swapped_label":
        wrong = rng.choice([e for e in contract.EXPRESSIONS if e != r.expression])
        new_records[i] = dataclasses.replace(r, expression=str(wrong))
        planted.append(Planted(r.path, problem, (F.LABEL,)))
      else:
        source = records[i]
        expression = source.expression
        if problem == "cross_label_duplicate":
          expression = str(rng.choice([e for e in contract.EXPRESSIONS
                                       if e != source.expression]))
        path = f"{expression}/dup_{dup_number:04d}.png"
        dup_number += 1
        os.makedirs(os.path.join(out_dir, expression), exist_ok=True)
        if problem == "near_duplicate":
          image = cv2.imread(os.path.join(src_dir, source.path), cv2.IMREAD_GRAYSCALE)
          fileio.write_bytes_atomic(os.path.join(out_dir, path),
                                    _png(_spoil(problem, image, rng)))
        else:
          shutil.copyfile(os.path.join(src_dir, source.path), os.path.join(out_dir, path))
        new_records.append(dataclasses.replace(source, path=path, expression=expression))
        # Both the copy and its source are duplicates; under two labels one of
        # them is mislabelled, so a label finding on either is no mistake.
        extra = (F.LABEL,) if problem == "cross_label_duplicate" else ()
        planted.append(Planted(path, problem, (F.DUPLICATE,), extra, source.path))
        planted.append(Planted(source.path, problem + "_source", (F.DUPLICATE,), extra,
                               path))
  contract.write_manifest(out_dir, new_records)
  write_planted(os.path.join(out_dir, PLANTED_NAME), planted)
  return planted


def write_planted(path: str, planted: Sequence[Planted]) -> None:
  rows = ["path,problem,required,allowed,source"]
  for p in planted:
    rows.append(",".join(_csv_cell(v) for v in (
        p.path, p.problem, ";".join(p.required), ";".join(p.allowed), p.source)))
  fileio.write_text_atomic(path, "\n".join(rows) + "\n")


def _csv_cell(value: str) -> str:
  return f'"{value}"' if any(c in value for c in ',"\n') else value


def read_planted(path: str) -> list[Planted]:
  with open(path, newline="") as f:
    return [Planted(row["path"], row["problem"],
                    tuple(k for k in row["required"].split(";") if k),
                    tuple(k for k in row["allowed"].split(";") if k), row["source"])
            for row in csv.DictReader(f)]


def score_findings(findings: Sequence[F.Finding], planted: Sequence[Planted],
                   kinds: Sequence[str] = F.KINDS) -> dict:
  """Per kind: precision, recall and their counts on a planted set.

  A finding of kind K on image P is a true positive when K is required for P,
  neutral when K is only allowed for P, and a false positive otherwise. A
  required (P, K) without a finding is a miss. `top_precision` is the
  precision of the kind's first `planted` findings by score, the ones a
  person reviewing largest first sees first.
  """
  required, allowed = {}, {}
  for p in planted:
    required.setdefault(p.path, set()).update(p.required)
    allowed.setdefault(p.path, set()).update(p.allowed)
  scores = {}
  for kind in kinds:
    ranked = sorted((f for f in findings if f.kind == kind), key=lambda f: -f.score)
    flagged = {f.path for f in ranked}
    truth = {path for path, ks in required.items() if kind in ks}
    ok = {path for path, ks in allowed.items() if kind in ks}
    tp = len(flagged & truth)
    fp = len(flagged - truth - ok)
    fn = len(truth - flagged)
    top = [f.path for f in ranked[:len(truth)]]
    top_tp = sum(1 for path in top if path in truth)
    top_fp = sum(1 for path in top if path not in truth and path not in ok)
    scores[kind] = dict(
        planted=len(truth), found=len(flagged), true_positives=tp, false_positives=fp,
        missed=fn, precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / len(truth) if truth else None,
        top_precision=top_tp / (top_tp + top_fp) if top_tp + top_fp else None)
  return scores
