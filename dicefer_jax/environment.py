"""Process settings: XLA/TF flags, multi-host start-up, the compilation cache.

Entry points import this module first: its top level sets environment variables
that must be in place before JAX or TensorFlow is imported. Settings are
defaults: anything the user exported already wins.

Two functions are called by entry points (experiments.run, experiments.evaluate,
experiments.protocol) once their flags are parsed, before any JAX computation:
`initialize_distributed` (multi-host) and `enable_compilation_cache`. This
module imports JAX only inside them, so importing it sets no JAX state.
"""

import os

# XLA:CPU (jaxlib 0.10) routes convolutions through YNNPACK fusions by default; on
# the ResNet-18 step they are ~1.4x slower than the Eigen path (measured on a
# 2-core x86 CPU). The flag is ignored by GPU/TPU compilation.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAG).strip()
# TensorFlow only feeds data here: keep its oneDNN banner and info logs quiet.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Set to 0 (or false/no/off) to turn the persistent compilation cache off in every
# entry point; JAX_COMPILATION_CACHE_DIR, when exported, chooses its directory.
COMPILATION_CACHE_ENV = "DICEFER_COMPILATION_CACHE"
# Cache every program, however fast it compiles (JAX's default skips those under
# 1 s). Initialising the model runs ~170 small programs (one per eager op); on 2
# busy CPU cores they took 8 s to compile and 0.6 s to read back: a second tiny
# stage-1 run went from 27 s to 8 s, against 16 s with a 0.5 s threshold (the
# whole tiny config: 49 s to 16 s; 196 programs, 2.3 MB).
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, exported, wins (e.g. for a cache on
# a network file system, where small reads cost more).
_CACHE_MIN_COMPILE_SECS = 0.0
# For clusters jax.distributed cannot detect by itself (it detects Cloud TPU,
# SLURM, Open MPI and Kubernetes): the process count and this process's index.
# JAX itself reads JAX_COORDINATOR_ADDRESS (host:port of process 0).
NUM_PROCESSES_ENV = "DICEFER_NUM_PROCESSES"
PROCESS_ID_ENV = "DICEFER_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  return int(value) if value else None


def initialize_distributed(enabled: bool) -> None:
  """Joins this process to a multi-host job (`jax.distributed.initialize`) once.

  Must run before any other JAX call (JAX refuses it after a computation).
  Cloud TPU pod slices, SLURM, Open MPI and Kubernetes jobs are detected by JAX;
  elsewhere export JAX_COORDINATOR_ADDRESS=host:port, DICEFER_NUM_PROCESSES and
  DICEFER_PROCESS_ID on every process. `enabled=False` does nothing.
  """
  if not enabled:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from dicefer_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(num_processes=_env_int(NUM_PROCESSES_ENV),
                               process_id=_env_int(PROCESS_ID_ENV))
  except (ValueError, TypeError) as e:  # no cluster found, or a malformed variable
    raise UserError(
        f"--config.distributed=True: jax.distributed.initialize failed ({e}); outside "
        "Cloud TPU, SLURM, Open MPI and Kubernetes export JAX_COORDINATOR_ADDRESS="
        f"host:port, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} on every process") from None


def compilation_cache_disabled() -> bool:
  return os.environ.get(COMPILATION_CACHE_ENV, "").strip().lower() in (
      "0", "false", "no", "off")


def enable_compilation_cache(cache_root: str, enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache in `<cache_root>/jax_cache`.

  A second run of the same config (or the next fold of a protocol, or an
  evaluation after training) then loads its XLA programs instead of compiling
  them. Entries are keyed by the program, the jaxlib version, the devices and
  the XLA flags, so a stale entry is never used for a different program.

  Args:
    cache_root: the project's cache root (`dicefer_jax.data.cache_root`).
    enabled: False (a `--nocompilation_cache` flag) leaves the cache off, as does
      DICEFER_COMPILATION_CACHE=0 in the environment.

  Returns:
    The cache directory in use, or None when the cache is off.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not enabled or compilation_cache_disabled():
    return None
  # Whichever directory is used: with JAX's 1 s threshold a directory exported
  # as JAX_COMPILATION_CACHE_DIR would keep none of the many small programs.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_SECS)
  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR or a caller
    return jax.config.jax_compilation_cache_dir
  cache_dir = os.path.join(cache_root, "jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  return cache_dir
