"""A small CPU demo: the full three-stage method on the synthetic set in minutes.

Differs from the paper's config only in size: 64 px images, a ResNet-18 of base
width 16 (same depth and topology), fewer steps.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.image_size = 64
  config.model.width = 16
  config.model.critic_hidden = 256
  config.model.disc_hidden = 256
  config.train.learning_rate = 1e-3
  config.stage1.num_steps = 1500
  config.stage2.num_steps = 300
  config.stage3.num_steps = 600
  config.baseline.num_steps = 1500
  config.log_every = 50
  config.checkpoint_every = 250
  return config
