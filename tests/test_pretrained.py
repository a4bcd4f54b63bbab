"""Tests of starting the trunks from torchvision's resnet18: the offline converter
(data_tools.torchvision_resnet) and the library side (dicefer_jax.pretrained).

Everything that imports torch runs in a subprocess: torch and TensorFlow in one
process can crash it, and pytest collects modules that import TensorFlow into
this one. One subprocess builds torchvision resnet18s with random weights and
random BN statistics, saves their state dicts and the stage outputs torchvision
computes; the converter's CLI runs as a subprocess too. The conversion's naming,
checks and file format are also tested here without torch, on numpy state dicts.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import missing_or_fail
from data_tools import torchvision_resnet as tvr
from dicefer_jax import checkpoints, contract, models, train
from dicefer_jax import pretrained
from dicefer_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0")
# The key test's tolerance: every stage's map is divided by its RMS (values of
# order 1; the residual stream grows to an RMS of ~2-5 through the stages, with
# peaks of ~30), then compared element by element with atol=1e-4, rtol=0.
# torch and XLA sum the same float32 products in different orders, which leaves
# scaled differences of ~1e-5 at most at stage 4 (~1e-7 relative per product);
# a wrong mapping gives differences of order 1.
ATOL = 1e-4
NUM_PARAMS_1CH = 11_170_240  # torchvision resnet18, 1-channel stem, no fc


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _random_state(seed=0, stem_channels=3):
  """A numpy resnet18 state dict as torchvision names it (with fc and
  num_batches_tracked), every tensor random and distinguishable."""
  rng = np.random.default_rng(seed)
  state = {}
  for e in tvr.layout(stem_channels):
    if e.torch_name.endswith("running_var"):
      value = rng.uniform(0.5, 2.0, e.shape)
    else:
      value = rng.normal(0.0, 0.1, e.shape)
    state[e.torch_name] = value.astype(np.float32)
    if e.torch_name.endswith("running_var"):
      state[e.torch_name.replace("running_var", "num_batches_tracked")] = np.array(7)
  state["fc.weight"] = rng.normal(size=(1000, 512)).astype(np.float32)
  state["fc.bias"] = np.zeros(1000, np.float32)
  return state


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "data_tools.torchvision_resnet", *args],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  err = result.stderr.strip()
  assert "\n" not in err and "Traceback" not in err, err
  assert err.startswith("error: "), err
  for fragment in fragments:
    assert fragment in err, err


# --------------------------------------------------------------------------
# Without torch: the layout, the conversion rules and the trunk file.


def test_layout_is_exactly_the_flax_trunk():
  """Catches a block or stage index off by one, a missing or misplaced
  downsample, or a kernel left in torch's OIHW layout: the converted keys and
  shapes must be those of ResNet18Trunk(width=64) on 1-channel images."""
  converted = tvr.convert_state_dict(_random_state())
  variables = jax.eval_shape(
      lambda: models.ResNet18Trunk(64).init(
          jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), train=False))
  expected = {f"{c}/{k}": v.shape for c in ("params", "batch_stats")
              for k, v in _flat(variables[c]).items()}
  assert {k: v.shape for k, v in converted.items()} == expected
  assert sum(v.size for k, v in converted.items() if k.startswith("params/")) == NUM_PARAMS_1CH
  assert all(v.dtype == np.float32 for v in converted.values())


def test_names_and_layout_of_single_tensors():
  """Catches BN leaves mapped to the wrong name or collection (mean/var swapped,
  weight/bias swapped), layerK.J -> block J instead of J+1, and a conv kernel
  transposed the wrong way (H and W swapped)."""
  state = _random_state()
  c = tvr.convert_state_dict(state)
  bn = "layer3.1.bn2"
  np.testing.assert_array_equal(c["params/stage3_block2/bn2/scale"], state[f"{bn}.weight"])
  np.testing.assert_array_equal(c["params/stage3_block2/bn2/bias"], state[f"{bn}.bias"])
  np.testing.assert_array_equal(c["batch_stats/stage3_block2/bn2/mean"],
                                state[f"{bn}.running_mean"])
  np.testing.assert_array_equal(c["batch_stats/stage3_block2/bn2/var"],
                                state[f"{bn}.running_var"])
  w = state["layer2.0.conv1.weight"]  # (O, I, H, W) = (128, 64, 3, 3)
  k = c["params/stage2_block1/conv1/kernel"]  # (H, W, I, O)
  assert k[0, 2, 5, 7] == w[7, 5, 0, 2]
  np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(c["params/stage2_block1/downsample_conv/kernel"][0, 0],
                                state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(c["batch_stats/stage4_block1/downsample_bn/var"],
                                state["layer4.0.downsample.1.running_var"])


def test_rgb_stem_is_the_sum_of_its_channel_kernels():
  """Catches a mean (1/3 of the right kernel), one channel only, or no folding."""
  state = _random_state()
  got = tvr.convert_state_dict(state)["params/stem_conv/kernel"]
  want = state["conv1.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
  assert got.shape == (7, 7, 1, 64)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gray_stem_is_kept_as_it_is():
  """Catches a 1-channel stem summed, scaled or refused."""
  state = _random_state(stem_channels=1)
  got = tvr.convert_state_dict(state)["params/stem_conv/kernel"]
  np.testing.assert_array_equal(got, state["conv1.weight"].transpose(2, 3, 1, 0))


def test_checkpoint_wrappers_and_dataparallel_prefix_are_unwrapped():
  """Catches a "state_dict"/"model" checkpoint or DataParallel's "module."
  keys refused as unexpected (or converted to different weights)."""
  state = _random_state()
  plain = tvr.convert_state_dict(tvr.unwrap_state_dict(state, "x"))
  prefixed = {f"module.{k}": v for k, v in state.items()}
  for wrapped in ({"state_dict": prefixed, "epoch": 3}, {"model": state}, prefixed):
    got = tvr.convert_state_dict(tvr.unwrap_state_dict(wrapped, "x"))
    assert got.keys() == plain.keys()
    for k in plain:
      np.testing.assert_array_equal(got[k], plain[k])
  with pytest.raises(UserError, match="not a state dict"):
    tvr.unwrap_state_dict([1, 2], "--pth=x.pth")


@pytest.mark.parametrize("change, fragments", [
    (lambda s: s.pop("layer3.1.bn2.running_var"), ["lacks", "'layer3.1.bn2.running_var'"]),
    (lambda s: s.update({"layer5.0.conv1.weight": np.zeros((1, 1, 3, 3), np.float32)}),
     ["unexpected", "'layer5.0.conv1.weight'"]),
    (lambda s: s.update({"layer1.0.conv1.weight": np.zeros((32, 64, 3, 3), np.float32)}),
     ["layer1.0.conv1.weight has shape (32, 64, 3, 3)", "width 64 has (64, 64, 3, 3)"]),
    (lambda s: s.update({"conv1.weight": np.zeros((64, 4, 7, 7), np.float32)}),
     ["conv1.weight has shape (64, 4, 7, 7)", "1 input channel"]),
])
def test_state_dicts_that_are_not_resnet18_are_refused_in_one_line(change, fragments):
  """Catches a missing, unexpected or misshapen tensor converted silently (or
  a crash with a traceback instead of a UserError naming the tensor)."""
  state = _random_state()
  change(state)
  with pytest.raises(UserError) as info:
    tvr.convert_state_dict(state, "--pth=r.pth")
  message = str(info.value)
  assert "\n" not in message and message.startswith("--pth=r.pth")
  for fragment in fragments:
    assert fragment in message, message


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
  """A trunk .npz written by the converter from a random numpy state dict."""
  path = str(tmp_path_factory.mktemp("trunk") / "trunk.npz")
  tvr.write_trunk(path, tvr.convert_state_dict(_random_state(seed=1)),
                  dict(source="random", sha256="0" * 64))
  return path


def test_load_trunk_returns_nested_float32_trees(trunk_file):
  """Catches a loader that leaves paths flat, mixes the collections up, or
  reads the metadata entry as a parameter."""
  params, stats = pretrained.load_trunk(trunk_file)
  want = tvr.convert_state_dict(_random_state(seed=1))
  assert set(params) == {"stem_conv", "stem_bn", *(f"stage{s}_block{b}"
                                                   for s in (1, 2, 3, 4) for b in (1, 2))}
  got = {**{f"params/{k}": v for k, v in _flat(params).items()},
         **{f"batch_stats/{k}": v for k, v in _flat(stats).items()}}
  assert got.keys() == want.keys()
  for k, v in got.items():
    assert isinstance(v, np.ndarray) and v.dtype == np.float32
    np.testing.assert_array_equal(v, want[k])
  with np.load(trunk_file) as npz:
    assert json.loads(str(npz[tvr.META_KEY]))["sha256"] == "0" * 64


def test_load_trunk_refuses_missing_and_foreign_files(tmp_path):
  """Catches a raw FileNotFoundError/BadZipFile traceback instead of one line."""
  with pytest.raises(UserError, match="does not exist: write one with"):
    pretrained.load_trunk(str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(UserError, match="cannot be read"):
    pretrained.load_trunk(str(tmp_path / "junk.npz"))
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(UserError, match="unexpected entry 'weights'"):
    pretrained.load_trunk(str(tmp_path / "other.npz"))


def test_write_trunk_never_overwrites(trunk_file):
  """Catches an existing trunk file replaced (e.g. by an atomic rename)."""
  before = open(trunk_file, "rb").read()
  with pytest.raises(UserError, match=r"exists already .* --out=.*trunk-2\.npz"):
    tvr.write_trunk(trunk_file, {"params/x": np.zeros(1, np.float32)}, {})
  assert open(trunk_file, "rb").read() == before
  assert [n for n in os.listdir(os.path.dirname(trunk_file))] == ["trunk.npz"]


def _encoder_variables(width=64, channels=1):
  """params/batch_stats of both encoders and a discriminator, as init_variables
  keys them (32 px: the trunk's variables do not depend on the image size)."""
  images = np.zeros((1, 32, 32, channels), np.float32)
  params, stats = {}, {}
  for i, name in enumerate(("exp_encoder", "id_encoder")):
    encoder = models.ResNet18Encoder(code_dim=8, width=width, normalize_code=True)
    v = encoder.init(jax.random.PRNGKey(i), images, train=False)
    params[name], stats[name] = v["params"], v["batch_stats"]
  params["discriminator"] = models.Discriminator(8).init(
      jax.random.PRNGKey(5), np.zeros((1, 8)), np.zeros((1, 8)))["params"]
  return params, stats


def test_with_pretrained_trunks_replaces_only_the_trunks(trunk_file):
  """Catches a loader that changes or re-creates anything but the trunks (code
  head, code_norm statistics, other modules), modifies its inputs in place, or
  hands both encoders one set of buffers (donation would then see a buffer twice)."""
  params, stats = _encoder_variables()
  params_before = jax.tree_util.tree_map(np.array, params)
  stats_before = jax.tree_util.tree_map(np.array, stats)
  leaves_before = [id(x) for x in jax.tree_util.tree_leaves((params, stats))]

  new_params, new_stats = pretrained.with_pretrained_trunks(params, stats, trunk_file)

  # Inputs: same objects, same values.
  assert [id(x) for x in jax.tree_util.tree_leaves((params, stats))] == leaves_before
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_before)
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats, stats_before)
  # Everything but the trunks: the very same objects.
  assert new_params["discriminator"] is params["discriminator"]
  for enc in ("exp_encoder", "id_encoder"):
    assert new_params[enc]["code"] is params[enc]["code"]
    assert new_stats[enc]["code_norm"] is stats[enc]["code_norm"]
    assert set(new_params[enc]) == set(params[enc])
  assert set(new_params) == set(params) and set(new_stats) == set(stats)
  # The trunks: the file's values, with the model's structure and dtypes.
  want_params, want_stats = pretrained.load_trunk(trunk_file)
  for enc in ("exp_encoder", "id_encoder"):
    for new, want, old in ((new_params, want_params, params),
                           (new_stats, want_stats, stats)):
      assert (jax.tree_util.tree_structure(new[enc]["trunk"])
              == jax.tree_util.tree_structure(old[enc]["trunk"]))
      jax.tree_util.tree_map(np.testing.assert_array_equal, new[enc]["trunk"], want)
      assert all(a.dtype == b.dtype for a, b in zip(
          jax.tree_util.tree_leaves(new[enc]["trunk"]),
          jax.tree_util.tree_leaves(old[enc]["trunk"])))
  exp_leaves = jax.tree_util.tree_leaves(new_params["exp_encoder"]["trunk"])
  id_leaves = jax.tree_util.tree_leaves(new_params["id_encoder"]["trunk"])
  assert all(a is not b for a, b in zip(exp_leaves, id_leaves))


def test_with_pretrained_trunks_names_a_wrong_width(trunk_file):
  """Catches a width mismatch reported as a bare shape error (or not at all)."""
  params, stats = _encoder_variables(width=16)
  with pytest.raises(UserError) as info:
    pretrained.with_pretrained_trunks(params, stats, trunk_file)
  assert str(info.value) == ("--config.model.width=16 but the pretrained trunk is "
                             "width 64: use --config.model.width=64")


def test_with_pretrained_trunks_names_a_channel_mismatch(trunk_file):
  """Catches a 3-channel model given the 1-channel trunk without a clear line."""
  params, stats = _encoder_variables(channels=3)
  with pytest.raises(UserError, match=r"images have 3 channel\(s\) but the pretrained "
                     r"trunk .* takes 1") as info:
    pretrained.with_pretrained_trunks(params, stats, trunk_file)
  assert "\n" not in str(info.value)


def test_with_pretrained_trunks_refuses_a_trunk_of_another_shape(tmp_path):
  """Catches a trunk missing a tensor, or with a misshapen one, loaded anyway."""
  params, stats = _encoder_variables()
  arrays = tvr.convert_state_dict(_random_state())
  short = dict(arrays)
  del short["batch_stats/stage2_block2/bn1/var"]
  tvr.write_trunk(str(tmp_path / "short.npz"), short, {})
  with pytest.raises(UserError, match=r"lacks exp_encoder's trunk batch_stats "
                     r"'stage2_block2/bn1/var'"):
    pretrained.with_pretrained_trunks(params, stats, str(tmp_path / "short.npz"))
  bent = dict(arrays)
  bent["params/stage4_block2/conv2/kernel"] = np.zeros((3, 3, 512, 256), np.float32)
  tvr.write_trunk(str(tmp_path / "bent.npz"), bent, {})
  with pytest.raises(UserError, match="stage4_block2/conv2/kernel has shape"):
    pretrained.with_pretrained_trunks(params, stats, str(tmp_path / "bent.npz"))


def test_library_side_does_not_import_torch():
  """Catches torch reaching training through dicefer_jax.pretrained, or the
  converter importing it before it reads a .pth."""
  code = ("import sys, dicefer_jax.pretrained, data_tools.torchvision_resnet; "
          "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=ENV, timeout=120)


# --------------------------------------------------------------------------
# The CLI's one-line refusals that need no torch.


def test_cli_refuses_a_missing_pth(tmp_path):
  """Catches torch's FileNotFoundError traceback instead of one line."""
  result = _run_cli(f"--pth={tmp_path / 'nope.pth'}", f"--out={tmp_path / 't.npz'}")
  _assert_one_line_error(result, "nope.pth does not exist")
  assert not (tmp_path / "t.npz").exists()


def test_cli_refuses_to_overwrite_and_suggests_a_name(tmp_path):
  """Catches an existing --out replaced, or refused without a name to use."""
  (tmp_path / "r.pth").write_bytes(b"whatever")
  (tmp_path / "t.npz").write_bytes(b"precious")
  result = _run_cli(f"--pth={tmp_path / 'r.pth'}", f"--out={tmp_path / 't.npz'}")
  _assert_one_line_error(result, "exists already", f"--out={tmp_path / 't-2.npz'}")
  assert (tmp_path / "t.npz").read_bytes() == b"precious"


def test_cli_asks_for_both_flags():
  """Catches a missing --out reaching os.path with None (a TypeError traceback)."""
  _assert_one_line_error(_run_cli("--pth=x.pth"), "pass --pth=")


# --------------------------------------------------------------------------
# With torch, in subprocesses: real torchvision files and reference outputs.

_TORCH_SCRIPT = r"""
import sys
import numpy as np
import torch
import torchvision

out = sys.argv[1]
torch.manual_seed(0)
torch.set_num_threads(1)
model = torchvision.models.resnet18()
# Random BN affine parameters and running statistics, all different, so that a
# swapped mean/var or scale/bias changes the outputs. Running statistics are
# near the real ones (from a few batches in train mode) and then perturbed,
# which keeps the activations of order 1 through all 20 layers.
for m in model.modules():
  if isinstance(m, torch.nn.BatchNorm2d):
    m.momentum = None  # cumulative average
    m.reset_running_stats()
model.train()
with torch.no_grad():
  for _ in range(3):
    model(torch.randn(8, 3, 112, 112))
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0.0, 0.2)
      m.running_mean.add_(torch.randn_like(m.running_mean) * 0.2 * m.running_var.sqrt())
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.6, 1.6))
model.eval()
torch.save(model.state_dict(), f"{out}/rgb.pth")
np.save(f"{out}/conv1_rgb.npy", model.conv1.weight.detach().numpy())

x = np.random.default_rng(0).standard_normal((2, 112, 112, 1)).astype(np.float32)
np.save(f"{out}/x.npy", x)


def stage_outputs(model, images_nchw):
  with torch.no_grad():
    h = model.maxpool(model.relu(model.bn1(model.conv1(images_nchw))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      h = layer(h)
      outs.append(h.permute(0, 2, 3, 1).numpy())  # NCHW -> NHWC
  return outs


gray = torch.from_numpy(x).permute(0, 3, 1, 2)
for i, o in enumerate(stage_outputs(model, gray.repeat(1, 3, 1, 1))):
  np.save(f"{out}/rgb_layer{i + 1}.npy", o)

# The same network with a 1-channel stem, fed the grayscale image itself: the
# folded RGB kernel, each weight scaled at random (a different kernel that
# still fits the stem BN's statistics).
rgb_kernel = model.conv1.weight.detach()
model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
with torch.no_grad():
  model.conv1.weight.copy_(rgb_kernel.sum(1, keepdim=True)
                           * torch.empty(64, 1, 7, 7).uniform_(0.7, 1.3))
model.eval()
torch.save(model.state_dict(), f"{out}/gray.pth")
np.save(f"{out}/conv1_gray.npy", model.conv1.weight.detach().numpy())
for i, o in enumerate(stage_outputs(model, gray)):
  np.save(f"{out}/gray_layer{i + 1}.npy", o)

# Files the converter must refuse.
state = model.state_dict()
torch.save({**state, "layer5.0.conv1.weight": torch.zeros(512, 512, 3, 3)},
           f"{out}/extra.pth")
torch.save({**state, "layer1.0.conv1.weight": torch.zeros(32, 64, 3, 3)},
           f"{out}/narrow.pth")
torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
           f"{out}/wrapped.pth")
"""


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  """torchvision files and reference outputs (made in a torch-only subprocess),
  converted by the CLI: rgb.npz and gray.npz."""
  for module in ("torch", "torchvision"):
    if importlib.util.find_spec(module) is None:
      missing_or_fail(f"{module} is not installed: pip install -e '.[data]'")
  out = tmp_path_factory.mktemp("torchvision")
  subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, str(out)], check=True,
                 cwd=REPO, env=ENV, timeout=600)
  for name in ("rgb", "gray"):
    result = _run_cli(f"--pth={out / name}.pth", f"--out={out / name}.npz")
    assert result.returncode == 0, result.stderr
  return out


# One jitted function for both tests: compiling the trunk costs seconds.
_apply_trunk = jax.jit(lambda p, s, x: models.ResNet18Trunk(64).apply(
    {"params": p, "batch_stats": s}, x, train=False))


def _trunk_outputs(npz_path, x):
  """Our trunk's stage maps in eval mode, variables read by dicefer_jax.pretrained."""
  params, stats = pretrained.load_trunk(str(npz_path))
  return [np.asarray(m) for m in _apply_trunk(params, stats, x)]


def _rms(x) -> float:
  return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _assert_close_at_scale(got, want, what):
  """|got - want| <= ATOL everywhere, both divided by want's RMS (see ATOL)."""
  scale = _rms(want)
  np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=ATOL,
                             err_msg=f"{what} (divided by its RMS {scale:.3g})")


def test_converted_trunk_matches_torchvision_stage_by_stage(torch_files):
  """The key test: a torchvision resnet18 with random weights and random BN
  statistics, converted by the CLI and run as our Flax trunk in eval mode on a
  grayscale batch, gives torchvision's layer1..layer4 outputs on that batch
  replicated to RGB. Catches every wrong mapping: kernels not transposed, a
  mean instead of a sum in the stem, mean/var or scale/bias swapped, a block
  or stage index off by one, a padding or stride that differs."""
  x = np.load(torch_files / "x.npy")
  got = _trunk_outputs(torch_files / "rgb.npz", x)
  shapes = [(2, 28, 28, 64), (2, 14, 14, 128), (2, 7, 7, 256), (2, 4, 4, 512)]
  diffs = []
  for stage, (g, shape) in enumerate(zip(got, shapes), start=1):
    want = np.load(torch_files / f"rgb_layer{stage}.npy")
    assert g.shape == want.shape == shape
    # A live map: not all zero after the ReLU, not blown up.
    assert np.mean(want > 0) > 0.2 and 0.3 < _rms(want) < 20, stage
    diffs.append((float(np.abs(g - want).max()), _rms(want)))
    _assert_close_at_scale(g, want, f"stage {stage}")
  print("max abs difference, RMS per stage:", diffs)


def test_gray_torchvision_stem_converts_unchanged(torch_files):
  """Catches a 1-channel stem summed, scaled or transposed wrongly, and any
  other tensor converted differently than with an RGB stem; the converted
  network also reproduces torchvision's outputs on the grayscale image."""
  with np.load(torch_files / "gray.npz") as g, np.load(torch_files / "rgb.npz") as c:
    np.testing.assert_array_equal(
        g["params/stem_conv/kernel"],
        np.load(torch_files / "conv1_gray.npy").transpose(2, 3, 1, 0))
    np.testing.assert_allclose(
        c["params/stem_conv/kernel"],
        np.load(torch_files / "conv1_rgb.npy").sum(1, keepdims=True).transpose(2, 3, 1, 0),
        rtol=1e-6, atol=1e-7)
    assert g.files == c.files
    for k in g.files:
      if k not in ("params/stem_conv/kernel", tvr.META_KEY):
        np.testing.assert_array_equal(g[k], c[k], err_msg=k)
    meta = json.loads(str(g[tvr.META_KEY]))
  assert meta["source"] == "gray.pth" and meta["source_stem_channels"] == 1
  assert meta["sha256"] == tvr.sha256_of(str(torch_files / "gray.pth"))
  got = _trunk_outputs(torch_files / "gray.npz", np.load(torch_files / "x.npy"))
  for stage in range(4):
    _assert_close_at_scale(got[stage], np.load(torch_files / f"gray_layer{stage + 1}.npy"),
                           f"stage {stage + 1}")


def test_cli_unwraps_a_checkpoint(torch_files, tmp_path):
  """Catches a {"state_dict": {"module.…"}} checkpoint refused by the CLI."""
  result = _run_cli(f"--pth={torch_files / 'wrapped.pth'}", f"--out={tmp_path / 'w.npz'}")
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / "w.npz") as w, np.load(torch_files / "gray.npz") as g:
    for k in g.files:
      if k != tvr.META_KEY:
        np.testing.assert_array_equal(w[k], g[k], err_msg=k)


@pytest.mark.parametrize("name, fragments", [
    ("extra", ["unexpected key(s) 'layer5.0.conv1.weight'"]),
    ("narrow", ["layer1.0.conv1.weight has shape (32, 64, 3, 3)", "width 64"]),
])
def test_cli_refuses_a_state_dict_that_is_not_resnet18(torch_files, tmp_path, name,
                                                       fragments):
  """Catches the CLI printing a traceback (or writing --out) for a conversion error."""
  result = _run_cli(f"--pth={torch_files / name}.pth", f"--out={tmp_path / 't.npz'}")
  _assert_one_line_error(result, *fragments)
  assert not (tmp_path / "t.npz").exists()


# ---------------------------------------------------------------------------
# Training wiring: --config.stage1.init_from=trunk.npz


def _write_trunk_file(path, seed=3):
  """A trunk file in the converter's format from a Flax width-64 trunk with
  random values, so a trunk that is not loaded cannot match by accident."""
  trunk = models.ResNet18Trunk(width=64)
  variables = trunk.init(jax.random.PRNGKey(seed), np.zeros((1, 32, 32, 1), np.float32),
                         train=False)
  rng = np.random.default_rng(seed)
  arrays = {}
  for collection in pretrained.COLLECTIONS:
    for key, value in pretrained._flatten(variables[collection]).items():
      arrays[f"{collection}/{key}"] = (np.asarray(value)
                                       + rng.normal(size=np.shape(value))).astype(np.float32)
  np.savez(path, **arrays)
  return arrays


def test_stage1_init_from_a_trunk_file_starts_both_encoders_from_it(tiny_config, tmp_path):
  """Catches init_from=PATH ignored by training, loaded into one encoder only,
  or overwriting more than the trunks (code heads, critics keep their init)."""
  path = str(tmp_path / "trunk.npz")
  arrays = _write_trunk_file(path)
  config = tiny_config
  config.model.width = 64
  config.stage1.num_steps = 0  # a zero-step stage checkpoints the state it starts from
  config.stage1.init_from = path
  workdir = str(tmp_path / "wd")
  from experiments import run as run_lib  # pylint: disable=g-import-not-at-top
  run_lib.run(config, workdir, "1")
  model = models.build_model(config.model, contract.NUM_CLASSES)
  state, _ = checkpoints.restore_final(workdir, "stage1",
                                       train.restore_template("stage1", config, model))
  fresh = train.initial_state("stage1", config, model)
  for enc in ("exp_encoder", "id_encoder"):
    for collection, tree in (("params", state.params), ("batch_stats", state.batch_stats)):
      flat = pretrained._flatten(tree[enc]["trunk"])
      assert set(flat) == {k.split("/", 1)[1] for k in arrays if k.startswith(collection)}
      for key, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), arrays[f"{collection}/{key}"])
  # Everything else is the seed's fresh init: code heads, critics, heads.
  for name, tree in fresh.params.items():
    if name in ("exp_encoder", "id_encoder"):
      tree = {k: v for k, v in tree.items() if k != "trunk"}
    restored = {k: v for k, v in state.params[name].items() if k != "trunk"}
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), restored, tree))


@pytest.mark.parametrize("value, expected", [
    ("resnet18.pth", "convert it first"),
    ("missing.npz", "no such file"),
])
def test_stage1_init_from_refuses_a_pth_or_a_missing_file_in_one_line(value, expected):
  """Catches a .pth handed to training (torch would have to be imported) or a
  typo in the path reaching the first training step."""
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.stage1.init_from = value
  with pytest.raises(UserError, match=expected) as info:
    train.stages_for(config, "all")
  assert "\n" not in str(info.value)
