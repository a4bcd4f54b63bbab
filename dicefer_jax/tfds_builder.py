"""A TensorFlow Datasets builder over any preprocessed face set (`dicefer_faces`).

It reads only the on-disk contract (`DIR/manifest.csv` and the grayscale face
images it names, resized to 112x112 by `face_images.decode_face` exactly as
training from the files does), so it serves the synthetic set, MTCNN-preprocessed folders and
every imported dataset alike.

Splits `train` and `test` come from `dicefer_jax.splits.split_records`: the
dataset's official split when every manifest row has one (RAF-DB, FER2013,
AffectNet), otherwise a seeded k-fold that holds out whole subjects when subject
ids are known (CK+, Oulu-CASIA; the paper's protocol there is 10-fold, so pass
num_folds=10 and run fold=0..9), or a stratified k-fold over images.

Features: image (112, 112, 1) uint8, expression ClassLabel(names=EXPRESSIONS),
subject Text ('' when unknown), source Text, path Text (the manifest's path).

Three ways to use it (importing this module registers the builder):

  from dicefer_jax import tfds_builder
  # 1. builder kwargs, in the name string or as arguments:
  ds = tfds.load("dicefer_faces/face_dir=/faces/ckplus,num_folds=10,fold=3",
                 split="train", data_dir="/tmp/tfds")
  b = tfds.builder("dicefer_faces", face_dir="/faces/ckplus", num_folds=10,
                   fold=3, data_dir="/tmp/tfds")
  b.download_and_prepare(); ds = b.as_dataset(split="test")
  # 2. a config object:
  cfg = tfds_builder.faces_config("/faces/ckplus", num_folds=10, fold=3)
  ds = tfds.load("dicefer_faces", builder_kwargs={"config": cfg},
                 split="train", data_dir="/tmp/tfds")
  # 3. the convenience wrapper:
  ds = tfds_builder.load("/faces/ckplus", "train", data_dir="/tmp/tfds",
                         num_folds=10, fold=3)

The config name is derived from the face directory's name, a hash of its path
and manifest, and the fold settings (e.g. `ckplus-3f2a9c0d1e-fold3of10-seed0`),
so editing the manifest builds a fresh copy instead of serving a stale one, and
a prepared copy can be read back by name alone, without the face directory:
`tfds.load("dicefer_faces/ckplus-3f2a9c0d1e-fold3of10-seed0", data_dir=...)`.
"""

import dataclasses
import hashlib
import os
import re

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from dicefer_jax import contract, face_images
from dicefer_jax import splits
from dicefer_jax.errors import DataError, UserError

_DESCRIPTION = """\
Preprocessed faces (112x112 grayscale, MTCNN-aligned or imported) of a DICE-FER
face set, labelled with the 7 canonical expressions. Train/test follow the
dataset's official split, else a subject-held-out k-fold.
"""


@dataclasses.dataclass(eq=False)
class DiceferFacesConfig(tfds.core.BuilderConfig):
  """Which face set and which fold; build it with `faces_config`.

  Attributes:
    face_dir: the face set directory (holds manifest.csv).
    fold: the test fold of the k-fold (ignored for an official split).
    num_folds: the number of folds (10 is the paper's CK+/Oulu-CASIA protocol).
    seed: seed of the fold assignment.
    manifest_sha256: hash of the manifest the config was made for.
    split_kind: 'official', 'subject' or 'stratified' (see dicefer_jax.splits).
  """

  face_dir: str = ""
  fold: int = 0
  num_folds: int = 5
  seed: int = 0
  # Kept out of repr: tfds logs the whole config when it is custom.
  manifest_sha256: str = dataclasses.field(default="", repr=False)
  split_kind: str = ""


def faces_config(face_dir: str, *, fold: int = 0, num_folds: int = 5,
                 seed: int = 0) -> DiceferFacesConfig:
  """A config for one face set and fold, named after its content.

  Raises:
    DataError: the directory is not a face set (no manifest, bad rows), or the
      fold settings are invalid for it.
  """
  face_dir = os.path.abspath(os.path.expanduser(str(face_dir)))
  records = contract.read_manifest(face_dir, check_files=False)
  kind = splits.split_kind(records)
  if kind != "official":
    # Fail here, with the library's one-line message, rather than mid-build.
    splits.split_records(records, num_folds=num_folds, fold=fold, seed=seed)
  with open(contract.face_set_location(face_dir)[1], "rb") as f:
    manifest_sha = hashlib.sha256(f.read()).hexdigest()
  key = hashlib.sha256(f"{face_dir}\n{manifest_sha}".encode()).hexdigest()[:10]
  slug = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(face_dir)).strip("_") or "faces"
  # An official split ignores the folds: one name for all of them avoids
  # building identical copies.
  tail = "official" if kind == "official" else f"fold{fold}of{num_folds}-seed{seed}"
  return DiceferFacesConfig(
      name=f"{slug}-{key}-{tail}",
      description=f"{face_dir} ({kind} split{'' if kind == 'official' else f', {tail}'})",
      face_dir=face_dir, fold=int(fold), num_folds=int(num_folds), seed=int(seed),
      manifest_sha256=manifest_sha, split_kind=kind)


class DiceferFaces(tfds.core.GeneratorBasedBuilder):
  """Faces of a DICE-FER face set (the on-disk contract) as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # tfds 4.9.10 derives code_path through `importlib_resources`, a package it
  # only requires on Python < 3.9, so the lookup fails on 3.10+ unless that
  # package happens to be installed. The path only serves to find a checksums
  # file, which a builder over local files has no use for.
  code_path = epath.Path(__file__)

  def __init__(self, *, face_dir: str | None = None, fold: int = 0,
               num_folds: int = 5, seed: int = 0, config=None, **kwargs):
    """Builds from `face_dir` (+ fold settings) or a `faces_config` config."""
    if face_dir is not None:
      if config is not None:
        raise UserError("dicefer_faces: pass either face_dir=... or config=..., "
                        "not both")
      config = faces_config(face_dir, fold=fold, num_folds=num_folds, seed=seed)
    if config is None or isinstance(config, str):
      # A config name is only readable from a prepared copy, which tfds.load
      # finds by itself; building needs to know the face directory.
      raise UserError(
          "dicefer_faces needs a face set: pass face_dir=DIR (e.g. "
          "tfds.load('dicefer_faces/face_dir=DIR,num_folds=10,fold=0', ...)) or "
          "config=tfds_builder.faces_config(DIR)")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = contract.IMAGE_SIZE
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8,
                                         encoding_format="png"),
            "expression": tfds.features.ClassLabel(names=list(contract.EXPRESSIONS)),
            "subject": tfds.features.Text(),
            "source": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        supervised_keys=("image", "expression"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local: the face set is the input.
    config = self.builder_config
    face_dir = config.face_dir
    image_root, manifest = contract.face_set_location(face_dir)
    with open(manifest, "rb") as f:
      if hashlib.sha256(f.read()).hexdigest() != config.manifest_sha256:
        raise DataError(
            f"{manifest} changed after this config was "
            "made: make a new config (faces_config) so it gets a new name")
    records = contract.read_manifest(face_dir)
    train, test, info = splits.split_records(
        records, num_folds=config.num_folds, fold=config.fold, seed=config.seed)
    # Recorded beside the data so a prepared copy says how it was split.
    self.info.metadata.update({
        "face_dir": face_dir, "manifest_sha256": config.manifest_sha256,
        "split": info.as_dict()})
    return {"train": self._generate_examples(image_root, train),
            "test": self._generate_examples(image_root, test)}

  def _generate_examples(self, face_dir, records):
    for r in records:
      # The same decoding as training from the files: gray, resized to 112x112.
      image = face_images.decode_face(os.path.join(face_dir, r.path), contract.IMAGE_SIZE)
      yield r.path, {
          "image": image[..., None],
          "expression": r.expression,
          "subject": r.subject,
          "source": r.source,
          "path": r.path,
      }


def load(face_dir: str, split: str, *, data_dir: str, fold: int = 0,
         num_folds: int = 5, seed: int = 0, **kwargs):
  """Builds the face set (once per data_dir) and returns `split` as a tf.data.Dataset.

  Extra kwargs go to `tfds.load` (e.g. as_supervised=True, shuffle_files=True).
  """
  config = faces_config(face_dir, fold=fold, num_folds=num_folds, seed=seed)
  return tfds.load("dicefer_faces", split=split, data_dir=data_dir,
                   builder_kwargs={"config": config}, **kwargs)
