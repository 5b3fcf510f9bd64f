"""Fine-tune ViT-B/16 at 224 on your own images: ROOT/{train,val,test}/{class_name}/*.jpg.

Class names (sorted folder names) are written to WORKDIR/labels.txt for
`vit-jax predict --labels`. Augmentations for histology-like data are shown
commented out; class-balanced oversampling is on for imbalanced folders.

  vit-jax train --config vit_folder --workdir runs/mydata \
    --config.folder=/data/mydata --config.pretrained=ViT-B_16.npz
"""

from vit_jax.config import schema


def get_config():
  c = schema.base()
  c.dataset = "folder"
  c.folder = "/path/to/ROOT"
  c.image_size = 224
  c.model.name = "ViT-B_16"
  c.pretrained = "gs://vit_models/imagenet21k/ViT-B_16.npz"
  c.batch_size = 128
  c.eval_batch_size = 128
  c.base_lr = 0.01
  c.warmup_steps = 200
  c.total_steps = 5_000
  c.shuffle_buffer = 10_000
  c.balance_classes = True
  c.best_metric = "macro_f1"
  # Histology-style (e.g. Chaoyang): each with p=0.5.
  # c.augment.inception_crop = False; c.augment.vflip = 0.5; c.augment.rot90 = 0.5
  # c.augment.rrc_prob = 0.5; c.augment.rrc_scale = (0.5, 1.0)
  c.eval_every = 500
  c.checkpoint_every = 500
  return c
