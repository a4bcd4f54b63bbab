"""Each synthetic image's nuisance, recovered: pose, lighting, blur and noise.

The synthetic set records who and what each face shows, not how it was posed
and lit. Every image's random stream depends only on its coordinates
(`synthetic_subjects.image_rng`), so the draws can be had again by rendering the
image once more with a generator that notes what it hands out. Reading the draws
off the renderer itself, rather than repeating its order of draws here, keeps
this right if the renderer changes; `recover` checks that the re-rendered image
equals the stored one and that the draws are the ones named below.

Used to ask what a code carries besides identity and expression (for example
`benchmarks/stage2_identity.py --nuisance`: what stage 2's z_id learns).
"""

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import cv2
import numpy as np

from data_tools import synthetic
from data_tools.synthetic_faces import render_face
from data_tools.synthetic_subjects import image_rng, make_subjects
from dicefer_jax.errors import UserError

# The renderer's last 13 draws of an image, in order: the pose (_posed_canvas),
# then the photometric nuisance (photometric_nuisance), as (method, arguments).
# None marks the sensor-noise field, which is not a nuisance value.
_POSE_DRAWS = (("uniform", (-8.0, 8.0)), ("uniform", (0.92, 1.08)),
               ("uniform", (-3.0, 3.0)), ("uniform", (-3.5, 3.5)),
               ("normal", (0.0, 12.0)), ("normal", (0.0, 0.6)))
_PHOTOMETRIC_DRAWS = (("uniform", (0.0, 2.0 * math.pi)), ("uniform", (0.0, 0.35)),
                      ("uniform", (0.8, 1.15)), ("uniform", (-18.0, 18.0)),
                      ("uniform", (0.35, 1.2)), ("standard_normal", None),
                      ("uniform", (1.0, 6.0)))
# What a code could be asked to predict, one number each.
NAMES = ("rotation_deg", "scale", "shift_x", "shift_y", "yaw", "background_offset",
         "gaze_x", "gaze_y", "light_x", "light_y", "contrast", "brightness",
         "blur_sigma", "noise_std")
_PATH = re.compile(r"^(?P<expression>[a-z]+)/(?P<subject>s\d+)_(?P=expression)_(?P<k>\d+)\.png$")


class _RecordingRng:
  """A numpy Generator that notes each draw: (method, positional args, value)."""

  def __init__(self, rng: np.random.Generator):
    self._rng = rng
    self.draws: list[tuple[str, tuple, Any]] = []

  def __getattr__(self, name):
    method = getattr(self._rng, name)

    def draw(*args, **kwargs):
      value = method(*args, **kwargs)
      self.draws.append((name, args, value))
      return value
    return draw


def _check_draws(draws, expected, where: str) -> None:
  for (name, args, _), (want_name, want_args) in zip(draws, expected):
    if name != want_name or (want_args is not None and
                             not np.allclose(args[:2], want_args)):
      raise RuntimeError(f"{where}: the renderer drew {name}{args[:2]} where "
                         f"{want_name}{want_args} was expected; update {__name__}")


def _values(draws) -> dict[str, float]:
  pose, photo = draws[-13:-7], draws[-7:]
  _check_draws(pose, _POSE_DRAWS, "pose")
  _check_draws(photo, _PHOTOMETRIC_DRAWS, "photometric nuisance")
  (_, _, angle), (_, _, scale), (_, _, shift), (_, _, yaw), (_, _, bg), (_, _, gaze) = pose
  theta, gradient, contrast, bright, sigma, noise = (photo[i][2] for i in (0, 1, 2, 3, 4, 6))
  return dict(rotation_deg=angle, scale=scale, shift_x=shift[0], shift_y=shift[1], yaw=yaw,
              background_offset=bg, gaze_x=gaze[0], gaze_y=gaze[1],
              light_x=gradient * math.cos(theta), light_y=gradient * math.sin(theta),
              contrast=contrast, brightness=bright, blur_sigma=sigma, noise_std=noise)


@dataclasses.dataclass(frozen=True)
class Nuisance:
  paths: list[str]       # relative to the set's directory, in the order asked
  values: np.ndarray     # (len(paths), len(NAMES)) float64


def recover(data_dir: str, relpaths: Sequence[str], check_images: bool = True
            ) -> Nuisance:
  """The nuisance draws of these images of a set `data_tools.synthetic` wrote.

  `check_images`: re-rendered images must equal the stored PNGs (a set written
  by another version of the renderer, or edited, is refused).
  """
  params = synthetic._read_params(data_dir)  # pylint: disable=protected-access
  if params is None:
    raise UserError(f"{data_dir} has no {synthetic.PARAMS_NAME}: only sets written by "
                    "data_tools.synthetic have recoverable nuisance")
  subjects = {s.subject_id: s for s in make_subjects(
      int(params["num_subjects"]), int(params["seed"]),
      float(params.get("confounders", 1.0)))}
  seed = int(params["seed"])
  rows = []
  for rel in relpaths:
    match = _PATH.match(rel)
    if match is None or match["subject"] not in subjects:
      raise UserError(f"{rel} is not an image name data_tools.synthetic writes "
                      f"(expression/sNNN_expression_k.png) for the set in {data_dir}")
    subject, expression, k = subjects[match["subject"]], match["expression"], int(match["k"])
    rng = _RecordingRng(image_rng(seed, subject.index, expression, k))
    # As synthetic._render_subject draws it: the intensity first, then the face.
    intensity = 0.0 if expression == "neutral" else float(rng.uniform(*synthetic.INTENSITY_RANGE))
    image = render_face(subject, expression, intensity, rng)
    if check_images:
      stored = cv2.imread(os.path.join(data_dir, rel), cv2.IMREAD_GRAYSCALE)
      if stored is None or not np.array_equal(stored, image):
        raise UserError(f"{rel} in {data_dir} is not the image the renderer draws for it "
                        "(another renderer version, or edited): its nuisance is unknown")
    rows.append([_values(rng.draws)[name] for name in NAMES])
  return Nuisance(list(relpaths), np.asarray(rows, np.float64).reshape(-1, len(NAMES)))
