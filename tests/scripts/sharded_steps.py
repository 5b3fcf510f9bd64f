"""Runs 3 training steps of a tiny ViT under several meshes; writes the results to an .npz.

Usage: python sharded_steps.py OUT.npz [--processes N --process-id I --coordinator HOST:PORT]
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or 4 per process).
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--coordinator", default=None)
parser.add_argument("--only", default=None, help="run one case")
args = parser.parse_args()

from vit_jax.training import sharding  # noqa: E402

if args.coordinator:
  sharding.maybe_initialize_distributed(args.coordinator, args.processes, args.process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax import models  # noqa: E402
from vit_jax.config import schema  # noqa: E402
from vit_jax.training import steps  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

BATCH, CLASSES = 32, 5


def config(**kw):
  c = schema.base()
  c.image_size = 32
  c.model.name = "ViT-Ti_16"
  c.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=8))
  c.batch_size = BATCH
  c.base_lr, c.warmup_steps, c.total_steps = 0.1, 1, 10
  for k, v in kw.items():
    c[k] = v
  return c


rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, (3, BATCH, 32, 32, 3)).astype(np.float32)
labels = rng.integers(0, CLASSES, (3, BATCH)).astype(np.int32)


def run(cfg, mesh):
  setup = steps.Setup(cfg, CLASSES, False, mesh)
  init_params = models.init_params(setup.model, 0)
  init_params = jax.tree_util.tree_map(
    lambda x: (
      np.asarray(x) + 0.05 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    ),
    init_params,
  )
  state = setup.init_state(jax.random.PRNGKey(0), init_params)
  step = setup.jit_train_step()
  losses = []
  per_host = BATCH // jax.process_count()
  lo = jax.process_index() * per_host
  for i in range(3):
    batch = {
      k: jax.make_array_from_process_local_data(setup.batch_sharding, v[i, lo : lo + per_host])
      for k, v in (("image", images), ("label", labels))
    }
    state, m = step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(m["loss"]))
  kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  spec = tuple(kernel.sharding.spec)
  gathered = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(state.params)
  flat = {
    "/".join(str(k.key) for k in path): np.asarray(v)
    for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(gathered))[0]
  }
  return losses, flat, str(spec), kernel.addressable_shards[0].data.shape


cases = {
  "one_device": (config(), {"data": 1}, jax.devices()[:1]),
  "data8": (config(), {"data": -1}, None),
  "data8_accum4": (config(accum_steps=4), {"data": -1}, None),
  "model_sharded": (config(), {"data": 2, "fsdp": 2, "model": 2}, None),
}
if jax.process_count() > 1:
  cases = {k: v for k, v in cases.items() if k != "one_device"}
if args.only:
  cases = {args.only: cases[args.only]}
out = {}
for name, (cfg, axes, devices) in cases.items():
  mesh = sharding.make_mesh(axes, devices)
  losses, flat, spec, shard_shape = run(cfg, mesh)
  out[f"{name}/losses"] = np.array(losses)
  out[f"{name}/spec"] = np.array(spec)
  out[f"{name}/shard_shape"] = np.array(shard_shape)
  for k, v in flat.items():
    out[f"{name}/params/{k}"] = v
if jax.process_index() == 0:
  np.savez(args.out, **out)
print("done", jax.process_index(), file=sys.stderr)
