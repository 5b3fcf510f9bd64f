"""Evaluates a checkpoint on one split over several processes; prints this host's metrics as JSON
and writes this host's predictions (split_predictions' .npz) beside OUT.

  python eval_hosts.py KIND DATA CKPT OUT --processes N --process-id I --coordinator HOST:PORT

KIND is `folder` (DATA an image folder) or `multilabel` (DATA a CSV list).
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

parser = argparse.ArgumentParser()
parser.add_argument("kind", choices=("folder", "multilabel"))
parser.add_argument("data")
parser.add_argument("ckpt")
parser.add_argument("out")
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--coordinator", default=None)
args = parser.parse_args()

from vit_jax.training import sharding  # noqa: E402

if args.coordinator:
  sharding.maybe_initialize_distributed(args.coordinator, args.processes, args.process_id)

import jax  # noqa: E402

from vit_jax.apps import split_predictions  # noqa: E402
from vit_jax.config import schema  # noqa: E402
from vit_jax.training import evaluation  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

c = schema.base()
c.dataset = args.kind
if args.kind == "folder":
  c.folder = args.data
else:
  c.multilabel_file = args.data
c.image_size = 16
c.model.name = None
c.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=8))
c.batch_size = c.eval_batch_size = 8
metrics = evaluation.evaluate(c, args.ckpt, "eval")
split_predictions.predict_dataset(c, args.ckpt, args.out, split="eval")
print(json.dumps({"process": jax.process_index(), "metrics": metrics}))
