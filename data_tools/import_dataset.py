r"""Imports a public facial-expression dataset into a DICE-FER face set.

Reads the dataset exactly as its owners distribute it, maps its labels onto the 7
classes (neutral anger disgust fear happiness sadness surprise) and writes
OUT/<expression>/*.png (112x112 grayscale) plus OUT/manifest.csv, keeping subject
ids and the official train/test split where the dataset has them.

Usage:
  python -m data_tools.import_dataset --dataset=NAME --root=DIR --output_dir=OUT \
      [--workers=N] [--limit=N] [--dry_run] [--resume | --overwrite]

Datasets and the layout --root must have (the folder you unpacked into):
  folder     DIR/<Expression>/*.jpg   class folders named e.g. Happy, angry,
             Surprised (contempt is skipped); no subjects; faces found by MTCNN.
  fer2013    DIR/fer2013.csv   columns emotion,pixels,Usage (48x48 pixels);
             Training -> train, PublicTest+PrivateTest -> test; no subjects;
             upsampled to 112 px and written directly.
  rafdb      DIR = RAF-DB's basic/ folder: EmoLabel/list_patition_label.txt
             and Image/aligned/train_00001_aligned.jpg; train_/test_ -> split;
             no subjects; written directly from the aligned faces.
  ckplus     DIR/cohn-kanade-images/S005/001/*.png and
             DIR/Emotion/S005/001/*_emotion.txt; last 3 frames of each labelled
             sequence as its expression, first frame as neutral; contempt and
             unlabelled sequences are skipped; subject = S###; MTCNN.
  oulu       DIR/VL/Strong/P001/Anger/000.jpeg ... (Oulu-CASIA NIR&VIS); last 3
             frames of each sequence; subject = P###; 6 classes and no neutral,
             as in the paper, unless --oulu_neutral; MTCNN.
  affectnet  DIR/train_set/{images,annotations}/ and DIR/val_set/... (N.jpg +
             N_exp.npy), or DIR/training.csv + validation.csv with
             DIR/Manually_Annotated_Images/; contempt and codes 8-10 dropped;
             train -> train, val -> test; MTCNN, or --aligned to resize the
             crops directly.

Check a layout first with --dry_run (counts only, nothing written). OUT must be
new or empty; --resume continues an interrupted import (faces already written are
kept; MTCNN skips the photos its work log lists) and --overwrite writes every
face again (fer2013, rafdb, affectnet --aligned only). The dataset itself is
never modified. MTCNN rejects are listed in OUT/rejects.csv. Errors are one line
on stderr with exit status 2.

Examples:
  python -m data_tools.import_dataset --dataset=rafdb --root=~/data/RAF-DB/basic \
      --output_dir=~/faces/rafdb
  python -m data_tools.import_dataset --dataset=ckplus --root=~/data/CK+ \
      --output_dir=~/faces/ckplus --workers=4
"""

import sys

from absl import app
from absl import flags

from data_tools import importers
# Cheap: torch is only imported in its worker processes.
from data_tools import preprocess
from dicefer_jax.errors import UserError

_DATASET = flags.DEFINE_enum("dataset", None, list(importers.DATASETS),
                             "Which dataset --root holds (layouts: see above).")
_ROOT = flags.DEFINE_string("root", None, "Folder the dataset was unpacked into.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Face set directory to write (new or empty).")
_WORKERS = flags.DEFINE_integer(
    "workers", None, "Parallel workers (default: one MTCNN process per core; up to "
    "8 threads for direct writes).", lower_bound=1)
_LIMIT = flags.DEFINE_integer(
    "limit", None, "Import at most N images, spread evenly over the dataset (for a "
    "quick trial).", lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Only check the layout and print the counts.")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Continue an interrupted import into --output_dir: faces already "
    "written are kept, the manifest is rewritten at the end.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Write over the face set in --output_dir.")
_ALIGNED = flags.DEFINE_bool(
    "aligned", False, "AffectNet only: the images are face crops already; resize "
    "them directly (CSV form: crop to the listed face box) instead of running MTCNN.")
_OULU_NEUTRAL = flags.DEFINE_bool(
    "oulu_neutral", False, "Oulu-CASIA only: also take each sequence's first frame "
    "as neutral (off: the paper's 6-class protocol has no neutral).")
_OULU_MODALITY = flags.DEFINE_enum("oulu_modality", "VL", ["VL", "NI"],
                                   "Oulu-CASIA only: visible light or near infrared.")
_OULU_ILLUMINATION = flags.DEFINE_enum("oulu_illumination", "Strong",
                                       ["Strong", "Weak", "Dark"],
                                       "Oulu-CASIA only: illumination condition.")
_MIN_FACE_SIZE = flags.DEFINE_integer("min_face_size", 40,
                                      "MTCNN: smallest face in pixels.", lower_bound=1)
_MIN_PROB = flags.DEFINE_float("min_prob", 0.9, "MTCNN: lowest detection probability.")
_MAX_DISTORTION = flags.DEFINE_float(
    "max_distortion", preprocess.DEFAULT_MAX_DISTORTION,
    "MTCNN: largest landmark misfit after alignment, in eye distances.")
_MULTI_FACE = flags.DEFINE_enum(
    "multi_face", "largest", list(preprocess.MULTI_FACE_POLICIES),
    "MTCNN: which face of a photo with several (reject: drop the photo).")
_DEVICE = flags.DEFINE_enum("device", "auto", list(preprocess.DEVICES),
                            "MTCNN: where it runs (auto: CUDA when torch sees it).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  missing = [f"--{n}" for n, f in (("dataset", _DATASET), ("root", _ROOT))
             if f.value is None]
  if _OUTPUT_DIR.value is None and not _DRY_RUN.value:
    missing.append("--output_dir")
  try:
    if missing:
      raise UserError(f"missing {', '.join(missing)}: see --help for the layouts")
    list_options = {}
    if _DATASET.value == "oulu":
      list_options = dict(include_neutral=_OULU_NEUTRAL.value,
                          modality=_OULU_MODALITY.value,
                          illumination=_OULU_ILLUMINATION.value)
    importers.import_dataset(
        _DATASET.value, _ROOT.value, _OUTPUT_DIR.value, workers=_WORKERS.value,
        limit=_LIMIT.value, resume=_RESUME.value, overwrite=_OVERWRITE.value,
        aligned=_ALIGNED.value, dry_run=_DRY_RUN.value, list_options=list_options,
        preprocess_options=dict(min_face_size=_MIN_FACE_SIZE.value,
                                min_prob=_MIN_PROB.value,
                                max_distortion=_MAX_DISTORTION.value,
                                multi_face=_MULTI_FACE.value, device=_DEVICE.value))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
