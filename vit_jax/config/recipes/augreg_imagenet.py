"""Fine-tune an AugReg ImageNet-21k checkpoint on ImageNet-1k: the recommended AugReg fine-tunes.

`--config augreg_imagenet:B_16` (the default) and the other variants the AugReg table
recommends (Ti_16, S_16, S_32, B_32, B_16, B_8, L_16, R_Ti_16, R26_S_32, R50_L_32). The
values come from the checkpoint names and the original repository (google-research/
vision_transformer):
- what each upstream file is pre-trained with, and which fine-tune of it the README's table
  recommends, from the table (`vit-jax checkpoints` lists both as NAME/augreg and
  NAME/augreg+i1k-384, or -224 for B_8);
- 20k steps at the learning rate and resolution that the recommended fine-tune's file name
  records (`--imagenet2012-steps_20k-lr_0.03-res_384`: lr 0.03 for B/16);
- batch 512: "adapt_steps: Number of steps used for fine-tuning (with a fixed batch size
  of 512)" (vit_jax/checkpoint.py there);
- SGD momentum 0.9, clipping at 1, 500 warmup steps, cosine decay to 0, no weight decay,
  `train[:99%]`, evaluation on validation with a plain resize (vit_jax/configs/common.py
  and train.py there; AugReg's own regularisation off: "No AugReg during fine-tuning",
  vit_jax/configs/augreg.py);
- Inception crop and flip for training (vit_jax/input_pipeline.py there).
The README's top-1 for the recommended fine-tune is what to compare with (`vit-jax
checkpoints --filter augreg`), e.g. 85.49% for B/16.

  vit-jax train --config augreg_imagenet:B_16 --workdir gs://BUCKET/runs/augreg_b16 \\
    --config.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""

from vit_jax import errors
from vit_jax.config import schema

# The README's recommended fine-tune of each upstream file: (model, lr, resolution), as its
# name records them (`...--imagenet2012-steps_20k-lr_0.03-res_384`); the registry lists the
# same files (tests/test_configs.py keeps the two equal).
RECOMMENDED = {
  "Ti_16": ("ViT-Ti_16", 0.03, 384),
  "S_16": ("ViT-S_16", 0.03, 384),
  "S_32": ("ViT-S_32", 0.01, 384),
  "B_32": ("ViT-B_32", 0.01, 384),
  "B_16": ("ViT-B_16", 0.03, 384),
  "B_8": ("ViT-B_8", 0.03, 224),
  "L_16": ("ViT-L_16", 0.01, 384),
  "R_Ti_16": ("R+ViT-Ti_16", 0.03, 384),
  "R26_S_32": ("R26+ViT-S_32", 0.01, 384),
  "R50_L_32": ("R50+ViT-L_32", 0.01, 384),
}


def get_config(variant: str = "B_16"):
  if variant not in RECOMMENDED:
    raise errors.ConfigError(f"augreg_imagenet:{variant}: one of {', '.join(RECOMMENDED)}")
  model, lr, res = RECOMMENDED[variant]
  c = schema.base()
  c.dataset = "imagenet2012"
  c.train_split = "train[:99%]"
  c.eval_split = "train[99%:]"
  c.test_split = "validation"
  c.image_size = res
  c.model.name = model
  c.pretrained = f"{model}/augreg"
  c.batch_size = 512
  c.eval_batch_size = 512
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.accumulator_dtype = "bfloat16"  # the original's optim_dtype
  c.base_lr = lr
  c.warmup_steps = 500
  c.decay_type = "cosine"
  c.grad_clip_norm = 1.0
  c.total_steps = 20_000
  c.model.dtype = "bfloat16"
  c.eval_every = 2_000
  c.checkpoint_every = 1_000
  c.best_metric = "accuracy"
  return c
