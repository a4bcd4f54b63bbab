"""Training loops: one stage at a time, with Orbax checkpoints, resume and logging.

`train_and_evaluate(config, workdir, stages)` runs the requested stages in order.
Each stage starts from the previous stage's final checkpoint (its parameters and
batch statistics, with a fresh optimizer), resumes from its own latest checkpoint
when one exists, and skips itself when its final checkpoint is already there.
"""

import json
import os
import time
from typing import Callable, Sequence

from absl import logging
import jax
import numpy as np

from dicefer_jax import checkpoints, contract, fileio, models, pretrained, steps
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.data import FaceData
from dicefer_jax.errors import UserError

DICEFER_STAGES = ("stage1", "stage2", "stage3")
ALL_STAGES = ("stage1", "stage2", "stage3", "baseline")


def prerequisite(stage: str, config) -> str | None:
  """The stage whose final checkpoint `stage` starts from (None: a fresh init).

  With `stage1.init_from = "baseline"`, DICE-FER's E_exp starts from a supervised
  ResNet-18 (the baseline stage run first in the same workdir), the way FER models
  usually start from a pretrained backbone instead of from random weights.
  """
  if stage == "stage1":
    return "baseline" if config.stage1.init_from == "baseline" else None
  return {"stage2": "stage1", "stage3": "stage2", "baseline": None}[stage]


def pretrained_trunk_path(config) -> str | None:
  """The trunk file both encoders start from (`stage1.init_from=PATH`), or None.

  The file is written offline from a torchvision resnet18 state dict by
  `python -m data_tools.torchvision_resnet`; training reads it with numpy only
  (torch never enters a training process).
  """
  init_from = config.stage1.init_from
  if init_from in ("", "baseline"):
    return None
  if init_from.endswith((".pth", ".pt")):
    raise UserError(
        f"stage1.init_from={init_from!r} is a PyTorch file: convert it first with "
        f"`python -m data_tools.torchvision_resnet --pth={init_from} --out=trunk.npz` "
        "and pass --config.stage1.init_from=trunk.npz")
  if not os.path.isfile(init_from):
    raise UserError(f"stage1.init_from={init_from!r}: no such file; use '' (random "
                    "init), 'baseline' (supervised warm-up) or a trunk .npz written by "
                    "`python -m data_tools.torchvision_resnet`")
  return init_from


def _stage_flag(stage: str) -> str:
  return stage[-1] if stage.startswith("stage") else stage

class TrainingDiverged(UserError):
  """A loss became NaN or inf; the last good checkpoint is kept."""


def stages_for(config, stage_flag: str) -> list[str]:
  """The stage names a `--stage` flag value stands for."""
  if config.method == "baseline":
    if stage_flag not in ("all", "baseline"):
      raise UserError(f"--stage={stage_flag} does not apply to method 'baseline': use "
                      "--stage=all (the baseline has one stage)")
    return ["baseline"]
  if config.method != "dicefer":
    raise UserError(f"unknown method {config.method!r}: use 'dicefer' or 'baseline'")
  init_from = config.stage1.init_from
  if init_from not in ("", "baseline"):
    pretrained_trunk_path(config)  # refuses, in one line, what it cannot load
  warmup = ["baseline"] if init_from == "baseline" else []
  if stage_flag == "all":
    return warmup + list(DICEFER_STAGES)
  if stage_flag in ("1", "2", "3"):
    return [f"stage{stage_flag}"]
  if stage_flag == "baseline" and warmup:
    return warmup
  raise UserError(f"--stage={stage_flag} is not a stage: use 1, 2, 3 or all"
                  + (" (or baseline, the warm-up)" if warmup else ""))


def final_stage(config) -> str:
  return "baseline" if config.method == "baseline" else "stage3"


# ----------------------------------------------------------------------------
# Devices: data parallel over every device of the job (GSPMD): each batch is split
# along its rows over a 1-D "data" mesh, parameters and optimizer state are
# replicated. Under jit a mean over the batch axis is a mean over the global
# batch (XLA inserts the all-reduce), so BatchNorm statistics and every loss are
# those of one device seeing the whole batch (tests/test_data_parallel.py).
#
# Multi-host (config.distributed): the mesh spans every process's devices. Each
# process builds the same deterministic global batch and feeds only its rows of it
# (`process_rows`), so a job of P processes trains on exactly the batches of a
# single-host run and resumes exactly too.


def is_primary() -> bool:
  """Whether this process writes the files of a run (always, on one host)."""
  return jax.process_index() == 0


def make_shardings(devices=None):
  """(replicated, batch-sharded) NamedShardings over a 1-D "data" mesh.

  Args:
    devices: the mesh's devices; default every device of the job. Across
      processes they are ordered by process, so that process p's devices hold the
      contiguous rows `process_rows(B, p, P)` of a global batch.
  """
  if devices is None:
    devices = jax.devices()
    if jax.process_count() > 1:
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


def check_batch_divisible(batch_size: int, field: str = "batch_size") -> None:
  """Batches are split evenly over the devices: refuses a size they cannot share."""
  n = jax.device_count()
  if batch_size % n:
    raise UserError(f"{field}={batch_size} is not divisible by the {n} devices: "
                    f"use a multiple of {n} (--config.{field}=...)")


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process `process_index` of `process_count` feeds."""
  if batch_size % process_count:
    raise UserError(f"batch of {batch_size} rows cannot be split over {process_count} "
                    "processes: use a multiple of the process count")
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def global_batch(batch: dict, sharding) -> dict:
  """A global batch (numpy, the same on every process) as arrays sharded by rows.

  On one process this is `jax.device_put`, as it always was. Across processes each
  one hands over only its rows; `make_array_from_process_local_data` places them
  on its devices, which the mesh order makes exactly these rows (checked: a mesh
  in another order would silently permute the batch).
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  out = {}
  for key, value in batch.items():
    rows = process_rows(value.shape[0], jax.process_index(), jax.process_count())
    held = sharding.addressable_devices_indices_map(value.shape).values()
    if (min(i[0].start for i in held), max(i[0].stop for i in held)) != (rows.start,
                                                                         rows.stop):
      raise ValueError(f"the mesh gives process {jax.process_index()} other rows than "
                       f"{rows}: build it with make_shardings()")
    out[key] = jax.make_array_from_process_local_data(sharding, value[rows], value.shape)
  return out


def _sync(name: str) -> None:
  """A barrier across processes (nothing on one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def restore_template(stage: str, config, model) -> steps.StageState:
  """What Orbax restores a stage's checkpoint into: the shapes and dtypes of
  `initial_state`, placed replicated over the mesh, computed without running it.

  An eager initialisation only to be overwritten cost ~10 s of compilation per
  process (restore_trained in evaluation, every prerequisite in training); tracing
  it abstractly costs a fraction of a second. Across processes the placement makes
  every process read the same checkpoint into its devices as one global array.
  """
  replicated = make_shardings()[0]
  shapes = jax.eval_shape(lambda: initial_state(stage, config, model))
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


# ----------------------------------------------------------------------------


def initial_state(stage: str, config, model, prev_state=None) -> steps.StageState:
  """A fresh state for `stage`: parameters from `prev_state` or a new init."""
  key = jax.random.PRNGKey(config.seed)
  init_key, stage_key = jax.random.split(key)
  if prev_state is None:
    params, batch_stats = models.init_variables(model, init_key, config.image_size)
  else:  # nothing to initialise (an init here would be computed and thrown away)
    params, batch_stats = prev_state.params, prev_state.batch_stats
  rng = jax.random.fold_in(stage_key, ALL_STAGES.index(stage))
  return steps.create_state(stage, params, batch_stats,
                            steps.make_optimizers(config.train, stage), rng)


def _input_pipeline():
  """dicefer_jax.input_pipeline, imported when first needed.

  It imports TensorFlow. `restore_trained` (and so `dicefer_jax.Predictor`)
  must not: a predictor's MTCNN imports torch, and torch next to TensorFlow in
  one process segfaults.
  """
  from dicefer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


def stage_dataset(stage: str, config, data: FaceData, start_step: int):
  """Infinite training batches for a stage. Batch b depends only on (seed, stage, b),
  so a run resumed at `start_step` sees exactly the batches an uninterrupted run would."""
  stage_index = ALL_STAGES.index(stage)
  seed = int(np.random.SeedSequence([config.seed, stage_index]).generate_state(1)[0] % (2**31))
  kwargs = dict(batch_size=config.batch_size, seed=seed, augment=True,
                max_rotation_degrees=config.augment.max_rotation_degrees,
                flip=config.augment.flip, start_step=start_step)
  if stage in steps.PAIR_STAGES:
    return _input_pipeline().pair_dataset(
        data.train_images, data.train_labels, data.train_subjects, **kwargs)
  return _input_pipeline().classification_dataset(data.train_images, data.train_labels, **kwargs)


class MetricWriter:
  """Scalars to TensorBoard event files and to `<workdir>/metrics.jsonl`.

  Only the primary process writes: in a multi-host job every process computes
  the same (replicated) scalars, and one copy of each row is wanted.
  """

  def __init__(self, workdir: str):
    self._enabled = is_primary()
    if not self._enabled:
      return
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
    self._tb = tensorboard.SummaryWriter(workdir_lib.tensorboard_dir(workdir))
    self._jsonl = open(workdir_lib.metrics_log_path(workdir), "a")

  def write(self, stage: str, step: int, scalars: dict) -> None:
    if not self._enabled:
      return
    for k, v in scalars.items():
      self._tb.scalar(f"{stage}/{k}", v, step)
    self._jsonl.write(json.dumps(dict(stage=stage, step=step, **scalars)) + "\n")
    self._jsonl.flush()

  def close(self):
    if not self._enabled:
      return
    self._tb.flush()
    self._jsonl.close()


def _print(text: str) -> None:
  """Progress lines, from the primary process only (one log per job, not per host)."""
  if is_primary():
    print(text, flush=True)


def _format_line(stage, step, num_steps, scalars, images_per_s, eta_s):
  shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                   if k not in ("finite", "images_per_s"))
  return (f"{stage} step {step}/{num_steps} | {shown} | {images_per_s:.1f} img/s | "
          f"eta {eta_s / 60:.1f} min")


class StabilityMonitor:
  """Says in the log when adversarial training or an MI estimate goes wrong.

  Looks at each logged window: a discriminator whose accuracy stays pinned near 0
  or 1 for `patience` windows has collapsed (the encoder gets no useful signal);
  an MI estimate far beyond what a batch can support (the DV bound on B samples
  rarely exceeds a few times log B when healthy) has diverged.
  """

  def __init__(self, stage: str, batch_size: int, patience: int = 5):
    self.stage, self.patience = stage, patience
    self.mi_limit = 5.0 * float(np.log(max(batch_size, 2)))
    self.pinned = 0

  def __call__(self, step: int, scalars: dict) -> list[str]:
    found = []
    acc = scalars.get("disc_accuracy")
    if acc is not None:
      self.pinned = self.pinned + 1 if (acc > 0.99 or acc < 0.01) else 0
      if self.pinned == self.patience:
        found.append(f"{self.stage} step {step}: discriminator accuracy pinned at "
                     f"{acc:.3f} for {self.patience} log windows: it has collapsed; try "
                     "--config.train.disc_steps, a lower disc_learning_rate or loss.zeta")
    for k in ("mi_global", "mi_local"):
      if k in scalars and abs(scalars[k]) > self.mi_limit:
        found.append(f"{self.stage} step {step}: {k} = {scalars[k]:.3g} nats exceeds "
                     f"{self.mi_limit:.3g}: the DV estimate is diverging; try "
                     "--config.train.grad_clip_norm=1.0 or a lower learning rate")
    return found


def train_stage(stage: str, config, workdir: str, model, data: FaceData,
                writer: MetricWriter, make_step: Callable = steps.make_step,
                timings: dict | None = None) -> steps.StageState:
  """Trains one stage to its num_steps, resuming from its latest checkpoint.

  `timings`, when given, receives the seconds this call spent before its first
  step (`setup`: restoring, initialising, building the input pipeline), on the
  first step (`first_step`: mostly compiling it), in the other steps (`steps`:
  steps, their input and logging) and in checkpoint saves (`checkpoints`); the
  caller's wall time minus these is what returning took.
  """
  clock = timings if timings is not None else {}
  clock.update(steps=0.0, checkpoints=0.0)
  called = time.perf_counter()
  num_steps = int(config[stage].num_steps)
  prev = prerequisite(stage, config)
  prev_state = None
  if prev is not None:
    if checkpoints.latest_step(workdir, prev) != int(config[prev].num_steps):
      raise UserError(
          f"{stage} needs the final checkpoint of {prev} in "
          f"{checkpoints.stage_dir(workdir, prev)}: run --stage={_stage_flag(prev)} first "
          "(or --stage=all)")
    prev_state, _ = checkpoints.restore_final(workdir, prev,
                                              restore_template(prev, config, model))
  stale = checkpoints.stale_reason(workdir, stage, prev)
  if stale:
    # Its checkpoints rest on parameters that are gone: train it again from the
    # new prerequisite, keeping the old ones aside rather than deleting them.
    # One process moves them, after every process has read them and before any
    # looks again.
    _sync(f"{stage}_stale_read")
    if is_primary():
      moved = checkpoints.set_aside(workdir, stage)
      _print(f"{stage}: {stale}; retraining it (old checkpoints moved to {moved})")
    _sync(f"{stage}_set_aside")

  replicated, data_sharding = make_shardings()
  check_batch_divisible(config.batch_size)
  mngr = checkpoints.manager(workdir, stage, keep=config.keep_checkpoints)
  start = mngr.latest_step()
  if start is None:
    state = initial_state(stage, config, model, prev_state)
    trunk_path = pretrained_trunk_path(config) if stage == "stage1" else None
    if trunk_path:  # E_exp and E_id both start from the pretrained trunk
      params, batch_stats = pretrained.with_pretrained_trunks(
          state.params, state.batch_stats, trunk_path)
      state = state.replace(params=params, batch_stats=batch_stats)
  else:
    if start > num_steps:
      mngr.close()
      raise UserError(f"{stage} already has a checkpoint at step {start} > num_steps="
                      f"{num_steps}: raise --config.{stage}.num_steps or use a new workdir")
    state, _ = checkpoints.restore(mngr, restore_template(stage, config, model))
    if start == num_steps:
      logging.info("%s: already complete (step %d), skipping", stage, start)
      mngr.close()
      return state
    logging.info("%s: resuming from step %d", stage, start)
  start = int(state.step)
  state = jax.device_put(state, replicated)

  step_impl = make_step(stage, model, config, steps.make_optimizers(config.train, stage))
  if jax.process_count() == 1:
    step_fn = jax.jit(step_impl, donate_argnums=0)
  else:
    # Replicated outputs: every process can then read the metrics and the state
    # (a sharded output would span devices other processes own).
    step_fn = jax.jit(step_impl, donate_argnums=0, out_shardings=(replicated, replicated))
  batches = _input_pipeline().as_numpy_iterator(stage_dataset(stage, config, data, start))
  images_per_step = config.batch_size * (2 if stage in steps.PAIR_STAGES else 1)
  meta = dict(stage=stage, num_steps=num_steps, method=config.method,
              lineage=checkpoints.lineage_after(workdir, prev))

  monitor = StabilityMonitor(stage, config.batch_size)
  pending = []           # per-step metrics (device arrays) since the last check
  last_good_save = start
  window_start, window_step = time.time(), start
  _print(f"{stage}: training steps {start}..{num_steps} on {jax.device_count()} "
         f"{jax.devices()[0].platform} device(s)"
         + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
         + f", {images_per_step} images/step")

  def check_finite():
    """Raises TrainingDiverged naming the first step whose loss was not finite."""
    flags = np.asarray(jax.device_get([m["finite"] for m in pending]))
    if not flags.all():
      bad = int(state.step) - len(pending) + int(np.argmin(flags)) + 1
      mngr.wait_until_finished()
      raise TrainingDiverged(
          f"{stage}: loss became NaN or inf at step {bad}; stopped. The last good "
          f"checkpoint (step {last_good_save}) is kept in {checkpoints.stage_dir(workdir, stage)}."
          " Lower --config.train.learning_rate or set --config.train.grad_clip_norm=1.0")

  def save():
    # The save waits for the steps still running; they are steps, not saving.
    jax.block_until_ready(state)
    started = time.perf_counter()
    checkpoints.save(mngr, state, meta)
    clock["checkpoints"] += time.perf_counter() - started

  loop_start = None
  clock["setup"] = time.perf_counter() - called
  try:
    if num_steps == 0:  # a skipped stage (an ablation) still hands its state on
      save()
    for step in range(start + 1, num_steps + 1):
      if step == start + 2:  # after the first step, which compiles the program
        loop_start = time.perf_counter()
        clock["first_step"] = loop_start - called - clock["setup"]
      batch = global_batch(next(batches), data_sharding)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)
      if step % config.log_every == 0 or step == num_steps:
        check_finite()
        now = time.time()
        scalars = {k: float(np.mean([float(m[k]) for m in pending]))
                   for k in pending[0] if k != "finite"}
        rate = images_per_step * (step - window_step) / max(now - window_start, 1e-9)
        scalars["images_per_s"] = rate
        writer.write(stage, step, scalars)
        _print(_format_line(stage, step, num_steps, scalars, rate,
                            (num_steps - step) * images_per_step / max(rate, 1e-9)))
        for warning in monitor(step, scalars):
          _print(f"WARNING: {warning}")
        pending.clear()
        window_start, window_step = now, step
      if step % config.checkpoint_every == 0 or step == num_steps:
        if pending:
          check_finite()
        save()
        last_good_save = step
    loop_end = time.perf_counter()
    if loop_start is not None:
      clock["steps"] = loop_end - loop_start - clock["checkpoints"]
    mngr.wait_until_finished()  # the last save's writes, after the loop
    clock["checkpoints"] += time.perf_counter() - loop_end
  finally:
    mngr.close()
  return state


def predict(config, model, state: steps.StageState, images) -> dict:
  """Codes, features and logits of every image (eval mode), as numpy arrays.

  `images` is a uint8 array or an `image_store.ImageStore` (a set larger than
  memory): `eval_dataset` reads either one batch at a time.
  """
  check_batch_divisible(config.eval_batch_size, "eval_batch_size")
  replicated, data_sharding = make_shardings()
  if jax.process_count() == 1:
    embed = jax.jit(steps.make_embed_fn(model))
  else:  # every process gets every output row (it applies the mask itself)
    embed = jax.jit(steps.make_embed_fn(model), out_shardings=replicated)
  params = jax.device_put(state.params, replicated)
  batch_stats = jax.device_put(state.batch_stats, replicated)
  labels = np.zeros(len(images), np.int32)
  outputs = []
  input_pipeline = _input_pipeline()
  for batch in input_pipeline.as_numpy_iterator(
      input_pipeline.eval_dataset(images, labels, batch_size=config.eval_batch_size)):
    out = embed(params, batch_stats, global_batch({"image": batch["image"]},
                                                  data_sharding)["image"])
    out = jax.device_get(out)
    outputs.append({k: v[batch["mask"]] for k, v in out.items()})
  result = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  logits_key = "baseline_logits" if config.method == "baseline" else "dicefer_logits"
  result["logits"] = result[logits_key]
  result["prediction"] = np.argmax(result["logits"], -1)
  return result


def restore_trained(config, workdir: str):
  """(model, final state) of a finished workdir, for evaluation or prediction.

  Refuses, in one line, a workdir whose stages are not all finished for this
  config, or whose final stage rests on a prerequisite trained further since.
  """
  stages = stages_for(config, "all")
  for stage in stages:
    if checkpoints.latest_step(workdir, stage) != int(config[stage].num_steps):
      raise UserError(
          f"{workdir!r} has no final {stage} checkpoint (step {config[stage].num_steps}): "
          f"finish training first with `python -m experiments.run --workdir={workdir} "
          "--config=...`")
    stale = checkpoints.stale_reason(workdir, stage, prerequisite(stage, config))
    if stale:
      raise UserError(f"{workdir!r}: {stale}, so its later stages are out of date: rerun "
                      f"`python -m experiments.run --workdir={workdir} --stage=all` first")
  model = models.build_model(config.model, contract.NUM_CLASSES)
  stage = final_stage(config)
  state, _ = checkpoints.restore_final(workdir, stage,
                                       restore_template(stage, config, model))
  return model, state


def train_and_evaluate(config, workdir: str, stage_names: Sequence[str], data: FaceData,
                       make_step: Callable = steps.make_step) -> dict | None:
  """Runs the stages in order; after the final stage, measures test accuracy.

  The summary's `timings_s` says where this call's time went, per stage:
  `total` (wall), `steps` and `checkpoints` (see train_stage); the rest of a
  stage's total is restoring, initialising and compiling.
  """
  model = models.build_model(config.model, contract.NUM_CLASSES)
  writer = MetricWriter(workdir)
  timings = {}
  try:
    state = None
    for stage in stage_names:
      started = time.perf_counter()
      timings[stage] = {}
      state = train_stage(stage, config, workdir, model, data, writer, make_step,
                          timings[stage])
      timings[stage]["total"] = time.perf_counter() - started
    if stage_names[-1] != final_stage(config):
      return None
    started = time.perf_counter()
    out = predict(config, model, state, data.test_images)
    accuracy = float(np.mean(out["prediction"] == data.test_labels))
    timings["test_accuracy"] = {"total": time.perf_counter() - started}
    summary = dict(test_accuracy=accuracy, num_test=int(len(data.test_labels)),
                   split=data.split_info.as_dict(), data_dir=data.data_dir,
                   timings_s={name: {k: round(v, 3) for k, v in t.items()}
                              for name, t in timings.items()})
    writer.write(stage_names[-1], int(state.step), dict(test_accuracy=accuracy))
    if is_primary():
      fileio.write_json_atomic(workdir_lib.train_metrics_path(workdir), summary)
    return summary
  finally:
    writer.close()
