r"""How well and how fast the audit finds known problems: precision and recall per
finding kind on a synthetic set with planted problems.

Plants blurred, dark, over-exposed and black frames, off-centre and cut-off
crops, exact, near and cross-label duplicates and swapped labels into a copy of
the built-in synthetic set (data_tools.audit.planting, about 1.5% of the images
each), runs the whole audit (`data_tools.audit`, every check, default
thresholds and label model) and scores its findings. Writes a JSON with the
scores, the audit's timings and the machine, and a Markdown table generated
from it (the README's table is that file).

Usage:
  python benchmarks/audit_planted.py --json=docs/audit_planted.json \
      --markdown=docs/audit_planted.md
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dicefer_jax import environment  # noqa: F401  pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_tools import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_tools.audit import auditor, planting  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_tools.audit import findings as F  # pylint: disable=g-import-not-at-top,wrong-import-position
from dicefer_jax import data as data_lib, fileio  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import audit_labels, default  # pylint: disable=g-import-not-at-top,wrong-import-position

_JSON = flags.DEFINE_string("json", None, "Write the results here (JSON).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table here (Markdown).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Where the planted copy goes "
                                "(default: a new temporary folder, kept).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the planting.")
_MACHINE_NOTE = flags.DEFINE_string("machine_note", "", "How busy the machine was.")


def markdown_table(result: dict) -> str:
  """The README's table, from the JSON's fields only."""
  lines = ["| finding kind | planted | found | precision | recall | precision of the top N |",
           "|---|---:|---:|---:|---:|---:|"]
  for kind, s in result["scores"].items():
    def pct(v):
      return "n/a" if v is None else f"{100 * v:.1f}%"
    lines.append(f"| {kind} | {s['planted']} | {s['found']} | {pct(s['precision'])} "
                 f"| {pct(s['recall'])} | {pct(s['top_precision'])} |")
  t = result["audit"]["timings_s"]
  lines.append("")
  lines.append(f"{result['num_images']} images ({result['num_planted_images']} planted), "
               f"audit wall time {result['audit_wall_s']:.0f} s "
               f"(read+measure+hash {t.get('read_measure_hash_s', 0):.0f} s, duplicates "
               f"{t.get('duplicates_s', 0):.0f} s, framing {t.get('framing_s', 0):.0f} s, "
               f"labels {t.get('label_s', 0):.0f} s) on {result['machine']['cpu']} "
               f"({result['machine']['cores']} cores{', ' + result['machine']['note'] if result['machine']['note'] else ''}). "
               + " ".join(result["audit"]["notes"]))
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = default.get_config()
  s = config.synthetic
  clean = synthetic.ensure_synthetic(
      os.path.join(data_lib.cache_root(config),
                   f"synthetic_n{s.num_subjects}_k{s.images_per_cell}_seed{s.seed}"),
      s.num_subjects, s.images_per_cell, s.seed)
  work = _WORK_DIR.value or tempfile.mkdtemp(prefix="audit_planted_")
  faces = os.path.join(work, "faces")
  planted = planting.plant_problems(clean, faces, seed=_SEED.value)
  started = time.perf_counter()
  result = auditor.run_audit(faces, auditor.AuditSettings(), audit_labels.get_config())
  wall = time.perf_counter() - started
  scores = planting.score_findings(result.findings, planted)
  out = dict(
      command=" ".join(["python"] + sys.argv), data=clean, planted_copy=faces,
      num_images=result.summary["num_images"],
      num_planted_images=len({p.path for p in planted}),
      planted_per_problem={p: sum(1 for q in planted if q.problem == p)
                           for p in planting.PROBLEMS},
      scores=scores, audit_wall_s=wall, audit=result.summary,
      machine=dict(cpu=benchmark.machine_info()["cpu_model"], cores=fileio.default_workers(),
                   note=_MACHINE_NOTE.value),
      date=time.strftime("%Y-%m-%d"))
  print(json.dumps(fileio.json_safe(scores), indent=1))
  print(markdown_table(out))
  if _JSON.value:
    fileio.write_json_atomic(_JSON.value, out)
  if _MARKDOWN.value:
    fileio.write_text_atomic(_MARKDOWN.value, markdown_table(out))


if __name__ == "__main__":
  app.run(main)
