r"""MTCNN preprocessing as an Apache Beam pipeline: data_tools.preprocess on a runner's workers.

  python -m data_tools.beam_preprocess --input_dir=RAW --output_dir=faces \
      [--runner=DirectRunner] [Beam pipeline options] [face-quality flags]

Reads the raw tree data_tools.preprocess reads (RAW/<Expression>/..., subjects
from capture_manifest.csv or --subject_from_dir: the same `scan_folder_tree`),
takes its flags (--min_face_size, --min_prob, --max_distortion, --multi_face,
--device, --source, --subject_from_dir; not --workers: the runner decides the
parallelism) and writes the same face set: the same PNG bytes under the same
names, the same manifest.csv and rejects.csv, and preprocess's bookkeeping
(preprocess_progress.csv, preprocess_settings.json), so either tool resumes or
extends a set the other began. Every argument that is not one of those flags
goes to Beam (--runner, --direct_num_workers, --project, ...).

How a run goes:
  1. Here: scan RAW, refuse a non-empty --output_dir that neither tool wrote,
     take preprocess's lock, read its progress log, list the photos not done
     yet into a task file (a file rather than beam.Create, which would put a
     million paths into the job graph).
  2. The pipeline: tasks -> Reshuffle (spreads them over the workers) ->
     AlignFaces: one MTCNN per DoFn instance, built in DoFn.setup, and per
     photo preprocess_pool.process_photo, the code the worker pool runs ->
     one text file of results.
  3. Here: append the results to the progress log and rewrite manifest.csv
     and rejects.csv from it (preprocess_runs.finalize, as preprocess does).

File systems: local or shared POSIX paths only (a disk for the DirectRunner;
for a cluster, a file system every worker mounts at the same path: NFS,
Filestore, gcsfuse). URLs (gs://, hdfs://, s3://) are refused: the scan,
the lock, the progress log and the atomic writes are preprocess's, written
for POSIX paths. Workers need dicefer-jax with torch and apache-beam
installed (a container image, or --setup_file on Dataflow).

Runners: Beam 2.77's DirectRunner first tries Prism, a binary it downloads
from GitHub, and without network falls back to the FnApiRunner;
--runner=FnApiRunner runs the pipeline in this process without that detour
(--direct_num_workers=N --direct_running_mode=multi_processing for N worker
processes, each with its own MTCNN).

What differs from a data_tools.preprocess run: no progress bar (the runner
reports progress; counters per status are Beam metrics), and results reach
the progress log when the pipeline ends, not photo by photo: an interrupted
run redoes its photos (faces are written atomically and come out the same).
Rows of the log are in input order. Torch is imported only where a DoFn is
set up (under an in-process runner: this process).
"""

import collections
import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

try:
  import apache_beam as beam
except ImportError:
  # The command line says so in one line; an importing module gets the error.
  if __name__ == "__main__":
    print("error: apache-beam is not installed here: pip install "
          "'dicefer-jax[data,beam]'", file=sys.stderr)
    sys.exit(2)
  raise
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import SetupOptions
from apache_beam.options.pipeline_options import StandardOptions

from data_tools import preprocess
from data_tools import preprocess_pool
from data_tools import preprocess_runs
from data_tools.face_quality import KEPT
from data_tools.face_quality import make_detector
from data_tools.face_quality import Settings
from dicefer_jax import contract
from dicefer_jax import face_detector
from dicefer_jax import fileio
from dicefer_jax.errors import UserError

# The run's task and result files, inside the output directory: on a shared
# file system the workers read and write it too. Hidden, and removed after
# the run (or, left by a killed run, by the next one, under the lock).
RUN_DIR = ".beam-run"
METRICS_NAMESPACE = "dicefer_preprocess"


class AlignFaces(beam.DoFn):
  """One photo's task line in, its result line out; writes the face when kept.

  The MTCNN is built in setup, once per DoFn instance, and a worker reuses
  an instance for all its bundles: the network loads once per worker, not
  per photo or bundle.
  """

  def __init__(self, settings: Settings, output_dir: str):
    super().__init__()
    self._settings = settings
    self._output_dir = output_dir
    self._detector = None

  def setup(self):
    # Imports torch (make_detector); one torch thread, as in the worker pool:
    # the workers share the cores, and with one thread the detections (and
    # so the faces) are bit-identical to data_tools.preprocess's.
    self._detector = make_detector(self._settings, torch_threads=1)

  def process(self, line: str):
    input_path, out_rel = json.loads(line)
    result = preprocess_pool.process_photo(input_path, self._output_dir, out_rel,
                                           self._settings, lambda: self._detector)
    result["device"] = self._detector.device
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, result["status"]).inc()
    yield json.dumps(result, sort_keys=True)

  def teardown(self):
    self._detector = None


def pipeline_options(pipeline_args: Sequence[str]) -> PipelineOptions:
  """Beam's options from the command line's leftover arguments.

  Unknown arguments are left to Beam (it warns): runner modules (Flink,
  Spark) add their options only when the runner is loaded.
  """
  options = PipelineOptions(list(pipeline_args))
  setup = options.view_as(SetupOptions)
  if setup.save_main_session is None:
    # Everything the workers run lives in importable modules; pickling the
    # launcher's __main__ (Beam's default on service runners) is not needed.
    setup.save_main_session = False
  return options


def _is_local(options: PipelineOptions) -> bool:
  """Whether the runner runs the DoFns here, where MTCNN must then be installed."""
  runner = options.view_as(StandardOptions).runner or "DirectRunner"
  name = runner.rsplit(".", 1)[-1].lower()
  local = {n.lower() for n in StandardOptions.LOCAL_RUNNERS}
  return name in local or f"{name}runner" in local


def run_beam_preprocess(items: Sequence[contract.Record], output_dir: str,
                        settings: Settings,
                        pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
  """Detects, aligns and writes the faces of raw photos with a Beam pipeline.

  Args:
    items: one Record per raw photo, as for preprocess.run_preprocess (`path`
      absolute, or relative to the current directory).
    output_dir: the face set to write: missing, empty, or one that
      data_tools.preprocess or this pipeline began (it is resumed).
    settings: the face-quality settings.
    pipeline_args: Beam pipeline options, e.g. ["--runner=DirectRunner"].

  Returns:
    run_preprocess's summary: {"kept", "rejected", "errors", "skipped",
    "reasons", "total_kept", "manifest", "rejects", "devices", "seconds"}.

  Raises:
    UserError: bad settings, records, output directory or runner; a URL for
      a path; no MTCNN stack for a local runner; a run in progress there.
  """
  started = time.monotonic()
  settings.validate()
  # preprocess's own check of the records (expressions, paths, duplicates).
  wanted = preprocess._records_by_input(items)  # pylint: disable=protected-access
  _check_output_dir(output_dir)
  output_dir = os.path.abspath(output_dir)
  options = pipeline_options(pipeline_args)
  try:
    # Builds the runner: an unknown --runner fails here, before any writing.
    pipeline = beam.Pipeline(options=options)
  except (ValueError, ImportError) as e:
    raise UserError(f"Beam cannot run with {' '.join(pipeline_args) or 'its defaults'}: "
                    f"{e}") from None
  if _is_local(options) and not face_detector.mtcnn_installed():
    raise UserError("facenet-pytorch is not installed in this environment: "
                    "pip install 'dicefer-jax[data]' (facenet-pytorch==2.5.3, torch)")
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --output_dir={output_dir}: {e.strerror or e}") from None

  lock = preprocess_runs.DirLock(output_dir)
  try:
    preprocess_runs.remove_stale_temp_files(output_dir)
    shutil.rmtree(os.path.join(output_dir, RUN_DIR), ignore_errors=True)
    preprocess_runs.check_settings(output_dir, settings)
    log = preprocess_runs.ProgressLog(os.path.join(output_dir, preprocess_runs.PROGRESS_NAME))
    counts, reasons, devices = collections.Counter(), collections.Counter(), set()
    try:
      todo, skipped = preprocess_runs.pending_inputs(wanted, log.state, output_dir)
      if todo:
        tasks = [(key, preprocess_runs.output_name(key, wanted[key].expression))
                 for key in todo]
        results = _run_pipeline(pipeline, tasks, settings, output_dir)
        for result in sorted(results, key=lambda r: r["input"]):
          log.write_result(wanted[result["input"]], result)
          counts[result["status"]] += 1
          if result.get("device"):
            devices.add(result["device"])
          if result["status"] != KEPT:
            reasons[result["reason"]] += 1
    finally:
      log.close()
      total_kept = preprocess_runs.finalize(output_dir, log.state, wanted)
  finally:
    lock.release()
  return preprocess_runs.run_summary(counts, reasons, devices, skipped, total_kept,
                                     output_dir, started)


def _check_output_dir(output_dir: str) -> None:
  """Refuses a URL, a file, or a non-empty directory neither tool wrote."""
  if "://" in output_dir:  # Before abspath, which would make it a local path.
    raise UserError(f"--output_dir={output_dir}: only local or shared (mounted) "
                    "paths are supported, not URLs")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output_dir={output_dir} is a file, not a directory")
  if not os.path.isdir(output_dir):
    return
  ours = any(os.path.isfile(os.path.join(output_dir, name))
             for name in (preprocess_runs.PROGRESS_NAME, preprocess_runs.SETTINGS_NAME))
  if not ours and any(not n.startswith(".") for n in os.listdir(output_dir)):
    # preprocess's own files are what make a folder safe to write into: its
    # manifest.csv and rejects.csv would replace anyone else's.
    raise UserError(f"--output_dir={output_dir} is not empty and holds no "
                    f"{preprocess_runs.PROGRESS_NAME}: it is not a face set this tool "
                    "or data_tools.preprocess began; pick an empty or new folder")


def _run_pipeline(pipeline: beam.Pipeline, tasks: Sequence[tuple[str, str]],
                  settings: Settings, output_dir: str) -> list[dict[str, str]]:
  """Runs the pipeline over (input, face path) tasks; returns its results."""
  run_dir = os.path.join(output_dir, RUN_DIR)
  os.makedirs(run_dir, exist_ok=True)
  tasks_path = os.path.join(run_dir, "tasks.jsonl")
  results_path = os.path.join(run_dir, "results.jsonl")
  try:
    # JSON lines: a file name may hold commas, quotes, even a newline.
    fileio.write_text_atomic(tasks_path, "".join(json.dumps(t) + "\n" for t in tasks))
    _ = (pipeline
         | "ReadTasks" >> beam.io.ReadFromText(tasks_path)
         | "Spread" >> beam.Reshuffle()
         | "DetectAlignWrite" >> beam.ParDo(AlignFaces(settings, output_dir))
         # One shard under a fixed name: a few hundred bytes per photo.
         | "WriteResults" >> beam.io.WriteToText(results_path, num_shards=1,
                                                 shard_name_template=""))
    pipeline.run().wait_until_finish()
    with open(results_path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: Sequence[str], flag_values) -> int:
  """The command line: scans --input_dir, runs the pipeline, prints a summary.

  Args:
    argv: the program name, then the arguments absl left: Beam's options.
    flag_values: the parsed flags (data_tools.preprocess's).

  Returns:
    The exit status: 0, 2 for a user error or no face kept, 130 on Ctrl-C.
  """
  fv = flag_values
  try:
    if fv.workers is not None:
      raise UserError("--workers is data_tools.preprocess's: under Beam the runner "
                      "sets the parallelism (--direct_num_workers=N for the "
                      "DirectRunner, --max_num_workers on Dataflow)")
    if not fv.input_dir or not fv.output_dir:
      raise UserError("pass --input_dir=RAW (photos) and --output_dir=DIR (face set)")
    if "://" in fv.input_dir:
      raise UserError(f"--input_dir={fv.input_dir}: only local or shared (mounted) "
                      "paths are supported, not URLs")
    inp, out = os.path.realpath(fv.input_dir), os.path.realpath(fv.output_dir)
    if out == inp or out.startswith(inp + os.sep):
      raise UserError("--output_dir must not be --input_dir or inside it: the "
                      "inputs stay as they are; pick a separate folder")
    settings = Settings(min_face_size=fv.min_face_size, min_prob=fv.min_prob,
                        max_distortion=fv.max_distortion, multi_face=fv.multi_face,
                        device=fv.device)
    settings.validate()
    scan = preprocess.scan_folder_tree(fv.input_dir, source=fv.source,
                                       subject_from_dir=fv.subject_from_dir)
    for folder, n in sorted(scan.dropped.items()):
      print(f"skipping {n} photo(s) of dropped class {folder}", file=sys.stderr)
    if scan.ignored:
      print(f"ignoring {scan.ignored} file(s) that are not images", file=sys.stderr)
    summary = run_beam_preprocess(scan.records, fv.output_dir, settings, argv[1:])
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return 130
  return preprocess.report(summary)


def _run_command_line() -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  # data_tools.preprocess's flags, not copies: the two tools take the same.
  flag_values = preprocess._define_flags()  # pylint: disable=protected-access

  def parse(argv):
    # absl takes its flags and leaves the rest, Beam's options, to main.
    try:
      return flag_values(argv, known_only=True)
    except flags.Error as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(2)

  app.run(lambda argv: main(argv, flag_values), flags_parser=parse)


if __name__ == "__main__":
  # Run through the module's importable name, so the DoFn is pickled as
  # data_tools.beam_preprocess.AlignFaces, which workers import, and not as
  # part of __main__.
  from data_tools import beam_preprocess  # pylint: disable=g-import-not-at-top
  beam_preprocess._run_command_line()  # pylint: disable=protected-access
