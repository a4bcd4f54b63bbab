"""python -m data_tools.audit: find blurred, badly exposed, badly framed, duplicate
and mislabelled images; review them; write a cleaned manifest.

  python -m data_tools.audit --data_dir=DIR            # audit -> DIR/audit/
  python -m data_tools.audit --data_dir=DIR --serve    # review in the browser
  python -m data_tools.audit --data_dir=DIR --apply=DIR/audit/reviewed.csv

The audit never edits, moves or deletes an image or manifest.csv.
"""

import os
import sys

from dicefer_jax import environment  # pylint: disable=unused-import  # XLA/TF flags first

# The label model's config: a config file of the experiments (configs live
# with the entry points), found beside this package, installed or not.
DEFAULT_LABEL_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "experiments", "configs", "audit_labels.py")


def _define_flags():
  # Defined only when run as a program: the framing check's spawned workers
  # import this module again (as __mp_main__), and absl refuses a flag twice.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from data_tools.audit import findings  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data_dir", None, "Face set (directory with manifest.csv, or a "
                      "manifest CSV in it) or raw photo tree (DIR/<Expression>/*.jpg).")
  flags.DEFINE_list("checks", list(findings.KINDS),
                    f"Checks to run, a subset of {','.join(findings.KINDS)}.")
  config_flags.DEFINE_config_file(
      "label_config", DEFAULT_LABEL_CONFIG,
      "Config of the label check's model (method 'baseline'); override fields with "
      "--label_config.FIELD=VALUE, e.g. --label_config.baseline.num_steps=400.",
      lock_config=True)
  flags.DEFINE_integer("label_folds", 5, "Folds of the label check (>= 2): each "
                       "image is judged by the model of the folds without it.")
  flags.DEFINE_integer("label_seed", 0, "Seed of the label check's folds.")
  flags.DEFINE_integer("workers", 0, "Threads for reading and processes for MTCNN "
                       "(0: one per core).")
  flags.DEFINE_float("min_laplacian_var", 20.0, "Blur: variance of the Laplacian "
                     "(of the 112x112 face) below this is flagged; see "
                     "DIR/audit/measure_laplacian_var.png to choose it.")
  flags.DEFINE_float("max_offset", 0.35, "Framing: a face further than this many "
                     "eye distances from where the set's faces are is off centre.")
  flags.DEFINE_integer("max_phash_distance", 10, "Duplicates: candidate pairs differ "
                       "in at most this many of the 64 perceptual-hash bits.")
  flags.DEFINE_float("max_local_difference", 0.2, "Duplicates: a candidate pair is a "
                     "duplicate when no 2x2 window of the 16x16 faces differs by more "
                     "than this many standard deviations.")
  flags.DEFINE_string("apply", None, "Reviewed findings CSV (decision column filled "
                      "in): write a cleaned manifest beside manifest.csv instead of "
                      "auditing.")
  flags.DEFINE_string("output", "manifest.cleaned.csv", "With --apply: file name of "
                      "the cleaned manifest, inside the face set's directory.")
  flags.DEFINE_bool("serve", False, "Open the findings in the review page (local web "
                    "app on 127.0.0.1) instead of auditing.")
  flags.DEFINE_integer("port", 8000, "With --serve: the loopback port.")
  return flags.FLAGS


def _settings(fv):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from data_tools.audit import auditor  # pylint: disable=g-import-not-at-top
  defaults = auditor.AuditSettings()
  return auditor.AuditSettings(
      checks=tuple(fv.checks),
      image=dataclasses.replace(defaults.image, min_laplacian_var=fv.min_laplacian_var),
      duplicates=dataclasses.replace(defaults.duplicates,
                                     max_phash_distance=fv.max_phash_distance,
                                     max_local_difference=fv.max_local_difference),
      framing=dataclasses.replace(defaults.framing, max_offset=fv.max_offset),
      label_folds=fv.label_folds, label_seed=fv.label_seed, workers=fv.workers)


def main(argv, fv) -> int:
  """Audits, serves or applies; returns the exit status (2: a user error)."""
  from dicefer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  try:
    if not fv.data_dir:
      raise UserError("pass --data_dir=DIR: a face set or a raw photo tree")
    if fv.apply and fv.serve:
      raise UserError("--apply and --serve are separate steps: review first "
                      "(--serve), then apply the reviewed CSV")
    if fv.serve:
      from data_tools.audit import review  # pylint: disable=g-import-not-at-top
      review.serve(fv.data_dir, port=fv.port)
      return 0
    if fv.apply:
      from data_tools.audit import apply as apply_lib  # pylint: disable=g-import-not-at-top
      done = apply_lib.apply_decisions(fv.data_dir, fv.apply, fv.output)
      print(f"kept {done.kept} image(s) ({done.relabelled} relabelled), dropped "
            f"{done.dropped}; {done.undecided} finding(s) had no decision (kept). "
            f"Cleaned manifest: {done.manifest} (train on it with "
            f"--config.data_dir={done.manifest}); changes: {done.changes}")
      return 0
    from data_tools.audit import auditor  # pylint: disable=g-import-not-at-top
    settings = _settings(fv)
    result = auditor.run_audit(fv.data_dir, settings, fv.label_config)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command (the label models resume)",
          file=sys.stderr)
    return 130
  counts = ", ".join(f"{k} {n}" for k, n in result.summary["counts"].items())
  print(f"{result.summary['images_flagged']} of {result.summary['num_images']} images "
        f"flagged ({counts}). Findings: {result.findings_path}; pages: "
        f"{result.index_path}. Review them with --serve, then --apply the reviewed CSV.")
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: sys.exit(main(argv, _FLAG_VALUES)))
