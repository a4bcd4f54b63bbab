"""Quick probe of how much identity confounds a face set's expressions.

Trains a small plain CNN (cross-entropy, no identity handling) on some subjects
and compares its accuracy on held-out images of those subjects with its accuracy
on subjects it never saw. A large gap means a classifier can lean on who a person
is; DICE-FER's claim is that removing identity closes it. Used to tune the
synthetic set's confounders (data_tools/synthetic.py) without waiting for the
ResNet-18 trainer; it runs in about three minutes on two shared CPU cores.

Measured on the default synthetic set (60 subjects x 7 x 10, seed 0), 800 steps:
held-out seen 88.7%, unseen 71.0%, gap 17.8 points (split seed 0); 91.3%,
70.6%, 20.7 (split seed 1). With --confounders=0 (same people, no misleading
resting traits): 93.7%, 85.0%, gap 8.6.

Split: subjects are shuffled and split 75/25 into seen/unseen; 20% of the seen
subjects' images are held out; the CNN trains on the rest. A manifest that pins
subjects to training (split=train, as the synthetic set's confounded benchmark
does for its confounded cohort) keeps them seen: the unseen subjects are then
25% of the unpinned (clean) ones, as in the pinned k-fold of dicefer_jax.splits,
and the held-out seen accuracy is also given per cohort.

On a set data_tools.synthetic wrote, the unseen accuracy is also split by
whether the label lies in the half of the expressions that the subject's
appearance attribute (glasses or long hair) goes with in the confounded
benchmark. A classifier that took the attribute as a shortcut does worse on
the other half; on a set without that association the two agree within noise.

Measured on the confounded benchmark (experiments/configs/confounded.py: 100
subjects showing 3 expressions each, 3000 images, attribute strength 1, 40 clean
subjects), 800 steps, --unseen_fraction=0.5 (20 unseen clean subjects), split
seeds 0, 1, 2:
  python -m data_tools.synthetic --output_dir=DIR --num_subjects=100 \
      --expressions_per_subject=3 --attribute_strength=1
  python -m data_tools.synthetic_probe --data_dir=DIR --unseen_fraction=0.5
held-out seen 90.0/93.5/92.5%, unseen 57.3/66.3/66.2%: gap 28.7 points on
average; unseen, label in the attribute's half 76.7/86.9/76.5%, in the other
half 42.9/48.9/55.4%. Control with the same cohorts, pins, split and test
images but (next to) no association, --attribute_strength=0.001: held-out seen
91.0%, unseen 70.2% on average (gap 20.8); the halves 67.9% and 72.5%. The
balanced set of the same size (100 subjects x 7 x 4 images, 2800 images,
--unseen_fraction=0.2): held-out seen 84.8%, unseen 73.5%, gap 11.3 (15.1, 14.2,
4.6); halves 70.7% and 75.8%. So the attribute costs new people about 7 points
overall and 23 on the other half's expressions, on top of the gap that
per-subject subsets and skewed counts already open.

Usage:
  python -m data_tools.synthetic_probe --data_dir=DIR [--steps=600] [--seed=0]
"""

import os
import sys
import time
from typing import Optional, Sequence

# Before JAX loads: XLA's YNNPACK convolution path is the slower one on CPU
# (see dicefer_jax/environment.py); the user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import cv2
import numpy as np

from dicefer_jax import contract
from dicefer_jax import splits
from dicefer_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "A face set in the on-disk contract.")
flags.DEFINE_integer("steps", 800, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("image_size", 48, "Side the 112 px faces are shrunk to.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate.")
flags.DEFINE_integer("width", 16, "Channels of the first conv stage (x2, x4 later).")
flags.DEFINE_integer("seed", 0, "Seed of the subject split and the training.")
flags.DEFINE_float("unseen_fraction", 0.25, "Fraction of subjects never trained on.")
flags.DEFINE_float("holdout_fraction", 0.2,
                   "Fraction of the seen subjects' images held out for testing.")


def load(data_dir: str, size: int):
  """Images (N, size, size) float32 standardised per image, labels, subjects,
  and whether each image's subject is pinned to training (split=train)."""
  records = contract.read_manifest(data_dir)
  if any(not r.subject for r in records):
    raise UserError(f"{data_dir}: the probe needs subject ids in the manifest")
  images = np.empty((len(records), size, size), np.float32)
  for i, r in enumerate(records):
    img = cv2.imread(os.path.join(data_dir, r.path), cv2.IMREAD_GRAYSCALE)
    if img is None:
      raise UserError(f"could not read {r.path} in {data_dir}")
    images[i] = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
  # Per-image standardisation, as the training pipeline does.
  images -= images.mean(axis=(1, 2), keepdims=True)
  images /= images.std(axis=(1, 2), keepdims=True) + 1e-6
  labels = np.array([r.label for r in records], np.int32)
  subjects = np.array([r.subject for r in records])
  pinned = np.array([r.split == "train" for r in records]) \
      if splits.split_kind(records) == splits.SUBJECT_PINNED else np.zeros(len(records), bool)
  return images, labels, subjects, pinned


def split(subjects: np.ndarray, seed: int, unseen_fraction: float,
          holdout_fraction: float, pinned: np.ndarray | None = None):
  """Index arrays (train, held-out seen, unseen) of a subject-disjoint split.

  Subjects of `pinned` images are never unseen; unseen_fraction is then a
  fraction of the others.
  """
  rng = np.random.default_rng(seed)
  fixed = set(subjects[pinned].tolist()) if pinned is not None else set()
  ids = np.array(sorted(set(subjects.tolist()) - fixed))
  rng.shuffle(ids)
  n_unseen = max(1, int(round(unseen_fraction * len(ids))))
  if n_unseen >= len(ids) + len(fixed):
    raise UserError(f"{len(ids)} subject(s) are too few to hold some out")
  unseen_ids = set(ids[:n_unseen].tolist())
  is_unseen = np.array([s in unseen_ids for s in subjects])
  seen = np.flatnonzero(~is_unseen)
  seen = seen[rng.permutation(len(seen))]
  n_hold = int(round(holdout_fraction * len(seen)))
  return np.sort(seen[n_hold:]), np.sort(seen[:n_hold]), np.flatnonzero(is_unseen)


def train_and_evaluate(images, labels, train, tests: dict, steps: int, batch: int,
                       lr: float, width: int, seed: int, log=print) -> dict:
  """Trains the small CNN on `train` and returns accuracy on each test index set."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import flax.linen as nn
  import optax

  def pool(x):
    # 2x2 max pool by reshape: Flax's max_pool backward is slow on CPU.
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  class SmallCNN(nn.Module):
    """A VGG-style CNN with BatchNorm (trains in a few hundred steps)."""
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool):
      def conv_bn(x, c):
        x = nn.Conv(c, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)
      for i, reps in enumerate((1, 2, 2)):
        for _ in range(reps):
          x = conv_bn(x, self.width * 2 ** i)
        x = pool(x)
      x = conv_bn(x, self.width * 8)
      x = x.mean(axis=(1, 2))
      return nn.Dense(contract.NUM_CLASSES)(x)

  size = images.shape[1]
  model = SmallCNN(width)
  key = jax.random.PRNGKey(seed)
  variables = model.init(key, jnp.zeros((1, size, size, 1)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps),
                   weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def predict(params, batch_stats, x):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=False)
    return jnp.argmax(logits, -1)

  rng = np.random.default_rng(seed + 1)
  pad = 3
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
  start = time.perf_counter()
  for i in range(steps):
    idx = train[rng.integers(0, len(train), batch)]
    # Augmentation like the trainer's: small shifts and horizontal flips.
    dx, dy = rng.integers(0, 2 * pad + 1, 2)
    x = padded[idx, dy:dy + size, dx:dx + size]
    flip = rng.random(batch) < 0.5
    x = np.where(flip[:, None, None], x[:, :, ::-1], x)
    params, batch_stats, opt_state, loss = step(
        params, batch_stats, opt_state, x[..., None], labels[idx])
    if (i + 1) % max(1, steps // 6) == 0:
      log(f"step {i + 1}/{steps}: loss {float(loss):.3f} "
          f"({time.perf_counter() - start:.0f} s)")

  results = {}
  for name, idx in tests.items():
    preds = np.concatenate([
        np.asarray(predict(params, batch_stats, images[idx[j:j + 256], ..., None]))
        for j in range(0, len(idx), 256)])
    results[name] = (preds, labels[idx])
  return results


def attribute_halves(data_dir: str, subjects: np.ndarray) -> Optional[np.ndarray]:
  """Per image, the classes that its subject's attribute value goes with in the
  confounded benchmark (a bool row over the classes), or None when data_dir is
  not a set data_tools.synthetic wrote."""
  from data_tools import synthetic  # pylint: disable=g-import-not-at-top
  from data_tools import synthetic_subjects  # pylint: disable=g-import-not-at-top
  params = synthetic._read_params(data_dir)  # pylint: disable=protected-access
  if params is None:
    return None
  people = {s.subject_id: s for s in synthetic.make_subjects(
      int(params["num_subjects"]), int(params["seed"]),
      float(params.get("confounders", 1.0)))}
  if not set(subjects.tolist()) <= set(people):
    return None  # a manifest edited since: its people are not the generator's
  masks = {}
  for sid, person in people.items():
    favoured = synthetic_subjects.favoured_expressions(person)
    masks[sid] = np.array([e in favoured for e in contract.EXPRESSIONS])
  return np.stack([masks[s] for s in subjects])


def _recalls(preds, labels) -> str:
  parts = []
  for c, name in enumerate(contract.EXPRESSIONS):
    mask = labels == c
    if mask.any():
      parts.append(f"{name[:4]} {100.0 * np.mean(preds[mask] == c):.0f}")
  return ", ".join(parts)


def main(argv: Sequence[str]) -> None:
  del argv
  try:
    if not FLAGS.data_dir:
      raise UserError("pass --data_dir=DIR, a face set with subject ids")
    start = time.perf_counter()
    images, labels, subjects, pinned = load(FLAGS.data_dir, FLAGS.image_size)
    train, held, unseen = split(subjects, FLAGS.seed, FLAGS.unseen_fraction,
                                FLAGS.holdout_fraction, pinned)
    print(f"{len(images)} images of {len(set(subjects.tolist()))} subjects"
          f"{f' ({len(set(subjects[pinned].tolist()))} pinned)' if pinned.any() else ''}: "
          f"train {len(train)}, held-out seen {len(held)}, unseen {len(unseen)}")
    tests = {"train": train, "held-out seen": held, "unseen": unseen}
    if pinned.any():
      tests["seen pinned"] = held[pinned[held]]
      tests["seen clean"] = held[~pinned[held]]
    halves = attribute_halves(FLAGS.data_dir, subjects)
    if halves is not None:
      agrees = halves[np.arange(len(labels)), labels]
      tests["unseen, attribute's half"] = unseen[agrees[unseen]]
      tests["unseen, other half"] = unseen[~agrees[unseen]]
    results = train_and_evaluate(
        images, labels, train, tests,
        FLAGS.steps, FLAGS.batch_size, FLAGS.learning_rate, FLAGS.width, FLAGS.seed)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  acc = {k: 100.0 * float(np.mean(p == y)) for k, (p, y) in results.items()}
  for name, (p, y) in results.items():
    print(f"{name:>24}: {acc[name]:5.1f}%  (recall: {_recalls(p, y)}; {len(y)} images)")
  print(f"gap (held-out seen - unseen): {acc['held-out seen'] - acc['unseen']:.1f} "
        f"points; chance {100.0 / contract.NUM_CLASSES:.1f}%; "
        f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  flags.mark_flag_as_required("data_dir")
  app.run(main)
