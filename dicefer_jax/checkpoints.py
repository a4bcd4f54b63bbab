"""Orbax checkpoints of stage states: `<workdir>/checkpoints/<stage>/<step>/`.

Each checkpoint holds the full StageState (all model parameters, batch statistics,
the stage's optax states, step and rng) and a small JSON `meta` item. The meta
records the checkpoint's lineage: the step of every stage it was (transitively)
started from, e.g. stage 3's {"stage1": 20000, "stage2": 10000}. A stage whose
lineage no longer matches its prerequisite's final checkpoint (stage 1 was
trained further after stage 2 finished) is stale: `stale_reason` says so.
"""

import os
import shutil
import time

import flax
import orbax.checkpoint as ocp

from dicefer_jax import workdir as workdir_lib
from dicefer_jax.steps import StageState


def stage_dir(workdir: str, stage: str) -> str:
  return workdir_lib.checkpoint_dir(workdir, stage)


def manager(workdir: str, stage: str, keep: int = 3, create: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(stage_dir(workdir, stage), options=options)


def _reader(workdir: str, stage: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(stage_dir(workdir, stage),
                               options=ocp.CheckpointManagerOptions(create=False))


def latest_step(workdir: str, stage: str) -> int | None:
  """The newest checkpointed step of a stage, or None when it has none."""
  if not os.path.isdir(stage_dir(workdir, stage)):
    return None
  with _reader(workdir, stage) as m:
    return m.latest_step()


def has_checkpoint(workdir: str, stage: str) -> bool:
  return latest_step(workdir, stage) is not None


def save(mngr: ocp.CheckpointManager, state: StageState, meta: dict) -> None:
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
      meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, target: StageState, step=None
            ) -> tuple[StageState, dict]:
  """Restores `step` (default: latest) into the structure of `target`."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(flax.serialization.to_state_dict(target)),
      meta=ocp.args.JsonRestore()))
  return flax.serialization.from_state_dict(target, restored["state"]), restored["meta"]


def restore_final(workdir: str, stage: str, target: StageState) -> tuple[StageState, dict]:
  with _reader(workdir, stage) as m:
    return restore(m, target)


def read_meta(workdir: str, stage: str, step: int | None = None) -> dict:
  """The JSON meta of a stage's checkpoint (default: latest), without its arrays."""
  with _reader(workdir, stage) as m:
    step = m.latest_step() if step is None else step
    return dict(m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def lineage_after(workdir: str, prerequisite: str | None) -> dict[str, int]:
  """The lineage a stage started from `prerequisite`'s latest checkpoint has."""
  if prerequisite is None:
    return {}
  step = latest_step(workdir, prerequisite)
  lineage = dict(read_meta(workdir, prerequisite).get("lineage") or {})
  lineage[prerequisite] = int(step)
  return lineage


def stale_reason(workdir: str, stage: str, prerequisite: str | None) -> str | None:
  """Why a stage's checkpoints no longer follow from its prerequisite, or None.

  Checkpoints written before lineages were recorded carry none; they are
  trusted, as before.
  """
  if prerequisite is None or not has_checkpoint(workdir, stage):
    return None
  recorded = read_meta(workdir, stage).get("lineage")
  if recorded is None or not has_checkpoint(workdir, prerequisite):
    return None
  expected = lineage_after(workdir, prerequisite)
  if {k: int(v) for k, v in recorded.items()} == expected:
    return None
  changed = ", ".join(f"{k} step {recorded.get(k)} -> {v}" for k, v in expected.items()
                      if recorded.get(k) != v)
  return f"{stage} was trained from an older {prerequisite} ({changed})"


def copy_final(source_workdir: str, workdir: str, stage: str) -> int:
  """Copies the final checkpoint of `stage` from another workdir into `workdir`
  (which has none of that stage); returns its step. The source is untouched."""
  step = latest_step(source_workdir, stage)
  if step is None:
    raise ValueError(f"{source_workdir} has no {stage} checkpoint to copy")
  if has_checkpoint(workdir, stage):
    raise ValueError(f"{workdir} already has {stage} checkpoints; nothing was copied")
  source = os.path.join(stage_dir(source_workdir, stage), str(step))
  shutil.copytree(source, os.path.join(stage_dir(workdir, stage), str(step)))
  return step


def set_aside(workdir: str, stage: str) -> str:
  """Moves a stage's checkpoints under checkpoints/superseded/ (nothing is deleted);
  returns where they went."""
  base = os.path.join(workdir_lib.superseded_dir(workdir),
                      f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
  # Suffixes go on `base`: cutting the path at a '~' would cut at one in the
  # workdir's own name (runs/zeta~0.01) and move the checkpoints out of it.
  target, suffix = base, 1
  while os.path.exists(target):
    target = f"{base}~{suffix}"
    suffix += 1
  os.makedirs(os.path.dirname(target), exist_ok=True)
  os.rename(stage_dir(workdir, stage), target)
  return target
