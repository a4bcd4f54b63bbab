"""The paper's settings: ResNet-18 at 112 px, Adam 1e-4, batch 32 (docs/design.md).

Every field can be overridden on the command line, e.g. `--config.batch_size=64`
or `--config.loss.zeta=0.025`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # 'dicefer' trains stages 1-3; 'baseline' trains the same ResNet-18 with
  # cross-entropy only (one stage, `baseline`).
  config.method = "dicefer"
  config.seed = 0

  # Data: a directory in the on-disk contract, or "" for the built-in synthetic set.
  config.data_dir = ""
  config.synthetic = ml_collections.ConfigDict(dict(
      num_subjects=60, images_per_cell=10, seed=0,
      # The confounded benchmark (data_tools/synthetic.py; configs/confounded.py),
      # off by default: expressions each subject shows (7 = all, images_per_cell
      # each), how strongly an appearance attribute picks the expressions of a
      # confounded cohort (0 = off), and the share of subjects in the clean cohort
      # that the folds test (the rest always train).
      expressions_per_subject=7, attribute_strength=0.0, clean_fraction=0.4,
      # Where the synthetic set is written once and reused; "" = ~/.cache/dicefer_jax.
      cache_dir=""))
  # "files": decode the PNGs of the manifest directly (fastest); "tfds": read the
  # same split through the `dicefer_faces` TFDS builder (prepared once into
  # tfds_dir, "" = <cache>/tfds).
  config.data_source = "files"
  config.tfds_dir = ""
  # A set whose decoded images (N x image_size^2 bytes) exceed this many MiB is
  # decoded once into a file under the cache and read from disk by index (e.g.
  # AffectNet: ~420,000 faces, ~5 GB at 112 px); smaller sets stay in memory.
  # 0 = always read from disk. The batches are the same either way.
  config.stream_above_mb = 2048
  config.image_size = 112
  # Subject-held-out k-fold (stratified when subjects are unknown; a manifest with
  # an official split column uses that instead).
  config.num_folds = 5
  config.fold = 0
  config.split_seed = 0
  # Share of each training subject's images held out of training, to measure
  # accuracy on seen people beside unseen ones (the seen-vs-unseen gap in
  # eval/metrics.json); 0 = every training image trains.
  config.seen_holdout = 0.0
  config.augment = ml_collections.ConfigDict(dict(max_rotation_degrees=15.0, flip=True))

  config.model = ml_collections.ConfigDict(dict(
      width=64,             # ResNet-18 base width (64 = the real ResNet-18)
      exp_dim=64,           # z_exp
      id_dim=64,            # z_id
      # Which trunk stage (1-4) the critics score: the local ones its map, the
      # global ones its globally pooled map (4 = f, whose Dense is the code).
      # Earlier stages were measured on the demo and not adopted: stage 1's
      # cross-MI and test accuracy fell (0.59 at 4/4, 0.55 at 3/3, 0.39 at 2/2),
      # z_id did not gain held-out identity, and stage 2 trained E_id to make
      # z_id linear in the earlier map too (benchmarks/identity_code_control.py).
      local_stage=4,
      global_stage=4,
      # Stage 2's critics: whose map they score, "id_encoder" (E_id's own, as in
      # Deep InfoMax) or "exp_encoder" (the frozen E_exp's, which E_id cannot
      # shape), and at which trunk stage (1-4; 0 = local_stage / global_stage).
      # Measured over 5 folds of each synthetic set (README, "What stage 2's
      # critics see"): on E_id's own last-stage map, stage 2 lowered z_id's
      # held-out identity below an untrained E_id's (0.82 against 0.92 balanced,
      # 0.71 against 0.87 confounded); on E_exp's stage-3 map it stayed near that
      # level (0.88, 0.89). E_exp's stage-2 map did as well and costs 19% more
      # FLOPs per stage-2 step at 112 px.
      id_critic_input="exp_encoder",
      id_critic_stage=3,
      normalize_code=False,  # batch-standardise z (BatchNorm without scale or bias)
      # The MI critics' form, every stage: "concat" (an MLP on concat[x, z], as in
      # MINE and Deep InfoMax's global critic) or "separable" (<g(x), h(z)>, two
      # MLPs and a dot product). From random weights, at demo size, only
      # separable critics with loss.estimator="infonce" got stage 1 off 0 nats:
      # on the confounded set, and on the balanced one with loss.delta=0
      # (README, "Warm start").
      critic="concat",
      critic_hidden=512,
      disc_hidden=512,
      classifier_hidden=(256,),
      classifier_dropout=0.0,
      # bfloat16 ResNet trunks (GPU/TPU); parameters, optimizer state, BatchNorm
      # statistics, critics and losses stay float32 (dicefer_jax/models.py).
      half_precision=False,
  ))

  config.loss = ml_collections.ConfigDict(dict(
      mu=0.5,      # weight of global MI terms
      nu=1.0,      # weight of local MI terms
      delta=0.1,   # L1 pull between the codes of a pair (stage 1)
      zeta=0.01,   # adversarial weight (stage 2); the literature uses 0.01-0.025
      swap=True,   # score M with z_N and N with z_M (stage 1)
      # The MI objective stages 1 and 2 maximise: "dv" (Donsker-Varadhan, as in
      # the method), "jsd" (Deep InfoMax's Jensen-Shannon form) or "infonce".
      # The logged mi_global / mi_local are the DV estimate whatever it is.
      estimator="dv",
  ))

  config.batch_size = 32
  config.eval_batch_size = 128
  config.train = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      disc_learning_rate=0.0,  # 0 = same as learning_rate
      adam_b1=0.9,
      adam_b2=0.999,
      grad_clip_norm=0.0,      # 0 = no clipping
      disc_steps=1,            # discriminator updates per encoder update (stage 2)
  ))
  # init_from: "" starts E_exp from random weights (the method as written);
  # "baseline" first trains the supervised baseline in the same workdir and starts
  # E_exp from it, like starting from a pretrained backbone; a path to a trunk
  # .npz (python -m data_tools.torchvision_resnet, from a torchvision resnet18
  # .pth; model.width=64) starts the trunks of E_exp and E_id from it.
  config.stage1 = ml_collections.ConfigDict(dict(num_steps=20000, init_from=""))
  config.stage2 = ml_collections.ConfigDict(dict(num_steps=10000))
  config.stage3 = ml_collections.ConfigDict(dict(num_steps=5000))
  config.baseline = ml_collections.ConfigDict(dict(num_steps=20000))

  # Evaluation (experiments.evaluate, experiments.protocol): what the
  # disentanglement metrics cost. Changing these re-evaluates, never retrains.
  config.eval = ml_collections.ConfigDict(dict(
      # DV critics of the modified MIG's terms (dicefer_jax.evaluation.mi_estimation).
      # calibrate: also measure the critic's error on Gaussians of known MI at the
      # terms' sizes (6 more critics); bootstrap_resamples: resamples of the
      # held-out images behind the 95% intervals (0 = none).
      mig=dict(hidden=64, num_hidden_layers=2, num_steps=300, batch_size=128,
               learning_rate=1e-3, num_seeds=3, heldout_fraction=0.4,
               validation_fraction=0.25, pairs_per_image=4, eval_permutations=10,
               pca_dim=64, calibrate=True, bootstrap_resamples=200),
      probe_max_images=2000,     # test images of the identity-leakage probe (and
                                 # training images its PCA is fitted on)
      probe_test_fraction=0.5,   # share of each subject's images testing the probe
      probe_pca_dim=64,          # principal components of the like-for-like probe
                                 # (z_exp's width; capped by the narrowest code)
      retrieval_k=6,             # neighbours per query in cross-subject retrieval
      retrieval_metric="cosine",  # or "euclidean"
      tsne_max_points=1000,      # test images in the t-SNE maps; 0 = none
      seed=0,                    # seed of the evaluation's subsamples and splits
  ))

  config.log_every = 100
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  # Multi-host: join a jax.distributed job at start-up (TPU pod slices, SLURM,
  # Open MPI and Kubernetes are detected; elsewhere see dicefer_jax.environment).
  # Every process feeds its rows of the same global batches, so results do not
  # depend on it.
  config.distributed = False
  return config
