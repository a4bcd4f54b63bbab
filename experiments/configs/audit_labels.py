"""The label check's model (python -m data_tools.audit): the supervised baseline, small.

One model per fold is trained, so it is sized for minutes on a 2-core CPU: 48 px
faces, a ResNet-18 of base width 16, 2,000 steps of batch 32 (about 19 epochs of
a 3,400-image training part). It only has to recognise expressions of people it
has seen (the folds are over images). Measured on the synthetic set (one fold,
840 held-out images): 800 steps 0.54 accuracy, 2,000 steps 0.75; without
augmentation 1,200 steps reached only 0.62 (it overfits).
Override with --label_config.FIELD=VALUE, or pass another file.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.method = "baseline"
  config.image_size = 48
  config.model.width = 16
  config.train.learning_rate = 1e-3
  config.batch_size = 32
  config.eval_batch_size = 128
  config.baseline.num_steps = 2000
  config.log_every = 200
  config.checkpoint_every = 1000
  config.keep_checkpoints = 1
  return config
