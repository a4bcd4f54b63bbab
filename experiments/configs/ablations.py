"""DICE-FER with one or more ingredients switched off, for ablation studies.

  python -m experiments.run --config=experiments/configs/ablations.py:demo,no_swap \
      --workdir=runs/no_swap

The text after ':' is a comma-separated list: at most one base config (default,
demo, tiny or confounded; default when omitted) and any number of ablation names from
ABLATIONS. `experiments.protocol --ablations=...` uses the same table.

Note: mu and nu weight the global and local MI terms of BOTH stage 1 and stage 2
(one `loss` block), so no_global / no_local remove that critic from both stages.
"""

from dicefer_jax import config_fields
from experiments.configs import confounded, default, demo, tiny

BASES = {"default": default, "demo": demo, "tiny": tiny, "confounded": confounded}

# Ablation name -> config overrides (dotted field -> value).
ABLATIONS = {
    # Score M with its own code (I(M; z_M) + I(N; z_N)): identity is rewarded too.
    "no_swap": {"loss.swap": False},
    # No L1 pull between the codes of a pair.
    "delta0": {"loss.delta": 0.0},
    # No local (feature-map) critic; global critic only.
    "no_local": {"loss.nu": 0.0},
    # No global critic; local critic only.
    "no_global": {"loss.mu": 0.0},
    # Stage 2 trains E_id without the adversarial term (zeta = 0).
    "no_adversarial": {"loss.zeta": 0.0},
    # No stage 2 at all: stage 3 starts from stage 1 (z_id stays untrained).
    "no_stage2": {"stage2.num_steps": 0},
}


# What an ablation can change. The ones that act on stage 2 only leave E_exp as
# stage 1 left it, and stage 3 then trains the same classifier on the same codes
# with the same seed: accuracy, macro-F1, the expression code's leakage and
# retrieval and its pair MI are those of DICE-FER by construction. They are
# reported on what they can move (the identity code and the MIG); None = every
# metric.
MOVES = {
    "no_adversarial": ("mig", "exp_id_mi", "leakage_id"),
    "no_stage2": ("mig", "exp_id_mi", "leakage_id"),
}


def apply(config, name: str):
  """config with the ablation `name` applied (in place); returns config."""
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}: use one of {', '.join(ABLATIONS)}")
  for field, value in ABLATIONS[name].items():
    config_fields.set_field(config, field, value)
  return config


def get_config(arg: str | None = None):
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  bases = [t for t in tokens if t in BASES]
  if len(bases) > 1:
    raise ValueError(f"ablations.py takes one base config, got {', '.join(bases)}")
  config = BASES[bases[0] if bases else "default"].get_config()
  config.method = "dicefer"
  for name in tokens:
    if name not in BASES:
      apply(config, name)
  return config
