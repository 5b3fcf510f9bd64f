"""Every file the project reads or writes, on local disk or in `gs://`, through one layer.

Local paths use the operating system; `gs://` (and any other URL fsspec knows)
goes through fsspec, whose `gcsfs` honours STORAGE_EMULATOR_HOST. Orbax reaches
`gs://` through etils.epath and TensorStore: `configure_storage()`, run when this
module is imported, points epath at fsspec too (EPATH_USE_TF=false) and, with
STORAGE_EMULATOR_HOST set, TensorStore at the same endpoint. So with that
variable set, every `gs://` access of the project and of Orbax goes to it;
without it nothing changes (real credentials, real GCS). What still goes through
TensorFlow's own filesystem is tf.data reading a TFDS `data_dir`'s TFRecords.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import MutableMapping
from typing import IO
from typing import Any

from vit_jax import errors


class StorageError(errors.UserError, OSError):
  """Remote storage that cannot be reached or refuses an operation."""


def configure_storage(environ: MutableMapping[str, str] | None = None) -> None:
  """Points Orbax's file access at the same `gs://` endpoint as ours (variables already set win)."""
  env = os.environ if environ is None else environ
  # With TensorFlow installed, epath would use TensorFlow's GCS client, which has no
  # endpoint override; fsspec's gcsfs has one, and is what this module uses.
  env.setdefault("EPATH_USE_TF", "false")
  emulator = env.get("STORAGE_EMULATOR_HOST", "")
  if emulator and emulator != "default":
    endpoint = emulator if "://" in emulator else f"http://{emulator}"
    env.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)  # Orbax's array data
    env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # an emulator checks no token
    # gcsfs would first ask the bucket's type over gRPC, which an emulator does not serve:
    # a 60 s wait per bucket.
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


configure_storage()


def is_remote(path: str) -> bool:
  """True for `gs://...` and other URL-style paths."""
  return "://" in str(path)


def _fs(path: str) -> tuple[Any, str]:
  import fsspec  # noqa: PLC0415  # only gs:// needs it, and the command's start-up imports this module

  return fsspec.core.url_to_fs(path)


@contextlib.contextmanager
def _remote(path: str) -> Iterator[None]:
  """Turns a remote storage failure into one line that names the path."""
  from gcsfs.retry import HttpError  # noqa: PLC0415  # only gs:// needs it, and the command's start-up imports this module

  try:
    yield
  except (errors.UserError, FileNotFoundError):
    raise
  except (OSError, HttpError) as e:  # gcsfs: OSError for 403 and lost connections, else HttpError
    first = (str(e).splitlines() or [""])[0]
    raise StorageError(f"{path}: storage error ({e.__class__.__name__}: {first})") from e


def _bucket_check(path: str) -> None:
  """A MissingFileError naming the bucket, when the bucket itself is missing."""
  if not str(path).startswith(("gs://", "gcs://", "s3://")):
    return  # no buckets (http://, memory://)
  fs, rpath = _fs(path)
  bucket = rpath.split("/", 1)[0]
  with _remote(path):
    if not fs.exists(bucket):
      scheme = str(path).split("://", 1)[0]
      raise errors.MissingFileError(f"{path}: no such bucket {scheme}://{bucket}")


def read_bytes(path: str) -> bytes:
  """The whole file; MissingFileError names the path when it is missing."""
  path = str(path)
  if is_remote(path):
    fs, rpath = _fs(path)
    with _remote(path):
      try:
        return fs.cat_file(rpath)  # one request: images of a gs:// folder come this way
      except (FileNotFoundError, IsADirectoryError):
        pass
      if fs.isdir(rpath):
        raise errors.MissingFileError(f"{path}: not a regular file")
    _bucket_check(path)
    raise errors.MissingFileError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise errors.MissingFileError(
      f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a regular file"
    )
  with open(path, "rb") as f:
    return f.read()


def size(path: str) -> int:
  """A file's size in bytes; MissingFileError names the path when it is missing."""
  path = str(path)
  if is_remote(path):
    fs, rpath = _fs(path)
    with _remote(path):
      try:
        return int(fs.size(rpath))
      except FileNotFoundError:
        pass
    _bucket_check(path)
    raise errors.MissingFileError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such file")
  return os.path.getsize(path)


@contextlib.contextmanager
def open_read(path: str) -> Iterator[IO[bytes]]:
  """A file opened for streaming reads (a large download need not fit in memory)."""
  path = str(path)
  if not is_remote(path):
    with open(path, "rb") as f:
      yield f
    return
  fs, rpath = _fs(path)
  # http(s): a plain stream, which needs no range requests from the server.
  kw = {"block_size": 0} if path.startswith(("http://", "https://")) else {}
  with _remote(path), fs.open(rpath, "rb", **kw) as f:
    yield f


def _ask(path: str, local: Callable[[str], bool], remote: str) -> bool:
  """A yes/no question about a path: `local` on disk, else the fsspec method named `remote`."""
  path = str(path)
  if not is_remote(path):
    return local(path)
  fs, rpath = _fs(path)
  with _remote(path):
    return getattr(fs, remote)(rpath)


def exists(path: str) -> bool:
  return _ask(path, os.path.exists, "exists")


def isdir(path: str) -> bool:
  return _ask(path, os.path.isdir, "isdir")


def isfile(path: str) -> bool:
  return _ask(path, os.path.isfile, "isfile")


def join(*parts: str) -> str:
  """Path joining that keeps `/` in URLs whatever the operating system."""
  return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def list_dir(path: str) -> tuple[list[str], list[str]]:
  """(sub-directory names, file names) of a directory, sorted, hidden entries left out."""
  path = str(path)
  dirs, names = [], []
  if is_remote(path):
    fs, rpath = _fs(path)
    with _remote(path):
      for entry in fs.ls(rpath, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        (dirs if entry["type"] == "directory" else names).append(name)
  else:
    with os.scandir(path) as it:
      for e in it:
        (dirs if e.is_dir() else names).append(e.name)
  return (
    sorted(d for d in dirs if not d.startswith(".")),
    sorted(n for n in names if not n.startswith(".")),
  )


def makedirs(path: str) -> None:
  """Creates a local directory and its parents; object stores need none."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def copy_dir(src: str, dst: str, recursive: bool = False) -> None:
  """Copies the files inside `src` into `dst` (created), and its subdirectories' when
  `recursive`; either may be remote."""
  makedirs(dst)
  dirs, names = list_dir(src)
  for name in names:
    with atomic_write(join(dst, name)) as f:
      f.write(read_bytes(join(src, name)))
  for name in dirs if recursive else ():
    copy_dir(join(src, name), join(dst, name), recursive=True)


def append_text(path: str, text: str) -> None:
  """Adds `text` at the end of a file (created if missing)."""
  path = str(path)
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  # Objects cannot grow in place: the file is written again whole, in one upload.
  old = read_bytes(path) if exists(path) else b""
  with atomic_write(path) as f:
    f.write(old + text.encode("utf-8"))


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
  """Writes to a temporary file beside `path`, renamed over it only on success.

  An interrupted or failed write leaves whatever was at `path` untouched. A
  remote file is sent in one upload once the block ends, and an object store
  makes an object visible only when its upload completes.
  """
  path = str(path)
  if is_remote(path):
    buf = io.BytesIO()
    yield buf
    fs, rpath = _fs(path)
    try:
      with _remote(path):
        fs.pipe_file(rpath, buf.getvalue())
    except FileNotFoundError:
      _bucket_check(path)
      raise
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    # mkstemp makes the file private (0600); what we write is a result, so it gets the
    # permissions any other new file would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
