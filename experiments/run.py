r"""Trains DICE-FER (or the supervised baseline) stage by stage.

  python -m experiments.run --config=experiments/configs/demo.py --workdir=runs/demo \
      --stage=all

Stages: 1 (expression code by cross MI), 2 (identity code, adversarial), 3
(classifier on the frozen expression code), or all. Every config field can be
overridden: --config.batch_size=64 --config.loss.zeta=0.025. With no
--config.data_dir the built-in synthetic face set is generated (once) and used.

Compiled programs are kept in <cache root>/jax_cache (DICEFER_CACHE, default
~/.cache/dicefer_jax) and reused by the next run; --nocompilation_cache or
DICEFER_COMPILATION_CACHE=0 turns that off. --config.distributed=True joins a
multi-host job (README: "Many devices and hosts").
"""

from dicefer_jax import environment  # sets XLA/TF flags: must come first

from absl import app
from absl import flags
from absl import logging

from dicefer_jax import data as data_lib
from dicefer_jax import train
from dicefer_jax import workdir as workdir_lib
from experiments import cli
from experiments import face_sets
from experiments.configs import default


def run(config, workdir: str, stage_flag: str,
        faces: data_lib.FaceSet | None = None) -> dict | None:
  """Trains the stages `stage_flag` names; returns the test summary after the last.

  `faces`: the face set already loaded in this process (the protocol passes
  it); by default the config's set is resolved and loaded here.
  """
  stage_names = train.stages_for(config, stage_flag)
  workdir_lib.save_config(config, workdir, default.get_config())
  if faces is None:
    faces = face_sets.FaceSets().get(config)
  data = data_lib.split_faces(config, faces)
  info = data.split_info
  if train.is_primary():  # one log per job, not one per host
    seen = (f" ({info.num_seen} more of training subjects held out)"
            if info.num_seen else "")
    print(f"data: {data.data_dir} | split {info.kind}: {info.num_train} train{seen} / "
          f"{info.num_test} test images | {info.note}", flush=True)
  summary = train.train_and_evaluate(config, workdir, stage_names, data)
  if summary is not None and train.is_primary():
    print(f"test accuracy on held-out data ({info.kind} split): "
          f"{summary['test_accuracy']:.4f} over {summary['num_test']} images", flush=True)
    print(f"wrote {workdir_lib.train_metrics_path(workdir)}; checkpoints in "
          f"{workdir_lib.checkpoints_root(workdir)}; TensorBoard: tensorboard "
          f"--logdir {workdir_lib.tensorboard_dir(workdir)}", flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where checkpoints and metrics go")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  # First, before any other JAX call: JAX refuses to join a job after computing.
  cli.run_or_exit(environment.initialize_distributed, config.distributed)
  environment.enable_compilation_cache(data_lib.cache_root(config),
                                       _COMPILATION_CACHE.value)
  cli.run_or_exit(run, config, _WORKDIR.value, _STAGE.value)


if __name__ == "__main__":
  # Defined only when this module is the program: experiments.protocol imports
  # `run` and defines flags of the same names.
  _CONFIG = cli.define_config_file(
      "config", "experiments/configs/default.py", "Training config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Directory for checkpoints, logs, metrics.")
  _STAGE = flags.DEFINE_string("stage", "all", "1, 2, 3 or all.")
  _COMPILATION_CACHE = flags.DEFINE_bool(
      "compilation_cache", True, "Keep compiled XLA programs in <cache root>/jax_cache "
      "(also off with DICEFER_COMPILATION_CACHE=0).")
  app.run(main, flags_parser=cli.parse_flags)
