"""The persistent compilation cache: a second process loads what the first compiled.

Entry points turn it on through `environment.enable_compilation_cache`, in
`<cache root>/jax_cache`. The check counts JAX's own monitoring events in each
process (a cache hit and a miss are events, so nothing here races the clock) and
the cache's files.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from dicefer_jax import environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS_TAG = "CACHE_EVENTS "
# experiments.run as its own program, with JAX's compilation-cache events counted
# and printed at exit. dicefer_jax.environment first, as in experiments.run: the
# XLA flags it sets are part of every cache key.
_COUNTING_RUN = f"""
import atexit, json, runpy, sys
from dicefer_jax import environment
from jax import monitoring
counts = {{}}
monitoring.register_event_listener(
    lambda event, **kw: counts.__setitem__(event, counts.get(event, 0) + 1))
atexit.register(lambda: print({EVENTS_TAG!r} + json.dumps(counts)))
sys.argv = ["experiments.run"] + sys.argv[1:]
runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
"""


def _run_stage1(data_dir: str, workdir: str, cache_root: str, *flags) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, DICEFER_CACHE=cache_root)
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               environment.COMPILATION_CACHE_ENV):
    env.pop(name, None)   # the defaults are what is under test
  result = subprocess.run(
      [sys.executable, "-c", _COUNTING_RUN, "--config=experiments/configs/tiny.py",
       f"--config.data_dir={data_dir}", f"--workdir={workdir}", "--stage=1",
       "--config.stage1.num_steps=2", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith(EVENTS_TAG)][-1]
  counts = json.loads(line[len(EVENTS_TAG):])
  return {k.rsplit("/", 1)[-1]: v for k, v in counts.items()
          if k.startswith("/jax/compilation_cache/")}


def test_a_second_run_loads_every_program_from_the_cache(tiny_faceset, tmp_path):
  """Catches the cache not being turned on by experiments.run, turned on after
  the first compilation (JAX then ignores it), or programs whose cache keys
  change from one run to the next (a path or a time baked into the program)."""
  cache_root = str(tmp_path / "cache")
  cache_dir = os.path.join(cache_root, "jax_cache")
  first = _run_stage1(tiny_faceset, str(tmp_path / "wd1"), cache_root)
  entries = sorted(os.listdir(cache_dir))
  assert first.get("cache_hits", 0) == 0
  assert first["cache_misses"] == first["compile_requests_use_cache"] > 0
  # Every program is kept, the training step among them.
  assert len(entries) == first["cache_misses"]
  assert any(name.startswith("jit_step-") for name in entries)

  second = _run_stage1(tiny_faceset, str(tmp_path / "wd2"), cache_root)
  assert second.get("cache_misses", 0) == 0
  assert second["cache_hits"] == second["compile_requests_use_cache"] == len(entries)
  assert sorted(os.listdir(cache_dir)) == entries


def test_the_cache_can_be_turned_off(monkeypatch, tmp_path):
  """Catches an off switch that is not honoured: --nocompilation_cache or
  DICEFER_COMPILATION_CACHE=0 leave JAX's cache settings alone."""
  before = jax.config.jax_compilation_cache_dir
  assert environment.enable_compilation_cache(str(tmp_path), enabled=False) is None
  for value in ("0", "false", "off", "No"):
    monkeypatch.setenv(environment.COMPILATION_CACHE_ENV, value)
    assert environment.enable_compilation_cache(str(tmp_path)) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert not os.listdir(tmp_path)


def test_an_exported_jax_cache_dir_wins_and_still_keeps_small_programs(monkeypatch,
                                                                       tmp_path):
  """Catches the project's default overriding a cache the user chose
  (JAX_COMPILATION_CACHE_DIR, which JAX reads into its config), and such a
  cache keeping only programs that compile for over JAX's default 1 s (then an
  evaluation after training compiles the model's ~170 small programs again)."""
  monkeypatch.delenv(environment.COMPILATION_CACHE_ENV, raising=False)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  chosen = str(tmp_path / "mine")
  before = jax.config.jax_compilation_cache_dir
  before_threshold = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", chosen)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    assert environment.enable_compilation_cache(str(tmp_path / "project")) == chosen
    assert jax.config.jax_compilation_cache_dir == chosen
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before_threshold)
  assert not os.path.exists(tmp_path / "project")


@pytest.mark.parametrize("value, disabled", [("", False), ("1", False), ("0", True),
                                             ("off", True), ("FALSE", True)])
def test_compilation_cache_env_values(monkeypatch, value, disabled):
  monkeypatch.setenv(environment.COMPILATION_CACHE_ENV, value)
  assert environment.compilation_cache_disabled() is disabled
