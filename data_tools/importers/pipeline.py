"""Listing a dataset by name and importing it: list, report, check, write.

`import_dataset` is what the CLI (`data_tools.import_dataset`) runs: it lists
the dataset with its lister, prints what it found, refuses an output directory
that would touch the dataset or clobber a face set, then writes the faces
directly or through MTCNN (see `writer`).
"""

import collections
import os

from data_tools.importers import affectnet
from data_tools.importers import ckplus
from data_tools.importers import common
from data_tools.importers import fer2013
from data_tools.importers import folder
from data_tools.importers import oulu
from data_tools.importers import rafdb
from data_tools.importers import writer
from dicefer_jax import contract
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError, UserError

DATASETS = ("folder", "fer2013", "rafdb", "ckplus", "oulu", "affectnet")
TITLES = {
    "folder": "image folder", "fer2013": "FER2013", "rafdb": "RAF-DB",
    "ckplus": "CK+", "oulu": "Oulu-CASIA", "affectnet": "AffectNet",
}
# Importers whose faces are aligned crops already and skip MTCNN by default.
DIRECT = ("fer2013", "rafdb")
LISTERS = {
    "folder": folder.list_folder, "fer2013": fer2013.list_fer2013,
    "rafdb": rafdb.list_rafdb, "ckplus": ckplus.list_ckplus,
    "oulu": oulu.list_oulu, "affectnet": affectnet.list_affectnet,
}
assert tuple(LISTERS) == DATASETS and tuple(TITLES) == DATASETS


def list_dataset(name: str, root: str, *, skipped: collections.Counter | None = None,
                 **options) -> list[Record]:
  """Dispatches to `list_<name>`; options are passed on (e.g. include_neutral)."""
  if name not in DATASETS:
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
  return LISTERS[name](root, skipped=skipped, **options)


def import_dataset(dataset: str, root: str, output_dir: str, *,
                   workers: int | None = None, limit: int | None = None,
                   resume: bool = False, overwrite: bool = False,
                   aligned: bool = False, dry_run: bool = False,
                   list_options: dict | None = None,
                   preprocess_options: dict | None = None,
                   show_progress: bool = True, log=print) -> dict:
  """Enumerates a dataset and writes it as a face set; returns a summary dict.

  Args:
    dataset: one of DATASETS.
    root: where the dataset was unpacked (see the dataset's module docstring).
    output_dir: the face set to write; see `writer.check_output_dir` for the rules.
    workers: parallel workers of the write step.
    limit: import at most this many images, spread over the dataset (a quick trial).
    resume: continue an import into a non-empty output_dir: direct writers keep
      the faces already written, MTCNN skips the photos its work log lists.
    overwrite: direct writers only: write every face again over output_dir.
    aligned: AffectNet only: treat the images as aligned crops and write them
      directly instead of running MTCNN.
    dry_run: enumerate and report only; write nothing.
    list_options: extra arguments of `list_<dataset>` (e.g. include_neutral).
    preprocess_options: extra arguments of run_preprocess (min_face_size, ...).
    show_progress: progress bars on stderr.
    log: where the human-readable report goes.

  Returns:
    dataset, root, output_dir, found (a `writer.summarize` dict) and skipped
    (reason -> count); unless dry_run also written (summarize of the manifest)
    and failed (reason -> count), and for MTCNN runs preprocess (its stats).

  Raises:
    UserError/DataError: a wrong layout or bad arguments, with one line to show.
  """
  if dataset not in DATASETS:
    raise UserError(f"unknown --dataset {dataset!r}: use one of {', '.join(DATASETS)}")
  if aligned and dataset != "affectnet":
    raise UserError("--aligned applies to --dataset=affectnet only (FER2013 and RAF-DB "
                    "are always written directly, the others always need MTCNN)")
  title = TITLES[dataset]
  root = common.check_root(os.path.expanduser(root or ""), title)
  output_dir = os.path.expanduser(output_dir or "")
  direct = dataset in DIRECT or aligned
  if overwrite and not direct:
    # MTCNN runs keep a work log in the output directory and resume from it;
    # starting over means a fresh directory, not deleting its bookkeeping.
    raise UserError(f"--overwrite applies to directly written faces only; {title} "
                    "goes through MTCNN, whose runs resume by themselves: rerun with "
                    "--resume, or pick an empty --output_dir to start over")
  if not dry_run:
    output_dir = writer.check_output_dir(output_dir, root, resume=resume,
                                         overwrite=overwrite, can_overwrite=direct)
  skipped = collections.Counter()
  boxes = {}
  if dataset == "affectnet":
    # The CSV form's face boxes are needed to crop --aligned faces.
    items = affectnet.list_with_face_boxes(root, skipped)
    records = [record for record, _ in items]
    boxes = {record.path: box for record, box in items if box is not None}
  else:
    records = list_dataset(dataset, root, skipped=skipped, **(list_options or {}))
  found = writer.summarize(records)
  log(writer.format_summary(f"{title} at {root}", found, skipped))
  if not records:
    raise DataError(f"{title}: nothing to import under {root} (everything was skipped)")
  records = writer.spread(records, limit)
  if len(records) < found["num_images"]:
    log(f"--limit: importing {len(records)} of {found['num_images']} images")
  result = {"dataset": dataset, "root": root, "output_dir": output_dir,
            "found": found, "skipped": dict(skipped)}
  if dry_run:
    return result

  if direct:
    written, manifest, failed = _write_directly(
        dataset, title, records, boxes, output_dir, workers=workers, resume=resume,
        show_progress=show_progress)
  else:
    written, manifest, failed, stats = _write_through_mtcnn(
        title, records, output_dir, workers=workers,
        preprocess_options=preprocess_options, show_progress=show_progress)
    result["preprocess"] = stats
  result["failed"] = failed
  result["written"] = writer.summarize(written)
  log(writer.format_summary(f"wrote {output_dir}", result["written"],
                            result.get("failed")))
  log(f"manifest: {manifest}")
  return result


def _write_directly(dataset: str, title: str, records: list[Record],
                    boxes: dict[str, affectnet.FaceBox], output_dir: str, *,
                    workers: int | None, resume: bool,
                    show_progress: bool) -> tuple[list[Record], str, dict]:
  """Writes aligned crops directly; returns (written, manifest path, failed)."""
  if dataset == "fer2013":
    load = fer2013.row_loader(records)
  elif boxes:
    load = affectnet.face_box_loader(boxes, writer.load_gray)
  else:
    load = writer.load_gray
  failed = collections.Counter()
  pairs = [(r, writer.output_name(r, dataset)) for r in records]
  written = writer.write_direct(pairs, output_dir, load, workers=workers, resume=resume,
                                failed=failed, show_progress=show_progress)
  if not written:
    raise DataError(f"{title}: no face could be written ({dict(failed)})")
  manifest = contract.write_manifest(output_dir, written)
  return written, manifest, dict(failed)


def _write_through_mtcnn(
    title: str, records: list[Record], output_dir: str, *, workers: int | None,
    preprocess_options: dict | None,
    show_progress: bool) -> tuple[list[Record], str, dict, dict]:
  """Detects and aligns with MTCNN; returns (written, manifest path, failed, stats)."""
  kwargs = dict(preprocess_options or {})
  if workers:
    kwargs["workers"] = workers
  # Looked up on the module at call time, so tests can stand in for MTCNN.
  stats = writer.run_mtcnn(records, output_dir, show_progress=show_progress, **kwargs)
  reasons = dict(stats.get("reasons") or {})
  failed = {f"MTCNN {reason} (this run; see rejects.csv)": n
            for reason, n in reasons.items()}
  manifest = os.path.join(output_dir, contract.MANIFEST_NAME)
  if not stats.get("total_kept", 1) or not os.path.isfile(manifest):
    listed = ", ".join(f"{n} {r}" for r, n in reasons.items())
    raise DataError(f"{title}: MTCNN kept no face of {len(records)} photos "
                    f"({listed or 'see rejects.csv'}); the rejects are listed in "
                    f"{os.path.join(output_dir, 'rejects.csv')}")
  written = contract.read_manifest(output_dir, check_files=False)
  return written, manifest, failed, stats
