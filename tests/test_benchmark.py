"""experiments.benchmark: the JSON a `--quick` run writes, its arithmetic, its tables.

One real `--quick` run in a subprocess (module fixture) is shared by the checks
on its record; with torch installed it drives the torch worker too. The phase
clock, the worker's protocol and the Markdown table are also checked on inputs
whose answer is known.
"""

import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import benchmark
from experiments import benchmark_torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """(record, markdown text, stdout) of `python -m experiments.benchmark --quick`."""
  from conftest import write_tiny_faceset  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("benchmark")
  data_dir = write_tiny_faceset(str(root / "faces"))
  out, md = root / "bench.json", root / "bench.md"
  env = dict(os.environ, PYTHONPATH=REPO, DICEFER_CACHE=str(root / "cache"))
  command = [sys.executable, "-m", "experiments.benchmark", "--quick", f"--json={out}",
             f"--markdown={md}", f"--config.data_dir={data_dir}"]
  if not HAS_TORCH:
    command.append("--no_torch")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(out.read_text()), md.read_text(), result.stdout


def test_required_figures_are_positive_and_finite(quick_run):
  """Catches a missing key or a zero, NaN or infinite figure in the record."""
  r, _, _ = quick_run
  required = [("resnet18_step", "jax_img_s"), ("stage1", "img_s"),
              ("stage1", "peak_fraction"), ("pipeline", "pairs_s")]
  if HAS_TORCH:
    required += [("resnet18_step", "torch_img_s"), ("resnet18_step", "ratio")]
  for section, key in required:
    assert _positive(r[section][key]), (section, key, r[section][key])
  assert _positive(r["peak_rss_mb"])
  for stage in benchmark.STAGES:
    assert _positive(r[stage]["img_s"]) and _positive(r[stage]["compile_s"]), r[stage]
  assert r["quick"] is True and r["config"]["image_size"] == 32


def test_resnet_comparison_is_the_real_size_with_equal_threads(quick_run):
  """Catches --quick shrinking the ResNet-18 comparison, a torch model that is
  not the same ResNet-18, or the two sides running on different thread counts."""
  res = quick_run[0]["resnet18_step"]
  assert (res["image_size"], res["batch_size"]) == (112, 32)
  assert res["jax_img_s"] == pytest.approx(statistics.median(res["jax_rounds_img_s"]))
  if not HAS_TORCH:
    assert res["torch_img_s"] is None and res["ratio"] is None
    return
  assert res["ratio"] == pytest.approx(res["jax_img_s"] / res["torch_img_s"], rel=1e-9)
  assert res["torch_img_s"] == pytest.approx(statistics.median(res["torch_rounds_img_s"]))
  assert len(res["jax_rounds_img_s"]) == len(res["torch_rounds_img_s"]) == res["rounds"]
  assert res["torch_threads"] == res["jax_threads"] >= 1
  # torchvision's resnet18 with a 1-channel stem and 7 classes; JAX's baseline
  # state adds only the unused 512->64 code head.
  assert res["torch_params"] == 11_170_240 + 512 * 7 + 7
  assert res["jax_params"] == res["torch_params"] + 512 * 64 + 64


def test_conv_specs_are_the_convolutions_of_the_trunk():
  """Catches a convolution list that is not ResNet-18's (a missing downsample, a
  wrong stride or size): its kernels must be exactly the trunk's, in number and
  in parameters, and each input size must be what the trunk feeds that layer."""
  import jax  # pylint: disable=g-import-not-at-top
  from dicefer_jax import models  # pylint: disable=g-import-not-at-top
  specs = benchmark.resnet18_conv_specs(112, 64)
  trunk = models.ResNet18Trunk(width=64)
  params = jax.eval_shape(lambda: trunk.init(
      jax.random.PRNGKey(0), np.zeros((1, 112, 112, 1), np.float32), train=False))["params"]
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if "kernel" in jax.tree_util.keystr(path)]
  assert len(specs) == len(kernels) == 20
  assert sorted((s["k"], s["k"], s["cin"], s["cout"]) for s in specs) == sorted(kernels)
  maps = jax.eval_shape(lambda: trunk.apply(
      trunk.init(jax.random.PRNGKey(0), np.zeros((1, 112, 112, 1), np.float32),
                 train=False), np.zeros((1, 112, 112, 1), np.float32), train=False))
  # The first convolution of each stage reads the previous stage's map.
  firsts = [s for s in specs[1:] if s["k"] == 3 and (s["stride"] == 2 or s is specs[1])]
  assert [s["size"] for s in firsts] == [28] + [m.shape[1] for m in maps[:3]]
  assert [s["input_grad"] for s in specs] == [False] + [True] * 19


def test_convolutions_alone_are_compared_and_bound_the_step_ratio(quick_run):
  """Catches the convolution-only comparison missing, or its bound computed from
  other figures than the record's: step_ratio_bound is torch's step time over
  (torch's step without its convolutions + JAX's convolutions)."""
  res = quick_run[0]["resnet18_step"]
  conv = res["convolutions"]
  assert conv["num_convs"] == 20 and _positive(conv["jax_ms"])
  if not HAS_TORCH:
    assert conv["torch_ms"] is None and conv["step_ratio_bound"] is None
    return
  assert conv["speed_ratio"] == pytest.approx(conv["torch_ms"] / conv["jax_ms"])
  torch_step_ms = 1e3 * 32 / res["torch_img_s"]
  assert conv["step_ratio_bound"] == pytest.approx(
      torch_step_ms / (max(torch_step_ms - conv["torch_ms"], 0) + conv["jax_ms"]))


def test_peak_share_and_pipeline_arithmetic(quick_run):
  """Catches a peak fraction or pipeline ratio not computed from the figures
  reported beside it (stage 1's FLOPs, its rate, the matmul peak)."""
  r = quick_run[0]
  s1, peak, pipe = r["stage1"], r["matmul_peak"], r["pipeline"]
  assert _positive(s1["flops_per_step"]) and _positive(peak["gflop_s"])
  assert s1["gflop_s"] == pytest.approx(
      s1["flops_per_step"] * s1["img_s"] / s1["images_per_step"] / 1e9, rel=1e-9)
  assert s1["peak_fraction"] == pytest.approx(s1["gflop_s"] / peak["gflop_s"], rel=1e-9)
  assert s1["images_per_step"] == 2 * r["config"]["batch_size"]  # pairs: two images
  assert pipe["stage1_pairs_s"] == pytest.approx(s1["img_s"] / 2, rel=1e-9)
  assert pipe["ratio"] == pytest.approx(pipe["pairs_s"] / pipe["stage1_pairs_s"], rel=1e-9)


def test_end_to_end_parts_sum_to_at_most_the_total(quick_run):
  """Catches time counted twice (a phase inside another) or not at all: the
  parts and the remainder add up to the total, every part was seen."""
  e2e = quick_run[0]["end_to_end"]
  assert e2e["stages"] == ["stage1", "stage2", "stage3"]
  parts = e2e["parts_s"]
  assert set(parts) == set(benchmark.E2E_PARTS)
  assert all(v >= 0 for v in parts.values())
  for name in ("init", "input", "compile", "steps", "checkpoints", "evaluation"):
    assert parts[name] > 0, name
  assert sum(parts.values()) <= e2e["total_s"] + 1e-6
  assert sum(parts.values()) + e2e["other_s"] == pytest.approx(e2e["total_s"], abs=1e-6)
  assert sum(e2e["stages_s"].values()) <= e2e["total_s"] + 1e-6
  assert quick_run[0]["peak_rss"]["after_stage"] == "stage1"


def test_machine_is_recorded(quick_run):
  m = quick_run[0]["machine"]
  assert m["cpu_model"] and m["usable_cpus"] >= 1 and m["jax"] and m["jaxlib"]
  assert "xla_cpu_experimental_ynn_fusion_type" in m["xla_flags"]
  assert all(isinstance(m["idle"][k], float) for k in ("load1_before", "load1_after"))


def test_markdown_and_printed_table_come_from_the_record(quick_run):
  """Catches a table that drifts from the JSON: the file is exactly what
  `markdown(record)` makes, and it shows the record's figures."""
  r, md, stdout = quick_run
  assert md == benchmark.markdown(r)
  assert f"{r['resnet18_step']['jax_img_s']:.1f} img/s" in md
  assert f"{r['pipeline']['pairs_s']:.0f} pairs/s" in md
  assert r["machine"]["cpu_model"] in md
  assert benchmark.text_table(r) in stdout


# ----------------------------------------------------------------------------
# Pieces on known inputs.


def test_phase_clock_counts_each_second_once():
  """Catches nested phases counted in both (parts would exceed the total) and
  phases inside an absorbing one (evaluation's compile) recorded apart."""
  clock = benchmark.PhaseClock()
  start = time.perf_counter()
  with clock.phase("steps"):
    time.sleep(0.02)
    with clock.phase("input"):
      time.sleep(0.03)
  with clock.phase("evaluation"):
    with clock.phase("compile"):
      time.sleep(0.02)
  total = time.perf_counter() - start
  assert clock.seconds["input"] >= 0.03 and clock.seconds["steps"] >= 0.02
  assert clock.seconds["steps"] < 0.03 + 0.02  # the input's time is not in it
  assert clock.seconds["evaluation"] >= 0.02 and "compile" not in clock.seconds
  assert sum(clock.seconds.values()) <= total
  assert clock.counts == {"steps": 1, "input": 1, "evaluation": 1}


def test_torch_worker_protocol_reports_errors_as_replies():
  """Catches a worker that dies (or stays silent) on a bad request: the
  benchmark would then hang on the pipe instead of naming the error."""
  replies = []
  requests = io.StringIO('{"op": "steps", "n": 1}\n\n{"op": "jump"}\n{"op": "quit"}\n'
                         '{"op": "steps", "n": 1}\n')
  benchmark_torch.serve(requests, replies.append)
  assert [r["ok"] for r in replies] == [False, False]  # nothing after quit
  assert "'steps' before 'init'" in replies[0]["error"]
  assert "unknown op 'jump'" in replies[1]["error"]


def test_tables_render_a_run_without_torch(quick_run):
  """Catches a table that breaks on a --no_torch record (torch fields None)."""
  r = json.loads(json.dumps(quick_run[0]))
  r["resnet18_step"].update(torch_img_s=None, ratio=None, paired_ratio_median=None,
                            torch_threads=None, torch_default_threads=None,
                            torch_version=None, torch_rounds_img_s=[])
  md = benchmark.markdown(r)
  assert "| PyTorch (not run) (eager, channels_last) | n/a |" in md
  assert "| ratio jax/torch | n/a |" in md
  assert benchmark.text_table(r)


@pytest.mark.skipif(not HAS_TORCH, reason="torch (the data extra) is not installed")
def test_torch_worker_runs_amp_steps_in_bfloat16():
  """The GPU script's mixed-precision comparison: with amp the worker's forward
  pass computes in bfloat16 (autocast), without it in float32. Catches an amp
  flag that is accepted but never reaches the model."""
  probe = (
      "import json, torch\n"
      "from experiments import benchmark_torch\n"
      "seen = []\n"
      "for amp in (False, True):\n"
      "  info, step = benchmark_torch._build(dict(threads=1, batch_size=2, image_size=32,"
      " num_classes=7, learning_rate=1e-3, b1=0.9, b2=0.999, device='cpu', amp=amp))\n"
      "  dtypes = []\n"
      "  handle = torch.nn.modules.module.register_module_forward_hook("
      "lambda m, i, o: dtypes.append(str(o.dtype)) if isinstance(m, torch.nn.Linear) else None)\n"
      "  loss = step(); handle.remove()\n"
      "  seen.append(dict(amp=info['amp'], fc=dtypes[-1], finite=bool(torch.isfinite(loss))))\n"
      "print(json.dumps(seen))\n")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-2000:]
  fp32, amp = json.loads(result.stdout.strip().splitlines()[-1])
  assert fp32 == dict(amp=False, fc="torch.float32", finite=True)
  assert amp == dict(amp=True, fc="torch.bfloat16", finite=True)
