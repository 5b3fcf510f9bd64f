"""`python -m vit_jax`: the `vit-jax` command."""
import sys

from vit_jax import cli

sys.exit(cli.main())
