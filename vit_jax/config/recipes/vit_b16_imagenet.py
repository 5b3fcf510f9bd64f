"""Fine-tune ViT-B/16 (ImageNet-21k) on ImageNet-2012 at 384, as in the paper.

SGD momentum 0.9, batch 512, base lr 0.03, 500 warmup steps, cosine decay over
20k steps, clipping at 1. ImageNet must be prepared in a TFDS data_dir.

Memory on v3-8, as `vit-jax aot --topology v3-8 --search` chose it (libtpu
0.0.50.1): 64 images per v3 core at 384 need 16.4 GiB in float32, over the 15.5
GiB usable. bfloat16 compute (params, gradients and momentum stay float32)
needs 13.71 GiB, 11% to spare, at 0.52 s per step and 67% MFU (compiler
estimates), without remat or accumulation.

  vit-jax train --config vit_b16_imagenet --workdir gs://BUCKET/runs/imagenet \
    --config.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""

from vit_jax.config import schema


def get_config():
  c = schema.base()
  c.dataset = "imagenet2012"
  c.image_size = 384
  c.model.name = "ViT-B_16"
  c.model.dtype = "bfloat16"
  c.pretrained = "gs://vit_models/imagenet21k/ViT-B_16.npz"
  c.batch_size = 512
  c.eval_batch_size = 512
  c.base_lr = 0.03
  c.warmup_steps = 500
  c.total_steps = 20_000
  c.shuffle_buffer = 250_000
  c.eval_every = 2000
  c.checkpoint_every = 1000
  return c
