"""Today's ViT training on the demo's digits, every piece on, in under two minutes on a CPU.

RandAugment(2, 10), mixup and CutMix with a switch, random erasing, stochastic depth, the
sin-cos position embedding with global average pooling, Adam with its first moment in
bfloat16 and decoupled weight decay, layer-wise lr decay, an EMA of the params (what
final.npz holds), and a second evaluation set, on a small ViT trained from scratch on the
digits `vit-jax demo` writes (run the demo first, or point --config.folder at any image
folder):

  vit-jax demo && vit-jax train --config digits_regularised --workdir runs/digits
"""

from vit_jax.config import schema


def get_config():
  c = schema.base()
  c.dataset = "folder"
  c.folder = "demo-run/digits/a"
  c.evals = (("train_sample", None, "train[:10%]", None),)  # as big_vision's train[:2%]
  c.image_size = 16
  c.model.name = None
  c.model.update(dict(hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4, patch_size=4))
  c.model.classifier = "gap"
  c.model.posemb = "sincos2d"
  c.model.drop_path_rate = 0.1
  c.augment.inception_crop = False
  c.augment.hflip = 0.0  # digits are not mirror images
  c.augment.randaug_layers = 2
  c.augment.randaug_magnitude = 10.0
  c.augment.mixup_alpha = 0.2
  c.augment.cutmix_alpha = 1.0
  c.augment.mix_switch_prob = 0.5
  c.augment.erase_prob = 0.25
  c.optimizer = "adam"
  c.mu_dtype = "bfloat16"
  c.base_lr = 3e-3
  c.weight_decay = 0.05
  c.layer_decay = 0.8
  c.ema_decay = 0.99
  c.export_params = "ema"
  c.batch_size = 128
  c.eval_batch_size = 128
  c.warmup_steps = 50
  c.total_steps = 400
  c.shuffle_buffer = 2_000
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 200
  c.best_metric = "accuracy"
  return c
