r"""Serves a trained model as a local web page: photos and a webcam in, expressions out.

  python -m experiments.serve --workdir=runs/demo            # http://127.0.0.1:8000/
  python -m experiments.serve --workdir=runs/demo --port=8080

The page (dicefer_jax.webapp) boxes each face of dropped photos with its
probabilities and classifies webcam frames live. It listens on the loopback
interface unless --host says otherwise; browsers allow the webcam only on
localhost/127.0.0.1 or over HTTPS. Needs the `web` extra (and `data` for MTCNN).
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA flags; must come first)

from absl import app
from absl import flags
from absl import logging

from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.predictor import Predictor
from experiments import cli
from experiments.configs import default


def build_app(workdir: str, max_upload_mb: float = 10.0):
  """The web app over `workdir`'s final checkpoint.

  Raises:
    UserError: not a finished workdir, or the `web` extra is not installed.
  """
  try:
    from dicefer_jax.webapp import app as webapp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"the web app needs the web extra ({e}): "
                    "pip install -e '.[web,data]'") from None
  if max_upload_mb <= 0:
    raise UserError(f"--max_upload_mb={max_upload_mb}: use a positive size")
  config = workdir_lib.read_config(workdir, default.get_config())
  predictor = Predictor.from_workdir(workdir, default.get_config())
  return webapp.make_app(predictor, webapp.describe_workdir(workdir, config),
                         max_upload_bytes=int(max_upload_mb * 1024 * 1024))


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = 10.0) -> None:
  """Builds the app and runs it with uvicorn until interrupted."""
  web_app = build_app(workdir, max_upload_mb)
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f"serving {workdir} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
  uvicorn.run(web_app, host=host, port=port, log_level="warning")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  cli.run_or_exit(serve, _WORKDIR.value, _HOST.value, _PORT.value, _MAX_UPLOAD_MB.value)


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished training workdir.")
  _HOST = flags.DEFINE_string("host", "127.0.0.1",
                              "Interface to listen on (0.0.0.0 exposes it to the network).")
  _PORT = flags.DEFINE_integer("port", 8000, "TCP port.")
  _MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 10.0, "Larger uploads get 413.")
  app.run(main, flags_parser=cli.parse_flags)
