"""Exact and near-duplicate images of a face set, within and across labels.

Exact duplicates have identical decoded pixels (a hash of the uint8 array and
its shape). Near-duplicates (the same photo re-encoded, re-exposed, with noise)
are found in three steps:
1. candidates: pairs whose 64-bit perceptual hashes (imagehash.phash) differ in
   at most `max_phash_distance` bits, found by a blocked XOR + popcount over
   the packed hashes (`hamming_pairs`: numpy, no Python loop over pairs);
2. a second hash (imagehash.dhash) within `max_dhash_distance` bits;
3. a pixel check (`local_difference`): the two faces, shrunk to 16x16 and
   standardised, differ by at most `max_local_difference` standard deviations
   in every 2x2 window.
Step 3 is needed because faces are aligned to one template: measured on the
synthetic set, 297 pairs of *different* pictures (mostly one person showing two
expressions) are within 2 phash bits, and 12 at distance 0. A changed mouth or
brow barely moves the 8x8 lowest frequencies a phash keeps, but changes some
2x2 window of the 16x16 face far more than noise or re-encoding does.
Black, white and flat frames (pixel standard deviation below `min_std`) are
never grouped: their hash bits are noise, and they are the exposure check's
business. Pairs are grouped with union-find; each member of a group becomes a
DUPLICATE finding whose `related` are the other members.

Suggestions, per group (members sorted by path):
- one label: keep the first member, drop the rest (copies add nothing);
- several labels, one of them held by more members than any other: keep the
  first member with that majority label and drop every other member (the
  minority-labelled copies carry a label error, the majority copies add nothing);
- several labels tied for the most members: keep every member (no rule can
  tell which label is right; the detail says a person must decide).

Default thresholds, measured on the default synthetic set (4,200 images, seed 0)
and on copies of 400 of its images: the candidates (phash <= 10 and dhash <= 10)
hold 36,364 pairs of different pictures, whose local difference is at least
0.243 (0.1% percentile 0.374). At max_local_difference=0.2 none of them is
grouped, while these copies are grouped with their original: Gaussian noise
sigma 5 (100%) and sigma 10 (98%), +15 brightness with clipping (96%), JPEG
quality 70 (100%) and 30 (99.8%), Gaussian blur sigma 1 (99.5%), halved and
re-enlarged (99.8%), gamma 0.8 (99.5%); +30 brightness only 82%, as clipping
erases detail. A copy shifted by a pixel or more is not found (its phash moves
by up to 20 bits): re-aligned copies are out of reach of a hash.
"""

import dataclasses
import hashlib
import math
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import cv2
import imagehash
import numpy as np
from PIL import Image

from data_tools.audit import findings
from data_tools.audit import image_checks
from dicefer_jax import contract
from dicefer_jax.errors import DataError

HASH_BITS = 64
THUMBNAIL_SIZE = 16


@dataclasses.dataclass(frozen=True)
class DuplicateThresholds:
  """When two images count as duplicates (see the module docstring for why)."""

  max_phash_distance: int = 10
  max_dhash_distance: int = 10
  # In standard deviations of the image's pixel values.
  max_local_difference: float = 0.2
  # Images whose pixel standard deviation is below this are skipped.
  min_std: float = 3.0

  def __post_init__(self):
    for name in ("max_phash_distance", "max_dhash_distance"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) \
          or not 0 <= value < HASH_BITS:
        raise DataError(f"{name}={value!r} must be a whole number of bits from 0 "
                        f"to {HASH_BITS - 1}")
    for name in ("max_local_difference", "min_std"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DataError(f"{name}={value!r} must be a non-negative number")


class ImageHash(NamedTuple):
  """What the duplicate search needs of one image."""

  digest: bytes            # of the decoded pixels and their shape
  phash: int               # 64 bits
  dhash: int               # 64 bits
  thumbnail: np.ndarray    # (16, 16) float32, zero mean, unit standard deviation
  std: float               # of the pixel values


@dataclasses.dataclass(frozen=True)
class HashTable:
  """ImageHashes of many images as arrays; row i is image i."""

  digests: list[bytes]
  phash: np.ndarray        # (n,) uint64
  dhash: np.ndarray        # (n,) uint64
  thumbnails: np.ndarray   # (n, 16, 16) float32
  std: np.ndarray          # (n,) float64

  def __len__(self) -> int:
    return len(self.digests)

  @classmethod
  def from_rows(cls, rows: Sequence[ImageHash]) -> "HashTable":
    return cls(
        digests=[r.digest for r in rows],
        phash=np.array([r.phash for r in rows], dtype=np.uint64),
        dhash=np.array([r.dhash for r in rows], dtype=np.uint64),
        thumbnails=(np.stack([r.thumbnail for r in rows]) if rows else
                    np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.float32)),
        std=np.array([r.std for r in rows], dtype=np.float64))


def _packed(bits: np.ndarray) -> int:
  """An imagehash bit matrix (8x8 bools) as one 64-bit integer, row-major."""
  return int.from_bytes(np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes(),
                        "big")


def hash_image(image: np.ndarray) -> ImageHash:
  """The hashes of one grayscale uint8 image.

  The exact digest is of the array as given; the perceptual parts are of the
  face at the contract's size (`image_checks.as_face`), so a set whose files
  have other sizes is compared as the training code sees it.
  """
  raw = np.asarray(image)
  face = image_checks.as_face(raw)
  raw = np.ascontiguousarray(raw)
  digest = hashlib.blake2b(repr((raw.shape, raw.dtype.str)).encode() + raw.tobytes(),
                           digest_size=16).digest()
  pil = Image.fromarray(face)
  small = cv2.resize(face, (THUMBNAIL_SIZE, THUMBNAIL_SIZE),
                     interpolation=cv2.INTER_AREA).astype(np.float32)
  small_std = float(small.std())
  thumbnail = (small - small.mean()) / (small_std if small_std > 0 else 1.0)
  return ImageHash(digest=digest, phash=_packed(imagehash.phash(pil).hash),
                   dhash=_packed(imagehash.dhash(pil).hash),
                   thumbnail=thumbnail.astype(np.float32), std=float(face.std()))


def hash_images(images: Iterable[np.ndarray]) -> HashTable:
  """Hashes every image of an iterator, in order."""
  return HashTable.from_rows([hash_image(image) for image in images])


def hash_face_set(data_dir: str, records: Sequence[contract.Record],
                  workers: int = 0) -> HashTable:
  """The hashes of every record's image (read by `image_checks.map_face_images`)."""
  return HashTable.from_rows(image_checks.map_face_images(
      data_dir, records, hash_image, workers))


def iter_hamming_pairs(hashes: np.ndarray, max_distance: int,
                       block: int = 256, column_block: int = 4096,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Pairs i < j of 64-bit hashes within `max_distance` differing bits, by tiles.

  Compares a block of rows with a block of columns at a time (XOR, then
  np.bitwise_count), only on and above the diagonal, into reused buffers: the
  memory is block x column_block, whatever the number of hashes.

  Yields:
    (i, j, distance) int64 arrays, one triple per tile with any pair.
  """
  hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
  n = len(hashes)
  block, column_block = max(1, int(block)), max(1, int(column_block))
  xor = np.empty((block, column_block), np.uint64)
  count = np.empty((block, column_block), np.uint8)
  close = np.empty((block, column_block), bool)
  for r0 in range(0, n, block):
    r1 = min(n, r0 + block)
    rows = hashes[r0:r1, None]
    for c0 in range(r0, n, column_block):
      c1 = min(n, c0 + column_block)
      shape = (r1 - r0, c1 - c0)
      x, c, m = (xor[:shape[0], :shape[1]], count[:shape[0], :shape[1]],
                 close[:shape[0], :shape[1]])
      np.bitwise_xor(rows, hashes[None, c0:c1], out=x)
      np.bitwise_count(x, out=c)
      np.less_equal(c, max_distance, out=m)
      if c0 < r1:
        # A tile crossing the diagonal: keep j > i only.
        m &= (np.arange(c0, c1)[None, :] > np.arange(r0, r1)[:, None])
      ii, jj = np.nonzero(m)
      if ii.size:
        yield (ii + r0, jj + c0, c[ii, jj].astype(np.int64))


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int = 256,
                  column_block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All of `iter_hamming_pairs` at once: (i, j, distance), sorted by (i, j)."""
  parts = list(iter_hamming_pairs(hashes, max_distance, block, column_block))
  if not parts:
    empty = np.zeros(0, np.int64)
    return empty, empty.copy(), empty.copy()
  i, j, d = (np.concatenate(p) for p in zip(*parts))
  order = np.lexsort((j, i))
  return i[order], j[order], d[order]


def local_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Largest mean |a - b| over 2x2 windows of standardised 16x16 thumbnails.

  Args:
    a, b: (..., 16, 16) thumbnails (`ImageHash.thumbnail`).

  Returns:
    (...) float32: in pixel standard deviations; 0 for identical thumbnails.
  """
  diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  windows = (diff[..., :-1, :-1] + diff[..., 1:, :-1] + diff[..., :-1, 1:]
             + diff[..., 1:, 1:]) / 4
  # An explicit window count: reshape(-1) cannot infer it for zero pairs.
  count = windows.shape[-2] * windows.shape[-1]
  return windows.reshape(windows.shape[:-2] + (count,)).max(axis=-1)


class _UnionFind:

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, x: int) -> int:
    root = x
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[x] != root:
      self.parent[x], x = root, self.parent[x]
    return root

  def union(self, a: int, b: int):
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
  """Images that are copies of each other, directly or through other members.

  `members` are indices into the hashed images, ascending. Per member (same
  order): `exact_copies`, how many other members have identical pixels;
  `phash_distance` and `local_difference`, of its closest near (not exact)
  match, or None when it has none.
  """

  members: tuple[int, ...]
  exact_copies: tuple[int, ...]
  phash_distance: tuple[Optional[int], ...]
  local_difference: tuple[Optional[float], ...]


def find_duplicate_groups(table: HashTable,
                          thresholds: DuplicateThresholds = DuplicateThresholds(),
                          block: int = 256) -> list[DuplicateGroup]:
  """Groups of exact and near-duplicates, ordered by their first member.

  Images with a pixel standard deviation below `thresholds.min_std` are never
  grouped: a black, white or flat frame has no meaningful perceptual hash
  (its bits are noise), and such frames are the exposure check's business.
  """
  n = len(table)
  usable = np.flatnonzero(table.std >= thresholds.min_std)
  # Exact copies first: one representative per distinct digest enters the
  # pairwise search, so a thousand identical frames cost one comparison row.
  by_digest: dict[bytes, list[int]] = {}
  for i in usable:
    by_digest.setdefault(table.digests[i], []).append(int(i))
  reps = np.array([members[0] for members in by_digest.values()], dtype=np.int64)
  union = _UnionFind(n)
  for members in by_digest.values():
    for other in members[1:]:
      union.union(members[0], other)
  best_distance = np.full(n, HASH_BITS + 1, np.int64)
  best_local = np.full(n, np.inf, np.float64)
  for ri, rj, distance in iter_hamming_pairs(table.phash[reps],
                                             thresholds.max_phash_distance, block):
    i, j = reps[ri], reps[rj]
    dhash_distance = np.bitwise_count(table.dhash[i] ^ table.dhash[j])
    keep = dhash_distance <= thresholds.max_dhash_distance
    i, j, distance = i[keep], j[keep], distance[keep]
    if not i.size:
      continue
    local = local_difference(table.thumbnails[i], table.thumbnails[j])
    keep = local <= thresholds.max_local_difference
    i, j, distance, local = i[keep], j[keep], distance[keep], local[keep]
    for side in (i, j):
      np.minimum.at(best_distance, side, distance)
      np.minimum.at(best_local, side, local)
    for a, b in zip(i.tolist(), j.tolist()):
      union.union(a, b)
  groups: dict[int, list[int]] = {}
  for i in usable.tolist():
    groups.setdefault(union.find(i), []).append(i)
  out = []
  for members in sorted(g for g in groups.values() if len(g) > 1):
    rep_of = {m: by_digest[table.digests[m]][0] for m in members}
    out.append(DuplicateGroup(
        members=tuple(members),
        exact_copies=tuple(len(by_digest[table.digests[m]]) - 1 for m in members),
        phash_distance=tuple(
            int(best_distance[rep_of[m]]) if best_distance[rep_of[m]] <= HASH_BITS
            else None for m in members),
        local_difference=tuple(
            float(best_local[rep_of[m]]) if np.isfinite(best_local[rep_of[m]])
            else None for m in members)))
  return out


def duplicate_score(exact_copies: int, phash_distance: Optional[int]) -> float:
  """1 for an exact copy; 0.99 * (1 - d/64) for a near one at phash distance d
  (so any near match ranks below an exact one, closer ones higher)."""
  if exact_copies:
    return 1.0
  return 0.99 * (1 - (phash_distance or 0) / HASH_BITS)


def group_suggestions(paths: Sequence[str], expressions: Sequence[str]) -> list[str]:
  """The suggestion of each member of one group (the rule in the module docstring).

  Args:
    paths: the members' paths.
    expressions: their labels, in the same order.

  Returns:
    findings.KEEP or findings.DROP for each member, in the same order.
  """
  counts: dict[str, int] = {}
  for e in expressions:
    counts[e] = counts.get(e, 0) + 1
  most = max(counts.values())
  leaders = [e for e, c in counts.items() if c == most]
  if len(leaders) > 1:
    return [findings.KEEP] * len(paths)
  kept = min(p for p, e in zip(paths, expressions) if e == leaders[0])
  return [findings.KEEP if p == kept else findings.DROP for p in paths]


def _label_summary(expressions: Sequence[str]) -> tuple[str, list[str]]:
  """("happiness x2, anger x1", labels by count, most first then by name)."""
  counts: dict[str, int] = {}
  for e in expressions:
    counts[e] = counts.get(e, 0) + 1
  labels = sorted(counts, key=lambda e: (-counts[e], e))
  return ", ".join(f"{e} x{counts[e]}" for e in labels), labels


def duplicate_findings(records: Sequence[contract.Record], table: HashTable,
                       thresholds: DuplicateThresholds = DuplicateThresholds(),
                       ) -> list[findings.Finding]:
  """A DUPLICATE finding for each member of each group (`find_duplicate_groups`).

  Raises:
    DataError: records and hashes of different lengths, or a path listed twice.
  """
  if len(records) != len(table):
    raise DataError(f"{len(records)} records but {len(table)} hashed images: hash "
                    "the same records the findings are for")
  seen: set[str] = set()
  for r in records:
    if r.path in seen:
      raise DataError(f"the manifest lists {r.path!r} twice: remove the repeated row")
    seen.add(r.path)
  out = []
  for group in find_duplicate_groups(table, thresholds):
    members = [records[m] for m in group.members]
    paths = [r.path for r in members]
    expressions = [r.expression for r in members]
    suggestions = group_suggestions(paths, expressions)
    summary, labels = _label_summary(expressions)
    if len(labels) == 1:
      labels_text = f"all labelled {labels[0]}"
    else:
      named = ", ".join(labels[:-1]) + " and " + labels[-1]
      labels_text = f"same picture labelled {named}: a label error ({summary}); "
      labels_text += ("labels tie: decide by eye which is right"
                      if len(set(suggestions)) == 1 else
                      f"keeping one {labels[0]} copy")
    for k, record in enumerate(members):
      exact, distance = group.exact_copies[k], group.phash_distance[k]
      match = []
      if exact:
        match.append(f"exact copy of {exact} other image(s)")
      if distance is not None:
        match.append(f"near duplicate (phash distance {distance}, local difference "
                     f"{group.local_difference[k]:.2f} <= "
                     f"{thresholds.max_local_difference:g})")
      out.append(findings.Finding(
          path=record.path, kind=findings.DUPLICATE,
          score=duplicate_score(exact, distance), suggestion=suggestions[k],
          detail=f"{' and '.join(match)}; group of {len(members)}, {labels_text}",
          related=tuple(p for p in paths if p != record.path),
          expression=record.expression, subject=record.subject))
  return out
