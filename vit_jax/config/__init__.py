"""Configs: the schema of every key (`schema`), the recipes that ship (`recipes`), and the
`--config RECIPE_OR_FILE [--config.key=value ...]` arguments (`config_args`)."""
