"""The demo config on the confounded synthetic benchmark: a shortcut that fails on
new people.

In real FER sets (CK+, Oulu-CASIA) each person shows a few expressions in uneven
numbers, so appearance predicts the label among the training people. The
balanced synthetic set has no such shortcut: every subject shows every
expression equally often, so knowing who someone is says nothing about their
expression and removing identity cannot help. This set (data_tools/synthetic.py)
has one:
- 100 subjects, each showing 3 of the 7 expressions with uneven counts (30
  images per subject, split by a seeded Dirichlet);
- a confounded cohort of 60 subjects, pinned to training (split=train), in
  which glasses or long hair go with anger, disgust, fear and sadness and their
  absence with neutral, happiness and surprise (attribute strength 1: only);
- a clean cohort of 40 subjects who show expressions regardless of the
  attribute. The 5 subject-held-out folds are over the clean cohort only (8 test
  subjects each; dicefer_jax.splits, kind `subject_pinned`), so every fold
  trains on the 60 confounded plus 32 clean subjects and tests on 8 clean ones.

A classifier that leans on the attribute scores well on held-out images of its
training subjects and worse on the clean test subjects; DICE-FER's claim is that
removing identity closes that gap. Compare with the demo config on the balanced
set:

  python -m experiments.run --config=experiments/configs/confounded.py --workdir=...
  python -m experiments.run --config=experiments/configs/baseline.py:confounded \
      --workdir=...

Everything else is experiments/configs/demo.py.
"""

from experiments.configs import demo


def get_config():
  config = demo.get_config()
  config.synthetic.num_subjects = 100
  config.synthetic.images_per_cell = 10
  config.synthetic.expressions_per_subject = 3
  config.synthetic.attribute_strength = 1.0
  # 40 clean subjects: 8 per test fold at num_folds = 5.
  config.synthetic.clean_fraction = 0.4
  return config
