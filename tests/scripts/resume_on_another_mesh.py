"""Trains 10 steps on a 4-device data-parallel mesh, then restores and resumes on a 2x2 data x model
mesh.

Usage: python resume_on_another_mesh.py FOLDER WORKDIR
Run with XLA_FLAGS=--xla_force_host_platform_device_count=4. Exits non-zero if a check fails.
"""

import logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax.config.recipes import tiny  # noqa: E402
from vit_jax.models import layout  # noqa: E402
from vit_jax.training import sharding  # noqa: E402
from vit_jax.training import state  # noqa: E402
from vit_jax.training import train  # noqa: E402
from vit_jax.weights import checkpoint  # noqa: E402

folder, work = sys.argv[1], sys.argv[2]
logging.getLogger("vit_jax").addHandler(logging.StreamHandler())
logging.getLogger("vit_jax").setLevel(logging.INFO)


def config(total_steps):
  c = tiny.get_config()
  c.folder, c.image_size, c.model.patch_size = folder, 16, 4
  c.total_steps, c.eval_every, c.checkpoint_every = total_steps, 10, 10
  return c


assert jax.device_count() == 4, jax.devices()
data4 = sharding.make_mesh({"data": 4})
data2_model2 = sharding.make_mesh({"data": 2, "model": 2})
train.train_and_evaluate(config(10), work, mesh=data4)

# The restore puts every array where the new mesh wants it; the values are the saved ones.
setup, _ = state.prepare(config(20), data2_model2)
params = state.load_params(setup, work)
kernel = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
assert kernel.sharding.spec[1] == "model", kernel.sharding
assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2)
saved = layout.flatten(checkpoint.load(os.path.join(work, "final.npz")))
restored = layout.flatten(jax.device_get(params))
assert saved.keys() == restored.keys()
for k, v in saved.items():
  np.testing.assert_array_equal(np.asarray(restored[k]), v, err_msg=k)

# Training goes on from step 10 on the new mesh.
train.train_and_evaluate(config(20), work, mesh=data2_model2)
assert os.path.isdir(os.path.join(work, "checkpoints", "20"))
