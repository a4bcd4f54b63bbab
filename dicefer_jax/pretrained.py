"""Starting the encoders' ResNet-18 trunks from a pretrained torchvision resnet18.

The weights come from a trunk file (.npz) that the offline converter writes:

  python -m data_tools.torchvision_resnet --pth=resnet18.pth --out=trunk.npz

It holds the Flax `ResNet18Trunk` variables at width 64 with a 1-channel stem,
one array per leaf under its flattened path (`params/stem_conv/kernel`,
`batch_stats/stage2_block1/downsample_bn/var`, ...). Reading it needs numpy
only: torch stays out of every training process (see tests/test_layering.py).
"""

import os
import zipfile
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from dicefer_jax.errors import UserError

COLLECTIONS = ("params", "batch_stats")
META_KEY = "meta"  # the converter's JSON metadata (source file, sha256)
_STEM_KERNEL = "stem_conv/kernel"
_CONVERT_HINT = "write one with python -m data_tools.torchvision_resnet --pth=... --out=..."


def _insert(tree: dict, path: Sequence[str], value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{"a/b/c": leaf} of a nested mapping."""
  flat = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, key + "/"))
    else:
      flat[key] = value
  return flat


def load_trunk(path: str) -> tuple[dict, dict]:
  """The trunk's (params, batch_stats) from a trunk file, as nested dicts of
  float32 numpy arrays shaped like `ResNet18Trunk`'s variables.

  Raises:
    UserError: the file is missing or is not a trunk file.
  """
  if not os.path.isfile(path):
    raise UserError(f"pretrained trunk {path} does not exist: {_CONVERT_HINT}")
  trees = {c: {} for c in COLLECTIONS}
  try:
    # allow_pickle=False: a trunk file is arrays and one string, never objects.
    npz = np.load(path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array
      raise ValueError("one array")
    with npz:
      for key in npz.files:
        if key == META_KEY:
          continue
        collection, _, rest = key.partition("/")
        if collection not in trees or not rest:
          raise UserError(f"pretrained trunk {path} has unexpected entry {key!r}: "
                          f"not a trunk file; {_CONVERT_HINT}")
        _insert(trees[collection], rest.split("/"), np.asarray(npz[key], np.float32))
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"pretrained trunk {path} cannot be read ({type(e).__name__}): "
                    f"not a trunk file; {_CONVERT_HINT}") from None
  if not trees["params"]:
    raise UserError(f"pretrained trunk {path} holds no parameters: {_CONVERT_HINT}")
  return trees["params"], trees["batch_stats"]


def _check_matches(model_trunk: Mapping, loaded: Mapping, collection: str,
                   encoder: str, path: str):
  """Raises a one-line UserError unless `loaded` has exactly the model trunk's
  paths and shapes; width and input channels are named first, since they are
  what a config can get wrong."""
  model_flat, loaded_flat = _flatten(model_trunk), _flatten(loaded)
  if _STEM_KERNEL in model_flat and _STEM_KERNEL in loaded_flat:
    *_, model_in, model_width = np.shape(model_flat[_STEM_KERNEL])
    *_, loaded_in, loaded_width = np.shape(loaded_flat[_STEM_KERNEL])
    if model_width != loaded_width:
      raise UserError(f"--config.model.width={model_width} but the pretrained trunk "
                      f"is width {loaded_width}: use --config.model.width={loaded_width}")
    if model_in != loaded_in:
      raise UserError(f"the model's images have {model_in} channel(s) but the "
                      f"pretrained trunk {path} takes {loaded_in}: convert the .pth "
                      "again with python -m data_tools.torchvision_resnet (it makes "
                      "a 1-channel stem)")
  where = f"{encoder}'s trunk {collection}"
  missing = sorted(set(model_flat) - set(loaded_flat))
  if missing:
    raise UserError(f"pretrained trunk {path} lacks {where} {missing[0]!r} "
                    f"({len(missing)} missing): {_CONVERT_HINT}")
  extra = sorted(set(loaded_flat) - set(model_flat))
  if extra:
    raise UserError(f"pretrained trunk {path} has {extra[0]!r}, which {where} does "
                    f"not ({len(extra)} such): {_CONVERT_HINT}")
  for key, value in model_flat.items():
    if np.shape(value) != np.shape(loaded_flat[key]):
      raise UserError(f"pretrained trunk {path}: {key} has shape "
                      f"{np.shape(loaded_flat[key])}, {where} has {np.shape(value)}")


def _like(loaded: Mapping, model_trunk: Mapping) -> dict:
  """`loaded` as fresh device arrays of the model's dtypes, tree by tree.

  Fresh per call: each encoder gets its own buffers, so donating the train
  state never hands XLA one buffer twice.
  """
  return {name: (_like(value, model_trunk[name]) if isinstance(value, Mapping)
                 else jnp.array(value, dtype=model_trunk[name].dtype))
          for name, value in loaded.items()}


def with_pretrained_trunks(params: Mapping, batch_stats: Mapping, path: str,
                           encoders: Sequence[str] = ("exp_encoder", "id_encoder")):
  """(params, batch_stats) with each encoder's `trunk` taken from a trunk file.

  A pure function: new top-level and encoder dicts are returned, the inputs
  are not changed, and everything but `params[enc]["trunk"]` and
  `batch_stats[enc]["trunk"]` (code head, code_norm, critics, ...) is the very
  same object as given.

  Args:
    params, batch_stats: the model's variables, keyed by module name
      (models.init_variables).
    path: a trunk file written by python -m data_tools.torchvision_resnet.
    encoders: the modules whose trunk is replaced.

  Raises:
    UserError: the file is missing or unreadable, or its trunk does not fit the
      model's (width, input channels, any path or shape); nothing is returned.
  """
  trunk_params, trunk_stats = load_trunk(path)
  for enc in encoders:
    if enc not in params or "trunk" not in params[enc]:
      raise ValueError(f"params has no {enc}/trunk to load a pretrained trunk into")
    # Every encoder is checked before anything is built: all or nothing.
    _check_matches(params[enc]["trunk"], trunk_params, "params", enc, path)
    _check_matches(batch_stats[enc]["trunk"], trunk_stats, "batch_stats", enc, path)
  new_params, new_stats = dict(params), dict(batch_stats)
  for enc in encoders:
    new_params[enc] = {**params[enc], "trunk": _like(trunk_params, params[enc]["trunk"])}
    new_stats[enc] = {**batch_stats[enc],
                      "trunk": _like(trunk_stats, batch_stats[enc]["trunk"])}
  return new_params, new_stats
