"""The subcommands that use a checkpoint: predict, explain, export, serve, convert, the
registry's list, and the demo."""

from __future__ import annotations

import argparse
import json
import sys

from vit_jax import errors


def add_classifier_options(p: argparse.ArgumentParser) -> None:
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


def load_classifier(args: argparse.Namespace, **kw):
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


def add_predict(p: argparse.ArgumentParser) -> None:
  p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (local or gs://)")
  add_classifier_options(p)
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


def run_predict(args: argparse.Namespace) -> int:
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

  clf = load_classifier(args, batch_size=args.batch_size)
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


def add_explain(p: argparse.ArgumentParser) -> None:
  p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local or gs://)")
  add_classifier_options(p)
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


def run_explain(args: argparse.Namespace) -> int:
  if args.top_k < 1 or args.batch_size < 1:
    raise errors.ConfigError("--top-k and --batch-size must be at least 1")
  from vit_jax.apps import explain
  from vit_jax.platform import files

  out_dir = args.output or (None if args.json else "explanations")
  names = explain.output_names(args.images, out_dir) if out_dir else []
  explainer = explain.Explainer(load_classifier(args, batch_size=args.batch_size), args.method)
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


def add_checkpoints(p: argparse.ArgumentParser) -> None:
  p.add_argument("--filter", default=None, help="only names or models containing this, e.g. B_16")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
  g.add_argument("--markdown", action="store_true", help="the table of docs/checkpoints.md")


def run_checkpoints(args: argparse.Namespace) -> int:
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


def add_convert(p: argparse.ArgumentParser) -> None:
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


def run_convert(args: argparse.Namespace) -> int:
  from vit_jax.weights import convert

  for path in convert.convert(
    args.src, args.dst, labels=args.labels, drop_pre_logits=args.drop_pre_logits
  ):
    print(f"wrote {path}")
  return 0


def add_export(p: argparse.ArgumentParser) -> None:
  add_classifier_options(p)
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


def run_export(args: argparse.Namespace) -> int:
  from vit_jax.apps import export

  export.check_format(args.format)  # before the checkpoint loads: one line, at once
  # The export runs elsewhere: float32 unless asked, whatever this machine's `auto` would pick.
  args.dtype = args.dtype or "float32"
  clf = load_classifier(args, batch_size=1)
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


def add_demo(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", default="demo-run")
  p.add_argument("--devices", type=int, default=4, help="CPU devices to shard batches over")
  p.add_argument("--pretrain-steps", type=int, default=300)
  p.add_argument("--finetune-steps", type=int, default=200)


def run_demo(args: argparse.Namespace) -> int:
  import jax

  # Several CPU devices, so that the demo runs the same sharded step as a TPU slice.
  jax.config.update("jax_num_cpu_devices", args.devices)
  from vit_jax.apps import demo

  demo.run(args.workdir, args.pretrain_steps, args.finetune_steps)
  return 0


def add_serve(p: argparse.ArgumentParser) -> None:
  from vit_jax.apps.serving import protocol

  add_classifier_options(p)
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


def run_serve(args: argparse.Namespace) -> int:
  from vit_jax.apps.serving import app as serve
  from vit_jax.apps.serving import protocol

  options = protocol.from_flags(args)
  if args.drain_timeout < 0:
    raise errors.ConfigError(f"--drain-timeout {args.drain_timeout}: must be at least 0")
  clf = load_classifier(args)
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
