"""Pre-train ViT-B/16 from scratch on ImageNet-21k at 224: the paper's TPUv3 setup.

The hyper-parameters of the released ImageNet-21k checkpoints, as the original
repository's maintainers stated them (google-research/vision_transformer, issue #2):
Adam, batch 4096, base lr 1e-3, 10k warmup steps, linear decay ending at 1e-5,
dropout 0.1, 90 epochs, weight decay 0.03, representation_size 768 (the
pre_logits layer), head bias initialised to -10. From the paper: Adam's b1 0.9
and b2 0.999, clipping at global norm 1.

The loss is a sigmoid cross-entropy over the 21,843 classes, as in big_vision's
ImageNet-21k recipe (big_vision/configs/vit_i21k.py: loss 'sigmoid_xent',
init_head_bias -10); the -10 bias starts every class near probability 0.

Weight decay: optax's `adamw` subtracts lr * 0.03 * param each step, which is
what the original code's optimizer did with weight_decay 0.03 (the Adam of
flax's retired optim package: `new_param -= learning_rate * weight_decay *
param`). That optimizer decayed every parameter; here only kernels decay (not
biases, norms or embeddings).

Memory: 512 images per v3 core at 224 do not fit in 16 GiB with float32
activations. Two levers, both on: bfloat16 compute (params and optimizer state
stay float32; halves activation memory, no extra FLOPs) and rematerialised
blocks (keeps only each block's input; costs about one more forward pass, i.e.
roughly 4/3 of the FLOPs of a plain step). `vit-jax aot --topology v3-8`
reports the fit. accum_steps is the third lever if a model still does not fit.

  vit-jax train --config vit_b16_pretrain_i21k --workdir gs://BUCKET/runs/i21k \
    --config.tfds_data_dir=gs://BUCKET/tensorflow_datasets
"""
from vit_jax import configs


def get_config():
  c = configs.base()
  c.dataset = "imagenet21k"
  c.train_split = "full[:99%]"
  c.eval_split = "full[99%:]"
  c.image_size = 224
  c.model.name = "ViT-B_16"
  c.model.representation_size = 768
  c.model.dropout_rate = 0.1
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.pretrained = None
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.optimizer = "adam"
  c.base_lr = 1e-3
  c.weight_decay = 0.03
  c.warmup_steps = 10_000
  c.decay_type = "linear"
  c.end_lr = 1e-5
  c.loss = "sigmoid_xent"
  c.model.head_bias_init = -10.0
  c.total_steps = 300_000  # about 90 epochs of ImageNet-21k's 14M images
  c.shuffle_buffer = 250_000
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  return c
