"""One audit of a face set: every check, then the CSV, the pages and a summary.

`run_audit` reads a face set in the on-disk contract (or a raw folder tree of
photos `DIR/<Expression>/...`, before preprocessing), runs the checks asked for
and writes DIR/audit/:
  findings.csv          every finding (findings.py); the input of --apply
  index.html, <kind>.html   the contact sheets (contact_sheets.py)
  measure_*.png         distributions of the blur and exposure measures
  balance.csv           counts per subject and class (balance.py)
  label_probabilities.jsonl  out-of-fold class probabilities (label check)
  label_model/          the label check's fold models (kept for reuse)
  summary.json          counts per kind, thresholds, timings
A findings.csv that a person already filled in (any decision set) is never
overwritten: it is renamed with a time stamp first, and the run says so.
"""

import dataclasses
import html
import os
import time
from typing import Sequence

import numpy as np

from data_tools.audit import balance as balance_lib
from data_tools.audit import contact_sheets
from data_tools.audit import duplicates as duplicates_lib
from data_tools.audit import findings as F
from data_tools.audit import framing as framing_lib
from data_tools.audit import image_checks
from data_tools.audit import label_check
from dicefer_jax import contract, data as data_lib, face_detector, fileio
from dicefer_jax.errors import DataError, UserError

SUMMARY_NAME = "summary.json"


@dataclasses.dataclass(frozen=True)
class AuditSettings:
  checks: tuple[str, ...] = F.KINDS
  image: image_checks.Thresholds = image_checks.Thresholds()
  duplicates: duplicates_lib.DuplicateThresholds = duplicates_lib.DuplicateThresholds()
  framing: framing_lib.Thresholds = framing_lib.Thresholds()
  label_folds: int = 5
  label_seed: int = 0
  workers: int = 0

  def validate(self) -> None:
    unknown = [c for c in self.checks if c not in F.KINDS]
    if unknown or not self.checks:
      raise UserError(f"--checks={','.join(self.checks)}: use a comma-separated subset "
                      f"of {','.join(F.KINDS)}")


@dataclasses.dataclass
class AuditResult:
  findings: list[F.Finding]
  findings_path: str
  index_path: str
  summary: dict


def list_face_set(data_dir: str) -> tuple[list[contract.Record], bool]:
  """(records with paths relative to data_dir, is_raw_tree).

  A directory with a manifest is a face set; one without is read as a raw
  photo tree the way `data_tools.preprocess` reads it.
  """
  root, manifest = contract.face_set_location(data_dir)
  if os.path.isfile(manifest):
    return contract.read_manifest(data_dir), False
  # Imported here: preprocessing's module brings its worker pool along.
  from data_tools import preprocess  # pylint: disable=g-import-not-at-top
  scan = preprocess.scan_folder_tree(root)
  return [dataclasses.replace(r, path=os.path.relpath(r.path, root))
          for r in scan.records], True


def _keep_reviewed_findings(path: str) -> str | None:
  """Renames a findings CSV holding a person's decisions; returns the new name."""
  if not os.path.isfile(path):
    return None
  try:
    decided = any(f.decision for f in F.read_findings(path))
  except DataError:
    decided = True  # not ours to judge: keep it
  if not decided:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  kept = path[:-len(".csv")] + f".reviewed-{stamp}.csv"
  os.rename(path, kept)
  return kept


def _read_images_once(root: str, records, workers: int):
  """Blur/exposure measures and hashes of every image, each file decoded once."""
  rows = image_checks.map_face_images(
      root, records, lambda face: (image_checks.measure_image(face),
                                   duplicates_lib.hash_image(face)), workers)
  return (image_checks.MeasureTable.from_rows([m for m, _ in rows]),
          duplicates_lib.HashTable.from_rows([h for _, h in rows]))


def _duplicate_groups_of(records, hashes, thresholds) -> list[int]:
  """A group id per image: duplicates share one, every other image its own."""
  group = np.arange(len(records))
  for g in duplicates_lib.find_duplicate_groups(hashes, thresholds):
    group[list(g.members)] = g.members[0]
  return group.tolist()


def run_audit(data_dir: str, settings: AuditSettings = AuditSettings(),
              label_config=None, *, progress: bool = True) -> AuditResult:
  """Runs the checks on data_dir and writes DIR/audit/ (module docstring).

  Args:
    data_dir: a face set (directory or manifest CSV) or a raw photo tree.
    settings: which checks, their thresholds, folds and workers.
    label_config: the label model's config (method "baseline"); required
      when the label check is on.
    progress: print one line per step.
  """
  settings.validate()
  say = (lambda m: print(m, flush=True)) if progress else (lambda m: None)
  root, _ = contract.face_set_location(data_dir)
  records, raw = list_face_set(data_dir)
  out_dir = F.audit_dir(root)
  os.makedirs(out_dir, exist_ok=True)
  findings_path = F.findings_path(root)
  kept = _keep_reviewed_findings(findings_path)
  if kept:
    say(f"kept the reviewed {findings_path} as {kept} (a new audit does not overwrite it)")
  checks = set(settings.checks)
  timings, notes, found = {}, [], []
  say(f"auditing {len(records)} images of {root}"
      + (" (a raw photo tree: not yet aligned)" if raw else ""))

  started = time.perf_counter()
  measures, hashes = _read_images_once(root, records, settings.workers)
  timings["read_measure_hash_s"] = time.perf_counter() - started
  plots = image_checks.plot_measure_distributions(measures, out_dir, settings.image)
  exposure = image_checks.exposure_findings(records, measures, settings.image)
  if F.EXPOSURE in checks:
    found += exposure
  if F.BLUR in checks:
    # A black or washed-out frame has no sharp detail either; it is shown once,
    # on the exposure sheet, so the blur sheet's top is real blur.
    badly_exposed = {f.path for f in exposure}
    found += [f for f in image_checks.blur_findings(records, measures, settings.image)
              if f.path not in badly_exposed]
  groups = list(range(len(records)))
  if F.DUPLICATE in checks or F.LABEL in checks:
    started = time.perf_counter()
    if F.DUPLICATE in checks:
      found += duplicates_lib.duplicate_findings(records, hashes, settings.duplicates)
    groups = _duplicate_groups_of(records, hashes, settings.duplicates)
    timings["duplicates_s"] = time.perf_counter() - started
  say(f"blur, exposure, duplicates: {len(found)} finding(s)")

  if F.FRAMING in checks:
    if not face_detector.mtcnn_installed():
      notes.append("framing check skipped: MTCNN is not installed "
                   "(pip install 'dicefer-jax[data]')")
      say(notes[-1])
    else:
      started = time.perf_counter()
      say(f"framing: detecting faces in {len(records)} images (MTCNN, worker processes)")
      detections = framing_lib.detect_all([os.path.join(root, r.path) for r in records],
                                      raw=raw, workers=settings.workers or None)
      framed = framing_lib.framing_findings(records, detections, settings.framing, raw=raw)
      found += framed
      timings["framing_s"] = time.perf_counter() - started
      say(f"framing: {len(framed)} finding(s)")

  if F.LABEL in checks:
    if raw:
      notes.append("label check skipped: a raw photo tree is not aligned; run "
                   "`python -m data_tools.preprocess` and audit the face set it writes")
      say(notes[-1])
    elif label_config is None:
      raise UserError("the label check needs the label model's config: pass "
                      "--label_config or leave label out of --checks")
    elif len({r.expression for r in records}) < 2:
      notes.append("label check skipped: the set has a single expression")
      say(notes[-1])
    else:
      started = time.perf_counter()
      labels = np.array([r.label for r in records])
      folds = label_check.fold_of_images(labels, groups, settings.label_folds,
                                         settings.label_seed)
      faces = data_lib.FaceSet(root, records)
      model_root = label_check.model_dir(out_dir, records, folds, label_config)
      probabilities = label_check.out_of_fold_probabilities(label_config, faces, folds,
                                                            model_root)
      label_check.write_probabilities(os.path.join(out_dir, "label_probabilities.jsonl"),
                                      records, probabilities, folds)
      labelled = label_check.label_findings(records, probabilities)
      found += labelled
      accuracy = float(np.mean(np.argmax(probabilities, 1) == labels))
      timings["label_s"] = time.perf_counter() - started
      notes.append(f"label model: out-of-fold accuracy {accuracy:.3f} over "
                   f"{settings.label_folds} image folds")
      say(f"labels: {len(labelled)} suspect(s); {notes[-1]}")

  table = balance_lib.balance_table(records)
  balance_lib.write_balance_csv(os.path.join(out_dir, "balance.csv"), table)
  found = F.sort_findings(found)
  F.write_findings(findings_path, found)
  contact_sheets.write_contact_sheets(
      root, found, records=records, kinds=[k for k in F.KINDS if k in checks], plots=plots,
      sections=[("Class and subject balance", balance_lib.balance_html(table)),
                *([("Notes", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
                    + "</ul>")] if notes else [])],
      title=f"Audit of {root}")
  summary = dict(
      data_dir=os.path.abspath(root), num_images=len(records), raw_tree=raw,
      checks=[k for k in F.KINDS if k in checks],
      counts={k: sum(1 for f in found if f.kind == k) for k in F.KINDS if k in checks},
      images_flagged=len({f.path for f in found}),
      thresholds=dict(image=dataclasses.asdict(settings.image),
                      duplicates=dataclasses.asdict(settings.duplicates),
                      framing=dataclasses.asdict(settings.framing)),
      label_folds=settings.label_folds, notes=notes, balance=dict(
          classes=table["classes"], unpairable=table["unpairable"],
          subjects_missing_expressions=len(table["missing"])),
      timings_s={k: round(v, 2) for k, v in timings.items()})
  fileio.write_json_atomic(os.path.join(out_dir, SUMMARY_NAME), summary)
  return AuditResult(found, findings_path,
                     os.path.join(out_dir, contact_sheets.INDEX_NAME), summary)
