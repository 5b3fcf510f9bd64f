"""Reading and writing files on local disk or on `gs://` (through tf.io.gfile)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from vit_jax import errors


def is_remote(path: str) -> bool:
  """True for `gs://...` and other URL-style paths that tf.io.gfile serves."""
  return "://" in str(path)


def _gfile():
  from vit_jax import tf_setup  # pylint: disable=import-outside-toplevel
  return tf_setup.tf().io.gfile


def read_bytes(path: str) -> bytes:
  """The whole file; FileNotFoundError names the path when it is missing."""
  path = str(path)
  if is_remote(path):
    gfile = _gfile()
    if not gfile.exists(path):
      raise errors.MissingFileError(f"{path}: no such file")
    if gfile.isdir(path):
      raise errors.MissingFileError(f"{path}: not a regular file")
    with gfile.GFile(path, "rb") as f:
      return f.read()
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such file" if not os.path.exists(path)
                                  else f"{path}: not a regular file")
  with open(path, "rb") as f:
    return f.read()


def exists(path: str) -> bool:
  path = str(path)
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  path = str(path)
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def copy_dir(src: str, dst: str) -> None:
  """Copies the files directly inside `src` into `dst` (created); either may be remote."""
  src, dst = str(src), str(dst)
  names = _gfile().listdir(src) if is_remote(src) else os.listdir(src)
  plain = [n.rstrip("/") for n in names if not isdir(os.path.join(src, n.rstrip("/")))]
  if is_remote(dst):
    _gfile().makedirs(dst)
  else:
    os.makedirs(dst, exist_ok=True)
  for name in plain:
    with atomic_write(os.path.join(dst, name)) as f:
      f.write(read_bytes(os.path.join(src, name)))


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
  """Writes to a temporary file beside `path`, renamed over it only on success.

  An interrupted or failed write leaves whatever was at `path` untouched.
  """
  path = str(path)
  if is_remote(path):
    gfile = _gfile()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      with gfile.GFile(tmp, "wb") as f:
        yield f
      gfile.rename(tmp, path, overwrite=True)
    finally:
      if gfile.exists(tmp):
        gfile.remove(tmp)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
