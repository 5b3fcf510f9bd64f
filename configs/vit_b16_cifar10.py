"""Fine-tune ViT-B/16 (ImageNet-21k) on CIFAR-10 at 384: the paper's fine-tuning recipe.

The packaged recipe `vit_b16_cifar10` (vit_jax/config/recipes/vit_b16_cifar10.py); `--config
vit_b16_cifar10` and
`--config configs/vit_b16_cifar10.py` run the same config.
"""

from vit_jax.config.recipes.vit_b16_cifar10 import get_config  # noqa: F401
