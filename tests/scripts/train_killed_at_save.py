"""Runs `vit-jax train ARGS` and kills itself with SIGKILL at a chosen point of one checkpoint save.

Usage: python train_killed_at_save.py {mid-save,after-save} STEP ARGS...

  mid-save:   step STEP's arrays are written to Orbax's temporary directory, not yet committed
              (renamed to checkpoints/STEP, or on gs:// its commit file written);
  after-save: just after checkpoints/STEP is committed.

The kill comes from inside Orbax's commit, in the background thread of an asynchronous save,
so the point is exact whatever the machine's speed.
"""

import os
import signal
import sys

from orbax.checkpoint._src.path import atomicity

from vit_jax import cli

when, step, args = sys.argv[1], sys.argv[2], sys.argv[3:]
assert when in ("mid-save", "after-save"), when


def killing(finalize_save):
  """`finalize_save` with a SIGKILL before or after it, for step STEP."""

  async def finalize(self, *a, **kw):
    if when == "mid-save" and self._final_path.name == step:
      os.kill(os.getpid(), signal.SIGKILL)
    await finalize_save(self, *a, **kw)
    if when == "after-save" and self._final_path.name == step:
      os.kill(os.getpid(), signal.SIGKILL)

  return finalize


# Local directories commit by renaming; object stores (gs://) by writing a commit file.
for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
  cls.finalize = killing(cls.finalize)
sys.exit(cli.main(["train", *args]))
