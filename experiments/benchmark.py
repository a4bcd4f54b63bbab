r"""Measures how fast dicefer-jax trains on this machine; writes JSON (and Markdown).

  python -m experiments.benchmark --json=bench.json [--markdown=bench.md] \
      [--config=experiments/configs/demo.py] [--quick] [--no_torch]

One run measures, in this order:
  1. End to end: every stage of the config (`train.stages_for(config, "all")`)
     for a fixed number of steps through the real `train.train_and_evaluate`,
     its wall time split into init, input, compile, steps, checkpoints,
     evaluation and logging by wrapping, from here, the functions its loop
     calls (dicefer_jax is not changed); and the peak resident memory up to the
     end of stage 1. It runs first, so it pays what a fresh training process
     pays (nothing compiled yet, TensorFlow not imported).
  2. The ResNet-18 train step (112x112x1, batch 32, Adam, float32): the
     baseline step of dicefer_jax (jit, donated state) against torchvision's
     resnet18 (eager, channels_last) in a worker process, in alternating rounds.
  3. Each stage's step on the configured model (compile time, images/s), the
     float32 matmul peak (stage 1's share of it, from XLA's FLOP count) and the
     tf.data pair pipeline against what stage 1 consumes, in alternating rounds.
Every rate is a median over rounds; the machine (CPU, vector extensions,
versions, XLA_FLAGS, the load average before and after) is recorded with them.
The Markdown table is generated from the JSON record alone.

`--quick` shrinks the configured model (32 px, width 8) and every count so a
test can run it; the ResNet-18 comparison keeps its real size, with fewer
rounds. torch is imported only by the worker (experiments/benchmark_torch.py),
never in this process, which imports TensorFlow.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import collections
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dicefer_jax import config_fields, contract, fileio, models, steps, train
from experiments import cli
from experiments import face_sets
from experiments.configs import default

STAGES = ("stage1", "stage2", "stage3", "baseline")
# Parts of the end-to-end wall time, in the order they are reported.
E2E_PARTS = ("init", "input", "compile", "steps", "checkpoints", "evaluation", "logging")
# The ResNet-18 comparison's fixed size: the paper's input and batch.
RESNET_IMAGE_SIZE, RESNET_BATCH = 112, 32


@dataclasses.dataclass(frozen=True)
class Plan:
  """How much of everything to run."""

  resnet_rounds: int      # alternating JAX / torch rounds
  resnet_steps: int       # train steps per round, each side
  resnet_warmup: int      # untimed steps first, each side (torch needs a few)
  rounds: int             # rounds of the stage / matmul / pipeline block
  stage_steps: int        # steps per stage per round
  matmul_size: int        # n of the n x n float32 matmul
  matmul_reps: int        # matmuls per round
  pipeline_batches: int   # batches timed per pipeline round
  pipeline_images: int    # random images the pipeline samples from
  e2e_steps: int          # steps of every stage end to end


FULL = Plan(resnet_rounds=7, resnet_steps=3, resnet_warmup=3, rounds=7, stage_steps=5,
            matmul_size=2048, matmul_reps=5, pipeline_batches=40, pipeline_images=2000,
            e2e_steps=20)
QUICK = Plan(resnet_rounds=3, resnet_steps=1, resnet_warmup=2, rounds=3, stage_steps=2,
             matmul_size=2048, matmul_reps=2, pipeline_batches=4, pipeline_images=300,
             e2e_steps=2)
# --quick's model and data, unless the command line sets the field itself.
QUICK_CONFIG = {"image_size": 32, "model.width": 8, "model.critic_hidden": 32,
                "model.disc_hidden": 32, "synthetic.num_subjects": 12,
                "synthetic.images_per_cell": 2, "num_folds": 3}
# Set-up code (initial states) runs once and is not measured: compiled for a
# short compile, not a fast run (a full-size init compiles in ~3 s, not ~10 s).
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _median(xs) -> float:
  return float(statistics.median(xs))


def _run_once(fn: Callable, *args):
  """fn(*args), jit-compiled for compile speed (set-up code, not measured)."""
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _peak_rss_mb() -> float:
  """This process's peak resident set so far (ru_maxrss), in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


# ----------------------------------------------------------------------------
# The machine.


def _version(*names: str) -> str | None:
  """The installed version of the first distribution found (no import)."""
  for name in names:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return None


def _cpuinfo() -> tuple[str, list[str]]:
  """(CPU model name, its vector extensions) from /proc/cpuinfo."""
  model, flag_words = platform.processor() or platform.machine(), []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
          model = value.strip()
        elif key in ("flags", "features") and not flag_words:  # x86 / Arm
          flag_words = value.split()
  except OSError:
    pass
  # x86 and Arm SIMD features; "smep" (a security feature) is no Arm "sme".
  vector = re.compile(r"^(sse4_2|avx.*|fma|f16c|amx.*|asimd.*|sve.*|sme(\d.*|[bfi].*)?)$")
  return model, sorted(w for w in set(flag_words) if vector.match(w))


def machine_info() -> dict:
  model, extensions = _cpuinfo()
  return dict(
      cpu_model=model, vector_extensions=extensions, logical_cpus=os.cpu_count(),
      usable_cpus=_usable_cpus(), device=f"{jax.device_count()} x "
      f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
      python=platform.python_version(), jax=jax.__version__, jaxlib=_version("jaxlib"),
      flax=_version("flax"), torch=_version("torch"), torchvision=_version("torchvision"),
      tensorflow=_version("tensorflow-cpu", "tensorflow"),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ----------------------------------------------------------------------------
# End to end: the real training loop, timed from outside.


class PhaseClock:
  """Wall time by phase; each second goes to the innermost phase open.

  Opening a phase pauses the one around it, so no second is counted twice and
  the parts never sum to more than the wall time they were measured in. Inside
  an absorbing phase nothing is recorded separately: the evaluation's own
  compile and input, or the model init that a checkpoint restore needs as its
  template, are the cost of that phase.
  """

  ABSORBING = ("init", "evaluation", "checkpoints", "logging")

  def __init__(self):
    self.seconds = collections.defaultdict(float)
    self.counts = collections.Counter()
    self._open = []  # [name, time it was last resumed]

  @contextlib.contextmanager
  def phase(self, name: str):
    if any(open_name in self.ABSORBING for open_name, _ in self._open):
      yield
      return
    now = time.perf_counter()
    if self._open:
      self.seconds[self._open[-1][0]] += now - self._open[-1][1]
    self._open.append([name, now])
    try:
      yield
    finally:
      now = time.perf_counter()
      closed, resumed = self._open.pop()
      self.seconds[closed] += now - resumed
      self.counts[closed] += 1
      if self._open:
        self._open[-1][1] = now

  def timed(self, name: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
      with self.phase(name):
        return fn(*args, **kwargs)
    return wrapper


class _Forward:
  """Forwards every attribute to `target` except the ones given as overrides."""

  def __init__(self, target, **overrides):
    self._target = target
    self.__dict__.update(overrides)

  def __getattr__(self, name):  # called only for names not set on self
    return getattr(self._target, name)


class _TimedCalls(_Forward):
  """Every function of `target` timed as one phase; results of the functions
  named in `wrap_results` (the checkpoint manager) are timed the same way."""

  def __init__(self, target, clock: PhaseClock, phase: str, wrap_results=()):
    super().__init__(target)
    self._clock, self._phase, self._wrap = clock, phase, wrap_results

  def __getattr__(self, name):
    value = getattr(self._target, name)
    if not callable(value) or isinstance(value, type):
      return value
    timed = self._clock.timed(self._phase, value)
    if name not in self._wrap:
      return timed
    return lambda *a, **k: _TimedCalls(timed(*a, **k), self._clock, self._phase)


class _TimedIterator:
  """An iterator whose every `next` is timed as input (waiting for a batch)."""

  def __init__(self, iterator, clock: PhaseClock):
    self._iterator, self._clock = iterator, clock

  def __iter__(self):
    return self

  def __next__(self):
    with self._clock.phase("input"):
      return next(self._iterator)


def _signature(args, kwargs):
  leaves, tree = jax.tree.flatten((args, kwargs))
  return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__)))
                     for x in leaves)


class _TimedJit:
  """jax.jit's result, split into compile (first call per input signature) and
  steps (every call, waited for: on an asynchronous backend the step's time
  would otherwise land in whatever next waits for it)."""

  def __init__(self, jitted, clock: PhaseClock):
    self._jitted, self._clock = jitted, clock
    self.compiled = {}  # input signature -> executable

  def __call__(self, *args, **kwargs):
    key = _signature(args, kwargs)
    if key not in self.compiled:
      with self._clock.phase("compile"):
        self.compiled[key] = self._jitted.lower(*args, **kwargs).compile()
    with self._clock.phase("steps"):
      return jax.block_until_ready(self.compiled[key](*args, **kwargs))


@dataclasses.dataclass
class StageRun:
  """What the instrumented loop saw of one stage."""

  stage: str
  seconds: float       # train_stage's wall time
  compile_s: float     # of which compiling (its step)
  state: Any           # the final state, live
  executable: Any      # the compiled step (None if the stage compiled nothing)


@contextlib.contextmanager
def instrumented_train(clock: PhaseClock, on_stage_end: Callable[[StageRun], None]):
  """dicefer_jax.train with the functions its loop calls timed by `clock`.

  Replaces module attributes of dicefer_jax.train for the duration (restored
  after); a name it no longer has is an error here, not a silently wrong figure.
  `on_stage_end` is called after each `train_stage`.
  """
  originals, jits = {}, []

  def patch(name: str, make: Callable[[Any], Any]):
    if not hasattr(train, name):
      raise RuntimeError(f"dicefer_jax.train has no {name!r} any more: update "
                         "instrumented_train in experiments/benchmark.py")
    originals[name] = getattr(train, name)
    setattr(train, name, make(originals[name]))

  def jit(real):
    def timed_jit(fun, **kwargs):
      jits.append(_TimedJit(real.jit(fun, **kwargs), clock))
      return jits[-1]
    return _Forward(real, jit=timed_jit)

  def train_stage(real):
    def wrapper(stage, *args, **kwargs):
      start, compile_before, first_jit = time.perf_counter(), clock.seconds["compile"], len(jits)
      state = real(stage, *args, **kwargs)
      executables = [e for j in jits[first_jit:] for e in j.compiled.values()]
      on_stage_end(StageRun(stage, time.perf_counter() - start,
                            clock.seconds["compile"] - compile_before, state,
                            executables[0] if len(executables) == 1 else None))
      return state
    return wrapper

  def input_pipeline(real):
    def forward():
      module = real()
      return _Forward(module, as_numpy_iterator=lambda ds: _TimedIterator(
          clock.timed("input", module.as_numpy_iterator)(ds), clock))
    # Timed as input, TensorFlow's import included (unless the TensorBoard writer,
    # timed as logging, has already imported it: it does so first in a run).
    return clock.timed("input", forward)

  def metric_writer(real):
    return lambda *a, **k: _TimedCalls(clock.timed("logging", real)(*a, **k), clock,
                                       "logging")

  try:
    patch("initial_state", lambda real: clock.timed("init", real))
    patch("stage_dataset", lambda real: clock.timed("input", real))
    patch("global_batch", lambda real: clock.timed("input", real))
    patch("_input_pipeline", input_pipeline)
    patch("predict", lambda real: clock.timed("evaluation", real))
    patch("checkpoints", lambda real: _TimedCalls(real, clock, "checkpoints",
                                                  wrap_results=("manager",)))
    patch("MetricWriter", metric_writer)
    patch("jax", jit)
    patch("train_stage", train_stage)
    yield
  finally:
    for name, value in originals.items():
      setattr(train, name, value)


def measure_end_to_end(config, num_steps: int) -> tuple[dict, dict, dict[str, StageRun]]:
  """Trains every stage of `config` for `num_steps` steps in a temporary workdir.

  Returns:
    The "end_to_end" record, the "peak_rss" record and what each stage left
    (its compiled step and final state, which the stage measurements reuse).
  """
  config = copy.deepcopy(config)
  stages = train.stages_for(config, "all")
  for stage in stages:
    config[stage].num_steps = num_steps
  start = time.perf_counter()
  data = face_sets.FaceSets().split(config)
  data_load_s = time.perf_counter() - start

  clock = PhaseClock()
  runs, rss = {}, {}
  rss_stage = "stage1" if "stage1" in stages else stages[0]

  def on_stage_end(run: StageRun):
    runs[run.stage] = run
    if run.stage == rss_stage:
      # ru_maxrss is a high-water mark: read now, it is the peak of everything
      # this process did up to the end of that stage and nothing after.
      rss.update(mb=_peak_rss_mb(), after_stage=run.stage,
                 stages_before=stages[:stages.index(run.stage)])

  with tempfile.TemporaryDirectory(prefix="dicefer-benchmark-") as workdir:
    with instrumented_train(clock, on_stage_end):
      start = time.perf_counter()
      summary = train.train_and_evaluate(config, workdir, stages, data)
      total_s = time.perf_counter() - start
  expected_steps = num_steps * len(stages)
  if clock.counts["steps"] != expected_steps or any(
      runs[s].executable is None for s in stages):
    raise RuntimeError(
        f"the instrumented loop saw {clock.counts['steps']} steps, not {expected_steps}, "
        "or a stage without its one compiled step: dicefer_jax.train no longer calls "
        "what instrumented_train in experiments/benchmark.py wraps")
  parts = {name: clock.seconds[name] for name in E2E_PARTS}
  record = dict(
      stages=list(stages), steps_per_stage=num_steps, total_s=total_s, parts_s=parts,
      other_s=max(total_s - sum(parts.values()), 0.0),
      stages_s={s: runs[s].seconds for s in stages},
      stages_compile_s={s: runs[s].compile_s for s in stages},
      data_load_s=data_load_s, test_accuracy=summary["test_accuracy"] if summary else None,
      num_train=len(data.train_labels), num_test=len(data.test_labels))
  return record, rss, runs


# ----------------------------------------------------------------------------
# ResNet-18: dicefer-jax against PyTorch.


class TorchWorker:
  """experiments.benchmark_torch in its own process, driven one JSON line at a time."""

  def __init__(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    self._proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.benchmark_torch"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env, cwd=root)

  def send(self, **request) -> None:
    self._proc.stdin.write(json.dumps(request) + "\n")
    self._proc.stdin.flush()

  def receive(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker exited (code {self._proc.wait()}); its "
                         "error is above. Skip the comparison with --no_torch")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(f"the torch worker failed: {reply.get('error')}")
    return reply

  def steps(self, n: int) -> float:
    """Runs n train steps in the worker; their wall time in seconds."""
    self.send(op="steps", n=n)
    return float(self.receive()["seconds"])

  def close(self) -> None:
    try:
      self.send(op="quit")
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self._proc.kill()
      self._proc.wait()


def _baseline_only_state(config, model) -> steps.StageState:
  """The baseline stage's state holding only what it trains (the ResNet-18
  trunk, code head and linear head): nothing torch's model lacks."""
  state = train.initial_state("baseline", config, model)
  keep = steps.TRAINABLE["baseline"]["main"]
  return state.replace(params={k: state.params[k] for k in keep},
                       batch_stats={"exp_encoder": state.batch_stats["exp_encoder"]})


def _run_steps(step_fn, state, batch, n: int):
  metrics = None
  for _ in range(n):
    state, metrics = step_fn(state, batch)
  return jax.block_until_ready((state, metrics))[0]


def measure_resnet18(plan: Plan, with_torch: bool, half_precision: bool = False) -> dict:
  """Images/s of one ResNet-18 train step in dicefer-jax and in PyTorch.

  Rounds alternate: `plan.resnet_steps` JAX steps, then as many torch steps in
  the worker while this process waits on the pipe, and so on; each side is idle
  while the other is timed, and both see the same spells of a busy machine.
  With half_precision, JAX's trunk computes in bfloat16 and torch runs under
  autocast to bfloat16 (its AMP; bfloat16 needs no loss scaling), parameters
  float32 on both sides.
  """
  config = default.get_config()  # 112 px, width 64, batch 32, Adam 1e-4
  config.image_size, config.batch_size = RESNET_IMAGE_SIZE, RESNET_BATCH
  config.model.width, config.model.half_precision = 64, bool(half_precision)
  # XLA:CPU sizes its thread pool to the CPUs this process may run on, and
  # jaxlib has no setting for it; torch's default is the physical cores. So
  # torch is set to JAX's count.
  threads = _usable_cpus()
  worker = TorchWorker() if with_torch else None
  if worker:
    # Sent now, answered later: the worker imports torch, builds the model and
    # takes its warm-up steps while this process compiles. Nothing is timed yet.
    worker.send(op="init", threads=threads, batch_size=RESNET_BATCH,
                image_size=RESNET_IMAGE_SIZE, num_classes=contract.NUM_CLASSES,
                learning_rate=config.train.learning_rate, b1=config.train.adam_b1,
                b2=config.train.adam_b2, amp=bool(half_precision),
                # Same kind of device as JAX's (untested off CPU).
                device="cuda" if jax.default_backend() == "gpu" else "cpu")
    worker.send(op="steps", n=plan.resnet_warmup)
  try:
    model = models.build_model(config.model, contract.NUM_CLASSES)
    replicated, data_sharding = train.make_shardings()
    state = jax.device_put(_run_once(lambda: _baseline_only_state(config, model)),
                           replicated)
    rng = np.random.default_rng(0)
    batch = jax.device_put(dict(
        image=rng.normal(size=(RESNET_BATCH, RESNET_IMAGE_SIZE, RESNET_IMAGE_SIZE, 1)
                         ).astype(np.float32),
        label=rng.integers(0, contract.NUM_CLASSES, RESNET_BATCH).astype(np.int32)),
                           data_sharding)
    step = jax.jit(steps.make_step("baseline", model, config,
                                   steps.make_optimizers(config.train, "baseline")),
                   donate_argnums=0)
    # Its compile time is not reported: the worker starts up meanwhile. (The
    # stage measurements time the baseline's compile at the configured size.)
    compiled = step.lower(state, batch).compile()
    jax_params = sum(x.size for x in jax.tree.leaves(state.params))
    state = _run_steps(compiled, state, batch, plan.resnet_warmup)
    info = worker.receive() if worker else {}
    if worker:
      worker.receive()  # the warm-up steps
    jax_rates, torch_rates = [], []
    n = plan.resnet_steps
    for _ in range(plan.resnet_rounds):
      start = time.perf_counter()
      state = _run_steps(compiled, state, batch, n)
      jax_rates.append(n * RESNET_BATCH / (time.perf_counter() - start))
      if worker:
        torch_rates.append(n * RESNET_BATCH / worker.steps(n))
  finally:
    if worker:
      worker.close()
  jax_img_s = _median(jax_rates)
  torch_img_s = _median(torch_rates) if torch_rates else None
  return dict(
      image_size=RESNET_IMAGE_SIZE, batch_size=RESNET_BATCH, optimizer="adam",
      rounds=plan.resnet_rounds, steps_per_round=n, jax_img_s=jax_img_s,
      torch_img_s=torch_img_s, ratio=jax_img_s / torch_img_s if torch_img_s else None,
      jax_rounds_img_s=jax_rates, torch_rounds_img_s=torch_rates,
      # Each round's JAX and torch halves ran back to back: the median of their
      # ratios is steadier than the ratio of medians when the load changes.
      paired_ratio_median=_median([j / t for j, t in zip(jax_rates, torch_rates, strict=True)])
      if torch_rates else None,
      jax_params=int(jax_params),
      torch_params=info.get("params"), jax_threads=threads,
      torch_threads=info.get("threads"), torch_default_threads=info.get("default_threads"),
      torch_interop_threads=info.get("interop_threads"), torch_version=info.get("torch"),
      torch_device=info.get("device"))


def resnet18_conv_specs(image_size: int, width: int) -> list[dict]:
  """Every convolution of a ResNet-18 train step (models.ResNet18Trunk's order):
  input size, channels, kernel, stride, and whether its input needs a gradient
  (not the stem's: the image is no parameter)."""
  out_size = lambda n, k, s: (n + 2 * (k // 2) - k) // s + 1
  specs = [dict(size=image_size, cin=1, cout=width, k=7, stride=2, input_grad=False)]
  size = out_size(out_size(image_size, 7, 2), 3, 2)   # the stem, then the max-pool
  cin = width
  for stage, mult in enumerate((1, 2, 4, 8)):
    cout, stride = width * mult, 1 if stage == 0 else 2
    specs.append(dict(size=size, cin=cin, cout=cout, k=3, stride=stride, input_grad=True))
    if stride != 1 or cin != cout:
      specs.append(dict(size=size, cin=cin, cout=cout, k=1, stride=stride, input_grad=True))
    size = out_size(size, 3, stride)
    specs += [dict(size=size, cin=cout, cout=cout, k=3, stride=1, input_grad=True)] * 3
    cin = cout
  return specs


def _conv_inputs(spec: dict, batch: int, rng: np.random.Generator):
  """(x, w, cotangent) of one convolution, NHWC / HWIO float32."""
  k, s, n = spec["k"], spec["stride"], spec["size"]
  out = (n + 2 * (k // 2) - k) // s + 1
  return (rng.standard_normal((batch, n, n, spec["cin"]), np.float32),
          rng.standard_normal((k, k, spec["cin"], spec["cout"]), np.float32) * 0.05,
          rng.standard_normal((batch, out, out, spec["cout"]), np.float32))


def measure_resnet18_convs(plan: Plan, with_torch: bool, step_record: dict) -> dict:
  """The convolutions alone: forward, input gradient and weight gradient of every
  ResNet-18 convolution at the step's size, in XLA (one jitted program, with the
  project's XLA flags) and in PyTorch (eager, channels_last, autograd), rounds
  alternating as in measure_resnet18.

  What it tells: if everything but the convolutions cost JAX exactly what it
  costs torch, the step's ratio could reach at most `step_ratio_bound`; a bound
  below 1 says no rewrite of the rest (BatchNorm, pooling, the optimiser) can
  close the gap, only a faster convolution kernel.
  """
  specs = resnet18_conv_specs(RESNET_IMAGE_SIZE, 64)
  rng = np.random.default_rng(0)
  inputs = [_conv_inputs(spec, RESNET_BATCH, rng) for spec in specs]
  worker = TorchWorker() if with_torch else None
  if worker:
    worker.send(op="init_convs", threads=step_record["jax_threads"], specs=specs,
                batch_size=RESNET_BATCH)
    worker.send(op="steps", n=plan.resnet_warmup)

  def all_convs(arrays):
    grads = []
    for spec, (x, w, g) in zip(specs, arrays):
      pad = ((spec["k"] // 2,) * 2,) * 2
      conv = lambda x, w, spec=spec, pad=pad: jax.lax.conv_general_dilated(
          x, w, (spec["stride"],) * 2, pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      if spec["input_grad"]:
        y, vjp = jax.vjp(conv, x, w)
        grads.append((y, *vjp(g)))
      else:
        y, vjp = jax.vjp(lambda w, x=x: conv(x, w), w)
        grads.append((y, *vjp(g)))
    return grads

  try:
    arrays = jax.device_put(inputs)
    compiled = jax.jit(all_convs).lower(arrays).compile()
    for _ in range(plan.resnet_warmup):
      jax.block_until_ready(compiled(arrays))
    if worker:
      worker.receive()
      worker.receive()
    jax_s, torch_s = [], []
    n = plan.resnet_steps
    for _ in range(plan.resnet_rounds):
      start = time.perf_counter()
      for _ in range(n):
        jax.block_until_ready(compiled(arrays))
      jax_s.append((time.perf_counter() - start) / n)
      if worker:
        torch_s.append(worker.steps(n) / n)
  finally:
    if worker:
      worker.close()
  jax_ms = 1e3 * _median(jax_s)
  torch_ms = 1e3 * _median(torch_s) if torch_s else None
  result = dict(num_convs=len(specs), jax_ms=jax_ms, torch_ms=torch_ms,
                speed_ratio=torch_ms / jax_ms if torch_ms else None,
                step_ratio_bound=None, torch_conv_share=None)
  if torch_ms and step_record.get("torch_img_s"):
    torch_step_ms = 1e3 * RESNET_BATCH / step_record["torch_img_s"]
    jax_step_ms = 1e3 * RESNET_BATCH / step_record["jax_img_s"]
    rest_torch = max(torch_step_ms - torch_ms, 0.0)
    result.update(torch_step_ms=torch_step_ms, jax_step_ms=jax_step_ms,
                  torch_conv_share=torch_ms / torch_step_ms,
                  jax_conv_share=jax_ms / jax_step_ms,
                  step_ratio_bound=torch_step_ms / (rest_torch + jax_ms))
  return result


# ----------------------------------------------------------------------------
# Stage steps, the matmul peak and the input pipeline.


def _flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, as XLA counts them."""
  try:
    analysis = compiled.cost_analysis()
  except NotImplementedError:
    return None
  if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _stage_runner(stage: str, config, model, pair: dict, single: dict,
                  run: StageRun | None):
  """(record, round function) of one stage's compiled step.

  `run`: the stage as the end-to-end run left it. Its compiled step is the very
  program a fresh jit would build here, and its compile time was measured in a
  process that had compiled nothing alike before (as a training run's is); so
  it is reused rather than compiled a second time (which costs as much as
  everything else here on a small machine).
  """
  replicated, data_sharding = train.make_shardings()
  batch = jax.device_put(pair if stage in steps.PAIR_STAGES else single, data_sharding)
  if run is not None:
    state, compiled, compile_s = run.state, run.executable, run.compile_s
  else:
    state = jax.device_put(_run_once(lambda: train.initial_state(stage, config, model)),
                           replicated)
    step = jax.jit(steps.make_step(stage, model, config,
                                   steps.make_optimizers(config.train, stage)),
                   donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()  # trace + lower + XLA compile
    compile_s = time.perf_counter() - start
  record = dict(compile_s=compile_s, compiled_in="end_to_end" if run else "here",
                flops_per_step=_flops(compiled),
                images_per_step=config.batch_size * (2 if stage in steps.PAIR_STAGES else 1))
  holder = [_run_steps(compiled, state, batch, 1)]  # warm-up, outside every round

  def one_round(n: int) -> float:
    start = time.perf_counter()
    holder[0] = _run_steps(compiled, holder[0], batch, n)
    return n * record["images_per_step"] / (time.perf_counter() - start)

  return record, one_round


def _matmul_runner(n: int):
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  dot(a, b).block_until_ready()

  def one_round(reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
      dot(a, b).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9

  return one_round


def _pipeline_runner(config, num_images: int):
  """A round function measuring pair_dataset's pairs/s on random uint8 images."""
  # Imported here: it imports TensorFlow (as train.py does, lazily).
  from dicefer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  s = config.image_size
  images = rng.integers(0, 256, (num_images, s, s, 1), dtype=np.uint8)
  labels = rng.integers(0, contract.NUM_CLASSES, num_images)
  subjects = [f"s{i}" for i in rng.integers(0, 40, num_images)]
  ds = input_pipeline.pair_dataset(
      images, labels, subjects, batch_size=config.batch_size, seed=0, augment=True,
      max_rotation_degrees=config.augment.max_rotation_degrees, flip=config.augment.flip)

  def one_round(batches: int) -> float:
    # A fresh iterator per round, dropped at its end: its prefetch threads would
    # otherwise keep working through the stage rounds this one alternates with.
    iterator = input_pipeline.as_numpy_iterator(ds)
    for _ in range(2):  # warm-up: start-up and autotuning, not timed
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    rate = batches * config.batch_size / (time.perf_counter() - start)
    del iterator
    return rate

  return one_round


def measure_stages(config, plan: Plan, runs: dict[str, StageRun]) -> dict:
  """Each stage's compile time and images/s, the matmul peak and the pipeline.

  After every stage is compiled and warmed up, each round runs every stage,
  the matmul and the pipeline once, so a slow spell of a shared machine hits
  them all alike; each figure is the median of its rounds.
  """
  model = models.build_model(config.model, contract.NUM_CLASSES)
  b, s = config.batch_size, config.image_size
  rng = np.random.default_rng(0)
  pair = dict(image_m=rng.normal(size=(b, s, s, 1)).astype(np.float32),
              image_n=rng.normal(size=(b, s, s, 1)).astype(np.float32),
              label=rng.integers(0, contract.NUM_CLASSES, b).astype(np.int32))
  single = dict(image=pair["image_m"], label=pair["label"])
  records, rounds = {}, {}
  for stage in STAGES:
    records[stage], rounds[stage] = _stage_runner(stage, config, model, pair, single,
                                                  runs.pop(stage, None))
  matmul = _matmul_runner(plan.matmul_size)
  pipeline = _pipeline_runner(config, plan.pipeline_images)
  rates = collections.defaultdict(list)
  for _ in range(plan.rounds):
    for stage in STAGES:
      rates[stage].append(rounds[stage](plan.stage_steps))
    rates["matmul"].append(matmul(plan.matmul_reps))
    rates["pipeline"].append(pipeline(plan.pipeline_batches))

  out = {}
  for stage in STAGES:
    r = records[stage]
    img_s = _median(rates[stage])
    out[stage] = dict(r, img_s=img_s, step_ms=1e3 * r["images_per_step"] / img_s,
                      rounds_img_s=rates[stage], steps_per_round=plan.stage_steps)
    if stage in steps.PAIR_STAGES:
      out[stage]["pairs_s"] = img_s / 2
  peak = _median(rates["matmul"])
  out["matmul_peak"] = dict(n=plan.matmul_size, reps_per_round=plan.matmul_reps,
                            gflop_s=peak, rounds_gflop_s=rates["matmul"])
  s1 = out["stage1"]
  s1["gflop_s"] = (s1["flops_per_step"] * s1["img_s"] / s1["images_per_step"] / 1e9
                   if s1["flops_per_step"] else None)
  s1["peak_fraction"] = s1["gflop_s"] / peak if s1["gflop_s"] else None
  pairs_s = _median(rates["pipeline"])
  out["pipeline"] = dict(
      pairs_s=pairs_s, stage1_pairs_s=s1["pairs_s"], ratio=pairs_s / s1["pairs_s"],
      rounds_pairs_s=rates["pipeline"], batches_per_round=plan.pipeline_batches,
      batch_size=config.batch_size, image_size=config.image_size,
      num_images=plan.pipeline_images, augment=True)
  return out


# ----------------------------------------------------------------------------
# Reports: built from the JSON record only.


def _fmt(value, spec: str = ".1f", unit: str = "") -> str:
  return "n/a" if value is None else f"{value:{spec}}{unit}"


def machine_line(r: dict) -> str:
  m = r["machine"]
  idle = m["idle"]
  extensions = ", ".join(m["vector_extensions"]) or "no vector extensions listed"
  return (f"{m['date_utc']}, {m['cpu_model']} ({extensions}), {m['usable_cpus']} of "
          f"{m['logical_cpus']} CPUs, "
          f"{m['device']}; jax {m['jax']}, jaxlib {m['jaxlib']}, torch {m['torch']}, "
          f"tensorflow {m['tensorflow']}; XLA_FLAGS `{m['xla_flags']}`; 1-minute load "
          f"average {idle['load1_before']:.2f} before, {idle['load1_after']:.2f} after")


def rows(r: dict) -> list[tuple[str, str]]:
  """(figure, value) rows of a result record; a heading row has value None."""
  res, cfg, e2e = r["resnet18_step"], r["config"], r["end_to_end"]
  out = [(f"ResNet-18 train step ({res['image_size']}x{res['image_size']}x1, batch "
          f"{res['batch_size']}, Adam, float32)", None),
         ("dicefer-jax (jit, donated state)", _fmt(res["jax_img_s"], unit=" img/s")),
         (f"PyTorch {res['torch_version'] or '(not run)'} (eager, channels_last)",
          _fmt(res["torch_img_s"], unit=" img/s")),
         ("ratio jax/torch", _fmt(res["ratio"], ".2f", "x") + (
             f" (median of per-round ratios {res['paired_ratio_median']:.2f}x)"
             if res["paired_ratio_median"] else "")),
         ("threads jax / torch", f"{res['jax_threads']} / {res['torch_threads'] or 'n/a'}"
          + (f" (torch's default: {res['torch_default_threads']})"
             if res["torch_default_threads"] else ""))]
  conv = res.get("convolutions")
  if conv:
    out += [(f"its {conv['num_convs']} convolutions alone (forward, input and weight "
             "gradients), ms jax / torch",
             f"{conv['jax_ms']:.1f} / {_fmt(conv['torch_ms'])}"),
            ("convolutions: speed ratio jax/torch", _fmt(conv["speed_ratio"], ".2f", "x")),
            ("convolutions' share of torch's step",
             _fmt(conv["torch_conv_share"] and 100 * conv["torch_conv_share"], ".0f", "%")),
            ("step ratio if all but the convolutions cost what torch's do",
             _fmt(conv["step_ratio_bound"], ".2f", "x"))]
  out += [
          (f"Stage steps ({cfg['file']}, {cfg['image_size']} px, width {cfg['width']}, "
           f"batch {cfg['batch_size']})", None)]
  for stage in STAGES:
    s = r[stage]
    pairs = f", {s['pairs_s']:.1f} pairs/s" if "pairs_s" in s else ""
    out.append((f"{stage} step", f"{s['img_s']:.1f} img/s{pairs}; compile "
                                 f"{s['compile_s']:.1f} s"))
  s1, peak, pipe = r["stage1"], r["matmul_peak"], r["pipeline"]
  flops = s1["flops_per_step"]
  out += [("stage1 FLOPs per step (XLA)", _fmt(flops and flops / 1e9, ".2f", " GFLOP")),
          ("stage1 achieved", _fmt(s1["gflop_s"], unit=" GFLOP/s")),
          (f"float32 matmul peak ({peak['n']}x{peak['n']} jnp.dot)",
           _fmt(peak["gflop_s"], unit=" GFLOP/s")),
          ("stage1 share of peak", _fmt(s1["peak_fraction"] and 100 * s1["peak_fraction"],
                                        ".1f", "%")),
          ("tf.data pair pipeline", _fmt(pipe["pairs_s"], ".0f", " pairs/s")),
          ("stage1 consumes", _fmt(pipe["stage1_pairs_s"], unit=" pairs/s")),
          ("pipeline / stage1", _fmt(pipe["ratio"], ".1f", "x")),
          (f"End to end ({', '.join(e2e['stages'])}; {e2e['steps_per_stage']} steps each, "
           "then test accuracy)", None),
          ("total", f"{e2e['total_s']:.1f} s")]
  parts = dict(e2e["parts_s"], other=e2e["other_s"])
  for name, seconds in parts.items():
    out.append((f"  {name}", f"{seconds:.1f} s ({100 * seconds / e2e['total_s']:.0f}%)"))
  out += [("loading the face set (before, not in the total)", f"{e2e['data_load_s']:.1f} s"),
          ("Memory", None),
          (f"peak RSS of the run up to the end of {r['peak_rss']['after_stage']}",
           f"{r['peak_rss_mb']:.0f} MiB")]
  return out


def markdown(r: dict) -> str:
  lines = [f"Measured {machine_line(r)}" + (" (`--quick`)." if r["quick"] else "."), "",
           "| measurement | value |", "|---|---|"]
  for figure, value in rows(r):
    if value is None:
      lines.append(f"| **{figure}** | |")
    else:  # an indented figure is a part of the one above it
      indent = "&nbsp;&nbsp;" if figure.startswith(" ") else ""
      lines.append(f"| {indent}{figure.strip()} | {value} |")
  return "\n".join(lines) + "\n"


def text_table(r: dict) -> str:
  width = max(len(f) for f, v in rows(r) if v is not None)
  lines = []
  for figure, value in rows(r):
    lines.append(figure if value is None else f"  {figure:<{width}}  {value}")
  lines.append(f"machine: {machine_line(r)}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------


def _command_line_fields(argv) -> set[str]:
  """Dotted config fields the command line sets (`--config.a.b=...`)."""
  names = set()
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name.startswith("config."):
      names.add(name[len("config."):])
  return names


def benchmark(config, plan: Plan, *, quick: bool, with_torch: bool, config_file: str
              ) -> dict:
  """Runs every measurement; returns the JSON record."""
  load_before = os.getloadavg()[0]
  start = time.perf_counter()

  def progress(done: str) -> None:
    print(f"benchmark: {done} ({time.perf_counter() - start:.0f} s in)", flush=True)

  machine = machine_info()
  e2e, rss, runs = measure_end_to_end(config, plan.e2e_steps)
  progress("end to end measured")
  resnet = measure_resnet18(plan, with_torch, config.model.half_precision)
  progress("ResNet-18 compared")
  if not config.model.half_precision:   # the convolutions in float32 only
    resnet["convolutions"] = measure_resnet18_convs(plan, with_torch, resnet)
    progress("ResNet-18 convolutions compared")
  stages = measure_stages(config, plan, runs)
  progress("stage steps, matmul peak and pipeline measured")
  machine["idle"] = dict(load1_before=load_before, load1_after=os.getloadavg()[0])
  return dict(
      schema=1, command=" ".join(["python -m experiments.benchmark", *sys.argv[1:]]),
      quick=quick, machine=machine,
      config=dict(file=config_file, image_size=config.image_size,
                  width=config.model.width, batch_size=config.batch_size,
                  half_precision=config.model.half_precision, method=config.method),
      resnet18_step=resnet, **stages, end_to_end=e2e, peak_rss_mb=rss["mb"], peak_rss=rss)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _JSON.value:
    raise app.UsageError("--json is required: where the results go")
  logging.set_verbosity(logging.WARNING)
  # Every compile here is a real one: a persistent cache (JAX_COMPILATION_CACHE_DIR)
  # would turn compile times into cache reads.
  jax.config.update("jax_enable_compilation_cache", False)
  with_torch = not _NO_TORCH.value
  if with_torch and importlib.util.find_spec("torch") is None:
    raise app.UsageError("torch is not installed (pip install -e '.[data]'): install "
                         "it, or skip the ResNet-18 comparison's torch side with --no_torch")
  plan = QUICK if _QUICK.value else FULL
  overrides = {k: v for k, v in (("rounds", _ROUNDS.value), ("e2e_steps", _E2E_STEPS.value))
               if v}
  plan = dataclasses.replace(plan, **overrides)
  config = _CONFIG.value
  if _QUICK.value:
    given = _command_line_fields(sys.argv)
    for field, value in QUICK_CONFIG.items():
      if field not in given:
        config_fields.set_field(config, field, value)
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  result = cli.run_or_exit(benchmark, config, plan, quick=_QUICK.value,
                           with_torch=with_torch, config_file=config_file)
  fileio.write_json_atomic(_JSON.value, result)
  if _MARKDOWN.value:
    fileio.write_text_atomic(_MARKDOWN.value, markdown(result))
  print(text_table(result), flush=True)
  print(f"wrote {_JSON.value}" + (f" and {_MARKDOWN.value}" if _MARKDOWN.value else ""))


if __name__ == "__main__":
  _CONFIG = cli.define_config_file(
      "config", "experiments/configs/default.py", "Config of the stage and end-to-end "
      "measurements (the ResNet-18 comparison has its own fixed size, and follows "
      "--config.model.half_precision: bfloat16 in JAX, autocast in torch).")
  _JSON = flags.DEFINE_string("json", None, "Where the results are written (JSON).")
  _MARKDOWN = flags.DEFINE_string("markdown", None, "Also a Markdown table of them.")
  _QUICK = flags.DEFINE_bool("quick", False, "Small sizes and counts (tests).")
  _NO_TORCH = flags.DEFINE_bool("no_torch", False, "Skip the PyTorch side.")
  _ROUNDS = flags.DEFINE_integer("rounds", 0, "Rounds of the stage block (0: the plan's).")
  _E2E_STEPS = flags.DEFINE_integer("e2e_steps", 0, "Steps per stage end to end "
                                    "(0: the plan's).")
  app.run(main, flags_parser=cli.parse_flags)
