"""Fine-tune ViT-B/16 at 224 on your own images: ROOT/{train,val,test}/{class_name}/*.jpg.

The packaged recipe `vit_folder` (vit_jax/config/recipes/vit_folder.py); `--config vit_folder` and
`--config configs/vit_folder.py` run the same config.
"""

from vit_jax.config.recipes.vit_folder import get_config  # noqa: F401
