"""Which face set a config trains on: the user's directory, or the synthetic default.

The library takes a data directory; choosing it, and generating the built-in
synthetic set on first use, is the entry points' job (the generator is an
offline tool). `FaceSets` resolves and loads each directory once per process,
so a protocol of many folds and variants reads and decodes the set once.
"""

import os

from data_tools import synthetic
from dicefer_jax import data as data_lib


def _options(config) -> dict:
  """The confounded benchmark's options of config.synthetic (data_tools.synthetic);
  a config saved before they existed has them off."""
  s = config.synthetic
  # Not coerced: ensure_synthetic refuses a bad value in one line.
  return dict(
      expressions_per_subject=s.get("expressions_per_subject", synthetic.ALL_EXPRESSIONS),
      attribute_strength=s.get("attribute_strength", synthetic.NO_ATTRIBUTE),
      clean_fraction=s.get("clean_fraction", synthetic.DEFAULT_CLEAN_FRACTION))


def synthetic_dir(config) -> str:
  """Where the built-in synthetic set for this config lives (generated once).

  The confounded benchmark's options are in the name only when on, so the
  balanced set keeps the directory (and cached copy) it always had.
  """
  s = config.synthetic
  name = f"synthetic_n{s.num_subjects}_k{s.images_per_cell}_seed{s.seed}"
  options = _options(config)
  if options["expressions_per_subject"] != synthetic.ALL_EXPRESSIONS:
    name += f"_e{options['expressions_per_subject']:g}"
  if options["attribute_strength"] != synthetic.NO_ATTRIBUTE:
    name += f"_a{options['attribute_strength']:g}_c{options['clean_fraction']:g}"
  return os.path.join(data_lib.cache_root(config), name)


def resolve_data_dir(config) -> str:
  """config.data_dir, or the built-in synthetic set (generated if needed) when empty."""
  if config.data_dir:
    return config.data_dir
  s = config.synthetic
  return synthetic.ensure_synthetic(synthetic_dir(config), s.num_subjects,
                                    s.images_per_cell, s.seed, **_options(config))


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
