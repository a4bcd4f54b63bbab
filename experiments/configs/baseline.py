"""The supervised baseline: the same ResNet-18 trained with cross-entropy alone.

Every DICE-FER number is measured against this model (docs/design.md, "Evaluation"):
the exp_encoder trunk with a linear head on its pooled feature, trained end to end
in one stage ("baseline", `baseline.num_steps`). Everything else (data, split,
image size, width, optimiser, augmentation) is the starting config's, so a
baseline and a DICE-FER run of the same size differ only in the method.

  python -m experiments.run --config=experiments/configs/baseline.py --workdir=runs/base
  python -m experiments.run --config=experiments/configs/baseline.py:demo --workdir=...

The text after ':' names the config to start from: default (the paper's size,
also when omitted), demo, tiny or confounded (the demo on the confounded
synthetic set).
"""

from experiments.configs import confounded, default, demo, tiny

BASES = {"default": default, "demo": demo, "tiny": tiny, "confounded": confounded}


def get_config(arg: str | None = None):
  name = (arg or "default").strip()
  if name not in BASES:
    raise ValueError(f"unknown base config {name!r} for baseline.py: use one of "
                     f"{', '.join(BASES)} (e.g. experiments/configs/baseline.py:demo)")
  config = BASES[name].get_config()
  config.method = "baseline"
  return config
