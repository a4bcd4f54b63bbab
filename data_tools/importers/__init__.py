"""Importers that turn public FER datasets, as their owners ship them, into face sets.

Every importer has two halves:

* `list_<name>(root, ...) -> list[Record]`: pure enumeration, one module per
  dataset (`folder`, `fer2013`, `rafdb`, `ckplus`, `oulu`, `affectnet`), each
  holding its dataset's layout and label codes (see their docstrings). It reads
  label files and directory listings only (no pixels), maps the dataset's labels
  onto the 7 canonical classes of `dicefer_jax.contract.EXPRESSIONS`, keeps
  subject ids and the official train/test split where the dataset has them,
  and counts what it leaves out in an optional `skipped` Counter (reason ->
  count). A `Record.path` here names where the face comes from: the raw image
  file, or for FER2013 the CSV row that holds its pixels (`<csv>#<row>`).
* a write step (`writer`, run by `pipeline.import_dataset`): faces that are
  already aligned crops are written directly (grayscale, resized to 112x112,
  PNG); the others go through MTCNN detection and alignment
  (`data_tools.preprocess.run_preprocess`). Either way the output follows the
  on-disk contract: `OUT/<expression>/*.png` plus `OUT/manifest.csv`.

Inputs are never modified: outputs go to a separate directory, and a directory
that already holds files is only written with resume (keep the faces already
written, do the rest, rewrite the manifest at the end) or, for direct writers,
overwrite (write every face again). MTCNN runs resume through their own work log
(see data_tools.preprocess), so overwrite does not apply to them.
"""

from data_tools.importers.affectnet import AFFECTNET_CODES
from data_tools.importers.affectnet import AFFECTNET_DROPPED
from data_tools.importers.affectnet import list_affectnet
from data_tools.importers.ckplus import CKPLUS_CODES
from data_tools.importers.ckplus import list_ckplus
from data_tools.importers.common import IMAGE_EXTENSIONS
from data_tools.importers.common import PEAK_FRAMES
from data_tools.importers.fer2013 import FER2013_CODES
from data_tools.importers.fer2013 import FER2013_USAGE
from data_tools.importers.fer2013 import list_fer2013
from data_tools.importers.folder import list_folder
from data_tools.importers.oulu import OULU_CLASSES
from data_tools.importers.oulu import list_oulu
from data_tools.importers.pipeline import DATASETS
from data_tools.importers.pipeline import DIRECT
from data_tools.importers.pipeline import import_dataset
from data_tools.importers.pipeline import list_dataset
from data_tools.importers.pipeline import TITLES
from data_tools.importers.rafdb import list_rafdb
from data_tools.importers.rafdb import RAFDB_CODES
from data_tools.importers.writer import check_output_dir
from data_tools.importers.writer import format_summary
from data_tools.importers.writer import spread
from data_tools.importers.writer import summarize
from data_tools.importers.writer import to_face
from data_tools.importers.writer import write_direct

__all__ = [
    "AFFECTNET_CODES", "AFFECTNET_DROPPED", "CKPLUS_CODES", "DATASETS", "DIRECT",
    "FER2013_CODES", "FER2013_USAGE", "IMAGE_EXTENSIONS", "OULU_CLASSES",
    "PEAK_FRAMES", "RAFDB_CODES", "TITLES", "check_output_dir", "format_summary",
    "import_dataset", "list_affectnet", "list_ckplus", "list_dataset",
    "list_fer2013", "list_folder", "list_oulu", "list_rafdb", "spread",
    "summarize", "to_face", "write_direct",
]
