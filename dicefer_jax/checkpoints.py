"""Orbax checkpoints of stage states: `<workdir>/checkpoints/<stage>/<step>/`.

Each checkpoint holds the full StageState (all model parameters, batch statistics,
the stage's optax states, step and rng) and a small JSON `meta` item.
"""

import os

import flax
import orbax.checkpoint as ocp

from dicefer_jax.steps import StageState


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def manager(workdir: str, stage: str, keep: int = 3, create: bool = True
            ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(stage_dir(workdir, stage), options=options)


def has_checkpoint(workdir: str, stage: str) -> bool:
  d = stage_dir(workdir, stage)
  return os.path.isdir(d) and latest_step(workdir, stage) is not None


def latest_step(workdir: str, stage: str):
  d = stage_dir(workdir, stage)
  if not os.path.isdir(d):
    return None
  with ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(create=False)) as m:
    return m.latest_step()


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
  with ocp.CheckpointManager(stage_dir(workdir, stage),
                             options=ocp.CheckpointManagerOptions(create=False)) as m:
    return restore(m, target)
