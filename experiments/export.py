r"""Exports a trained workdir as a standalone expression classifier.

  python -m experiments.export --workdir=runs/demo --format=saved_model \
      --output=runs/demo_savedmodel
  python -m experiments.export --workdir=runs/demo --format=tflite --output=demo.tflite
  python -m experiments.export --workdir=runs/demo --format=onnx --output=demo.onnx

The model takes `faces`, uint8 (N, 112, 112, 1) aligned gray faces as the data
contract stores them, and returns `probabilities`, float32 (N, 7) in
dicefer_jax.contract.EXPRESSIONS order; resizing and standardisation are inside
it (see dicefer_jax/export.py). An existing --output is kept unless --overwrite.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA flags; must come first)

from absl import app
from absl import flags
from absl import logging

from dicefer_jax import export
from experiments import cli
from experiments.configs import default


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "format", "output"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.WARNING)
  cli.run_or_exit(export.export_workdir, _WORKDIR.value, _FORMAT.value, _OUTPUT.value,
                  defaults=default.get_config(), overwrite=_OVERWRITE.value)
  print(f"wrote {_OUTPUT.value} ({_FORMAT.value})")


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished training workdir.")
  _FORMAT = flags.DEFINE_enum("format", None, list(export.FORMATS), "The model format.")
  _OUTPUT = flags.DEFINE_string(
      "output", None, "A directory (saved_model) or file (tflite, onnx) to write.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  app.run(main, flags_parser=cli.parse_flags)
