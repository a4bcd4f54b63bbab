"""The MTCNN worker pool of preprocessing: one photo in, one face file out.

`run_tasks` spawns the worker processes and hands each finished photo's
result to the caller as it comes. Each worker builds one MTCNNDetector on
its first photo and then, per photo, reads it, detects, decides (see
face_quality), aligns and writes the face PNG. Everything torch happens in
the workers, never in the process that calls run_tasks.
"""

import collections
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from data_tools.face_quality import detect_and_align
from data_tools.face_quality import ERROR
from data_tools.face_quality import KEPT
from data_tools.face_quality import MISSING
from data_tools.face_quality import REJECTED
from data_tools.face_quality import Settings
from data_tools.face_quality import TOO_SMALL
from data_tools.face_quality import make_detector
from data_tools.face_quality import UNREADABLE
from dicefer_jax import face_detector
from dicefer_jax import fileio
from dicefer_jax.errors import UserError
# Photos are decoded by the library, as a predictor decodes them.
from dicefer_jax.face_images import read_image  # pylint: disable=unused-import
from dicefer_jax.face_images import UnreadableImage

# (input photo, output face set, face path relative to it).
Task = tuple[str, str, str]


# --------------------------------------------------------------------------
# In the worker processes.

_worker_state: dict[str, Any] = {}


def init_worker(settings: Settings, torch_threads: int | None,
                parent_pid: int | None = None) -> None:
  """Pool initializer: keeps the settings; with parent_pid, exits with the parent."""
  # Only stores the arguments: an initializer that raises makes a Pool
  # respawn workers forever, so the detector is built by the first task.
  _worker_state.clear()
  _worker_state.update(settings=settings, torch_threads=torch_threads)
  if parent_pid is not None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                     name="exit-with-parent").start()


def _exit_with_parent(parent_pid: int) -> None:
  # A parent killed with -9 cannot stop its pool, and spawned workers would
  # go on with the queued photos and then wait forever, each holding an
  # MTCNN. Re-parenting shows the parent is gone.
  while True:
    time.sleep(1.0)
    if os.getppid() != parent_pid:
      os._exit(1)


def _worker_detector() -> face_detector.MTCNNDetector:
  """This process's MTCNN, built once."""
  if "detector" not in _worker_state:
    _worker_state["detector"] = make_detector(
        _worker_state["settings"], torch_threads=_worker_state.get("torch_threads"))
  return _worker_state["detector"]


def _write_png_atomic(path: str, face: np.ndarray) -> None:
  ok, encoded = cv2.imencode(".png", face)
  if not ok:
    raise OSError(f"PNG encoding failed for {path}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fileio.write_bytes_atomic(path, encoded.tobytes())


def process_task(task: Task) -> dict[str, str]:
  """process_one, plus the device this worker's MTCNN runs on."""
  result = process_one(*task)
  detector = _worker_state.get("detector")
  result["device"] = detector.device if detector is not None else ""
  return result


def process_one(input_path: str, output_dir: str, out_rel: str) -> dict[str, str]:
  """process_photo with this worker's settings and MTCNN. Runs in a worker."""
  return process_photo(input_path, output_dir, out_rel, _worker_state["settings"],
                       _worker_detector)


def process_photo(input_path: str, output_dir: str, out_rel: str, settings: Settings,
                  get_detector: Callable[[], face_detector.MTCNNDetector]
                  ) -> dict[str, str]:
  """Detects, checks, aligns and writes one photo.

  The one per-photo path of preprocessing: the worker pool here and the Beam
  pipeline (data_tools.beam_preprocess) both call it, so both write the same
  faces and the same reject reasons.

  Args:
    input_path: the photo (absolute).
    output_dir: the face set (absolute).
    out_rel: the face's path in it (preprocess_runs.output_name).
    settings: validated thresholds.
    get_detector: returns the MTCNN; called only for photos that reach
      detection, so a caller may build it lazily.

  Returns:
    {"input", "status" (KEPT, REJECTED or ERROR), "output" (out_rel when
    kept), "reason", "detail"}.

  Raises:
    UserError: a setup problem (no facenet-pytorch, no CUDA) that stops the
      run. Any other failure is returned as an ERROR result.
  """
  result = {"input": input_path, "output": "", "reason": "", "detail": ""}
  try:
    if not os.path.isfile(input_path):
      return {**result, "status": ERROR, "reason": MISSING, "detail": "file not found"}
    try:
      image = read_image(input_path)
    except UnreadableImage as e:
      return {**result, "status": REJECTED, "reason": UNREADABLE, "detail": str(e)}
    if min(image.shape[:2]) < settings.min_face_size:
      return {**result, "status": REJECTED, "reason": TOO_SMALL,
              "detail": f"image {image.shape[1]}x{image.shape[0]} is smaller than "
                        f"--min_face_size={settings.min_face_size}"}
    # The library's detect -> pick -> align, the same path a Predictor uses.
    decision, face = detect_and_align(get_detector(), image, settings)
    if decision.status != KEPT:
      return {**result, "status": REJECTED, "reason": decision.reason,
              "detail": decision.detail}
    _write_png_atomic(os.path.join(output_dir, out_rel), face)
    return {**result, "status": KEPT, "output": out_rel, "detail": decision.detail}
  except UserError:
    raise  # Setup problems (no CUDA, no facenet-pytorch) stop the run.
  except Exception as e:  # pylint: disable=broad-except
    # One odd photo must not end a long run; "error" is retried next time.
    message = " ".join(f"{type(e).__name__}: {e}".split())
    return {**result, "status": ERROR, "reason": "error", "detail": message[:300]}


# --------------------------------------------------------------------------
# In the parent process.


def run_tasks(tasks: Sequence[Task], settings: Settings, workers: int | None, *,
              show_progress: bool, on_result: Callable[[dict[str, str]], None]):
  """Runs process_task over `tasks` in spawned worker processes.

  Args:
    tasks: (input photo, output dir, face path) per photo; not empty.
    settings: validated settings, sent to every worker.
    workers: worker processes (default: the usable cores), at most one per task.
    show_progress: tqdm bar on stderr.
    on_result: called in this process with each result of process_task, in
      the order they finish.

  Returns:
    (counts, reasons, devices): results per status, rejects and errors per
    reason, and the devices MTCNN ran on.

  Raises:
    UserError: facenet-pytorch missing, or a worker's setup failed.
  """
  if not face_detector.mtcnn_installed():
    raise UserError("facenet-pytorch is not installed in this environment: "
                    "pip install 'dicefer-jax[data]' (facenet-pytorch==2.5.3, torch)")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  workers = min(workers or fileio.default_workers(), len(tasks))
  counts, reasons, devices = collections.Counter(), collections.Counter(), set()
  # Spawned, not forked: the workers start clean, and torch never enters the
  # caller's process.
  ctx = multiprocessing.get_context("spawn")
  # One torch thread per worker, also for a single worker: MTCNN's small
  # convolutions gain little from intra-op threads, and when the cores are
  # shared (other workers, other jobs) OpenMP's spinning threads collapse:
  # one worker on a busy 2-core machine did 17 images/s with one thread and
  # 1 image/s with torch's default (benchmarks/mtcnn_bench.py).
  torch_threads = 1
  bar = tqdm(total=len(tasks), desc="MTCNN", unit="img", disable=not show_progress,
             dynamic_ncols=True, file=sys.stderr)
  try:
    with ctx.Pool(workers, initializer=init_worker,
                  initargs=(settings, torch_threads, os.getpid())) as pool:
      for result in pool.imap_unordered(process_task, tasks, chunksize=1):
        on_result(result)
        counts[result["status"]] += 1
        if result.get("device"):
          devices.add(result["device"])
        if result["status"] != KEPT:
          reasons[result["reason"]] += 1
        bar.update(1)
        bar.set_postfix(kept=counts[KEPT], rejected=counts[REJECTED],
                        errors=counts[ERROR], refresh=False)
      pool.close()
      pool.join()
  finally:
    bar.close()
  return counts, reasons, devices
