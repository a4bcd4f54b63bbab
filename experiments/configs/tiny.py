"""Smoke-test size: the demo config shrunk until 3 stages take seconds on 2 cores.

Used by the test suite; also handy to check an installation end to end:
  python -m experiments.run --config=experiments/configs/tiny.py --workdir=/tmp/t
"""

from experiments.configs import demo


def get_config():
  config = demo.get_config()
  config.synthetic.num_subjects = 12
  config.synthetic.images_per_cell = 2
  config.image_size = 32
  config.model.width = 4
  config.model.exp_dim = 8
  config.model.id_dim = 8
  config.model.critic_hidden = 16
  config.model.disc_hidden = 16
  config.model.classifier_hidden = (16,)
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_folds = 3
  config.stage1.num_steps = 6
  config.stage2.num_steps = 4
  config.stage3.num_steps = 4
  config.baseline.num_steps = 6
  config.stage1.init_from = ""   # tests run the method as written; the warm-up has its own test
  # Cheap critics and probes: on a tiny test split a third of the images per
  # part still leaves pairs in every part.
  config.eval.mig.num_seeds = 2
  config.eval.mig.num_steps = 50
  config.eval.mig.heldout_fraction = 1 / 3
  config.eval.mig.validation_fraction = 0.5
  config.eval.probe_max_images = 200
  config.eval.tsne_max_points = 40
  config.log_every = 2
  config.checkpoint_every = 3
  return config
