"""A small CPU demo: the three DICE-FER stages on the synthetic set in ~10 minutes.

Differs from the paper's config in size (64 px images, a ResNet-18 of base width
16 with the same depth and topology, fewer steps, lr 1e-3) and in one choice:
E_exp starts from a short supervised warm-up (`stage1.init_from = "baseline"`)
instead of random weights. From random weights, stage 1's cross-MI did not leave
zero within this budget on the synthetic set (see README, "Notes on the method").
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.image_size = 64
  config.model.width = 16
  config.model.critic_hidden = 256
  config.model.disc_hidden = 256
  config.train.learning_rate = 1e-3
  config.baseline.num_steps = 1500
  config.stage1.init_from = "baseline"
  config.stage1.num_steps = 1000
  config.stage2.num_steps = 300
  config.stage3.num_steps = 600
  config.log_every = 100
  config.checkpoint_every = 250
  return config
