"""Which face set a config trains on: the user's directory, or the synthetic default.

The library takes a data directory; choosing it, and generating the built-in
synthetic set on first use, is the entry points' job (the generator is an
offline tool). `FaceSets` resolves and loads each directory once per process,
so a protocol of many folds and variants reads and decodes the set once.
"""

import os

from data_tools import synthetic
from dicefer_jax import data as data_lib


def synthetic_dir(config) -> str:
  """Where the built-in synthetic set for this config lives (generated once)."""
  s = config.synthetic
  return os.path.join(data_lib.cache_root(config),
                      f"synthetic_n{s.num_subjects}_k{s.images_per_cell}_seed{s.seed}")


def resolve_data_dir(config) -> str:
  """config.data_dir, or the built-in synthetic set (generated if needed) when empty."""
  if config.data_dir:
    return config.data_dir
  s = config.synthetic
  return synthetic.ensure_synthetic(synthetic_dir(config), s.num_subjects,
                                    s.images_per_cell, s.seed)


class FaceSets:
  """Face sets by config, each resolved and loaded once."""

  def __init__(self):
    self._dirs = {}
    self._sets = {}

  def data_dir(self, config) -> str:
    key = (config.data_dir, synthetic_dir(config))
    if key not in self._dirs:
      self._dirs[key] = resolve_data_dir(config)
    return self._dirs[key]

  def get(self, config) -> data_lib.FaceSet:
    data_dir = self.data_dir(config)
    if data_dir not in self._sets:
      self._sets[data_dir] = data_lib.load_face_set(data_dir)
    return self._sets[data_dir]

  def split(self, config) -> data_lib.FaceData:
    return data_lib.split_faces(config, self.get(config))
