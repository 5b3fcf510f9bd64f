"""The original .npz checkpoints: strict loading, adaptation, saving, and bad files."""

import errno
import io
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import zipfile

import ckpt_fixtures as cf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import layout
from vit_jax.platform import files
from vit_jax.weights import checkpoint

SPEC = cf.Spec()  # Ti-width, 2 blocks, patch 16, 32 px, 10 classes


def _model(**kw):
  args = dict(num_classes=10, image_size=32, num_layers=2, mlp_dim=384)
  args.update(kw)
  return models.create_model("Ti/16", **args)


@pytest.fixture
def original(tmp_path):
  path = tmp_path / "orig.npz"
  return str(path), cf.write_original(path, SPEC)


def test_load_renames_pre_linen_and_keeps_arrays(original):
  path, arrays = original
  tree = checkpoint.load(path)
  for key, value in arrays.items():
    np.testing.assert_array_equal(cf.get(tree, cf.linen_key(key)), value)
  assert "MlpBlock_3" not in tree["Transformer"]["encoderblock_0"]
  assert set(tree["Transformer"]["encoderblock_1"]) == {
    "LayerNorm_0",
    "MultiHeadDotProductAttention_0",
    "LayerNorm_1",
    "MlpBlock_0",
  }


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
@pytest.mark.parametrize("naming", ["pre-linen", "linen"])
def test_every_prefix_and_naming_loads_exactly(tmp_path, prefix, naming):
  """Files the original training code wrote (`opt/target/` and pre-Linen names) load like any."""
  arrays = cf.original_arrays(SPEC)  # keys in the original (pre-Linen) naming
  if naming == "linen":
    arrays = {cf.linen_key(k): v for k, v in arrays.items()}
  np.savez(tmp_path / "ckpt.npz", **{prefix + k: v for k, v in arrays.items()})
  params = checkpoint.load_pretrained(str(tmp_path / "ckpt.npz"), _model())
  assert layout.flatten(params).keys() == {cf.linen_key(k) for k in arrays}
  for key, value in arrays.items():
    np.testing.assert_array_equal(cf.get(params, cf.linen_key(key)), value)
  tree = checkpoint.load(str(tmp_path / "ckpt.npz"))
  assert layout.flatten(tree).keys() == {cf.linen_key(k) for k in arrays}


def test_linen_named_files_load_too(tmp_path):
  arrays = {cf.linen_key(k): v for k, v in cf.original_arrays(SPEC).items()}
  np.savez(tmp_path / "linen.npz", **arrays)
  params = checkpoint.load_pretrained(str(tmp_path / "linen.npz"), _model())
  for key, value in arrays.items():
    np.testing.assert_array_equal(cf.get(params, key), value)


@pytest.mark.slow
def test_load_pretrained_is_exact_and_runs(original):
  path, arrays = original
  model = _model()
  params = checkpoint.load_pretrained(path, model, image_size=32)
  for key, value in arrays.items():
    np.testing.assert_array_equal(cf.get(params, cf.linen_key(key)), value)
  assert models.count_params(params) == sum(v.size for v in arrays.values())
  out = model.apply({"params": params}, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_save_round_trip_gives_the_original_names_and_arrays(original, tmp_path):
  path, arrays = original
  params = checkpoint.load_pretrained(path, _model())
  out = tmp_path / "saved.npz"
  checkpoint.save(params, str(out))
  with np.load(out, allow_pickle=False) as saved:
    assert set(saved.files) == set(arrays)
    for key in arrays:
      assert saved[key].dtype == np.float32
      np.testing.assert_array_equal(saved[key], arrays[key])


@pytest.mark.slow
def test_scanned_model_loads_and_saves(original, tmp_path):
  path, arrays = original
  plain = _model()
  scanned = _model(scan=True)
  p_plain = checkpoint.load_pretrained(path, plain)
  p_scan = checkpoint.load_pretrained(path, scanned)
  assert p_scan["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (
    2,
    192,
    384,
  )
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
  ref = plain.apply({"params": p_plain}, x)
  # Two compiled programs (a loop over stacked blocks, and the blocks unrolled), free to sum in
  # other orders. fp32 bound: u * sqrt(K) summed over the 21 matmuls, softmaxes and norms on
  # the path (K = 5 to 768) = 1.5e-5 of the largest logit. Measured: 1.5e-6 (AMD AVX2;
  # YNNPACK, Eigen or oneDNN dots; max ISA SSE4.2 to AVX2) and 1.7e-6 (Intel AVX-512 with
  # AMX), the largest logit being 1.66.
  np.testing.assert_allclose(
    scanned.apply({"params": p_scan}, x), ref, rtol=0, atol=2e-5 * float(np.abs(ref).max())
  )
  checkpoint.save(p_scan, str(tmp_path / "scan.npz"))
  with np.load(tmp_path / "scan.npz") as saved:
    assert set(saved.files) == set(arrays)
    np.testing.assert_array_equal(
      saved["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
      arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
    )


def test_head_is_reset_when_classes_differ_or_when_asked(original):
  path, arrays = original
  params = checkpoint.load_pretrained(path, _model(num_classes=3))
  assert params["head"]["kernel"].shape == (192, 3)
  assert not params["head"]["kernel"].any() and not params["head"]["bias"].any()
  np.testing.assert_array_equal(params["cls"], arrays["cls"])
  reset = checkpoint.load_pretrained(path, _model(), reset_head=True)
  assert reset["head"]["kernel"].shape == (192, 10) and not reset["head"]["kernel"].any()
  kept = checkpoint.load_pretrained(path, _model())
  np.testing.assert_array_equal(kept["head"]["kernel"], arrays["head/kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("reset", [False, True])
def test_a_reset_head_starts_at_the_models_head_bias_init(original, reset):
  """A sigmoid fine-tune from a checkpoint starts its new head where pre-training starts one:
  every bias at head_bias_init (-10), the kernel at zero, as the model's own init."""
  path, _ = original
  model = _model(num_classes=10 if reset else 3, head_bias_init=-10.0)
  params = checkpoint.load_pretrained(path, model, reset_head=reset)
  np.testing.assert_array_equal(params["head"]["bias"], np.full(model.num_classes, -10.0))
  assert not params["head"]["kernel"].any()
  fresh = models.init_params(model)["head"]
  np.testing.assert_array_equal(params["head"]["bias"], fresh["bias"])


def test_pre_logits_kept_or_dropped(tmp_path):
  spec = cf.Spec(pre_logits=192, classes=21843 // 100)
  arrays = cf.write_original(tmp_path / "i21k.npz", spec)
  path = str(tmp_path / "i21k.npz")
  kept = checkpoint.load_pretrained(path, _model(num_classes=218, representation_size=192))
  np.testing.assert_array_equal(kept["pre_logits"]["kernel"], arrays["pre_logits/kernel"])
  dropped = checkpoint.load_pretrained(path, _model(num_classes=10))
  assert "pre_logits" not in dropped and not dropped["head"]["kernel"].any()
  with pytest.raises(errors.CheckpointError, match="missing key 'pre_logits/"):
    checkpoint.load_pretrained(str(_write(tmp_path, cf.Spec())), _model(representation_size=192))


def _write(tmp_path, spec, name="x.npz", **kw):
  path = tmp_path / name
  cf.write_original(path, spec, **kw)
  return path


def test_posemb_is_resized_keeping_the_class_token(tmp_path):
  spec = cf.Spec(image_size=64)  # a 4x4 grid
  arrays = cf.original_arrays(spec)
  d = spec.hidden
  # A grid that is linear in (row, col): bilinear resizing must keep it linear,
  # with the corners fixed (first-order zoom aligns the corners).
  r, c = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
  slope = np.linspace(-1, 1, d)
  grid = (r[..., None] * slope + c[..., None] * 0.5).reshape(1, 16, d).astype(np.float32)
  arrays["Transformer/posembed_input/pos_embedding"] = np.concatenate(
    [np.full((1, 1, d), 7.0, np.float32), grid], axis=1
  )
  np.savez(tmp_path / "g4.npz", **arrays)
  params = checkpoint.load_pretrained(str(tmp_path / "g4.npz"), _model(image_size=112))  # 7x7 grid
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 50, d)
  np.testing.assert_array_equal(pe[0, 0], 7.0)
  r7, c7 = np.meshgrid(np.linspace(0, 3, 7), np.linspace(0, 3, 7), indexing="ij")
  want = (r7[..., None] * slope + c7[..., None] * 0.5).reshape(49, d)
  # zoom interpolates in float64: the error is the float32 rounding of the grid and of the
  # result, half an ulp each, 2 * 2.4e-7 at |x| <= 4.5 (measured 2.5e-7).
  np.testing.assert_allclose(pe[0, 1:], want, rtol=0, atol=1e-6)


def _corner_aligned_zoom(grid: np.ndarray, n: int) -> np.ndarray:
  """[g, g, D] -> [n, n, D] by order-1 interpolation with the corner samples on the corners.

  Written out from the definition (source coordinate i * (g - 1) / (n - 1)), as a check on
  the scipy.ndimage.zoom call the loader makes, which is what the original code calls.
  """
  g = grid.shape[0]
  src = np.arange(n) * (g - 1) / (n - 1)
  lo = np.minimum(np.floor(src).astype(int), g - 2)
  w = np.zeros((n, g))
  w[np.arange(n), lo] = 1 - (src - lo)
  w[np.arange(n), lo + 1] = src - lo
  return np.einsum("yh,hwd,xw->yxd", w, grid.astype(np.float64), w)


@pytest.mark.parametrize("g_old,g_new", [(14, 24), (24, 14), (7, 12), (14, 14)])
def test_posemb_resize_is_the_corner_aligned_order_1_zoom(g_old, g_new):
  """ViT-B/16 224 -> 384 (14 -> 24), the way back, B/32's 7 -> 12, and no change."""
  posemb = np.random.default_rng(0).normal(size=(1, 1 + g_old * g_old, 8)).astype(np.float32)
  out = layout.resize_posemb(posemb, 1 + g_new * g_new, has_cls=True)
  assert out.shape == (1, 1 + g_new * g_new, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], posemb[:, 0])  # the class token is copied
  want = _corner_aligned_zoom(posemb[0, 1:].reshape(g_old, g_old, 8), g_new)
  # scipy's zoom interpolates in float64 and rounds once to float32: half an ulp, at most
  # 2.4e-7 for these values (|x| < 4; measured 1.1e-7).
  np.testing.assert_allclose(out[0, 1:].reshape(g_new, g_new, 8), want, rtol=0, atol=1e-6)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
  path = _write(tmp_path, cf.Spec(mlp=256))
  with pytest.raises(
    errors.CheckpointError,
    match=r"Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias has shape \(256,\), "
    r"expected \(384,\)",
  ):
    checkpoint.load_pretrained(str(path), _model())


def test_missing_and_unexpected_keys(tmp_path):
  arrays = cf.original_arrays(SPEC)
  del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
  np.savez(tmp_path / "missing.npz", **arrays)
  with pytest.raises(
    errors.CheckpointError,
    match=r"missing key 'Transformer/encoderblock_1/LayerNorm_1/scale' \(shape \(192,\)\)",
  ):
    checkpoint.load_pretrained(str(tmp_path / "missing.npz"), _model())
  arrays = cf.original_arrays(SPEC)
  arrays["Transformer/extra/kernel"] = np.zeros((3,), np.float32)
  np.savez(tmp_path / "extra.npz", **arrays)
  with pytest.raises(errors.CheckpointError, match="unexpected key 'Transformer/extra/kernel'"):
    checkpoint.load_pretrained(str(tmp_path / "extra.npz"), _model())
  # A deeper file does not silently load into a shallower model.
  with pytest.raises(errors.CheckpointError, match="unexpected key 'Transformer/encoderblock_2/"):
    checkpoint.load_pretrained(str(_write(tmp_path, cf.Spec(layers=3), "deep.npz")), _model())


def test_non_square_grid_and_wrong_width(tmp_path):
  arrays = cf.original_arrays(SPEC)
  arrays["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 1 + 6, 192), np.float32)
  np.savez(tmp_path / "rect.npz", **arrays)
  with pytest.raises(errors.CheckpointError, match="6 patch positions do not form a square grid"):
    checkpoint.load_pretrained(str(tmp_path / "rect.npz"), _model(image_size=48))
  arrays["Transformer/posembed_input/pos_embedding"] = np.zeros((1, 5, 64), np.float32)
  np.savez(tmp_path / "narrow.npz", **arrays)
  with pytest.raises(
    errors.CheckpointError, match=r"has shape \(1, 5, 64\), expected \(1, 5, 192\)"
  ):
    checkpoint.load_pretrained(str(tmp_path / "narrow.npz"), _model())


def _one_line_error(path, match):
  with pytest.raises(errors.CheckpointError, match=match) as info:
    checkpoint.load(str(path))
  assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_files_give_one_line_errors(tmp_path, original):
  path, _ = original
  data = open(path, "rb").read()
  (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
  _one_line_error(tmp_path / "trunc.npz", "truncated or corrupt")
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"embedding/kernel": np.zeros(3)}))
  _one_line_error(tmp_path / "pickle.npz", "is a pickle")
  np.save(tmp_path / "single.npy", np.zeros(3))
  _one_line_error(tmp_path / "single.npy", "a single .npy array")
  (tmp_path / "text.npz").write_text("hello")
  _one_line_error(tmp_path / "text.npz", "not an .npz")
  np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
  _one_line_error(tmp_path / "objects.npz", "pickled")
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  _one_line_error(tmp_path / "other.npz", "not a ViT checkpoint")
  _one_line_error(tmp_path / "absent.npz", "no such file")
  # A zip whose member is damaged after the directory is read.
  with zipfile.ZipFile(tmp_path / "bad_member.npz", "w") as z:
    z.writestr("embedding/kernel.npy", b"\x93NUMPY garbage")
  _one_line_error(tmp_path / "bad_member.npz", "corrupt")


def test_non_float_arrays_are_refused(tmp_path):
  arrays = cf.original_arrays(SPEC)
  arrays["cls"] = np.zeros((1, 1, 192), np.int32)
  np.savez(tmp_path / "int.npz", **arrays)
  with pytest.raises(errors.CheckpointError, match="cls has dtype int32"):
    checkpoint.load_pretrained(str(tmp_path / "int.npz"), _model())


def test_local_writes_get_the_permissions_of_any_new_file(tmp_path):
  old = os.umask(0o027)
  try:
    with files.atomic_write(str(tmp_path / "out.bin")) as f:
      f.write(b"x")
    open(tmp_path / "plain.bin", "wb").close()
  finally:
    os.umask(old)
  mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
  assert mode("out.bin") == mode("plain.bin") == 0o640


@pytest.mark.slow
def test_remote_paths_go_through_the_file_layer(original, tmp_path, monkeypatch, gcs):
  path, arrays = original
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")  # a URL wrongly taken for a local path would land here
  # fsspec's in-memory filesystem, then gs:// on the emulator: the same code for both.
  for root in ("memory://ckpt", f"{gcs}/ckpt"):
    url = f"{root}/orig.npz"
    with files.atomic_write(url) as f:
      f.write(open(path, "rb").read())
    tree = checkpoint.load(url)
    for key, value in arrays.items():
      np.testing.assert_array_equal(cf.get(tree, cf.linen_key(key)), value, err_msg=key)
    # Fresh values, so that the file read back can only match if the save wrote them.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
      lambda v, rng=rng: rng.normal(size=v.shape).astype(np.float32),
      checkpoint.load_pretrained(url, _model()),
    )
    want = layout.flatten(params)
    checkpoint.save(params, f"{root}/out.npz")
    back = layout.flatten(checkpoint.load_pretrained(f"{root}/out.npz", _model()))
    assert back.keys() == want.keys()
    for key, value in want.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)
    with np.load(io.BytesIO(files.read_bytes(f"{root}/out.npz")), allow_pickle=False) as saved:
      assert set(saved.files) == set(arrays)  # the original layout and names
      assert {saved[k].dtype for k in saved.files} == {np.dtype(np.float32)}
    assert files.list_dir(root) == ([], ["orig.npz", "out.npz"])  # no temporary left
    with pytest.raises(errors.CheckpointError, match=f"^{root}/none.npz: no such file$"):
      checkpoint.load(f"{root}/none.npz")
  assert not os.listdir(".")  # nothing local
  with pytest.raises(
    errors.CheckpointError, match="^gs://nobucket/x.npz: no such bucket gs://nobucket$"
  ):
    checkpoint.load("gs://nobucket/x.npz")


@pytest.mark.slow
def test_failed_save_leaves_the_old_file(tmp_path, original):
  """A write that fails halfway (the file-size limit, as a full disk would) keeps the old file.

  The save runs in a child process whose RLIMIT_FSIZE is below the new file's size, so the
  operating system refuses the write itself after part of the bytes are out; a save that
  opened the target directly would leave it truncated.
  """
  path, _ = original
  (tmp_path / "out").mkdir()
  target = tmp_path / "out" / "keep.npz"
  target.write_bytes(b"previous contents")
  code = textwrap.dedent(f"""
      import resource, signal, sys
      from vit_jax.weights import checkpoint
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
      params = checkpoint.load({str(path)!r})
      resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
      try:
        checkpoint.save(params, {str(target)!r})
      except OSError as e:
        print("refused:", e.errno)
        sys.exit(0)
      sys.exit("the save went through")
  """)
  r = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == f"refused: {errno.EFBIG}"
  assert os.path.getsize(path) > 4096, "the checkpoint must be larger than the limit"
  assert target.read_bytes() == b"previous contents"
  assert os.listdir(tmp_path / "out") == ["keep.npz"], "no temporary file left behind"


def test_image_size_argument_must_match_the_model(original):
  path, _ = original
  with pytest.raises(errors.CheckpointError, match="image_size=64 differs"):
    checkpoint.load_pretrained(path, _model(), image_size=64)
