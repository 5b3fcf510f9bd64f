"""A tiny ViT on an image folder, for CPU tests and smoke runs (seconds per step on a laptop).

The packaged recipe `tiny` (vit_jax/config/recipes/tiny.py); `--config tiny` and
`--config configs/tiny.py` run the same config.
"""

from vit_jax.config.recipes.tiny import get_config  # noqa: F401
