"""The `vit-jax` command line: one subcommand per job, each a thin layer over the library.

Each subcommand imports its library when it runs, inside its function, not at the top of this
module: `vit-jax --help` and `vit-jax checkpoints` then start without JAX, TensorFlow or
ml_collections. Measured on an AMD EPYC (2 cores, jax 0.12.0.1), `vit-jax --help` takes
0.41 s (the least of 15 runs), of which 0.22 s import this module; with its imports at the
top, importing the libraries every subcommand uses (JAX, Flax, Orbax, TensorFlow, PyTorch)
took 11.6 s on the same machine, under load.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from collections.abc import Sequence

from vit_jax import errors
from vit_jax.commands import apps
from vit_jax.commands import runs
from vit_jax.config import config_args
from vit_jax.platform import jax_setup


def _add_config_help(p: argparse.ArgumentParser) -> None:
  # Handled in main() before parsing, so that it needs no other argument.
  p.add_argument(
    "--help-config",
    action="store_true",
    help="print every config key (type, value, meaning) and exit",
  )


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: its flags, what it runs, and what it needs from main()."""

  add: Callable[[argparse.ArgumentParser], None]  # its flags
  run: Callable[[argparse.Namespace], int]
  help: str
  description: str
  config: str = "none"  # "required", "optional" (predict: a dataset split) or "none"
  cpu_only: bool = False  # never touches an accelerator
  keeps_programs: bool = True  # compiles, so keeps compiled programs between runs
  extra: tuple[str, tuple[str, ...]] | None = None  # (pip extra, modules it provides)


COMMANDS: dict[str, Command] = {
  "predict": Command(
    apps.add_predict,
    apps.run_predict,
    "classify image files with a checkpoint",
    "Prints the top-k labels of each image. The model is read off the checkpoint unless "
    "--model is given.",
    config="optional",
  ),
  "explain": Command(
    apps.add_explain,
    apps.run_explain,
    "draw where the model looks: attention maps over images",
    "Writes each image with its attention map (rollout, or the last layer's per head) as "
    "DIR/<image-stem>.png, titled with the top labels; --json prints the maps.",
    extra=("explain", ("matplotlib",)),
  ),
  "fewshot": Command(
    runs.add_fewshot,
    runs.run_fewshot,
    "the paper's few-shot linear accuracy of a checkpoint",
    "vit-jax fewshot --config RECIPE_OR_FILE --checkpoint CKPT [--shots 1,5,10,25]: ridge "
    "regression on frozen features, k training images per class, scored on the test split.",
    config="required",
  ),
  "checkpoints": Command(
    apps.add_checkpoints,
    apps.run_checkpoints,
    "list the public checkpoints by name",
    "Names accepted wherever a checkpoint path is (--checkpoint, convert, config.pretrained); "
    "a name's file is downloaded once into the cache.",
    cpu_only=True,
    keeps_programs=False,
  ),
  "convert": Command(
    apps.add_convert,
    apps.run_convert,
    "convert between .npz and a Hugging Face PyTorch directory",
    "SRC .npz (or gs://) -> DST transformers directory, or SRC transformers directory -> "
    "DST .npz in the original layout.",
    keeps_programs=False,
    extra=("torch", ("torch", "transformers", "safetensors")),
  ),
  "train": Command(
    runs.add_train,
    runs.run_train,
    "fine-tune or train as a config says; rerun to resume",
    "vit-jax train --config RECIPE_OR_FILE --workdir DIR [--config.key=value ...]",
    config="required",
  ),
  "eval": Command(
    runs.add_eval,
    runs.run_eval,
    "evaluate a checkpoint on a dataset split",
    "vit-jax eval --config RECIPE_OR_FILE --checkpoint CKPT [--split test]",
    config="required",
  ),
  "aot": Command(
    runs.add_aot,
    runs.run_aot,
    "compile a config's steps for a TPU topology, without a TPU",
    "vit-jax aot --config RECIPE_OR_FILE --topology v3-8 [--config.key=value ...]: HBM per "
    "device, fit, FLOPs and estimated step time, from the TPU compiler.",
    # Compiles for a TPU it does not have: nothing to run here, nothing to keep.
    config="required",
    cpu_only=True,
    keeps_programs=False,
    extra=("aot", ("libtpu",)),
  ),
  "demo": Command(
    apps.add_demo,
    apps.run_demo,
    "the whole pipeline offline in a few minutes: pre-train, save, "
    "fine-tune at a new size, evaluate, predict",
    "Transfer learning on scikit-learn's handwritten digits, on CPU.",
    cpu_only=True,
    extra=("demo", ("sklearn", "matplotlib")),
  ),
  "export": Command(
    apps.add_export,
    apps.run_export,
    "write a checkpoint's classifier for another runtime",
    "--format saved_model (TF Serving), stablehlo (jax.export), onnx (onnxruntime) or "
    "litert (TFLite), with predict's preprocessing, labels, head and top-k; "
    "docs/export.md says how each is run and how closely it matches predict.",
    keeps_programs=False,
  ),
  "serve": Command(
    apps.add_serve,
    apps.run_serve,
    "an HTTP endpoint that classifies images (POST /score)",
    'POST /score {"input_data": [base64 image or URL, ...]} -> the top-k labels of each '
    "image; GET /healthz, /metadata, /stats. Concurrent requests share batched model calls.",
    extra=("serve", ("fastapi", "uvicorn", "httpx")),
  ),
}


def _versions() -> str:
  """This package's version and those of the libraries that decide its numbers."""
  from importlib import metadata

  import vit_jax

  libs = []
  for name in ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint"):
    try:
      libs.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      libs.append(f"{name} not installed")
  return f"vit-jax {vit_jax.__version__} ({', '.join(libs)})"


class _PrintVersions(argparse.Action):
  """--version, on one line (argparse's own would wrap it to the terminal)."""

  def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
    super().__init__(option_strings, dest, nargs=0, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None) -> None:
    print(_versions())
    mismatch = jax_setup.libtpu_mismatch()
    if mismatch:
      print(f"vit-jax: warning: {mismatch}", file=sys.stderr)
    parser.exit()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="vit-jax", description=__doc__)
  parser.add_argument("--version", action=_PrintVersions, help="print versions and exit")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, command in COMMANDS.items():
    kw = {}
    if command.config == "required":
      kw = dict(
        epilog=config_args.recipes_help(), formatter_class=argparse.RawDescriptionHelpFormatter
      )
    p = sub.add_parser(name, help=command.help, description=command.description, **kw)
    command.add(p)
    if command.config == "required":
      _add_config_help(p)
  return parser


class _StderrHandler(logging.Handler):
  """Writes to whatever sys.stderr is at the time (it may be replaced after setup)."""

  def emit(self, record: logging.LogRecord) -> None:
    print(self.format(record), file=sys.stderr)


def _check_extras(command: Command) -> None:
  """A one-line error naming the extra to install when a command's dependencies are missing."""
  import importlib.util

  extra, modules = command.extra or ("", ())
  for module in modules:
    if importlib.util.find_spec(module) is None:
      raise errors.MissingExtraError(extra, module)


def _show_our_logs() -> None:
  """The library's own progress lines (e.g. "resumed from ... at step N") on stderr."""
  log = logging.getLogger("vit_jax")
  if not any(isinstance(h, _StderrHandler) for h in log.handlers):  # main() may run again
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("vit-jax: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # Not again through the root logger, which a dependency may have given a handler
    # (importing Orbax does): each line would show twice.
    log.propagate = False
  # gcsfs logs each failed request's traceback before it gives up; the error that follows
  # reaches the user as one line naming the path (vit_jax.platform.files.StorageError).
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  whole = argv
  argv, rest = config_args.split_args(argv)
  first = COMMANDS.get(argv[0]) if argv else None
  if "--help-config" in argv and first is not None and first.config == "required":
    return config_args.print_schema(argv[0], rest)
  args = parser.parse_args(argv)
  args.argv = whole  # a multi-host command runs itself again, under supervision
  command = COMMANDS[args.command]
  if rest and command.config == "none":
    parser.error(f"{args.command} takes no config: unrecognized arguments: {' '.join(rest)}")
  jax_setup.keep_off_absent_tpus(force_cpu=command.cpu_only)
  _show_our_logs()
  if command.keeps_programs:
    jax_setup.keep_compiled_programs()
  # User mistakes (errors.UserError, or an OSError about a path given) end in one line naming
  # what is wrong, exit 2; anything else is a bug and shows its traceback (exit 1).
  # VIT_JAX_DEBUG=1 shows the traceback of user mistakes too.
  try:
    _check_extras(command)
    if command.config != "none":
      args.config = (
        config_args.load_config(rest) if (rest or command.config == "required") else None
      )
      args.config_args = rest
    return command.run(args)
  except BrokenPipeError:
    import stat

    if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
      raise  # not our output's reader: some other pipe broke
    # The reader went away (`vit-jax checkpoints | head`): stop quietly, and let Python's
    # final flush of stdout go nowhere instead of failing again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except (errors.UserError, OSError) as e:
    if os.environ.get("VIT_JAX_DEBUG") or not (isinstance(e, errors.UserError) or e.filename):
      raise
    print(f"vit-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"vit-jax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
