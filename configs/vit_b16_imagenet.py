"""Fine-tune ViT-B/16 (ImageNet-21k) on ImageNet-2012 at 384, as in the paper.

The packaged recipe `vit_b16_imagenet` (vit_jax/config/recipes/vit_b16_imagenet.py); `--config
vit_b16_imagenet` and
`--config configs/vit_b16_imagenet.py` run the same config.
"""

from vit_jax.config.recipes.vit_b16_imagenet import get_config  # noqa: F401
