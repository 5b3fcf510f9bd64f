"""The `vit-jax` command line: one subcommand per job, each a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

# User mistakes end in one line naming what is wrong; VIT_JAX_DEBUG=1 shows tracebacks.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _add_predict(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("predict", help="classify image files with a checkpoint",
                     description="Prints the top-k labels of each image. The model is read off the "
                                 "checkpoint unless --model is given.")
  p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local or gs://)")
  p.add_argument("--checkpoint", required=True, help="original-layout .npz, local path or gs:// URL")
  p.add_argument("--model", default=None, help="variant, e.g. ViT-B_16 or B/16 (default: from the file)")
  p.add_argument("--image-size", type=int, default=None,
                 help="input size (default: the checkpoint's); position embeddings are resized")
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument("--labels", default=None, help="class names, one per line (default: ImageNet-2012 "
                                                "for 1000-class heads)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--json", action="store_true", help="one JSON object per image")
  p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
  from vit_jax import predict  # pylint: disable=import-outside-toplevel
  if args.top_k < 1 or args.batch_size < 1:
    raise ValueError("--top-k and --batch-size must be at least 1")
  clf = predict.load_classifier(args.checkpoint, model_name=args.model, image_size=args.image_size,
                                labels_path=args.labels, batch_size=args.batch_size)
  failed = 0
  for r in predict.classify_files(clf, args.images, k=args.top_k):
    if r.error:
      failed += 1
      print(f"vit-jax predict: {r.error}", file=sys.stderr)
    if args.json:
      row = {"image": r.image, "predictions": r.predictions} if r.error is None else \
            {"image": r.image, "error": r.error}
      print(json.dumps(row), flush=True)
    elif r.error is None:
      print(r.image)
      for p in r.predictions:
        print(f"  {p['score']:7.2%}  {p['label']}")
  return 1 if failed else 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("convert", help="convert between .npz and a Hugging Face PyTorch directory",
                     description="SRC .npz (or gs://) -> DST transformers directory, or SRC "
                                 "transformers directory -> DST .npz in the original layout.")
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--labels", default=None, help="class names for the transformers config (npz -> HF)")
  p.add_argument("--drop-pre-logits", action="store_true",
                 help="npz -> HF: drop the pre_logits layer (changes the outputs; "
                      "ViTForImageClassification has no such layer)")
  p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
  from vit_jax import checkpoint, convert  # pylint: disable=import-outside-toplevel
  from vit_jax import labels as labels_lib  # pylint: disable=import-outside-toplevel
  if os.path.isdir(args.src):
    model, params, names = convert.from_transformers(args.src)
    checkpoint.save(params, args.dst)
    print(f"wrote {args.dst} ({model.num_layers} layers, {model.num_classes} classes, "
          f"{model.image_size}px)")
    if names:
      path = os.path.splitext(args.dst)[0] + ".labels.txt"
      convert.write_labels(names, path)
      print(f"wrote {path}")
    return 0
  tree = checkpoint.load(args.src)
  found = checkpoint.model_for(tree, args.src)
  if found.representation_size and not args.drop_pre_logits:
    raise convert.ConversionError(f"{args.src} has a pre_logits layer, which ViTForImageClassification "
                                  "cannot hold; pass --drop-pre-logits to drop it (outputs change)")
  if found.num_classes is None:
    raise convert.ConversionError(f"{args.src} has no head; ViTForImageClassification needs one")
  model = found.clone(representation_size=None)
  params = checkpoint.load_pretrained(tree, model)
  names = labels_lib.for_classes(model.num_classes, args.labels) \
      if (args.labels or model.num_classes == 1000) else None
  convert.to_transformers(params, model, args.dst, labels=names)
  print(f"wrote {args.dst} (load with transformers.ViTForImageClassification.from_pretrained)")
  return 0


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_predict, _add_convert]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="vit-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add in _COMMANDS:
    add(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  from vit_jax import checkpoint, convert, preprocess  # pylint: disable=import-outside-toplevel
  errors = _USER_ERRORS + (checkpoint.CheckpointError, convert.ConversionError,
                           preprocess.ImageError, OSError)
  try:
    return args.run(args)
  except errors as e:
    if os.environ.get("VIT_JAX_DEBUG"):
      raise
    print(f"vit-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"vit-jax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
