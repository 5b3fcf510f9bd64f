"""`python -m vit_jax`: the `vit-jax` command."""

import sys

from vit_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
