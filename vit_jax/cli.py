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
import json
import logging
import os
import sys
from collections.abc import Callable
from collections.abc import Sequence

from vit_jax import errors
from vit_jax.config import config_args
from vit_jax.platform import jax_setup


def _add_classifier_options(p: argparse.ArgumentParser) -> None:
  """The options that pick a checkpoint's classifier (predict and serve)."""
  p.add_argument(
    "--checkpoint",
    required=True,
    help="original-layout .npz (local path or gs:// URL), "
    "or a checkpoint name such as ViT-B_16/i21k+i1k-224 (vit-jax checkpoints)",
  )
  p.add_argument(
    "--model", default=None, help="variant, e.g. ViT-B_16 or B/16 (default: from the file)"
  )
  p.add_argument(
    "--image-size",
    type=int,
    default=None,
    help="input size (default: the checkpoint's); position embeddings are resized",
  )
  p.add_argument(
    "--labels",
    default=None,
    help="class names, one per line (default: the head "
    "record's, NAME.head.json beside NAME.npz; else ImageNet-2012 for 1000 classes)",
  )
  g = p.add_mutually_exclusive_group()
  g.add_argument(
    "--multilabel",
    dest="multilabel",
    action="store_const",
    const=True,
    default=None,
    help="score each class on its own (sigmoid); default: as the head record says, "
    "else --multiclass",
  )
  g.add_argument(
    "--multiclass",
    dest="multilabel",
    action="store_const",
    const=False,
    help="a softmax over the classes",
  )
  p.add_argument(
    "--threshold",
    type=float,
    default=None,
    help="leave out classes scored below this probability (e.g. 0.5 for tags)",
  )
  p.add_argument(
    "--dtype",
    choices=("auto", "float32", "bfloat16"),
    default=None,
    help="compute dtype (the weights are cast to it once; logits stay float32); "
    "auto (the default, or $VIT_JAX_DTYPE): bfloat16 on TPUs and AMX CPUs, "
    "else float32",
  )
  g = p.add_argument_group(
    "int8 (post-training quantization with qwix; pip install 'vit-jax[int8]')"
  )
  g.add_argument(
    "--quantize",
    choices=("int8",),
    default=None,
    help="int8 weights in every matrix multiply; with --calibration, int8 activations too",
  )
  g.add_argument(
    "--calibration",
    metavar="DATA",
    default=None,
    help="images (a directory, searched recursively, or a glob) whose activation ranges "
    "int8 activations use: pick images like those to classify",
  )
  g.add_argument(
    "--calibration-images",
    metavar="N",
    type=int,
    default=64,
    help="how many of the --calibration images, spread over their sorted list (default 64)",
  )


def _load_classifier(args: argparse.Namespace, **kw):
  from vit_jax.apps import classifier

  return classifier.load_classifier(
    args.checkpoint,
    model_name=args.model,
    image_size=args.image_size,
    labels_path=args.labels,
    multilabel=args.multilabel,
    threshold=args.threshold,
    dtype=args.dtype,
    quantize=args.quantize,
    calibration=args.calibration,
    calibration_images=args.calibration_images,
    **kw,
  )


def _add_predict(p: argparse.ArgumentParser) -> None:
  p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (local or gs://)")
  _add_classifier_options(p)
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument(
    "--batch-size",
    type=int,
    default=8,
    help="images per model call (8 is the fastest per image on a CPU)",
  )
  p.add_argument("--json", action="store_true", help="one JSON object per image")
  g = p.add_argument_group(
    "a whole dataset split, sharded over every device and host "
    "(with --config RECIPE_OR_FILE [--config.key=value ...])"
  )
  g.add_argument("--split", default="test", help="'eval', 'test' or a split string")
  g.add_argument("--output", default=None, help=".npz with logits (or embeddings), labels, top_k")
  g.add_argument("--embeddings", action="store_true", help="write the representation the head sees")


def _run_predict(args: argparse.Namespace) -> int:
  if args.top_k < 1 or args.batch_size < 1:
    raise errors.ConfigError("--top-k and --batch-size must be at least 1")
  if args.config is not None:
    if args.images or not args.output:
      raise errors.ConfigError(
        "with --config, predict runs over a dataset split: give --output, no IMAGEs"
      )
    from vit_jax.apps import split_predictions

    out = split_predictions.predict_dataset(
      args.config,
      args.checkpoint,
      args.output,
      split=args.split,
      embeddings=args.embeddings,
      top_k=args.top_k,
    )
    print(f"wrote {args.output}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))
    return 0
  if not args.images:
    raise errors.ConfigError(
      "give IMAGE files, or --config RECIPE_OR_FILE --output OUT.npz for a dataset split"
    )
  from vit_jax.apps import classifier

  clf = _load_classifier(args, batch_size=args.batch_size)
  failed = 0
  for r in classifier.classify_files(clf, args.images, k=args.top_k):
    if r.error:
      failed += 1
      print(f"vit-jax predict: {r.error}", file=sys.stderr)
    if args.json:
      row = (
        {"image": r.image, "predictions": r.predictions}
        if r.error is None
        else {"image": r.image, "error": r.error}
      )
      print(json.dumps(row), flush=True)
    elif r.error is None:
      print(r.image)
      for p in r.predictions:
        print(f"  {p['score']:7.2%}  {p['label']}")
  return 1 if failed else 0


def _add_explain(p: argparse.ArgumentParser) -> None:
  p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local or gs://)")
  _add_classifier_options(p)
  p.add_argument(
    "--method",
    choices=("rollout", "last"),
    default="rollout",
    help="rollout: attention rollout over every layer; last: the last layer's "
    "class-token attention, per head",
  )
  p.add_argument(
    "--output",
    default=None,
    help="directory for DIR/<image-stem>.png (default: explanations; with --json, "
    "no PNGs unless given)",
  )
  p.add_argument("--top-k", type=int, default=3, help="labels in each picture's title")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument(
    "--json",
    action="store_true",
    help="one JSON object per image: predictions, grid and the map before upsampling",
  )


def _run_explain(args: argparse.Namespace) -> int:
  if args.top_k < 1 or args.batch_size < 1:
    raise errors.ConfigError("--top-k and --batch-size must be at least 1")
  from vit_jax.apps import explain
  from vit_jax.platform import files

  out_dir = args.output or (None if args.json else "explanations")
  names = explain.output_names(args.images, out_dir) if out_dir else []
  explainer = explain.Explainer(_load_classifier(args, batch_size=args.batch_size), args.method)
  if out_dir:
    files.makedirs(out_dir)
  failed = 0
  for i, r in enumerate(explainer.files(args.images, k=args.top_k)):
    if r.error:
      failed += 1
      print(f"vit-jax explain: {r.error}", file=sys.stderr)
    elif out_dir:
      explain.render(r, names[i])
    if args.json:
      print(json.dumps(r.to_json()), flush=True)
    elif r.error is None:
      print(
        f"{r.image} -> {names[i]}: "
        + ", ".join(f"{p['label']} {p['score']:.2%}" for p in r.predictions),
        flush=True,
      )
  return 1 if failed else 0


def _add_fewshot(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--checkpoint",
    required=True,
    help="original-layout .npz, or a training workdir / Orbax checkpoint directory",
  )
  p.add_argument("--shots", default="1,5,10,25", help="comma-separated examples per class")
  p.add_argument("--seeds", type=int, default=3, help="support sets drawn per shot count")
  p.add_argument("--l2", type=float, default=1024.0, help="ridge regularisation")
  p.add_argument("--json", action="store_true", help="print only the JSON line")
  _add_distributed(p)


def _run_fewshot(args: argparse.Namespace) -> int:
  try:
    shots = [int(k) for k in args.shots.split(",")]
  except ValueError:
    raise errors.ConfigError(
      f"--shots {args.shots!r}: give whole numbers, e.g. 1,5,10,25"
    ) from None
  code = _on_every_host(args)
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


def _add_checkpoints(p: argparse.ArgumentParser) -> None:
  p.add_argument("--filter", default=None, help="only names or models containing this, e.g. B_16")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
  g.add_argument("--markdown", action="store_true", help="the table of docs/checkpoints.md")


def _run_checkpoints(args: argparse.Namespace) -> int:
  from vit_jax.weights import registry

  if args.markdown:
    print(registry.markdown_table())
    return 0
  records = registry.select(args.filter)
  if args.json:
    for r in records:
      print(
        json.dumps(
          {**r.asdict(), "url": f"{registry.base()}/{r.path}", "cached": registry.cached(r)}
        )
      )
    return 0
  records = registry.short_list(records)  # the recommended AugReg files under their short names
  width = max((len(r.name) for r in records), default=4)
  print(f"{'name':<{width}}  {'model':<13} {'px':>4} {'classes':>16}  {'top-1':>6}  cached")
  for r in records:
    classes = (f"{r.num_classes:,}" if r.num_classes else "as the file") + (
      " +pre" if r.pre_logits else ""
    )
    top1 = f"{r.top1:g}%" if r.top1 else ""
    print(
      f"{r.name:<{width}}  {r.model:<13} {r.image_size:>4} {classes:>16}  {top1:>6}  "
      f"{'yes' if registry.cached(r) else ''}"
    )
  print(
    f"{len(records)} checkpoints from {registry.base()} (any augreg/<file name> works too); "
    f"cache: {registry.cache_dir()}"
  )
  return 0


def _add_convert(p: argparse.ArgumentParser) -> None:
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument(
    "--labels", default=None, help="class names for the transformers config (npz -> HF)"
  )
  p.add_argument(
    "--drop-pre-logits",
    action="store_true",
    help="npz -> HF: drop the pre_logits layer (changes the outputs; "
    "ViTForImageClassification has no such layer)",
  )


def _run_convert(args: argparse.Namespace) -> int:
  from vit_jax.weights import convert

  for path in convert.convert(
    args.src, args.dst, labels=args.labels, drop_pre_logits=args.drop_pre_logits
  ):
    print(f"wrote {path}")
  return 0


def _add_export(p: argparse.ArgumentParser) -> None:
  _add_classifier_options(p)
  p.add_argument(
    "--format",
    required=True,
    metavar="FORMAT",
    help="saved_model (TF Serving; takes JPEG/PNG bytes), stablehlo (jax.export: CPU, TPU, "
    "CUDA), onnx (onnxruntime), litert (TFLite)",
  )
  p.add_argument("--output", required=True, metavar="DIR", help="a new (or empty) directory")
  p.add_argument(
    "--batch",
    type=int,
    default=None,
    metavar="N",
    help="stablehlo, onnx: a fixed batch of N (default: any); saved_model, litert: the "
    "compiled batch that any batch is split into (default 8 and 1)",
  )
  p.add_argument("--top-k", type=int, default=5, help="classes per image in the outputs")
  p.add_argument("--overwrite", action="store_true", help="replace an export in DIR")


def _run_export(args: argparse.Namespace) -> int:
  from vit_jax.apps import export

  export.check_format(args.format)  # before the checkpoint loads: one line, at once
  # The export runs elsewhere: float32 unless asked, whatever this machine's `auto` would pick.
  args.dtype = args.dtype or "float32"
  clf = _load_classifier(args, batch_size=1)
  manifest = export.export(
    clf,
    args.format,
    args.output,
    batch=args.batch,
    top_k=args.top_k,
    overwrite=args.overwrite,
  )
  print(
    f"wrote {args.output}: {args.format}, batch {manifest['batch']}, top {manifest['top_k']} of "
    f"{manifest['classes']} classes ({manifest['head']}), {manifest['dtype']}"
    + (f", {manifest['quantized']}" if manifest["quantized"] else "")
  )
  return 0


def _add_config_help(p: argparse.ArgumentParser) -> None:
  # Handled in main() before parsing, so that it needs no other argument.
  p.add_argument(
    "--help-config",
    action="store_true",
    help="print every config key (type, value, meaning) and exit",
  )


def _add_distributed(p: argparse.ArgumentParser) -> None:
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


def _on_every_host(args: argparse.Namespace, checkpoints: str | None = None) -> int | None:
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


def _add_train(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="checkpoints, logs and exports (local or gs://)")
  _add_distributed(p)


def _run_train(args: argparse.Namespace) -> int:
  from vit_jax.platform import files

  root = args.workdir if files.is_remote(args.workdir) else os.path.abspath(args.workdir)
  code = _on_every_host(args, checkpoints=files.join(root, "checkpoints"))
  if code is not None:
    return code
  from vit_jax.training import hosts
  from vit_jax.training import train

  with hosts.waiting_for_the_service(args.heartbeat_timeout):
    result = train.train_and_evaluate(args.config, args.workdir)
  _print_result(result)
  return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--checkpoint",
    required=True,
    help="original-layout .npz, or a training workdir / Orbax checkpoint directory",
  )
  p.add_argument("--split", default="eval", help="'eval', 'test', or a split string")
  _add_distributed(p)


def _run_eval(args: argparse.Namespace) -> int:
  code = _on_every_host(args)
  if code is not None:
    return code
  from vit_jax.training import evaluation
  from vit_jax.training import hosts

  with hosts.waiting_for_the_service(args.heartbeat_timeout):
    result = evaluation.evaluate(args.config, args.checkpoint, args.split)
  _print_result({args.split: result})
  return 0


def _print_result(result: dict) -> None:
  import jax

  if jax.process_index() == 0:
    for split, values in result.items():
      scalars = {
        k: round(v, 6) if isinstance(v, float) else v
        for k, v in values.items()
        if not isinstance(v, list)
      }
      print(json.dumps({"split": split, **scalars}))


def _add_aot(p: argparse.ArgumentParser) -> None:
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


def _run_aot(args: argparse.Namespace) -> int:
  from vit_jax.planning import aot

  if args.search or args.exhaustive or args.apply:
    return _run_aot_search(args)
  report = aot.check(args.config, args.topology, args.num_classes)
  if not args.json_only:
    print(aot.table(report))
  print(aot.to_json(report))
  return 0


def _run_aot_search(args: argparse.Namespace) -> int:
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


def _add_demo(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default="demo-run")
  p.add_argument("--devices", type=int, default=4, help="CPU devices to shard batches over")
  p.add_argument("--pretrain-steps", type=int, default=300)
  p.add_argument("--finetune-steps", type=int, default=200)


def _run_demo(args: argparse.Namespace) -> int:
  import jax

  # Several CPU devices, so that the demo runs the same sharded step as a TPU slice.
  jax.config.update("jax_num_cpu_devices", args.devices)
  from vit_jax.apps import demo

  demo.run(args.workdir, args.pretrain_steps, args.finetune_steps)
  return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
  from vit_jax.apps.serving import protocol

  _add_classifier_options(p)
  p.add_argument(
    "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
  )
  p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
  protocol.add_flags(p)
  g = p.add_argument_group("shutdown and logs")
  g.add_argument(
    "--drain-timeout",
    type=float,
    default=25.0,
    help="on SIGTERM or Ctrl-C, seconds to finish the requests in flight before "
    "cancelling them (default under Kubernetes' 30 s grace period)",
  )
  g.add_argument("--no-access-log", action="store_true", help="no log line per request")


def _run_serve(args: argparse.Namespace) -> int:
  from vit_jax.apps.serving import app as serve
  from vit_jax.apps.serving import protocol

  options = protocol.from_flags(args)
  if args.drain_timeout < 0:
    raise errors.ConfigError(f"--drain-timeout {args.drain_timeout}: must be at least 0")
  clf = _load_classifier(args)
  sock = serve.bind(args.host, args.port)
  print(
    f"vit-jax serve: {clf.model_name} listening on {serve.url_of(sock)} "
    f"(ready when GET /healthz answers 200)",
    flush=True,
  )
  serve.run(
    serve.create_app(clf, options),
    sock,
    access_log=not args.no_access_log,
    drain_timeout_s=args.drain_timeout,
  )
  print("vit-jax serve: stopped", flush=True)
  return 0


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
    _add_predict,
    _run_predict,
    "classify image files with a checkpoint",
    "Prints the top-k labels of each image. The model is read off the checkpoint unless "
    "--model is given.",
    config="optional",
  ),
  "explain": Command(
    _add_explain,
    _run_explain,
    "draw where the model looks: attention maps over images",
    "Writes each image with its attention map (rollout, or the last layer's per head) as "
    "DIR/<image-stem>.png, titled with the top labels; --json prints the maps.",
    extra=("explain", ("matplotlib",)),
  ),
  "fewshot": Command(
    _add_fewshot,
    _run_fewshot,
    "the paper's few-shot linear accuracy of a checkpoint",
    "vit-jax fewshot --config RECIPE_OR_FILE --checkpoint CKPT [--shots 1,5,10,25]: ridge "
    "regression on frozen features, k training images per class, scored on the test split.",
    config="required",
  ),
  "checkpoints": Command(
    _add_checkpoints,
    _run_checkpoints,
    "list the public checkpoints by name",
    "Names accepted wherever a checkpoint path is (--checkpoint, convert, config.pretrained); "
    "a name's file is downloaded once into the cache.",
    cpu_only=True,
    keeps_programs=False,
  ),
  "convert": Command(
    _add_convert,
    _run_convert,
    "convert between .npz and a Hugging Face PyTorch directory",
    "SRC .npz (or gs://) -> DST transformers directory, or SRC transformers directory -> "
    "DST .npz in the original layout.",
    keeps_programs=False,
    extra=("torch", ("torch", "transformers", "safetensors")),
  ),
  "train": Command(
    _add_train,
    _run_train,
    "fine-tune or train as a config says; rerun to resume",
    "vit-jax train --config RECIPE_OR_FILE --workdir DIR [--config.key=value ...]",
    config="required",
  ),
  "eval": Command(
    _add_eval,
    _run_eval,
    "evaluate a checkpoint on a dataset split",
    "vit-jax eval --config RECIPE_OR_FILE --checkpoint CKPT [--split test]",
    config="required",
  ),
  "aot": Command(
    _add_aot,
    _run_aot,
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
    _add_demo,
    _run_demo,
    "the whole pipeline offline in a few minutes: pre-train, save, "
    "fine-tune at a new size, evaluate, predict",
    "Transfer learning on scikit-learn's handwritten digits, on CPU.",
    cpu_only=True,
    extra=("demo", ("sklearn", "matplotlib")),
  ),
  "export": Command(
    _add_export,
    _run_export,
    "write a checkpoint's classifier for another runtime",
    "--format saved_model (TF Serving), stablehlo (jax.export), onnx (onnxruntime) or "
    "litert (TFLite), with predict's preprocessing, labels, head and top-k; "
    "docs/export.md says how each is run and how closely it matches predict.",
    keeps_programs=False,
  ),
  "serve": Command(
    _add_serve,
    _run_serve,
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
