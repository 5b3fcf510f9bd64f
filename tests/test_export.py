"""`vit-jax export`: each format loads and predicts in its own runtime, in a fresh process that
does not import vit_jax, and its scores match `vit-jax predict`'s on the same image files.

The bound. An export computes predict's float32 ops in another order (other fusions, another
batch, TF's or onnxruntime's or LiteRT's kernels); its preprocessing is the same ops on the
same pixels (PIL and TF's accurate-integer JPEG IDCT agree). Summing k float32 terms in
another order changes the sum by up to about k * 2^-24 of the terms' magnitudes; through this
model's two blocks that is test_checkpoint's fp32 bound for the architecture, 1.5e-5 on
logits of size up to max|logit| (4 here). Softmax (and sigmoid) turn a logit error d into a
probability's relative error of at most 2d: 2 * 1.5e-5 * 4 = 1.2e-4, so rtol 2e-4 (with atol
1e-7 for probabilities near 0). Measured, per format, in the comment of each assertion.
"""

import json
import os
import subprocess
import sys
import textwrap

import ckpt_fixtures as cf
import data_fixtures as df
import numpy as np
import pytest

from vit_jax import cli
from vit_jax.apps import export as export_lib
from vit_jax.data import preprocess
from vit_jax.weights import head_record

NAMES = ["cat", "dog", "bird", "fish", "frog"]
RTOL, ATOL = 2e-4, 1e-7
TOP_K = 3
# Formats whose files decode in-graph; the others take predict's preprocessed floats.
IMAGE_FILES = ("rgb.jpg", "gray.png", "palette.png", "alpha.png", "pic.bmp", "big.jpg", "wide.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A 5-class checkpoint with a labels file, image files, and predict's answers for them."""
  root = tmp_path_factory.mktemp("export")
  ckpt = str(root / "m.npz")
  cf.write_original(ckpt, cf.Spec(classes=5, image_size=32))
  labels = root / "labels.txt"
  labels.write_text("".join(f"{n}\n" for n in NAMES))
  (root / "img").mkdir()
  paths = df.write_mode_images(str(root / "img"))
  rng = np.random.default_rng(1)
  big = rng.uniform(0, 255, (97, 131, 3)).astype(np.uint8)
  paths["big.jpg"] = df.write_file(
    str(root / "img" / "big.jpg"), df.encode(big, "JPEG", quality=90)
  )
  wide = df.class_image(1, 3, 20, 64)
  paths["wide.png"] = df.write_file(str(root / "img" / "wide.png"), df.encode(wide))
  files = [paths[k] for k in IMAGE_FILES]
  return {"root": root, "ckpt": ckpt, "labels": str(labels), "files": files}


def _predict(capsys, setup, *extra) -> list[dict]:
  """predict --json's rows for the setup's files."""
  argv = ["predict", "--checkpoint", setup["ckpt"], "--labels", setup["labels"], "--json"]
  code = cli.main([*argv, "--top-k", str(TOP_K), *extra, *setup["files"]])
  out, err = capsys.readouterr()
  assert code == 0, err
  return [json.loads(line)["predictions"] for line in out.splitlines()]


def _floats(setup, path) -> str:
  """predict's preprocessed images of the setup's files, as an .npy for the float formats."""
  x = np.stack([preprocess.eval_resize(preprocess.read_rgb(p), 32) for p in setup["files"]])
  np.save(path, x)
  return str(path)


def _export(setup, fmt, out, *extra) -> dict:
  argv = ["export", "--checkpoint", setup["ckpt"], "--labels", setup["labels"]]
  code = cli.main([*argv, "--format", fmt, "--output", str(out), "--top-k", str(TOP_K), *extra])
  assert code == 0
  return json.loads((out / "export.json").read_text())


def _fresh(code: str, *args, allowed_vit_jax=False) -> dict:
  """Runs `code` in a new Python process; it prints one JSON line, which is returned."""
  guard = (
    "\nimport sys, json as _j\n"
    "print(_j.dumps({'vit_jax_loaded': 'vit_jax' in sys.modules, "
    "'flax_loaded': 'flax' in sys.modules}))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code) + guard, *map(str, args)],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd="/",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  result, guard_out = lines[-2], lines[-1]
  assert not guard_out["vit_jax_loaded"], "the runtime check must not need vit_jax"
  return {**result, **guard_out}


def _check(rows: list[dict], scores, indices, classes=None, rtol: float = RTOL) -> float:
  """Asserts the export's top-k equals predict's; returns the largest score difference."""
  want_idx = np.array([[p["index"] for p in r] for r in rows])
  want = np.array([[p["score"] for p in r] for r in rows])
  scores, indices = np.asarray(scores), np.asarray(indices)
  np.testing.assert_array_equal(indices, want_idx)
  np.testing.assert_allclose(scores, want, rtol=rtol, atol=ATOL)
  if classes is not None:
    assert np.asarray(classes).tolist() == [[p["label"] for p in r] for r in rows]
  diff = float(np.abs(scores - want).max())
  print(f"max |score - predict's| = {diff:.2g}")  # pytest -s shows the measured figures
  return diff


# -- the runtimes: each a program that imports only its runtime ---------------------------------

TF_LOAD = """
import json, sys
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
out = {}
blobs = [open(p, "rb").read() for p in sys.argv[3:]]
r = model.signatures["serving_default"](image_bytes=tf.constant(blobs))
out["bytes"] = {k: v.numpy().tolist() for k, v in r.items() if k != "classes"}
out["bytes"]["classes"] = [[c.decode() for c in row] for row in r["classes"].numpy()]
x = np.load(sys.argv[2])
for n in (len(x), 1, 0):  # any batch: the compiled batch is 8
  r = model.signatures["serving_float"](images=tf.constant(x[:n]))
  out[f"float{n}"] = {k: v.numpy().tolist() for k, v in r.items() if k != "classes"}
print(json.dumps(out))
"""

STABLEHLO_LOAD = """
import json, sys
import numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + "/model.jax_exported", "rb").read()))
params = np.load(sys.argv[1] + "/params.npz")
leaves = [params[f"arr_{i}"] for i in range(len(params.files))]
x = np.load(sys.argv[2])
out = {"platforms": list(exported.platforms)}
for n in (len(x), 3):  # a symbolic batch: any size, no recompiled artifact
  scores, indices = exported.call(leaves, x[:n])
  out[f"n{n}"] = {"scores": np.asarray(scores).tolist(), "indices": np.asarray(indices).tolist()}
print(json.dumps(out))
"""

ONNX_LOAD = """
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
out = {"input": [str(d) for d in session.get_inputs()[0].shape]}
for n in (len(x), 2):
  scores, indices = session.run(["scores", "indices"], {"images": x[:n]})
  out[f"n{n}"] = {"scores": scores.tolist(), "indices": indices.tolist()}
print(json.dumps(out))
"""

LITERT_LOAD = """
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
x = np.load(sys.argv[2])
out = {}
for n in (len(x), 1):  # one .tflite, any batch (compiled batch 1, looped)
  runner = Interpreter(model_path=sys.argv[1] + "/model.tflite").get_signature_runner()
  r = runner(images=x[:n])
  out[f"n{n}"] = {"scores": r["scores"].tolist(), "indices": r["indices"].tolist(),
                  "classes": [[c.decode() for c in row] for row in r["classes"]]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_saved_model_takes_image_bytes_and_floats_and_matches_predict(capsys, setup, tmp_path):
  rows = _predict(capsys, setup)
  manifest = _export(setup, "saved_model", tmp_path / "sm")
  assert manifest["compiled_batch"] == 8 and manifest["batch"] == "any"
  out = _fresh(TF_LOAD, tmp_path / "sm", _floats(setup, tmp_path / "x.npy"), *setup["files"])
  b = out["bytes"]
  # JPEG, PNG (gray, palette, alpha), BMP decoded, resized and scaled in the graph.
  # Measured: 3.3e-7.
  _check(rows, b["scores"], b["indices"], b["classes"])
  f = out[f"float{len(rows)}"]
  _check(rows, f["scores"], f["indices"])  # Measured: 3.6e-7.
  _check(rows[:1], out["float1"]["scores"], out["float1"]["indices"])  # Measured: 2.4e-7.
  assert out["float0"]["scores"] == []


@pytest.mark.slow
def test_saved_model_cli_runs_the_jpeg_signature(capsys, setup, tmp_path):
  rows = _predict(capsys, setup)[:1]
  _export(setup, "saved_model", tmp_path / "sm", "--batch", "2")
  blob = open(setup["files"][0], "rb").read()
  literal = "[b'" + "".join(f"\\x{c:02x}" for c in blob) + "']"
  cli_path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  proc = subprocess.run(
    [cli_path, "run", "--dir", str(tmp_path / "sm"), "--tag_set", "serve"]
    + ["--signature_def", "serving_default", "--input_exprs", f"image_bytes={literal}"],
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = proc.stdout
  for p in rows[0]:
    assert p["label"] in text.split("Result for output key classes:")[1].split("Result")[0]
  scores = text.split("Result for output key scores:")[1].split("Result")[0]
  got = np.array([float(v) for v in scores.replace("[", " ").replace("]", " ").split()])
  # The CLI prints 8 significant digits. Measured: 2.3e-7.
  _check(rows, got[None], [[p["index"] for p in rows[0]]])


@pytest.mark.slow
def test_stablehlo_runs_without_the_model_code_at_any_batch(capsys, setup, tmp_path):
  rows = _predict(capsys, setup)
  manifest = _export(setup, "stablehlo", tmp_path / "hlo")
  assert manifest["platforms"] == ["cpu", "tpu", "cuda"] and manifest["batch"] == "any"
  out = _fresh(STABLEHLO_LOAD, tmp_path / "hlo", _floats(setup, tmp_path / "x.npy"))
  assert out["platforms"] == ["cpu", "tpu", "cuda"] and not out["flax_loaded"]
  n = out[f"n{len(rows)}"]
  _check(rows, n["scores"], n["indices"])  # Measured: 6.0e-8.
  _check(rows[:3], out["n3"]["scores"], out["n3"]["indices"])  # Measured: 3.6e-7.
  assert (tmp_path / "hlo" / "labels.txt").read_text().split() == NAMES


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_at_any_batch(capsys, setup, tmp_path):
  rows = _predict(capsys, setup)
  _export(setup, "onnx", tmp_path / "onnx")
  out = _fresh(ONNX_LOAD, tmp_path / "onnx", _floats(setup, tmp_path / "x.npy"))
  assert out["input"] == ["n", "32", "32", "3"]
  n = out[f"n{len(rows)}"]
  _check(rows, n["scores"], n["indices"])  # Measured: 2.7e-7.
  _check(rows[:2], out["n2"]["scores"], out["n2"]["indices"])  # Measured: 2.2e-7.


@pytest.mark.slow
def test_litert_runs_in_ai_edge_litert_at_any_batch(capsys, setup, tmp_path):
  rows = _predict(capsys, setup)
  manifest = _export(setup, "litert", tmp_path / "lite")
  assert manifest["compiled_batch"] == 1
  out = _fresh(LITERT_LOAD, tmp_path / "lite", _floats(setup, tmp_path / "x.npy"))
  n = out[f"n{len(rows)}"]
  _check(rows, n["scores"], n["indices"], n["classes"])  # Measured: 3.6e-7.
  _check(rows[:1], out["n1"]["scores"], out["n1"]["indices"], out["n1"]["classes"])  # 1.5e-7.


@pytest.mark.slow
def test_litert_carries_int8_weights(capsys, setup, tmp_path):
  rows = _predict(capsys, setup, "--quantize", "int8")
  manifest = _export(setup, "litert", tmp_path / "lite", "--quantize", "int8")
  assert manifest["quantized"] == "int8 weights (activations float)"
  out = _fresh(LITERT_LOAD, tmp_path / "lite", _floats(setup, tmp_path / "x.npy"))
  n = out[f"n{len(rows)}"]
  # TFLite multiplies the dequantized weights in float32: predict's float32 bound.
  _check(rows, n["scores"], n["indices"], n["classes"])  # Measured: 3.3e-7.


@pytest.mark.slow
def test_a_multilabel_head_record_gives_sigmoid_scores_and_its_class_names(capsys, setup, tmp_path):
  ckpt = str(tmp_path / "tags.npz")
  cf.write_original(ckpt, cf.Spec(classes=4, image_size=32), seed=3)
  tags = ["indoor", "outdoor", "people", "text"]
  head_record.write(ckpt, head_record.HeadRecord("sigmoid", tuple(tags)))
  code = cli.main(["predict", "--checkpoint", ckpt, "--json", "--top-k", "4", *setup["files"]])
  out, err = capsys.readouterr()
  assert code == 0, err
  rows = [json.loads(line)["predictions"] for line in out.splitlines()]
  # Independent probabilities: they need not sum to 1 (a softmax's would).
  assert any(abs(sum(p["score"] for p in r) - 1) > 0.05 for r in rows)
  argv = ["export", "--checkpoint", ckpt, "--format", "saved_model", "--top-k", "4"]
  assert cli.main([*argv, "--output", str(tmp_path / "sm")]) == 0
  manifest = json.loads((tmp_path / "sm" / "export.json").read_text())
  assert manifest["head"] == "sigmoid" and manifest["top_k"] == 4
  res = _fresh(TF_LOAD, tmp_path / "sm", _floats(setup, tmp_path / "x.npy"), *setup["files"])
  # Measured: 6.0e-7.
  _check(rows, res["bytes"]["scores"], res["bytes"]["indices"], res["bytes"]["classes"])


@pytest.mark.slow
def test_top_k_is_capped_at_the_classes_and_the_labels_go_along(capsys, setup, tmp_path):
  manifest = _export(setup, "stablehlo", tmp_path / "hlo", "--top-k", "9", "--batch", "2")
  assert manifest["top_k"] == 5 and manifest["batch"] == 2
  assert manifest["input"]["images"] == [2, 32, 32, 3]
  out = _fresh(
    STABLEHLO_LOAD.replace("(len(x), 3)", "(2,)"),
    tmp_path / "hlo",
    _floats(setup, tmp_path / "x.npy"),
  )
  assert np.asarray(out["n2"]["indices"]).shape == (2, 5)
  capsys.readouterr()


@pytest.mark.slow
def test_bfloat16_stablehlo_matches_predict_bfloat16(capsys, setup, tmp_path):
  rows = _predict(capsys, setup, "--dtype", "bfloat16")
  manifest = _export(setup, "stablehlo", tmp_path / "hlo", "--dtype", "bfloat16")
  assert manifest["dtype"] == "bfloat16"
  # The params are stored as float32 (bf16 is no NumPy dtype) and cast back in the function.
  out = _fresh(STABLEHLO_LOAD, tmp_path / "hlo", _floats(setup, tmp_path / "x.npy"))
  n = out[f"n{len(rows)}"]
  # The same bf16 program as predict's, at another batch, which XLA fuses differently: each
  # bf16 rounding is up to 2^-9 relative, and the float32 bound's derivation (a few roundings
  # through two blocks, doubled by the softmax) gives about 5 x 2^-8, so rtol 2e-2.
  # Measured: 0 on one run, 4.1e-3 relative on another (AMD EPYC, AVX-512).
  _check(rows, n["scores"], n["indices"], rtol=2e-2)


# -- int8 ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_stablehlo_matches_predict_int8(capsys, setup, tmp_path):
  """The quantized model exported: the same int8 program as `predict --quantize int8`."""
  cal = ["--quantize", "int8", "--calibration", str(setup["root"] / "img")]
  rows = _predict(capsys, setup, *cal)
  manifest = _export(setup, "stablehlo", tmp_path / "hlo", *cal)
  assert manifest["quantized"].startswith("int8 weights and activations")
  out = _fresh(STABLEHLO_LOAD, tmp_path / "hlo", _floats(setup, tmp_path / "x.npy"))
  n = out[f"n{len(rows)}"]
  # int8 arithmetic is exact and the rounding points are the same XLA program's:
  # predict's bound holds. Measured: 0 (bit-equal).
  _check(rows, n["scores"], n["indices"])


@pytest.mark.slow
def test_int8_saved_model_matches_predict_int8(capsys, setup, tmp_path):
  cal = ["--quantize", "int8", "--calibration", str(setup["root"] / "img")]
  rows = _predict(capsys, setup, *cal)
  _export(setup, "saved_model", tmp_path / "sm", *cal)
  out = _fresh(TF_LOAD, tmp_path / "sm", _floats(setup, tmp_path / "x.npy"), *setup["files"])
  # TF's XLA rounds the same int8 program: an activation on a rounding boundary may round to
  # the next int8 step, far over the bound (0.09 on logits was seen once with a symbolic
  # batch). At a fixed compiled batch none does here. Measured: 3.0e-8.
  _check(rows, out["bytes"]["scores"], out["bytes"]["indices"], out["bytes"]["classes"])


# -- bad input ----------------------------------------------------------------------------------


def _fails(capsys, *argv) -> str:
  capsys.readouterr()
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 2 and out == "", err
  # One error line (after any progress line, e.g. "vit-jax: computing in bfloat16").
  (line,) = [x for x in err.strip().splitlines() if not x.startswith("vit-jax: ")]
  return line


def test_an_unknown_format_lists_the_formats(capsys, setup, tmp_path):
  out = str(tmp_path / "x")
  line = _fails(
    capsys, "export", "--checkpoint", setup["ckpt"], "--format", "coreml", "--output", out
  )
  assert line == (
    "vit-jax export: error: --format coreml: choose one of saved_model, stablehlo, onnx, litert"
  )


@pytest.mark.parametrize("fmt, module", [("onnx", "jax2onnx"), ("saved_model", "orbax.export")])
def test_a_format_whose_extra_is_missing_names_the_extra(
  capsys, setup, monkeypatch, tmp_path, fmt, module
):
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a)
  )
  out = str(tmp_path / "x")
  line = _fails(capsys, "export", "--checkpoint", setup["ckpt"], "--format", fmt, "--output", out)
  assert line == (
    f"vit-jax export: error: {module} is not installed; this command needs "
    "pip install 'vit-jax[export]'"
  )


@pytest.mark.slow
def test_an_existing_export_is_kept_unless_overwrite(capsys, setup, tmp_path):
  out = tmp_path / "hlo"
  _export(setup, "stablehlo", out)
  before = (out / "model.jax_exported").read_bytes()
  line = _fails(
    capsys, "export", "--checkpoint", setup["ckpt"], "--format", "stablehlo", "--output", str(out)
  )
  assert line == f"vit-jax export: error: --output {out}: already holds an export; pass " + (
    "--overwrite to replace it"
  )
  assert (out / "model.jax_exported").read_bytes() == before
  manifest = _export(setup, "stablehlo", out, "--overwrite", "--batch", "3")
  assert manifest["batch"] == 3 and (out / "model.jax_exported").read_bytes() != before
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  line = _fails(
    capsys,
    "export",
    "--checkpoint",
    setup["ckpt"],
    "--format",
    "stablehlo",
    "--output",
    str(tmp_path / "other"),
    "--overwrite",
  )
  assert "a directory with other files in it" in line
  assert sorted(os.listdir(tmp_path)) == ["hlo", "other"]  # no partial directories left
  capsys.readouterr()


@pytest.mark.slow
def test_a_failed_export_leaves_nothing_that_looks_complete(capsys, setup, tmp_path, monkeypatch):
  out = tmp_path / "hlo"
  _export(setup, "stablehlo", out)
  before = sorted(os.listdir(out))
  original = export_lib._stablehlo

  def half_written(job, where):
    original(job, where)  # the model files are there; then the process dies
    raise KeyboardInterrupt

  monkeypatch.setattr(export_lib, "_stablehlo", half_written)
  code = cli.main(
    [
      "export",
      "--checkpoint",
      setup["ckpt"],
      "--format",
      "stablehlo",
      "--output",
      str(tmp_path / "new"),
    ]
  )
  assert code == 130
  code = cli.main(
    [
      "export",
      "--checkpoint",
      setup["ckpt"],
      "--format",
      "stablehlo",
      "--output",
      str(out),
      "--overwrite",
    ]
  )
  assert code == 130
  # Neither the new directory nor a temporary one; the old export untouched.
  assert sorted(os.listdir(tmp_path)) == ["hlo"] and sorted(os.listdir(out)) == before
  capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize(
  "fmt, extra, message",
  [
    ("onnx", ["--quantize", "int8"], "--format onnx cannot carry --quantize int8 (jax2onnx"),
    (
      "litert",
      ["--quantize", "int8", "--calibration", "CAL"],
      "--format litert cannot carry int8 ",
    ),
    ("onnx", ["--dtype", "bfloat16"], "--format onnx cannot carry --dtype bfloat16 (onnxrun"),
    ("litert", ["--dtype", "bfloat16"], "--format litert cannot carry --dtype bfloat16 (TFLite"),
    ("stablehlo", ["--threshold", "0.5"], "--threshold: an export's outputs hold k classes"),
  ],
)
def test_what_a_format_cannot_carry_is_one_line(capsys, setup, tmp_path, fmt, extra, message):
  extra = [str(setup["root"] / "img") if x == "CAL" else x for x in extra]
  argv = ["export", "--checkpoint", setup["ckpt"], "--format", fmt, "--output", str(tmp_path / "o")]
  line = _fails(capsys, *argv, *extra)
  assert line.startswith(f"vit-jax export: error: {message}"), line
  assert os.listdir(tmp_path) == []
