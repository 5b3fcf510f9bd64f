"""The subcommands that run a config: train, eval and fewshot (on one host or several), and
aot, which compiles one for a TPU slice."""

from __future__ import annotations

import argparse
import json
import os
import sys

from vit_jax import errors
from vit_jax.config import config_args


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--checkpoint",
    required=True,
    help="original-layout .npz, or a training workdir / Orbax checkpoint directory",
  )


def add_fewshot(p: argparse.ArgumentParser) -> None:
  _add_checkpoint(p)
  p.add_argument("--shots", default="1,5,10,25", help="comma-separated examples per class")
  p.add_argument("--seeds", type=int, default=3, help="support sets drawn per shot count")
  p.add_argument("--l2", type=float, default=1024.0, help="ridge regularisation")
  p.add_argument("--json", action="store_true", help="print only the JSON line")
  add_distributed(p)


def run_fewshot(args: argparse.Namespace) -> int:
  try:
    shots = [int(k) for k in args.shots.split(",")]
  except ValueError:
    raise errors.ConfigError(
      f"--shots {args.shots!r}: give whole numbers, e.g. 1,5,10,25"
    ) from None
  code = on_every_host(args)
  if code is not None:
    return code
  import jax

  from vit_jax.apps import fewshot
  from vit_jax.training import hosts

  with hosts.waiting_for_the_service(args.heartbeat_timeout):
    result = fewshot.evaluate(
      args.config, args.checkpoint, shots=shots, seeds=args.seeds, l2=args.l2
    )
  if jax.process_index() == 0:
    if not args.json:
      print(fewshot.table(result))
    print(
      json.dumps(
        {k: v for k, v in result.items() if k in ("shots", "num_classes", "eval_examples")}
      )
    )
  return 0


def add_distributed(p: argparse.ArgumentParser) -> None:
  from vit_jax.training import hosts

  g = p.add_argument_group("multi-host (TPU pod slices are detected without these)")
  g.add_argument("--coordinator", default=None, help="host:port of process 0, for jax.distributed")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  g.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=hosts.DEFAULT_HEARTBEAT_TIMEOUT,
    metavar="SECONDS",
    help="a process silent this long counts as lost: every other one then stops with one "
    f"line and exit status {hosts.LOST_PROCESS_EXIT} (default {hosts.DEFAULT_HEARTBEAT_TIMEOUT})",
  )


def on_every_host(args: argparse.Namespace, checkpoints: str | None = None) -> int | None:
  """On several hosts, runs the command in a child process and returns its exit status, with
  one line for a lost process (vit_jax.training.hosts); None where this process is to do the
  work, jax.distributed then initialized. `checkpoints`: where the run's checkpoints are."""
  from vit_jax.training import hosts

  if args.heartbeat_timeout < 1:
    raise errors.ConfigError(f"--heartbeat-timeout {args.heartbeat_timeout}: at least 1 second")
  run = hosts.multi_host(
    args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout
  )
  if run is not None and not hosts.supervised_child():
    return hosts.supervise(args.argv, args.command, run, checkpoints)
  from vit_jax.training import sharding

  sharding.maybe_initialize_distributed(
    args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout
  )
  return None


def add_train(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="checkpoints, logs and exports (local or gs://)")
  add_distributed(p)


def run_train(args: argparse.Namespace) -> int:
  from vit_jax.platform import files

  root = args.workdir if files.is_remote(args.workdir) else os.path.abspath(args.workdir)
  code = on_every_host(args, checkpoints=files.join(root, "checkpoints"))
  if code is not None:
    return code
  from vit_jax.training import hosts
  from vit_jax.training import train

  with hosts.waiting_for_the_service(args.heartbeat_timeout):
    result = train.train_and_evaluate(args.config, args.workdir)
  print_result(result)
  return 0


def add_eval(p: argparse.ArgumentParser) -> None:
  _add_checkpoint(p)
  p.add_argument("--split", default="eval", help="'eval', 'test', or a split string")
  add_distributed(p)


def run_eval(args: argparse.Namespace) -> int:
  code = on_every_host(args)
  if code is not None:
    return code
  from vit_jax.training import evaluation
  from vit_jax.training import hosts

  with hosts.waiting_for_the_service(args.heartbeat_timeout):
    result = evaluation.evaluate(args.config, args.checkpoint, args.split)
  print_result({args.split: result})
  return 0


def print_result(result: dict) -> None:
  import jax

  if jax.process_index() == 0:
    for split, values in result.items():
      scalars = {
        k: round(v, 6) if isinstance(v, float) else v
        for k, v in values.items()
        if not isinstance(v, list)
      }
      print(json.dumps({"split": split, **scalars}))


def add_aot(p: argparse.ArgumentParser) -> None:
  from vit_jax.planning import tpus

  p.add_argument("--topology", required=True, help=", ".join(tpus.TOPOLOGIES))
  p.add_argument("--num-classes", type=int, default=None, help="default: the dataset's")
  p.add_argument("--json-only", action="store_true", help="print only the JSON line(s)")
  g = p.add_argument_group("search: the fastest setting that fits")
  g.add_argument(
    "--search",
    action="store_true",
    help="compile dtype x remat x accum_steps x mesh variants of the training step; one row "
    "and one JSON line per variant, then the recommended overrides as a JSON line",
  )
  g.add_argument(
    "--headroom",
    type=float,
    default=0.10,
    help="HBM a recommended variant leaves free, as a fraction of the usable HBM (default 0.10)",
  )
  g.add_argument(
    "--max-accum", type=int, default=16, help="the most accumulation steps tried (default 16)"
  )
  g.add_argument(
    "--exhaustive",
    action="store_true",
    help="compile every variant (no pruning) and check the pruning rules on the results",
  )
  g.add_argument(
    "--apply",
    metavar="FILE",
    default=None,
    help="write the recommended setting as a config file that imports --config",
  )
  g.add_argument(
    "--jobs",
    type=int,
    default=None,
    help="compiles at once, each in its own process (default: as many as half the machine's "
    "memory holds at 10 GiB each, at most 2; one compile of ViT-B/16 at batch 4096 for v3-8 "
    "peaks at 9.4 GiB)",
  )


def run_aot(args: argparse.Namespace) -> int:
  from vit_jax.planning import aot

  if args.search or args.exhaustive or args.apply:
    return run_aot_search(args)
  report = aot.check(args.config, args.topology, args.num_classes)
  if not args.json_only:
    print(aot.table(report))
  print(aot.to_json(report))
  return 0


def run_aot_search(args: argparse.Namespace) -> int:
  import tqdm

  from vit_jax.planning import aot
  from vit_jax.planning import aot_search
  from vit_jax.platform import files

  if not 0 <= args.headroom < 1:
    raise errors.ConfigError(f"--headroom {args.headroom}: a fraction in [0, 1)")
  if args.apply and files.exists(args.apply):
    raise errors.UserError(f"--apply {args.apply}: the file exists; give a new path")
  search = aot_search.Search(
    args.config,
    aot.topology(args.topology),
    args.num_classes or aot.default_classes(args.config),
    args.headroom,
    args.max_accum,
    jobs=args.jobs,
  )
  total = len(aot_search.variants(search.accums))
  if not args.json_only:
    print(aot_search.TABLE_HEADER, flush=True)
  with tqdm.tqdm(
    total=total, desc=f"aot --search {args.topology}", unit="variant", file=sys.stderr, disable=None
  ) as bar:

    def progress(variant, row):
      # Each row as its variant finishes, so that a stopped search keeps what it found.
      line = aot_search.to_json(row) if args.json_only else aot_search.table_row(row)
      bar.clear()
      print(line, flush=True)
      bar.set_postfix_str(variant.label() + (" (skipped)" if "skipped" in row else ""))
      bar.update(1)

    rows = list(search.run(exhaustive=args.exhaustive, progress=progress))
  if os.path.exists(search.log_path):  # the children's stderr; the rows say what failed
    os.remove(search.log_path)
  result = aot_search.summary(rows, search)
  if args.exhaustive:
    result["rule_violations"] = aot_search.check_rules(rows)
  if not args.json_only:
    print(
      f"\nin search order ({search.slice.name}, compile peaks "
      f"{max(search.compile_peaks, default=0) / 2**30:.1f} GiB per process):"
    )
    print(aot_search.table(rows))
    for row in rows:
      print(aot_search.to_json(row))
  if args.apply and result["recommended"]:
    from vit_jax.config import recipes

    spec = recipes.absolute(config_args.config_spec(args.config_args))
    with files.atomic_write(args.apply) as f:
      f.write(aot_search.config_file(spec, args.config, result).encode())
    result["applied"] = args.apply
  print(aot_search.to_json(result))
  if result["recommended"] is None:
    print(
      f"vit-jax aot: no variant fits {args.topology} with {args.headroom:.0%} headroom",
      file=sys.stderr,
    )
    return 1
  return 0
