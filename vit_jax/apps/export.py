"""`vit-jax export`: a classifier for another runtime, with `predict`'s preprocessing and scores.

Formats (docs/export.md has a command per runtime and the measured bounds):
  * saved_model: a TF SavedModel (orbax-export, jax2tf). `serving_default` takes encoded
    images (JPEG, PNG, GIF, BMP, WebP) and decodes, resizes and scales them in the graph as
    `predict` does; `serving_float` takes images already scaled to [-1, 1]. Both take any
    number of images and return the top-k `scores`, `classes` (names) and `indices`.
  * stablehlo: `jax.export`'s serialized artifact, for CPU, TPU and CUDA in one file, with
    a symbolic batch, and the params beside it (params.npz): no model code needed to run it.
  * onnx: jax2onnx, with a dynamic batch, for onnxruntime.
  * litert: a .tflite converted from the SavedModel's float signature, any batch.

Why the SavedModel compiles a fixed batch: TF 2.21 reads StableHLO up to 1.13.7, and the
module JAX 0.12 writes for a symbolic batch holds a `shape_assertion` custom call
(vhlo.custom_call_v2, StableHLO 1.18+), which it cannot read; only a private JAX hook
serializes at the older version. The model is compiled at a fixed batch B instead (no
custom calls, readable), and the graph around it pads and splits any batch into chunks of
B (a tf.map_fn), so the signatures still take any number of images.

An export is written to a temporary directory beside OUTPUT and renamed into place when
complete, `export.json` last: a directory with `export.json` is a whole export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.apps import classifier as classifier_lib
from vit_jax.data import transforms
from vit_jax.platform import files
from vit_jax.platform import tf_setup

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "stablehlo", "onnx", "litert")
# The modules each format needs while exporting (all from the `export` extra).
NEEDS = {
  "saved_model": ("orbax.export",),
  "stablehlo": (),
  "onnx": ("jax2onnx", "onnx"),
  "litert": ("orbax.export",),
}
MANIFEST = "export.json"
STABLEHLO_PLATFORMS = ("cpu", "tpu", "cuda")
# The compiled batch of the formats that split any batch into chunks (saved_model, litert):
# predict's CPU optimum for a server; one image at a time on a phone.
DEFAULT_CHUNK = {"saved_model": 8, "litert": 1}
JPEG_DCT = transforms.JPEG_DCT  # PIL's IDCT: in-graph JPEG pixels equal predict's


def check_format(fmt: str) -> None:
  """A one-line error for an unknown format, or one whose extra is not installed."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
  for module in NEEDS[fmt]:
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing too
      found = False
    if not found:
      raise errors.MissingExtraError("export", module)


def check_carries(clf: classifier_lib.Classifier, fmt: str) -> None:
  """A one-line error for a classifier the format cannot carry (each reason seen here)."""
  activations = bool(clf.quantized) and "activations (" in clf.quantized  # Setting.describe()
  why = None
  if fmt == "onnx" and clf.quantized:
    why = (
      "--quantize int8 (jax2onnx 0.13 converts flax's Dense with its own plugin, which cannot "
      "take qwix's int8 weights)"
    )
  elif fmt == "litert" and activations:
    why = (
      "int8 activations (TFLite's fully_connected takes its own quantized types, not the "
      "plain int8 tensors jax2tf writes); --quantize int8 without --calibration can"
    )
  elif fmt == "onnx" and clf.dtype != "float32":
    why = f"--dtype {clf.dtype} (onnxruntime has no bfloat16 Einsum: the model would not load)"
  elif fmt == "litert" and clf.dtype != "float32":
    why = f"--dtype {clf.dtype} (TFLite's converter cannot lower a bfloat16 conv_2d)"
  if why:
    raise errors.ConfigError(f"--format {fmt} cannot carry {why}")


@dataclasses.dataclass
class Export:
  """What one export holds: enough for its manifest and for the functions that build it."""

  clf: classifier_lib.Classifier
  fmt: str
  top_k: int
  batch: int | None  # None: any batch

  @property
  def size(self) -> int:
    return self.clf.image_size

  @property
  def k(self) -> int:
    return min(self.top_k, len(self.clf.class_names))

  def probs_fn(self):
    """(flat params, images [n, S, S, 3]) -> probabilities [n, C] float32, and the params."""
    leaves, treedef = jax.tree_util.tree_flatten(self.clf.params)
    model, activation = self.clf.model, self.clf.activation

    def probs(leaves, images):
      params = jax.tree_util.tree_unflatten(treedef, leaves)
      return activation(model.apply({"params": params}, images, train=False))

    return probs, [np.asarray(x) for x in leaves]

  def top_k_fn(self):
    """(flat params, images) -> (scores [n, k] float32, indices [n, k] int32), and the params."""
    probs, leaves = self.probs_fn()
    k = self.k

    def top(leaves, images):
      scores, indices = jax.lax.top_k(probs(leaves, images), k)
      return scores, indices.astype(jnp.int32)

    return top, leaves

  def manifest(self, files_written: list[str], **extra: Any) -> dict[str, Any]:
    import vit_jax  # noqa: PLC0415  # the version only

    s = self.size
    return {
      "format": self.fmt,
      "vit_jax": vit_jax.__version__,
      "model": self.clf.model_name,
      "classes": len(self.clf.class_names),
      "head": "sigmoid" if self.clf.multilabel else "softmax",
      "top_k": self.k,
      "dtype": self.clf.dtype,
      "quantized": self.clf.quantized,
      "batch": self.batch if self.batch is not None else "any",
      "input": {
        "images": [self.batch if self.batch is not None else "n", s, s, 3],
        "dtype": "float32",
        "preprocessing": f"decode to RGB, bilinear resize to {s}x{s} (no crop), "
        "(pixels - 127.5) / 127.5",
      },
      "outputs": {
        "scores": "float32 [n, k]: the k best probabilities, best first "
        + ("(sigmoid per class)" if self.clf.multilabel else "(softmax over classes)"),
        "indices": "int32 [n, k]: their classes' rows in labels.txt",
      },
      "files": sorted(files_written),
      **extra,
    }


def export(
  clf: classifier_lib.Classifier,
  fmt: str,
  output: str,
  *,
  batch: int | None = None,
  top_k: int = 5,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes `clf` as `fmt` into the directory `output`; returns the manifest (export.json)."""
  check_format(fmt)
  check_carries(clf, fmt)
  if top_k < 1:
    raise errors.ConfigError(f"--top-k {top_k}: must be at least 1")
  if batch is not None and batch < 1:
    raise errors.ConfigError(f"--batch {batch}: must be at least 1")
  if clf.threshold is not None:
    raise errors.ConfigError(
      "--threshold: an export's outputs hold k classes for every image; leave out low scores "
      "in the client"
    )
  output = _check_output(output, overwrite)
  chunk = batch or DEFAULT_CHUNK.get(fmt)
  job = Export(clf, fmt, top_k, None if fmt in DEFAULT_CHUNK else batch)
  parent = os.path.dirname(output) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.partial-", dir=parent)
  try:
    if fmt == "saved_model":
      written, extra = _saved_model(job, tmp, chunk, bytes_signature=True)
    elif fmt == "litert":
      written, extra = _litert(job, tmp, chunk)
    elif fmt == "stablehlo":
      written, extra = _stablehlo(job, tmp)
    else:
      written, extra = _onnx(job, tmp)
    with open(os.path.join(tmp, "labels.txt"), "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in clf.class_names))
    manifest = job.manifest([*written, "labels.txt", MANIFEST], **extra)
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      f.write(json.dumps(manifest, indent=1) + "\n")
    _move_into_place(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _check_output(output: str, overwrite: bool) -> str:
  if files.is_remote(output):
    raise errors.ConfigError(f"--output {output}: exports are written to a local directory")
  output = os.path.abspath(output)
  if os.path.exists(output):
    if not os.path.isdir(output):
      raise errors.ConfigError(f"--output {output}: a file, not a directory")
    if os.path.exists(os.path.join(output, MANIFEST)):
      if not overwrite:
        raise errors.ConfigError(
          f"--output {output}: already holds an export; pass --overwrite to replace it"
        )
    elif os.listdir(output):
      raise errors.ConfigError(
        f"--output {output}: a directory with other files in it; give a new or empty one"
      )
  return output


def _move_into_place(tmp: str, output: str) -> None:
  """Renames the finished `tmp` to `output`; an export already there goes only after that."""
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a server's other users out
  old = None
  if os.path.exists(output):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
    os.rmdir(old)
    os.rename(output, old)
  try:
    os.rename(tmp, output)
  except OSError:
    if old is not None:
      os.rename(old, output)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# -- TF SavedModel (and LiteRT from it) ---------------------------------------------------------


def _tf_graph(job: Export, chunk: int):
  """(JaxModule, {name: tf.function}) for the SavedModel's signatures, compiled at `chunk`."""
  from orbax.export import JaxModule  # noqa: PLC0415  # orbax-export: the export extra

  tf = tf_setup.tf()
  probs, leaves = job.probs_fn()
  s, c, k = job.size, len(job.clf.class_names), job.k
  module = JaxModule(
    leaves,
    probs,
    trainable=False,
    jax2tf_kwargs={"native_serialization_platforms": STABLEHLO_PLATFORMS},
  )
  (infer,) = module.methods.values()  # [chunk, S, S, 3] -> [chunk, C], the params inside
  names = tf.constant(job.clf.class_names)

  def chunked(images):
    """Any number of images through the fixed-batch model, padded to whole chunks."""
    n = tf.shape(images)[0]
    chunks = (n + chunk - 1) // chunk
    padded = tf.pad(images, [[0, chunks * chunk - n], [0, 0], [0, 0], [0, 0]])
    out = tf.map_fn(
      infer,
      tf.reshape(padded, [chunks, chunk, s, s, 3]),
      fn_output_signature=tf.TensorSpec([chunk, c], tf.float32),
      parallel_iterations=1,
    )
    return tf.reshape(out, [chunks * chunk, c])[:n]

  def outputs(probs):
    scores, indices = tf.math.top_k(probs, k)  # ties: the lower index first, as predict
    return {"scores": scores, "classes": tf.gather(names, indices), "indices": indices}

  def decode(data):
    """predict's preprocessing: decode to RGB, bilinear resize, scale to [-1, 1]."""
    image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image = tf.image.resize(tf.ensure_shape(image, [None, None, 3]), [s, s], method="bilinear")
    return (image - 127.5) / 127.5

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serving_bytes(image_bytes):
    images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([s, s, 3]))
    return outputs(chunked(images))

  @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32, name="images")])
  def serving_float(images):
    return outputs(chunked(images))

  return module, {"bytes": serving_bytes, "float": serving_float}


def _saved_model(job: Export, out: str, chunk: int, *, bytes_signature: bool):
  from orbax.export import ExportManager  # noqa: PLC0415  # orbax-export: the export extra

  module, fns = _tf_graph(job, chunk)
  signatures = {"serving_float": fns["float"].get_concrete_function()}
  if bytes_signature:
    signatures["serving_default"] = fns["bytes"].get_concrete_function()
  else:  # LiteRT: no image decoders; the float signature is the default
    signatures = {"serving_default": signatures["serving_float"]}
  ExportManager(module, []).save(out, signature_overrides=signatures)
  extra = {
    "signatures": {
      "serving_default": "image_bytes: string [n] (JPEG, PNG, GIF, BMP, WebP)",
      "serving_float": "images: float32 [n, S, S, 3] in [-1, 1]",
    },
    "compiled_batch": chunk,
    "platforms": list(STABLEHLO_PLATFORMS),
  }
  extra["outputs_also"] = {"classes": "string [n, k]: the class names of `indices`"}
  return sorted(os.listdir(out)), extra


def _litert(job: Export, out: str, chunk: int):
  tf = tf_setup.tf()
  with tempfile.TemporaryDirectory(dir=out) as tmp:
    _saved_model(job, tmp, chunk, bytes_signature=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    data = converter.convert()
  with open(os.path.join(out, "model.tflite"), "wb") as f:
    f.write(data)
  extra = {
    "signatures": {"serving_default": "images: float32 [n, S, S, 3] in [-1, 1]"},
    "compiled_batch": chunk,
    "outputs_also": {"classes": "string [n, k]: the class names of `indices`"},
  }
  return ["model.tflite"], extra


# -- StableHLO (jax.export) ---------------------------------------------------------------------


def _stablehlo(job: Export, out: str):
  fn, leaves = job.top_k_fn()
  # bfloat16 is no NumPy dtype: an .npz would hold it as raw void bytes. Such params are
  # stored as float32 (exactly) and cast back inside the function.
  dtypes = [x.dtype for x in leaves]
  leaves = [x.astype(np.float32) if x.dtype == jnp.bfloat16 else x for x in leaves]

  def portable(stored, images):
    return fn([x.astype(d) for x, d in zip(stored, dtypes, strict=True)], images)

  s = job.size
  if job.batch is None:
    (n,) = jax.export.symbolic_shape("n")
  else:
    n = job.batch
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  exported = jax.export.export(jax.jit(portable), platforms=STABLEHLO_PLATFORMS)(
    specs, jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32)
  )
  with open(os.path.join(out, "model.jax_exported"), "wb") as f:
    f.write(exported.serialize())
  # The params in the order the function takes them: arr_0, arr_1, ...
  np.savez(os.path.join(out, "params.npz"), *leaves)
  extra = {
    "platforms": list(STABLEHLO_PLATFORMS),
    "call": "jax.export.deserialize(bytearray(open('model.jax_exported', 'rb').read()))"
    ".call([params['arr_%d' % i] for i in range(len(params.files))], images)",
  }
  return ["model.jax_exported", "params.npz"], extra


# -- ONNX (jax2onnx) ----------------------------------------------------------------------------


def _onnx(job: Export, out: str):
  from jax2onnx import to_onnx  # noqa: PLC0415  # jax2onnx: the export extra

  fn, leaves = job.top_k_fn()
  params = [jnp.asarray(x) for x in leaves]
  s = job.size
  # jax2onnx logs a line for every shape it leaves unnamed: hundreds, none of them a problem.
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  with contextlib.redirect_stdout(io.StringIO()):  # and prints a DEBUG line per Dense
    to_onnx(
      lambda images: fn(params, images),
      [(job.batch if job.batch is not None else "n", s, s, 3)],
      model_name="vit_jax",
      return_mode="file",
      output_path=os.path.join(out, "model.onnx"),
      input_names=["images"],
      output_names=["scores", "indices"],
    )
  return ["model.onnx"], {}
