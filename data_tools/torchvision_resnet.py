r"""Converts a torchvision resnet18 state dict (.pth) into DICE-FER's trunk (.npz).

E_exp and E_id are ResNet-18s with torchvision's topology (dicefer_jax.models.
ResNet18Trunk), so they can start from a standard pretrained resnet18. This
offline tool reads the PyTorch file once and writes the weights in the Flax
naming and layout; training then reads the .npz with dicefer_jax.pretrained
and never needs torch.

Usage:
  python -m data_tools.torchvision_resnet --pth=resnet18.pth --out=trunk.npz

--pth is a torchvision `resnet18` state dict: `torch.save(model.state_dict())`,
or a checkpoint dict holding one under "state_dict" or "model"; a "module."
prefix (DataParallel) is stripped. Only resnet18 at width 64 converts; `fc.*`
and `num_batches_tracked` are dropped. The mapping:

  conv1 / bn1                  -> stem_conv / stem_bn
  layerK.J.conv1 ... bn2       -> stageK_block{J+1}/conv1 ... bn2
  layerK.J.downsample.0 / .1   -> stageK_block{J+1}/downsample_conv / downsample_bn
  conv weight (O, I, H, W)     -> kernel (H, W, I, O)
  BN weight, bias              -> params scale, bias
  BN running_mean, running_var -> batch_stats mean, var

A 3-channel (RGB) stem becomes a 1-channel one, whose kernel is the SUM of the
three input-channel kernels: our images are one grayscale channel, and feeding
torchvision that channel replicated three times computes sum_c w_c * x =
(sum_c w_c) * x, so the summed kernel gives exactly the pretrained network's
output on the replicated image. A plain mean would scale every stem output by
1/3, against the stem BatchNorm's pretrained running mean and variance, and so
shift every activation after it. A 1-channel stem is kept as it is.

The .npz holds one array per leaf under its flattened path
(`params/stage1_block1/conv1/kernel`, `batch_stats/stem_bn/mean`, ...) and a
`meta` entry: a JSON string with the source file's name and sha256. --out is
never overwritten. Errors are one line on stderr with exit status 2.

This is the only module that imports torch, and only inside `read_state_dict`:
importing the module for its conversion functions leaves torch out.
"""

import hashlib
import io
import json
import os
import sys
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from dicefer_jax import fileio
from dicefer_jax.errors import UserError

WIDTH = 64  # torchvision's resnet18; the only width a pretrained file comes in
_STAGES = 4
_BLOCKS_PER_STAGE = 2
STEM_CHANNELS = (1, 3)  # grayscale stems are kept, RGB ones summed to grayscale
META_KEY = "meta"
FORMAT = "dicefer-resnet18-trunk-v1"
# torchvision names that carry nothing the trunk uses.
_IGNORED_PREFIXES = ("fc.",)
_IGNORED_LEAVES = ("num_batches_tracked",)
# torchvision BN leaf -> (Flax collection, Flax leaf).
_BN_LEAVES = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"),
              ("running_var", "batch_stats", "var"))
# Keys of a checkpoint dict that hold the model's state dict.
_WRAPPER_KEYS = ("state_dict", "model")
_PARALLEL_PREFIX = "module."


class Entry(NamedTuple):
  """One tensor of the state dict and where it goes."""
  torch_name: str          # e.g. "layer2.0.downsample.1.running_var"
  shape: tuple[int, ...]   # its torchvision shape
  flax_key: str            # e.g. "batch_stats/stage2_block1/downsample_bn/var"


def layout(stem_channels: int = 3) -> list[Entry]:
  """Every trunk tensor of torchvision's resnet18 (width 64), in its order.

  Written from the topology, not read from a model, so that the converter
  checks a file against resnet18 itself; tests compare it with the Flax trunk.
  """
  entries = []

  def conv(torch_prefix, flax_module, out_c, in_c, k):
    entries.append(Entry(f"{torch_prefix}.weight", (out_c, in_c, k, k),
                         f"params/{flax_module}/kernel"))

  def bn(torch_prefix, flax_module, c):
    for torch_leaf, collection, flax_leaf in _BN_LEAVES:
      entries.append(Entry(f"{torch_prefix}.{torch_leaf}", (c,),
                           f"{collection}/{flax_module}/{flax_leaf}"))

  conv("conv1", "stem_conv", WIDTH, stem_channels, 7)
  bn("bn1", "stem_bn", WIDTH)
  in_c = WIDTH
  for stage in range(1, _STAGES + 1):
    c = WIDTH * 2 ** (stage - 1)
    for block in range(_BLOCKS_PER_STAGE):
      t, f = f"layer{stage}.{block}", f"stage{stage}_block{block + 1}"
      conv(f"{t}.conv1", f"{f}/conv1", c, in_c, 3)
      bn(f"{t}.bn1", f"{f}/bn1", c)
      conv(f"{t}.conv2", f"{f}/conv2", c, c, 3)
      bn(f"{t}.bn2", f"{f}/bn2", c)
      # torchvision and BasicBlock both project the shortcut exactly when the
      # block changes the channel count (the first block of stages 2-4).
      if in_c != c:
        conv(f"{t}.downsample.0", f"{f}/downsample_conv", c, in_c, 1)
        bn(f"{t}.downsample.1", f"{f}/downsample_bn", c)
      in_c = c
  return entries


def _listed(names: Sequence[str], limit: int = 3) -> str:
  shown = ", ".join(repr(n) for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Any]:
  """The state dict inside what torch.load returned, "module." prefixes stripped.

  Accepts a bare state dict or a checkpoint dict holding one under "state_dict"
  or "model" (the common training-script layouts).
  """
  if isinstance(obj, Mapping):
    for key in _WRAPPER_KEYS:
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise UserError(f"{source} holds a {type(obj).__name__}, not a state dict: save "
                    "torchvision's resnet18 with torch.save(model.state_dict(), path)")
  state = {}
  for key, value in obj.items():
    name = str(key)
    if name.startswith(_PARALLEL_PREFIX):
      name = name[len(_PARALLEL_PREFIX):]
    state[name] = value
  return state


def convert_state_dict(state: Mapping[str, np.ndarray],
                       source: str = "the state dict") -> dict[str, np.ndarray]:
  """A resnet18 state dict (numpy values) -> {flattened Flax key: float32 array}.

  Raises:
    UserError: a key is missing or unexpected, or a shape is not resnet18's at
      width 64 (message names `source` and the first offending key).
  """
  kept = {k: v for k, v in state.items()
          if not k.startswith(_IGNORED_PREFIXES)
          and k.rsplit(".", 1)[-1] not in _IGNORED_LEAVES}
  stem = kept.get("conv1.weight")
  stem_channels = (stem.shape[1] if stem is not None and np.ndim(stem) == 4
                   and stem.shape[1] in STEM_CHANNELS else 3)
  entries = layout(stem_channels)
  expected = {e.torch_name for e in entries}
  unexpected = [k for k in kept if k not in expected]
  if unexpected:
    raise UserError(f"{source} has unexpected key(s) {_listed(unexpected)}: only a "
                    "torchvision resnet18 state dict converts (not resnet34/50 or a "
                    "changed model)")
  missing = [e.torch_name for e in entries if e.torch_name not in kept]
  if missing:
    raise UserError(f"{source} lacks key(s) {_listed(missing)}: only a complete "
                    "torchvision resnet18 state dict converts")
  out = {}
  for e in entries:
    value = np.asarray(kept[e.torch_name])
    if value.shape != e.shape:
      also = " (or 1 input channel)" if e.torch_name == "conv1.weight" else ""
      raise UserError(f"{source}: {e.torch_name} has shape {tuple(value.shape)}, but "
                      f"resnet18 at width {WIDTH} has {e.shape}{also}: only a "
                      "standard torchvision resnet18 converts")
    if not np.issubdtype(value.dtype, np.floating):
      raise UserError(f"{source}: {e.torch_name} holds {value.dtype}, not floats")
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      raise UserError(f"{source}: {e.torch_name} holds NaN or inf values")
    if e.flax_key.endswith("/kernel"):
      if e.torch_name == "conv1.weight" and value.shape[1] == 3:
        # Exact for a grayscale image replicated to RGB (module docstring):
        # sum, not mean, or the stem's BN statistics no longer fit.
        value = value.sum(axis=1, keepdims=True)
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    out[e.flax_key] = np.ascontiguousarray(value)
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The state dict of a .pth file as numpy arrays (the one place torch runs)."""
  import torch  # pylint: disable=g-import-not-at-top  # offline only; see docstring
  source = f"--pth={path}"
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch's own message is many lines (and suggests weights_only=False, which
    # would run arbitrary code from the file): one line instead.
    raise UserError(f"{source} cannot be read as a torch state dict "
                    f"({type(e).__name__}): save the model with "
                    "torch.save(model.state_dict(), path)") from None
  state = {}
  for name, value in unwrap_state_dict(obj, source).items():
    if not isinstance(value, torch.Tensor):
      raise UserError(f"{source}: {name!r} holds a {type(value).__name__}, not a "
                      "tensor: not a state dict")
    value = value.detach().cpu()
    # numpy has no bfloat16: every float tensor goes through float32.
    state[name] = (value.float() if value.is_floating_point() else value).numpy()
  return state


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _free_name(path: str) -> str:
  """A name like `path` that does not exist yet, to suggest instead."""
  stem, ext = os.path.splitext(path)
  n = 2
  while os.path.exists(f"{stem}-{n}{ext}"):
    n += 1
  return f"{stem}-{n}{ext}"


def _refuse_existing(out: str):
  if os.path.exists(out):
    raise UserError(f"--out={out} exists already and is never overwritten: pick "
                    f"another name, e.g. --out={_free_name(out)}")


def write_trunk(out: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]):
  """Writes the .npz without ever replacing an existing file, nor leaving half
  of one: it is written under a temporary name, then hard-linked to `out`,
  which fails if `out` appeared in the meantime (a rename would replace it)."""
  _refuse_existing(out)
  buffer = io.BytesIO()
  np.savez(buffer, **{META_KEY: np.array(json.dumps(dict(meta), sort_keys=True))},
           **arrays)
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  tmp = fileio.temp_path(out)
  try:
    with open(tmp, "xb") as f:
      f.write(buffer.getvalue())
    try:
      os.link(tmp, out)
    except FileExistsError:
      _refuse_existing(out)
      raise
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def convert_file(pth: str, out: str) -> dict[str, Any]:
  """Reads `pth`, converts it and writes `out`; returns the metadata written."""
  if not os.path.isfile(pth):
    raise UserError(f"--pth={pth} does not exist: pass a torchvision resnet18 state "
                    "dict, e.g. saved with torch.save(resnet18(weights=...).state_dict(), "
                    "'resnet18.pth')")
  # Before the (slow) read: a run that cannot write its output should not start.
  _refuse_existing(out)
  state = read_state_dict(pth)
  arrays = convert_state_dict(state, f"--pth={pth}")
  stem_channels = np.shape(state["conv1.weight"])[1]
  meta = dict(format=FORMAT, architecture="resnet18", width=WIDTH,
              source=os.path.basename(pth), sha256=sha256_of(pth),
              source_stem_channels=int(stem_channels),
              stem="summed over the 3 input channels" if stem_channels == 3
              else "kept (1 input channel)")
  write_trunk(out, arrays, meta)
  return meta


def _define_flags():
  """The command line's flags, defined only when run as a program (tests import
  this module next to others that define flags of the same names)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("pth", None, "torchvision resnet18 state dict (.pth) to read.")
  flags.DEFINE_string("out", None, "Trunk file (.npz) to write; must not exist.")
  return flags.FLAGS


def main(argv, flag_values) -> int:
  """The command line: converts --pth into --out; 0, or 2 for a user error."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  try:
    if not flag_values.pth or not flag_values.out:
      raise UserError("pass --pth=resnet18.pth (a torchvision state dict) and "
                      "--out=trunk.npz (the file to write)")
    meta = convert_file(flag_values.pth, flag_values.out)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"wrote {flag_values.out}: resnet18 trunk from {meta['source']} "
        f"(sha256 {meta['sha256'][:12]}), stem {meta['stem']}")
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: main(argv, _FLAG_VALUES))
