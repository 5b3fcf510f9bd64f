"""Outside input, generated: every failure is the module's own clear error, never a crash or a hang.

The checkpoint loader, the image decoder, the config overrides and the server's
request parsing each get random, mutated, truncated and bit-flipped input. The
only exceptions allowed out are `errors.CheckpointError`,
`preprocess.ImageError`, a one-line `ValueError` for config overrides and a 4xx
`protocol.RequestError` for request bodies; anything else fails the test.

A hang (in Python or inside zlib or PIL's C code) is caught by pytest-timeout's thread
method: past the module's limit it prints every thread's stack and ends the run. The
limit is far above a test's run time (under two minutes on 2 loaded cores), so a slow
machine does not trip it (a per-call alarm could neither interrupt C code nor stay
clear of a loaded machine).
"""

import functools
import io
import json
import os
import re
import string
import zipfile

import ckpt_fixtures as cf
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image

from vit_jax import errors
from vit_jax import models
from vit_jax.apps.serving import app as serve
from vit_jax.apps.serving import protocol
from vit_jax.config import config_args
from vit_jax.config import recipes
from vit_jax.data import preprocess
from vit_jax.models import layout
from vit_jax.models import spec
from vit_jax.weights import checkpoint

pytestmark = [
  pytest.mark.filterwarnings("ignore::UserWarning:PIL"),  # "Corrupt EXIF data"
  pytest.mark.timeout(900, method="thread"),
]


def examples(n: int) -> settings:
  """n examples, no deadline (first calls trace JAX), no saved database: each run is fresh."""
  return settings(
    max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
  )


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# --- checkpoints ------------------------------------------------------------------------------

SPEC = cf.Spec(hidden=16, mlp=32, heads=2, layers=2, patch=8, image_size=16, classes=3)
VALID = cf.original_arrays(SPEC)
DTYPES = [
  np.float32,
  np.float16,
  np.float64,
  np.int32,
  np.int8,
  np.uint8,
  np.bool_,
  np.complex64,
  np.dtype("<U3"),
  np.dtype([("a", np.float32), ("b", np.int8)]),
]


def load_all(path: str) -> None:
  """What `vit-jax predict` and `convert` do with a file: read it, infer the model, fill it."""
  tree = checkpoint.load(path)
  model = models.build(spec.ModelSpec.from_params(tree, path))
  checkpoint.load_pretrained(tree, model)


def check_loads_or_refuses(data: bytes, tmp_path) -> None:
  """The bytes as a checkpoint file: a successful load or a CheckpointError, within 30 s."""
  path = tmp_path / "fuzz.npz"
  path.write_bytes(data)
  try:
    load_all(str(path))
  except errors.CheckpointError as e:
    assert str(e) and "\n" not in str(e)


def savez(arrays: dict, compressed: bool = False) -> bytes:
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  return buf.getvalue()


shapes = st.lists(st.integers(0, 20), min_size=0, max_size=4).map(tuple)
keys = st.one_of(
  st.sampled_from(sorted(VALID)),
  st.text(string.ascii_letters + "/_0123456789", min_size=1, max_size=40),
)


@st.composite
def arrays(draw) -> np.ndarray:
  dtype = draw(st.sampled_from(DTYPES))
  return np.zeros(draw(shapes), dtype)


def mutate(ops: list[tuple]) -> dict:
  """The valid arrays with keys dropped, added, renamed, reshaped, retyped or prefixed."""
  out = dict(VALID)
  for op, pick, key, value in ops:
    old = sorted(out)[pick % len(out)] if out else None
    if op == "drop" and old:
      del out[old]
    elif op == "add":
      out[key] = value
    elif op == "rename" and old:
      out[key] = out.pop(old)
    elif op == "reshape" and old:
      out[old] = np.zeros(value.shape, np.float32)
    elif op == "retype" and old:
      out[old] = np.zeros(np.shape(out[old]), value.dtype)
    elif op == "prefix":
      out = {"opt/target/" + k: v for k, v in out.items()}
  return out


# Each mutation: (what, which existing key by index, a new key, a new array); printed when one
# fails.
mutations = st.lists(
  st.tuples(
    st.sampled_from(["drop", "add", "rename", "reshape", "retype", "prefix"]),
    st.integers(0, 10_000),
    keys,
    arrays(),
  ),
  min_size=1,
  max_size=4,
)


@examples(100)
@given(st.dictionaries(keys, arrays(), max_size=8))
def test_random_key_sets_shapes_and_dtypes(tmp_path_factory, arrays_):
  check_loads_or_refuses(savez(arrays_), tmp_path_factory.mktemp("ck"))


@pytest.mark.slow
@examples(150)
@given(mutations)
def test_mutated_checkpoints(tmp_path_factory, ops):
  """Loaded or refused in one line; that valid files are not refused is test_valid_variants_load."""
  check_loads_or_refuses(savez(mutate(ops)), tmp_path_factory.mktemp("ck"))


valid_variants = st.fixed_dictionaries(
  dict(
    prefix=st.booleans(),
    linen=st.booleans(),
    compressed=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    order=st.permutations(sorted(VALID)),
  )
)


@pytest.mark.slow
@examples(60)
@given(valid_variants)
def test_valid_variants_load(tmp_path_factory, variant):
  """Every way a valid file is written (prefix, names, compression, dtype, key order) loads."""
  arrays = {k: VALID[k].astype(variant["dtype"]) for k in variant["order"]}
  if variant["linen"]:
    arrays = {cf.linen_key(k): v for k, v in arrays.items()}
  if variant["prefix"]:
    arrays = {"opt/target/" + k: v for k, v in arrays.items()}
  path = tmp_path_factory.mktemp("ck") / "valid.npz"
  path.write_bytes(savez(arrays, variant["compressed"]))
  tree = checkpoint.load(str(path))
  model = models.build(spec.ModelSpec.from_params(tree, str(path)))
  params = checkpoint.load_pretrained(tree, model)
  assert layout.flatten(params).keys() == {cf.linen_key(k) for k in VALID}
  for key, value in VALID.items():
    np.testing.assert_array_equal(
      cf.get(params, cf.linen_key(key)), value.astype(variant["dtype"]).astype(np.float32)
    )


def test_an_object_array_is_refused_not_unpickled(tmp_path):
  (tmp_path / "obj.npz").write_bytes(savez({**VALID, "cls": np.array([{"a": 1}], dtype=object)}))
  with pytest.raises(errors.CheckpointError, match="pickled"):
    checkpoint.load(str(tmp_path / "obj.npz"))


VALID_BYTES = {False: savez(VALID), True: savez(VALID, compressed=True)}


def _npz_with_raw_member(name: str, member: bytes) -> bytes:
  """The valid arrays plus one member written byte for byte (a hand-made .npy)."""
  buf = io.BytesIO(VALID_BYTES[False])
  with zipfile.ZipFile(buf, "a") as z:
    z.writestr(name + ".npy", member)
  return buf.getvalue()


def _npy_header(text: str) -> bytes:
  header = text.encode("latin1")
  header += b" " * (-(len(header) + 11) % 64) + b"\n"
  return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _with(**changes) -> bytes:
  return savez({**VALID, **changes})


def _corrupt_compressed_member() -> bytes:
  data = bytearray(VALID_BYTES[True])
  start = data.index(b"embedding/kernel.npy") + len("embedding/kernel.npy") + 40
  data[start : start + 64] = bytes(64)  # inside the deflate stream of that member
  return bytes(data)


# Inputs that once escaped as IndexError, AssertionError, zlib.error, TokenError or a NaN
# ValueError: each is a CheckpointError now.
FIXED = {
  "1-D head kernel": (_with(**{"head/kernel": np.zeros(16, np.float32)}), "head/kernel has shape"),
  "1-D MLP kernel": (
    _with(**{"Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros(16, np.float32)}),
    "cannot tell the model",
  ),
  "width not divisible by heads": (
    _with(**{"embedding/kernel": np.zeros((8, 8, 3, 5), np.float32)}),
    "inconsistent shapes",
  ),
  "no position tokens": (
    _with(**{"Transformer/posembed_input/pos_embedding": np.zeros((1, 0, 16), np.float32)}),
    "not a square grid",
  ),
  "an array that is also a group": (
    _with(embedding=np.zeros(3, np.float32)),
    "'embedding' is an array and also holds",
  ),
  "corrupt deflate stream": (_corrupt_compressed_member(), "corrupt .npz archive"),
  "unbalanced .npy header": (
    _npz_with_raw_member(
      "extra", _npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, }")
    ),
    "corrupt .npz archive",
  ),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_inputs_that_used_to_crash_the_loader(tmp_path, case):
  data, message = FIXED[case]
  (tmp_path / "c.npz").write_bytes(data)
  with pytest.raises(errors.CheckpointError, match=re.escape(message)):
    load_all(str(tmp_path / "c.npz"))


@examples(100)
@given(st.booleans(), st.floats(0, 1, exclude_max=True))
def test_truncated_archives(tmp_path_factory, compressed, fraction):
  data = VALID_BYTES[compressed]
  check_loads_or_refuses(data[: int(len(data) * fraction)], tmp_path_factory.mktemp("ck"))


@pytest.mark.slow
@examples(150)
@given(
  st.booleans(),
  st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8),
)
def test_bit_flipped_archives(tmp_path_factory, compressed, flips):
  data = bytearray(VALID_BYTES[compressed])
  for where, bit in flips:
    data[int(len(data) * where)] ^= 1 << bit
  check_loads_or_refuses(bytes(data), tmp_path_factory.mktemp("ck"))


@pytest.mark.slow
@examples(100)
@given(st.integers(0, 2000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, 255))))
def test_bit_flips_in_the_zip_headers(tmp_path_factory, spot):
  # Headers sit at both ends of the archive: the local one first, the central directory last.
  pos, value = spot
  data = bytearray(VALID_BYTES[False])
  data[pos if pos < 1000 else len(data) - (pos - 999)] = value
  check_loads_or_refuses(bytes(data), tmp_path_factory.mktemp("ck"))


# --- images -----------------------------------------------------------------------------------


def _encoded() -> dict[str, bytes]:
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)
  out = {}
  for fmt, im, kw in [
    ("PNG", Image.fromarray(rgb), {}),
    ("JPEG", Image.fromarray(rgb), {}),
    ("JPEG", Image.fromarray(rgb), {"progressive": True}),
    ("GIF", Image.fromarray(rgb).convert("P"), {}),
    ("BMP", Image.fromarray(rgb), {}),
    ("TIFF", Image.fromarray(rgb), {"compression": "tiff_deflate"}),
    ("WEBP", Image.fromarray(rgb), {}),
    ("PNG", Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), {}),
  ]:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    out[f"{fmt}{len(out)}"] = buf.getvalue()
  return out


ENCODED = _encoded()


def check_decodes_or_refuses(data: bytes, max_pixels: int = 1_000_000) -> None:
  """decode_rgb gives uint8 [H, W, 3] within its pixel limit, or an ImageError, within 20 s."""
  try:
    rgb = preprocess.decode_rgb(data, name="fuzz", max_pixels=max_pixels)
  except preprocess.ImageError as e:
    assert str(e).startswith("fuzz: ") and "\n" not in str(e)
    return
  assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
  assert 0 < rgb.shape[0] * rgb.shape[1] <= max_pixels


@examples(200)
@given(st.binary(max_size=512))
def test_random_bytes(data):
  check_decodes_or_refuses(data)


@examples(200)
@given(st.sampled_from(sorted(ENCODED)), st.binary(min_size=1, max_size=64))
def test_a_real_header_with_random_bytes_after_it(fmt, tail):
  check_decodes_or_refuses(ENCODED[fmt][:16] + tail)


@examples(200)
@given(st.sampled_from(sorted(ENCODED)), st.floats(0, 1, exclude_max=True))
def test_truncated_images(fmt, fraction):
  data = ENCODED[fmt]
  check_decodes_or_refuses(data[: int(len(data) * fraction)])


@examples(400)
@given(
  st.sampled_from(sorted(ENCODED)),
  st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=6),
)
def test_bit_flipped_images(fmt, flips):
  data = bytearray(ENCODED[fmt])
  for where, bit in flips:
    data[int(len(data) * where)] ^= 1 << bit
  check_decodes_or_refuses(bytes(data))


@examples(50)
@given(st.sampled_from(sorted(ENCODED)), st.integers(1, 24 * 30 * 2))
def test_the_pixel_limit(fmt, max_pixels):
  check_decodes_or_refuses(ENCODED[fmt], max_pixels)
  if max_pixels < 24 * 30:
    with pytest.raises(preprocess.ImageError, match="over the limit"):
      preprocess.decode_rgb(ENCODED[fmt], max_pixels=max_pixels)


def test_a_huge_declared_size_is_refused_before_decoding():
  # A valid PNG header declaring 100,000 x 100,000 pixels, and no pixel data.
  png = bytearray(ENCODED["PNG0"][:33])
  png[16:24] = (100_000).to_bytes(4, "big") * 2
  with pytest.raises(preprocess.ImageError, match="fuzz: "):
    preprocess.decode_rgb(bytes(png), name="fuzz")


# --- config overrides -------------------------------------------------------------------------

CONFIG = os.path.join(CONFIGS, "tiny.py")
BASE = config_args.load_config(["--config", CONFIG])
FIELDS = [
  "batch_size",
  "base_lr",
  "model.name",
  "model.dropout_rate",
  "augment.hflip",
  "augment.rrc_scale",
  "mesh.data",
  "pretrained",
  "num_classes",
  "data_threads",
  "folder",
  "model.representation_size",
  "total_steps",
  "model",
  "augment",
  "model.hidden_size",
]
values = st.one_of(
  st.integers(-(10**30), 10**30).map(str),
  st.floats(allow_nan=True).map(str),
  st.sampled_from(
    [
      "True",
      "false",
      "None",
      "none",
      "(1, 2)",
      "[1,2]",
      "()",
      "(0.1,)",
      "{}",
      "''",
      '"',
      "1e999",
      "-",
      "0x10",
      "nan",
      "--",
      "=",
    ]
  ),
  st.text(max_size=20),
)
overrides = st.lists(
  st.tuples(
    st.one_of(
      st.sampled_from(FIELDS), st.text(string.ascii_letters + "._", min_size=1, max_size=20)
    ),
    values,
  ),
  max_size=4,
)


@pytest.mark.slow
@examples(300)
@given(overrides)
def test_random_config_overrides(pairs):
  argv = ["--config", CONFIG, *(f"--config.{k}={v}" for k, v in pairs)]
  try:
    config = config_args.load_config(argv)
  except ValueError as e:
    message = str(e)
    assert message and "\n" not in message, message
    return
  assert isinstance(config, ml_collections.ConfigDict)
  # A value that was taken has the field's declared type (None only where the field may be unset).
  for key, _ in pairs:
    *parents, name = key.split(".")
    if key not in FIELDS or key in ("model", "augment"):
      continue
    declared = functools.reduce(getattr, parents, BASE).get_type(name)
    value = functools.reduce(getattr, parents, config)[name]
    if value is None:
      assert (
        functools.reduce(getattr, parents, BASE).get_ref(name).empty
        or functools.reduce(getattr, parents, BASE)[name] is None
      ), key
    else:
      assert isinstance(value, declared) or (declared is float and type(value) is int), (key, value)


@examples(50)
@given(
  st.text(st.characters(exclude_characters="\n\r"), max_size=30)
)  # the message repeats the path
def test_random_config_paths(path):
  assume(not os.path.exists(path.split(":", 1)[0]))
  assume(path.split(":", 1)[0] not in recipes.names())  # a recipe's name is a valid --config
  with pytest.raises(ValueError) as e:
    config_args.load_config(["--config", path])
  assert "\n" not in str(e.value)


# --- /score request bodies --------------------------------------------------------------------

json_values = st.recursive(
  st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
  lambda inner: (
    st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
  ),
  max_leaves=12,
)
bodies = st.one_of(
  st.binary(max_size=200),
  json_values.map(lambda v: json.dumps(v).encode()),
  st.fixed_dictionaries({"input_data": json_values}, optional={"top_k": json_values}).map(
    lambda v: json.dumps(v).encode()
  ),
)


@pytest.mark.slow
@examples(300)
@given(bodies)
def test_random_request_bodies(body):
  options = protocol.Options(max_images=3)
  try:
    inputs, k = serve._parse(body, options)
  except protocol.RequestError as e:
    assert e.status in (400, 422) and e.message and "\n" not in e.message
    return
  assert 1 <= len(inputs) <= 3 and all(isinstance(i, str) for i in inputs)
  assert k is None or (isinstance(k, int) and k >= 1)


@examples(100)
@given(st.one_of(st.text(max_size=8), json_values))
def test_random_top_k(value):
  try:
    k = serve._top_k(value, "query parameter")
  except protocol.RequestError as e:
    assert e.status == 400 and "top_k must be a positive integer" in e.message
    return
  assert isinstance(k, int) and k >= 1


@examples(200)
@given(st.text(max_size=40))
def test_random_base64_text(text):
  try:
    data = serve._decode_base64(text, 0)
  except protocol.RequestError as e:
    assert e.status == 400 and e.message.startswith("input_data[0]: not valid base64")
    return
  assert isinstance(data, bytes)


@examples(200)
@given(
  st.one_of(
    st.binary(max_size=300),
    st.sampled_from(sorted(ENCODED)).flatmap(
      lambda f: st.integers(0, len(ENCODED[f])).map(lambda n: ENCODED[f][:n])
    ),
  )
)
def test_random_image_bytes_in_a_request(data):
  try:
    x = serve._prepare(data, 0, 8, max_pixels=500)
  except protocol.RequestError as e:
    assert e.status in (400, 413) and e.message.startswith("input_data[0]: ")
    return
  assert x.shape == (8, 8, 3) and x.dtype == np.float32
