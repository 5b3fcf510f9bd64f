"""The `vit-jax` subcommands' flags and what each runs (`vit_jax.cli` has the table and
`main`). Each imports its library when it runs, for the start-up time `cli.py`'s docstring gives.
"""
