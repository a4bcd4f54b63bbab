"""Temporal smoothing of face predictions over video frames, per tracked face.

A face is followed from one frame to the next by the overlap (IoU) of its
boxes; its probabilities are averaged over its last N frames. With N = 1 the
probabilities are returned unchanged.

  smoother = ProbabilitySmoother(window=5)
  for boxes, probs in frames:        # (K, 4) and (K, 7) per frame
    track_ids, smoothed = smoother.update(boxes, probs)
"""

import collections

import numpy as np


def iou(a, b) -> float:
  """Intersection over union of two x1, y1, x2, y2 boxes (0 when disjoint or empty)."""
  ax1, ay1, ax2, ay2 = (float(v) for v in a)
  bx1, by1, bx2, by2 = (float(v) for v in b)
  inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
  union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
  return inter / union if union > 0 else 0.0


class ProbabilitySmoother:
  """Averages each tracked face's probabilities over its last `window` frames.

  Tracking is greedy IoU matching between consecutive frames only: a face
  missing from one frame starts a new track when it comes back.
  """

  def __init__(self, window: int, min_iou: float = 0.3):
    """Args: window: frames averaged (>= 1); min_iou: least overlap of one
    face's boxes in consecutive frames."""
    if window < 1:
      raise ValueError(f"window={window}: must be >= 1")
    self.window = int(window)
    self.min_iou = float(min_iou)
    self._next_id = 0
    # track id -> (last box, deque of its last `window` probability rows)
    self._tracks: dict[int, tuple[np.ndarray, collections.deque]] = {}

  def update(self, boxes, probabilities) -> tuple[list[int], np.ndarray]:
    """Adds one frame's faces.

    Args:
      boxes: (K, 4) x1, y1, x2, y2 of this frame's faces (K may be 0).
      probabilities: (K, C) their probabilities.

    Returns:
      (track_ids, smoothed): a track id per face and (K, C) float32
      probabilities averaged over each face's track.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    probabilities = np.asarray(probabilities, np.float32)
    if len(boxes) == 0:
      self._tracks = {}  # no face in this frame: every track ends
      return [], probabilities.reshape((0,) + probabilities.shape[1:])
    probabilities = probabilities.reshape(len(boxes), -1)
    # Every (previous track, face) pair that overlaps enough, best first.
    pairs = sorted(((iou(track_box, box), track_id, i)
                    for track_id, (track_box, _) in self._tracks.items()
                    for i, box in enumerate(boxes)), reverse=True)
    assigned: dict[int, int] = {}
    used_tracks = set()
    for overlap, track_id, i in pairs:
      if overlap < self.min_iou:
        break
      if i in assigned or track_id in used_tracks:
        continue
      assigned[i] = track_id
      used_tracks.add(track_id)
    tracks = {}
    track_ids = []
    smoothed = np.empty_like(probabilities)
    for i, box in enumerate(boxes):
      if i in assigned:
        history = self._tracks[assigned[i]][1]
        track_id = assigned[i]
      else:
        history = collections.deque(maxlen=self.window)
        track_id = self._next_id
        self._next_id += 1
      history.append(probabilities[i])
      tracks[track_id] = (box, history)
      track_ids.append(track_id)
      smoothed[i] = np.mean(np.stack(history), axis=0)
    # Tracks without a face in this frame end here.
    self._tracks = tracks
    return track_ids, smoothed
