"""The default training config that every recipe in `configs/` starts from.

Each field is overridable on the command line (`--config.base_lr=0.01`).
Fields that may be unset are placeholders with a type, so that overrides parse.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data (input_pipeline.py).
  c.dataset = "cifar10"            # a TFDS name, 'folder' or 'multilabel'
  c.tfds_data_dir = config_dict.placeholder(str)
  c.folder = config_dict.placeholder(str)           # ROOT/{train,val,test}/{class}/*.jpg
  c.multilabel_file = config_dict.placeholder(str)  # CSV/JSON of path,labels
  c.multilabel_root = config_dict.placeholder(str)
  c.train_split = config_dict.placeholder(str)      # None: the dataset's preset
  c.eval_split = config_dict.placeholder(str)
  c.test_split = config_dict.placeholder(str)
  c.image_size = 384
  c.eval_crop = False              # False: plain resize, as the original evaluation
  c.shuffle_buffer = 50_000
  c.augment = ml_collections.ConfigDict(dict(
      inception_crop=True, hflip=True, vflip=0.0, rot90=0.0, rrc_prob=0.0, rrc_scale=(0.05, 1.0),
      mixup_alpha=0.0))
  c.balance_classes = False
  c.prefetch = 2                   # batches kept ahead on the devices
  c.data_threads = config_dict.placeholder(int)     # tf.data threads; None: all CPUs
  c.tfds_image_key, c.tfds_label_key = "image", "label"
  c.tfds_cycle_length = 16         # TFDS shards read at once
  c.num_classes = config_dict.placeholder(int)      # multi-label lists without a class list
  # Batches: global sizes, split over all devices and hosts.
  c.batch_size = 512
  c.eval_batch_size = 512
  c.accum_steps = 1                # micro-batches per step, accumulated inside the jitted step
  c.seed = 0
  # Model (models.create_model overrides).
  c.model = ml_collections.ConfigDict(dict(
      name="ViT-B_16", dtype="float32", param_dtype="float32", remat=False,
      remat_policy="nothing_saveable", scan=False, dropout_rate=0.0, attention_dropout_rate=0.0,
      gelu_approximate=True, representation_size=config_dict.placeholder(int),
      head_bias_init=0.0))
  c.pretrained = config_dict.placeholder(str)  # original-layout .npz, local or gs://
  c.reset_head = True
  # Optimizer (optim.py): the paper's fine-tuning recipe by default.
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.b1, c.b2 = 0.9, 0.999
  c.weight_decay = 0.0
  c.base_lr = 0.03
  c.warmup_steps = 500
  c.total_steps = 10_000
  c.decay_type = "cosine"
  c.end_lr = 0.0                   # the learning rate the decay ends at (cosine and linear)
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.loss = "auto"                  # softmax_xent, sigmoid_xent; auto: sigmoid for multi-label data
  # Devices: all on `data` (pure data parallel); see sharding.py.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # Loop.
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.best_metric = "loss"           # or 'accuracy', 'macro_f1', 'mAP', ...
  return c
