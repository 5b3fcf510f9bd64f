"""A tiny ViT on an image folder, for CPU tests and smoke runs (seconds per step on a laptop).

vit-jax train --config tiny --workdir /tmp/tiny --config.folder=/path/to/ROOT
"""

from vit_jax.config import schema


def get_config():
  c = schema.base()
  c.dataset = "folder"
  c.folder = "/path/to/ROOT"
  c.image_size = 32
  c.model.name = None  # not a published variant: every field is given
  c.model.update(dict(hidden_size=64, mlp_dim=128, num_heads=2, num_layers=2, patch_size=8))
  c.batch_size = 16
  c.eval_batch_size = 16
  c.base_lr = 0.05
  c.warmup_steps = 2
  c.total_steps = 20
  c.shuffle_buffer = 256
  c.log_every = 5
  c.eval_every = 10
  c.checkpoint_every = 10
  c.async_checkpointing = False
  return c
