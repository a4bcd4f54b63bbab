"""The import rule between the three packages, and torch kept out of training.

  dicefer_jax/   the library: imports neither experiments nor data_tools
  data_tools/    offline tools: may import dicefer_jax, not experiments
  experiments/   entry points: may import both

Every import counts, wherever it is written: at module level, inside a
function (a lazy import still ties the packages together the moment it runs),
and `importlib.import_module("...")` / `__import__("...")` with a literal name.

torch (through facenet-pytorch's MTCNN) is for the offline face tools only: next
to TensorFlow in one process it can crash it, and it costs seconds to import.
So no dicefer_jax module imports it at module level, only face_detector.py may
import it inside a function, and importing the training path in a fresh
process leaves it out of sys.modules.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dicefer_jax", "data_tools", "experiments")
# Which of our packages each package must not import.
FORBIDDEN = {
    "dicefer_jax": {"experiments", "data_tools"},
    "data_tools": {"experiments"},
    "experiments": set(),
}
TORCH = {"torch", "torchvision", "facenet_pytorch"}
# The one library module that may import torch, and only inside a function.
TORCH_ALLOWED_LAZILY = os.path.join("dicefer_jax", "face_detector.py")
TRAINING_PATH = ("dicefer_jax.train", "dicefer_jax.data", "dicefer_jax.evaluation.evaluator")


class Import:
  """One import in a source file."""

  def __init__(self, module: str, lineno: int, in_function: bool):
    self.module = module          # absolute dotted name
    self.lineno = lineno
    self.in_function = in_function

  @property
  def top(self) -> str:
    return self.module.split(".")[0]

  def __repr__(self):
    return f"Import({self.module!r}, line {self.lineno}, in_function={self.in_function})"


def _resolve_relative(package: str, module: str | None, level: int) -> str:
  """`from ..x import y` in package a.b.c -> a.b.x (what Python would import)."""
  parts = package.split(".")
  base = parts[:len(parts) - (level - 1)] if level > 1 else parts
  return ".".join(base + ([module] if module else []))


def _literal(node) -> str | None:
  return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dynamic_import(call: ast.Call, package: str) -> str | None:
  """The module a call like importlib.import_module("x") or __import__("x") imports."""
  func = call.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
  if name not in ("import_module", "__import__") or not call.args:
    return None
  module = _literal(call.args[0])
  if module is None:
    return None
  if module.startswith("."):  # import_module(".x", package="a.b")
    anchor = next((_literal(k.value) for k in call.keywords if k.arg == "package"), None)
    if len(call.args) > 1 and name == "import_module":
      anchor = _literal(call.args[1])
    level = len(module) - len(module.lstrip("."))
    return _resolve_relative(anchor or package, module.lstrip(".") or None, level)
  return module


def collect_imports(source: str, module_name: str, is_package: bool = False) -> list[Import]:
  """Every import of a module's source: statements at any depth and literal
  importlib.import_module/__import__ calls, each with its line and whether it
  runs inside a function (lazily) or when the module is imported.

  Args:
    source: the module's Python source.
    module_name: its dotted name (resolves relative imports).
    is_package: whether it is a package's __init__.py.
  """
  package = module_name if is_package else module_name.rpartition(".")[0]
  found = []

  def visit(node, in_function):
    if isinstance(node, ast.Import):
      found.extend(Import(a.name, node.lineno, in_function) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      module = (_resolve_relative(package, node.module, node.level) if node.level
                else node.module)
      found.append(Import(module, node.lineno, in_function))
    elif isinstance(node, ast.Call):
      module = _dynamic_import(node, package)
      if module is not None:
        found.append(Import(module, node.lineno, in_function))
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inner)

  visit(ast.parse(source), False)
  return found


def _python_files(root: str):
  """(path relative to root, dotted module name, is_package) of every .py file
  under root's three packages."""
  for package in PACKAGES:
    for folder, dirs, names in os.walk(os.path.join(root, package)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for name in sorted(names):
        if name.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, name), root)
          parts = rel[:-3].split(os.sep)
          is_package = parts[-1] == "__init__"
          yield rel, ".".join(parts[:-1] if is_package else parts), is_package


def _imports_by_file(root: str) -> dict[str, list[Import]]:
  out = {}
  for rel, module_name, is_package in _python_files(root):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
      out[rel] = collect_imports(f.read(), module_name, is_package)
  return out


def layering_violations(root: str) -> list[str]:
  """'file:line: ...' for every import that breaks the package rule."""
  problems = []
  for rel, imports in _imports_by_file(root).items():
    forbidden = FORBIDDEN[rel.split(os.sep)[0]]
    for imp in imports:
      if imp.top in forbidden:
        where = "inside a function" if imp.in_function else "at module level"
        problems.append(f"{rel}:{imp.lineno}: imports {imp.module} ({where}); "
                        f"{rel.split(os.sep)[0]} must not import {imp.top}")
  return problems


def torch_violations(root: str) -> list[str]:
  """'file:line: ...' for every torch import of dicefer_jax that is not a lazy
  one in face_detector.py."""
  problems = []
  for rel, imports in _imports_by_file(root).items():
    if rel.split(os.sep)[0] != "dicefer_jax":
      continue
    for imp in imports:
      if imp.top not in TORCH:
        continue
      if not imp.in_function:
        problems.append(f"{rel}:{imp.lineno}: imports {imp.module} at module level")
      elif rel != TORCH_ALLOWED_LAZILY:
        problems.append(f"{rel}:{imp.lineno}: imports {imp.module}; only "
                        f"{TORCH_ALLOWED_LAZILY} may (inside a function)")
  return problems


# ----------------------------------------------------------------------------
# The collector itself: a rule checked with a blind collector passes vacuously.


def test_collector_sees_imports_at_every_depth_and_dynamic_ones():
  """Catches a collector that walks only the module's top level (ast.parse's
  body), misses `from x import y`, or ignores importlib.import_module/__import__
  with a literal name."""
  source = textwrap.dedent("""\
      import os, json as j
      from dicefer_jax import data
      try:
        import cv2
      except ImportError:
        pass

      class C:
        import re
        def method(self):
          from experiments import cli
          return cli

      def f():
        def g():
          import data_tools.synthetic
        from data_tools import synthetic
        return importlib.import_module("experiments.run")

      async def h():
        __import__("torch")

      k = lambda: importlib.import_module("facenet_pytorch")
      import_module("data_tools.labels")
      importlib.import_module(name)  # not a literal: unknowable, skipped
      """)
  got = [(i.module, i.lineno, i.in_function)
         for i in collect_imports(source, "dicefer_jax.example")]
  assert got == [
      ("os", 1, False), ("json", 1, False), ("dicefer_jax", 2, False),
      ("cv2", 4, False), ("re", 9, False), ("experiments", 11, True),
      ("data_tools.synthetic", 16, True), ("data_tools", 17, True),
      ("experiments.run", 18, True), ("torch", 21, True),
      ("facenet_pytorch", 23, True), ("data_tools.labels", 24, False)]


def test_collector_resolves_relative_imports():
  """Catches `from . import x` / `from ..x import y` reported as empty or
  top-level names (a relative import could then hide a forbidden one)."""
  source = "from . import a\nfrom .b import c\nfrom .. import d\nfrom ..e import f\n"
  got = [i.module for i in collect_imports(source, "pkg.sub.mod")]
  assert got == ["pkg.sub", "pkg.sub.b", "pkg", "pkg.e"]
  got = [i.module for i in collect_imports("from . import a\n", "pkg.sub", is_package=True)]
  assert got == ["pkg.sub"]
  got = [i.module for i in collect_imports(
      'importlib.import_module(".x", package="experiments")\n', "dicefer_jax.m")]
  assert got == ["experiments.x"]


def _tree(tmp_path, files: dict[str, str]) -> str:
  for rel, source in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
  for package in PACKAGES:
    (tmp_path / package).mkdir(exist_ok=True)
  return str(tmp_path)


def test_rule_catches_a_lazy_data_tools_import_in_the_library(tmp_path):
  """Catches a rule that only looks at module-level imports: a function-level
  `from data_tools import synthetic` in dicefer_jax is reported with its file
  and line, as are the other forbidden directions."""
  root = _tree(tmp_path, {
      "dicefer_jax/__init__.py": "",
      "dicefer_jax/lazy.py": """\
          import numpy as np


          def make():
            from data_tools import synthetic
            return synthetic
          """,
      "dicefer_jax/dynamic.py": 'import importlib\nM = importlib.import_module("experiments.cli")\n',
      "data_tools/tool.py": "from dicefer_jax import data\nfrom experiments import run\n",
      "experiments/ok.py": "import data_tools\nimport dicefer_jax\nfrom experiments import cli\n",
  })
  problems = layering_violations(root)
  assert len(problems) == 3, problems
  joined = "\n".join(problems)
  assert os.path.join("dicefer_jax", "lazy.py") + ":5: imports data_tools (inside a function)" in joined
  assert os.path.join("dicefer_jax", "dynamic.py") + ":2: imports experiments.cli" in joined
  assert os.path.join("data_tools", "tool.py") + ":2: imports experiments" in joined


def test_torch_rule_allows_only_lazy_imports_in_face_detector(tmp_path):
  """Catches a torch rule that allows module-level torch in face_detector.py,
  lazy torch anywhere else in the library, or misses facenet_pytorch."""
  root = _tree(tmp_path, {
      "dicefer_jax/face_detector.py": """\
          import importlib.util


          def build():
            import torch
            from facenet_pytorch import MTCNN
            return torch, MTCNN
          """,
      "dicefer_jax/models.py": "def f():\n  import torch\n",
      "dicefer_jax/mi.py": "import facenet_pytorch.models\n",
      "data_tools/preprocess.py": "import torch\n",  # the offline tools may
  })
  problems = torch_violations(root)
  assert len(problems) == 2, problems
  joined = "\n".join(problems)
  assert os.path.join("dicefer_jax", "models.py") + ":2: imports torch; only" in joined
  assert os.path.join("dicefer_jax", "mi.py") + ":1: imports facenet_pytorch.models at module level" in joined
  # And at module level even face_detector.py may not.
  (tmp_path / "dicefer_jax" / "face_detector.py").write_text("import torch\n")
  assert (os.path.join("dicefer_jax", "face_detector.py") + ":1: imports torch at module level"
          in torch_violations(root))


# ----------------------------------------------------------------------------
# The rules on the real tree


def test_every_package_file_is_checked():
  """Catches a walk that finds nothing (a wrong root makes every rule pass)."""
  files = {rel for rel, _, _ in _python_files(REPO)}
  for rel in ("dicefer_jax/train.py", "dicefer_jax/evaluation/evaluator.py",
              "data_tools/synthetic.py", "data_tools/importers/common.py",
              "experiments/run.py", "experiments/configs/default.py"):
    assert rel.replace("/", os.sep) in files


def test_packages_import_only_downwards():
  """Catches the library importing the entry points or the offline tools (at
  any depth, or through importlib), and the tools importing the entry points:
  a training process would drag in what it must not, and the layers could no
  longer be used one without the other."""
  problems = layering_violations(REPO)
  assert not problems, "\n".join(problems)


def test_library_never_imports_torch_except_lazily_in_face_detector():
  """Catches `import torch` / `facenet_pytorch` at module level of any
  dicefer_jax module (every training process would import it), or a lazy one
  outside face_detector.py."""
  problems = torch_violations(REPO)
  assert not problems, "\n".join(problems)


_PROBE = r"""
import json, sys, traceback

BANNED = set(sys.argv[1].split(","))
REPO = sys.argv[2]
attempts = {}


class Spy:
  # Records who first asks for a banned module, then lets the import go on.
  def find_spec(self, name, path=None, target=None):
    top = name.split(".")[0]
    if top in BANNED and top not in attempts:
      attempts[top] = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                       if f.filename.startswith(REPO)]
    return None


sys.meta_path.insert(0, Spy())
report = {}
for step in sys.argv[3:]:
  for module in step.split(","):
    __import__(module)
  report[step] = sorted(m for m in BANNED if m in sys.modules)
print(json.dumps({"loaded": report, "attempts": attempts}))
"""


def test_training_path_leaves_torch_out_of_a_fresh_process():
  """Catches torch reaching a training process through any import chain (a
  module-level import in a module the training path imports, directly or via
  data_tools), which the static rule alone would miss (e.g. a third-party
  package that imports torch). The failure names the file:line that asked."""
  env = dict(os.environ, PYTHONPATH=REPO)
  steps = [",".join(TRAINING_PATH), "experiments.run"]
  result = subprocess.run(
      [sys.executable, "-c", _PROBE, ",".join(sorted(TORCH)), REPO, *steps],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for step in steps:
    loaded = report["loaded"][step]
    who = {m: report["attempts"].get(m) for m in loaded}
    assert not loaded, f"importing {step} loaded {loaded}; imported from {who}"
