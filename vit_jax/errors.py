"""The project's user errors: a mistake in what was given, told in one line.

The command line prints these on one line and exits 2; any other exception is a
bug and shows its traceback. Each also derives from the built-in it refines
(ValueError, FileNotFoundError, ...), so code catching those still works.
"""


class UserError(Exception):
  """A mistake in a config, an option, a file, a dataset or a checkpoint the user gave."""


class ConfigError(UserError, ValueError):
  """A config key, command-line option or argument that cannot work."""


class DataError(UserError, ValueError):
  """A dataset, folder, list or labels file that cannot be read as what it should be."""


class MissingFileError(UserError, FileNotFoundError):
  """A path that does not exist, or is not the kind of file expected."""


class MissingExtraError(UserError, ImportError):
  """A command whose optional dependencies are not installed."""

  def __init__(self, extra: str, module: str):
    super().__init__(
      f"{module} is not installed; this command needs pip install 'vit-jax[{extra}]'"
    )


class CheckpointError(UserError, ValueError):
  """A checkpoint file that cannot be read, or does not fit the model."""
