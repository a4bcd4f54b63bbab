"""experiments.cli: bad flags, config overrides and config files as one line.

Most tests run the real entry points in a subprocess, because the flag and
config machinery (absl, ml_collections) runs at import and at `app.run`; each
fails before any training, so they are quick. A user mistake must give exit
code 2 and one `error: ...` line on stderr that names what is wrong, never a
traceback; a bug inside a config file must be reported as that bug (file and
line), not as an unknown field.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from dicefer_jax.errors import DataError, UserError
from experiments import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=experiments/configs/tiny.py"


def _run(module, *args, workdir):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", module, f"--workdir={workdir}", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(result) -> str:
  """The single stderr line of a refused command (asserts there is only it)."""
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: "), lines[0]
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  return lines[0]


def _config_file(tmp_path, name, source) -> tuple[str, int]:
  """Writes a config file; returns its path and the line marked `# BUG`."""
  source = textwrap.dedent(source)
  path = tmp_path / name
  path.write_text(source)
  line = next(i for i, text in enumerate(source.splitlines(), 1) if "# BUG" in text)
  return str(path), line


# ----------------------------------------------------------------------------
# Unknown fields, wrong types


@pytest.mark.parametrize("args, field", [
    (["--config.no_such_field=1"], "no_such_field"),
    (["--config.model.no_such=1"], "model.no_such"),
    ([TINY, "--config.no_such_field=1"], "no_such_field"),
    ([TINY, "--config.model.no_such=1"], "model.no_such"),
], ids=["default-top", "default-nested", "tiny-top", "tiny-nested"])
def test_unknown_config_field_is_one_line_naming_the_dotted_field(args, field, tmp_path):
  """Catches an override of a field that does not exist giving a traceback
  (ml_collections raises AttributeError/KeyError deep inside), naming only the
  last part ('no_such' for 'model.no_such'), or escaping the one-line handling
  in one of the two places it can fail: while the default config file is
  loaded at flag definition, or while an explicit --config is parsed."""
  result = _run("experiments.run", *args, workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert f"config field '{field}' does not exist" in line
  assert not os.path.exists(tmp_path / "wd")


def test_misspelt_config_field_names_the_field_readably(tmp_path):
  """Catches a near-miss typo (`widht`) reported as a garbled escaped string:
  ml_collections then raises a KeyError whose text is a repr with a
  'Did you mean' line inside it, not the bare field name."""
  result = _run("experiments.run", TINY, "--config.model.widht=3", workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert "config field 'model.widht' does not exist" in line
  assert "\\" not in line


def test_wrong_type_override_is_one_line(tmp_path):
  """Catches a non-integer width giving a traceback instead of one line that
  names the override."""
  result = _run("experiments.run", "--config.model.width=abc", workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert "config.model.width" in line and "abc" in line
  assert "does not exist" not in line


# ----------------------------------------------------------------------------
# Bugs inside a config file


def test_attribute_error_in_get_config_is_reported_as_the_config_files_bug(tmp_path):
  """Catches a typo inside a config file's get_config reported as 'config
  field ... does not exist' (sending the user to their command line instead of
  the file): the message names the file and the line."""
  path, line = _config_file(tmp_path, "typo_config.py", """\
      from experiments.configs import tiny


      def get_config():
        config = tiny.get_config()
        config.model.width = config.model.widht  # BUG
        return config
      """)
  result = _run("experiments.run", f"--config={path}", workdir=tmp_path / "wd")
  message = _one_error_line(result)
  assert "does not exist" not in message
  assert "config file typo_config.py: AttributeError" in message
  assert f"{path}:{line}" in message


def test_key_error_in_a_helper_of_get_config_is_the_config_files_bug(tmp_path):
  """Catches a KeyError raised in a function get_config calls being taken for
  an unknown override (here next to a valid override of an existing field)."""
  path, line = _config_file(tmp_path, "lookup_config.py", """\
      from experiments.configs import tiny

      SIZES = {"small": 4}


      def _width(name):
        return SIZES[name]  # BUG


      def get_config():
        config = tiny.get_config()
        config.model.width = _width("large")
        return config
      """)
  result = _run("experiments.run", f"--config={path}", "--config.seed=3",
                workdir=tmp_path / "wd")
  message = _one_error_line(result)
  assert "does not exist" not in message
  assert "config file lookup_config.py: KeyError" in message and "large" in message
  assert f"{path}:{line}" in message


def test_error_at_module_level_of_a_config_file_is_the_config_files_bug(tmp_path):
  """Catches an AttributeError in a config file's module-level code (outside
  get_config) reported as "config field \"module '...' has no attribute ...\"
  does not exist"."""
  path, line = _config_file(tmp_path, "module_config.py", """\
      from experiments.configs import tiny

      BASE = tiny.get_confg  # BUG


      def get_config():
        return BASE()
      """)
  result = _run("experiments.run", f"--config={path}", workdir=tmp_path / "wd")
  message = _one_error_line(result)
  assert "does not exist" not in message
  assert "config file module_config.py: AttributeError" in message
  assert f"{path}:{line}" in message


# ----------------------------------------------------------------------------
# experiments.evaluate takes only --config.eval.* overrides


def test_evaluate_refuses_a_non_eval_override(tmp_path):
  """Catches evaluate accepting --config.model.width: the model comes from the
  workdir's config.json, so the override would be silently ignored (or, if
  applied, restore checkpoints into the wrong model)."""
  result = _run("experiments.evaluate", "--config.model.width=3", workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert "--config.model.width: evaluate takes only --config.eval.* overrides" in line


def test_evaluate_accepts_an_eval_override(tmp_path):
  """Catches the eval-only filter refusing eval.* overrides too: this one gets
  past it to the missing workdir, which is the error reported."""
  result = _run("experiments.evaluate", "--config.eval.mig.num_seeds=5",
                workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert "config.json not found" in line and "not a training workdir" in line


def test_evaluate_unknown_eval_field_is_one_line(tmp_path):
  """Catches an unknown --config.eval.* field giving a traceback in evaluate."""
  result = _run("experiments.evaluate", "--config.eval.no_such=3", workdir=tmp_path / "wd")
  line = _one_error_line(result)
  assert "eval.no_such" in line and "does not exist" in line


# ----------------------------------------------------------------------------
# run_or_exit


def test_run_or_exit_returns_the_result():
  """Catches run_or_exit dropping fn's return value or its arguments."""
  assert cli.run_or_exit(lambda a, b=0: a + b, 2, b=3) == 5


@pytest.mark.parametrize("error", [UserError("bad --workdir: use another"),
                                   DataError("manifest.csv is missing")])
def test_run_or_exit_turns_a_user_error_into_exit_2_and_one_line(error, capsys):
  """Catches a UserError (or a subclass) escaping as a traceback, exiting with
  another code, or printed without the `error: ` prefix scripts look for."""
  def fail():
    raise error

  with pytest.raises(SystemExit) as info:
    cli.run_or_exit(fail)
  assert info.value.code == 2
  captured = capsys.readouterr()
  assert captured.err == f"error: {error}\n"
  assert captured.out == ""


def test_run_or_exit_lets_other_exceptions_through():
  """Catches a programming error swallowed into a one-line exit: a bug must
  keep its traceback."""
  def bug():
    raise ZeroDivisionError("a bug")

  with pytest.raises(ZeroDivisionError, match="a bug"):
    cli.run_or_exit(bug)
