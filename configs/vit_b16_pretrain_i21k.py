"""Pre-train ViT-B/16 from scratch on ImageNet-21k at 224: the paper's TPUv3 setup.

The packaged recipe `vit_b16_pretrain_i21k` (vit_jax/config/recipes/vit_b16_pretrain_i21k.py);
`--config vit_b16_pretrain_i21k` and `--config configs/vit_b16_pretrain_i21k.py` run the
same config.
"""

from vit_jax.config.recipes.vit_b16_pretrain_i21k import get_config  # noqa: F401
