"""The tf.data input pipeline on small real data: image folders of encoded files and local TFDS
datasets.

Images are colour-coded by class (data_fixtures), so a batch shows whether
images and labels stayed together. Several devices need their own process
(XLA fixes the count at start): those checks run in a subprocess.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import data_fixtures as df
import ml_collections
import numpy as np
import pytest

from vit_jax import data as ip
from vit_jax.config import schema
from vit_jax.data import preprocess
from vit_jax.data import transforms
from vit_jax.platform import files
from vit_jax.platform import tf_setup
from vit_jax.training import sharding
from vit_jax.weights import labels as labels_lib

SIZE = 16


def cfg(**kw):
  c = schema.base()
  c.image_size = SIZE
  c.batch_size = 4
  c.eval_batch_size = 4
  c.shuffle_buffer = 64
  c.data_threads = 2
  aug = kw.pop("augment", {})
  c.update(kw)
  # A new dict, so that switches given as bools in the base config may be probabilities here.
  c.augment = ml_collections.ConfigDict({**c.augment.to_dict(), **aug})
  return c


def colour(images: np.ndarray) -> np.ndarray:
  """The class colour of each image: its brightest channel on average."""
  return images.mean(axis=(1, 2)).argmax(-1)


def take(it, n):
  return [next(it) for _ in range(n)]


def cat(batches, key):
  return np.concatenate([b[key] for b in batches])


def split_files(root: str, split: str) -> list[str]:
  """A split's files in the pipeline's documented order: class folders sorted, files sorted."""
  d = os.path.join(root, split)
  return [
    os.path.join(d, c, f)
    for c in sorted(os.listdir(d))
    for f in sorted(os.listdir(os.path.join(d, c)))
  ]


def reference_eval(path: str, size: int = SIZE) -> np.ndarray:
  """What `vit-jax predict` computes for a file."""
  with open(path, "rb") as f:
    return preprocess.eval_resize(preprocess.decode_rgb(f.read()), size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  df.write_folder(
    root,
    {
      "train": {"a": 7, "b": 5, "c": 4},
      "val": {"a": 3, "b": 2, "c": 2},
      "test": {"a": 2, "b": 2, "c": 1},
    },
  )
  return root


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  df.build_tfds(d)
  return d


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("cifar"))
  df.build_small_cifar10(d)
  return d


# -- sources, shapes, ranges -------------------------------------------------------------


def test_a_pipeline_lists_its_folder_once_and_reads_only_its_section(folder, monkeypatch):
  listed = []
  real = files.list_dir
  monkeypatch.setattr(files, "list_dir", lambda path: listed.append(path) or real(path))
  data = ip.Pipeline(cfg(dataset="folder", folder=folder))
  s = sharding.batch_sharding(sharding.make_mesh())
  counts = [sum(int(b["mask"].sum()) for b in data.eval_iterator("eval", s)) for _ in range(3)]
  assert counts == [7, 7, 7] and data.info.num_examples["eval"] == 7
  # train/ (the classes) once, then val/ and each of its 3 classes once, for three passes and the
  # info.
  val = [p for p in listed if "/val" in p]
  assert len(val) == 4 and len(set(val)) == 4, listed
  # The pipeline sees the data section and the batch sizes and seed, nothing else.
  assert data.config.image_size == SIZE and data.config.seed == 0
  with pytest.raises(AttributeError):
    _ = data.config.total_steps
  with pytest.raises(AttributeError):
    _ = data.config.model


def test_folder_info_and_train_batches(folder):
  c = cfg(dataset="folder", folder=folder)
  info = ip.get_info(c)
  assert info == ip.DatasetInfo(
    num_classes=3,
    class_names=["a", "b", "c"],
    multilabel=False,
    num_examples={"train": 16, "eval": 7, "test": 5},
  )
  batches = take(ip.host_batches(c, process_index=0, process_count=1), 8)  # two epochs
  for b in batches:
    assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["image"].max() - b["image"].min() > 0.5
    np.testing.assert_array_equal(colour(b["image"]), b["label"])
  idx = cat(batches, "index")
  # Each epoch is a permutation of the whole split, a different one each time.
  assert sorted(idx[:16]) == list(range(16)) and sorted(idx[16:]) == list(range(16))
  assert list(idx[:16]) != list(idx[16:])
  files = split_files(folder, "train")
  expected = np.array(
    [["a", "b", "c"].index(os.path.basename(os.path.dirname(files[i]))) for i in idx]
  )
  np.testing.assert_array_equal(cat(batches, "label"), expected)


@pytest.mark.slow
def test_tfds_dataset_by_name_and_data_dir(tfds_dir):
  c = cfg(dataset=df.TFDS_NAME, tfds_data_dir=tfds_dir, batch_size=10)
  info = ip.get_info(c)
  assert (info.num_classes, info.class_names, info.multilabel) == (3, list(df.CLASS_COLOURS), False)
  assert info.num_examples == {
    "train": 50,
    "eval": 13,
    "test": 13,
  }  # no validation split: eval is test
  batches = take(ip.host_batches(c, process_index=0, process_count=1), 10)  # two epochs of 50
  for b in batches:
    assert (
      b["image"].shape == (10, SIZE, SIZE, 3)
      and -1.0 <= b["image"].min() <= b["image"].max() <= 1.0
    )
    np.testing.assert_array_equal(colour(b["image"]), b["label"])
  idx = cat(batches, "index")
  assert sorted(idx[:50]) == list(range(50)) and sorted(idx[50:]) == list(range(50))
  assert list(idx[:50]) != list(idx[50:])
  ev = list(ip.host_batches(c, "test", process_index=0, process_count=1))
  assert len(ev) == 4 and cat(ev, "mask").tolist() == [True] * 13 + [False] * 3
  assert cat(ev, "index")[:13].tolist() == list(range(13))
  np.testing.assert_array_equal(colour(cat(ev, "image")[:13]), cat(ev, "label")[:13])


@pytest.mark.slow
def test_cifar10_presets_hold_out_the_end_of_train(cifar_dir):
  c = cfg(dataset="cifar10", tfds_data_dir=cifar_dir, batch_size=14)
  info = ip.get_info(c)
  assert info.num_examples == {"train": 98, "eval": 2, "test": 20}  # train[:98%], train[98%:], test
  assert info.class_names == list(df.CIFAR10_NAMES)
  ev = list(ip.host_batches(c, "eval", process_index=0, process_count=1))
  assert cat(ev, "index")[cat(ev, "mask")].tolist() == [98, 99]
  shares = _host_eval(cfg(dataset="cifar10", tfds_data_dir=cifar_dir, eval_batch_size=4), "eval", 4)
  assert [len(h) for h in shares] == [
    1
  ] * 4  # two hosts have nothing: all padding, same batch count
  assert sorted(i for h in shares for i in cat(h, "index")[cat(h, "mask")]) == [98, 99]
  train = cat(take(ip.host_batches(c, process_index=0, process_count=1), 7), "index")
  assert sorted(train) == list(range(98))
  test = list(ip.host_batches(c, "test", process_index=0, process_count=1))
  assert sorted(cat(test, "index")[cat(test, "mask")]) == list(range(20))


# -- evaluation ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 32), (5, 9), (40, 17), (16, 16)])
def test_eval_transform_equals_predict_preprocessing(shape):
  tf = tf_setup.tf()
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  for size in (SIZE, 7):
    got = transforms.eval_image(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(got, preprocess.eval_resize(image, size))


def test_eval_pipeline_equals_predict_on_files(tmp_path):
  root = str(tmp_path)
  df.write_folder(root, {"train": {"a": 1, "b": 1}, "val": {"b": 3}}, ext="png")
  df.write_folder(os.path.join(root, "jpg"), {"val": {"b": 2}}, ext="jpg")
  for name in os.listdir(os.path.join(root, "jpg", "val", "b")):
    os.rename(
      os.path.join(root, "jpg", "val", "b", name), os.path.join(root, "val", "b", "j" + name)
    )
  for (
    name,
    data,
  ) in df.odd_images().items():  # gray, palette, RGBA, LA, CMYK, gray JPEG, palette BMP, WebP
    df.write_file(os.path.join(root, "val", "a", name), data)
  c = cfg(dataset="folder", folder=root, eval_batch_size=4)
  ev = list(ip.host_batches(c, "eval", process_index=0, process_count=1))
  files = split_files(root, "val")
  mask = cat(ev, "mask")
  assert mask.sum() == len(files) == 13
  for image, i in zip(cat(ev, "image")[mask], cat(ev, "index")[mask], strict=True):
    np.testing.assert_array_equal(image, reference_eval(files[i]), err_msg=files[i])


def test_eval_crop_resizes_the_short_side_then_cuts_the_centre(folder):
  tf = tf_setup.tf()
  image = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
  got = transforms.eval_image(tf.constant(image), 10, crop_ratio=1.0).numpy()
  full = tf.image.resize(image, [10, 20], method="bilinear").numpy()
  # The same TensorFlow resize kernel on the same pixels, then the same two correctly rounded
  # float32 operations (numpy's here): equal bit for bit.
  np.testing.assert_array_equal(got, (full[:, 5:15] - 127.5) / 127.5)
  assert transforms.eval_image(tf.constant(image), 10, crop_ratio=0.5).shape == (10, 10, 3)
  ev = list(
    ip.host_batches(
      cfg(dataset="folder", folder=folder, eval_crop=True), "eval", process_index=0, process_count=1
    )
  )
  files = split_files(folder, "val")
  for got, i in zip(
    cat(ev, "image")[cat(ev, "mask")], cat(ev, "index")[cat(ev, "mask")], strict=True
  ):
    with open(files[i], "rb") as f:
      decoded = preprocess.decode_rgb(
        f.read()
      )  # 24 x 32: short side to 16, then the centre 16 x 16
    want = tf.image.resize(decoded, [SIZE, round(32 * SIZE / 24)], method="bilinear").numpy()[
      :, 2:18
    ]
    np.testing.assert_array_equal(got, (want - 127.5) / 127.5)  # as above: the same operations


def _host_eval(c, split, count):
  return [
    list(ip.host_batches(c, split, process_index=i, process_count=count)) for i in range(count)
  ]


@pytest.mark.parametrize("count", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
  "split,n", [("train", 16), ("train[:13]", 13), ("val", 7), ("train[5:]", 11)]
)
def test_eval_every_example_once_padded_and_masked(folder, count, split, n):
  c = cfg(dataset="folder", folder=folder, eval_batch_size=3 * count)
  hosts = _host_eval(c, split, count)
  per_host = -(-n // count)
  assert {len(h) for h in hosts} == {-(-per_host // 3)}  # every host the same number of batches
  seen = []
  for batches in hosts:
    mask, idx, images = cat(batches, "mask"), cat(batches, "index"), cat(batches, "image")
    k = int(mask.sum())
    assert mask.tolist() == [True] * k + [False] * (len(mask) - k)  # padding only at the end
    assert (idx[~mask] == -1).all() and not images[~mask].any()
    np.testing.assert_array_equal(colour(images[mask]), cat(batches, "label")[mask])
    seen += idx[mask].tolist()
  assert len(seen) == len(set(seen)) == n
  reference = _host_eval(c, split, 1)[0] if count > 1 else hosts[0]
  assert set(seen) == set(cat(reference, "index")[cat(reference, "mask")].tolist())


@pytest.mark.parametrize("count", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tfds_eval_shares_cover_the_split_once(tfds_dir, count):
  c = cfg(dataset=df.TFDS_NAME, tfds_data_dir=tfds_dir, eval_batch_size=2 * count)
  hosts = _host_eval(c, "test", count)
  assert len({len(h) for h in hosts}) == 1
  seen = [i for h in hosts for i in cat(h, "index")[cat(h, "mask")].tolist()]
  assert sorted(seen) == list(range(13))


# -- per-host training shares, determinism, resuming -------------------------------------------


@pytest.mark.parametrize("count", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_train_host_shares_disjoint_and_complete(folder, count):
  c = cfg(dataset="folder", folder=folder, batch_size=2 * count)
  steps = 16 // count // 2  # one epoch: 16 examples, 2 per host per step
  epochs = [[], []]
  for i in range(count):
    batches = take(ip.host_batches(c, process_index=i, process_count=count), 2 * steps)
    idx = cat(batches, "index")
    epochs[0].append(idx[: 16 // count].tolist())
    epochs[1].append(idx[16 // count :].tolist())
  for shares in epochs:
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(16))
  if count > 1:
    assert epochs[0] != epochs[1]  # hosts draw different examples each epoch


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_tfds_train_host_shares_disjoint_and_complete(tfds_dir, count):
  c = cfg(dataset=df.TFDS_NAME, tfds_data_dir=tfds_dir, batch_size=count)
  shares = []
  for i in range(count):
    n = -(-50 // count) if i < 50 % count or 50 % count == 0 else 50 // count
    shares.append(
      cat(take(ip.host_batches(c, process_index=i, process_count=count), n), "index").tolist()
    )
  flat = [i for share in shares for i in share]
  assert sorted(flat) == list(range(50))


def _same(a, b):
  return all(
    np.array_equal(x["image"], y["image"])
    and np.array_equal(x["label"], y["label"])
    and np.array_equal(x["index"], y["index"])
    for x, y in zip(a, b, strict=True)
  )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tfds"])
def test_seeded_streams_repeat_and_resume_exactly(folder, tfds_dir, kind):
  source = (
    dict(dataset="folder", folder=folder)
    if kind == "folder"
    else dict(dataset=df.TFDS_NAME, tfds_data_dir=tfds_dir)
  )
  c = cfg(seed=3, batch_size=6, augment=dict(vflip=0.5, rot90=0.5, rrc_prob=0.5), **source)
  first = take(ip.host_batches(c, process_index=0, process_count=1), 12)  # crosses epochs
  again = take(ip.host_batches(c, process_index=0, process_count=1), 12)
  assert _same(first, again)
  for start in (5, 9):  # mid-epoch, and in a later epoch
    resumed = take(
      ip.host_batches(c, start_step=start, process_index=0, process_count=1), 12 - start
    )
    assert _same(resumed, first[start:])
  c.seed = 4
  other = take(ip.host_batches(c, process_index=0, process_count=1), 3)
  assert not _same(other, first[:3])


# -- augmentations -----------------------------------------------------------------------------


@pytest.mark.slow
def test_flips_and_quarter_turns_are_exact(folder):
  plain = dict(inception_crop=False, hflip=False)
  base = take(
    ip.host_batches(
      cfg(dataset="folder", folder=folder, augment=plain), process_index=0, process_count=1
    ),
    2,
  )
  files = split_files(folder, "train")
  for image, i in zip(cat(base, "image"), cat(base, "index"), strict=True):
    np.testing.assert_array_equal(image, reference_eval(files[i]))  # resize only: the eval numbers
  ops = {"hflip": lambda a: a[:, ::-1], "vflip": lambda a: a[::-1]}
  for name, op in ops.items():
    got = take(
      ip.host_batches(
        cfg(dataset="folder", folder=folder, augment={**plain, name: 1.0}),
        process_index=0,
        process_count=1,
      ),
      2,
    )
    np.testing.assert_array_equal(cat(got, "index"), cat(base, "index"))
    for g, b in zip(cat(got, "image"), cat(base, "image"), strict=True):
      np.testing.assert_array_equal(g, op(b))
  got = take(
    ip.host_batches(
      cfg(dataset="folder", folder=folder, augment={**plain, "rot90": 1.0}),
      process_index=0,
      process_count=1,
    ),
    2,
  )
  turns = []
  for g, b in zip(cat(got, "image"), cat(base, "image"), strict=True):
    k = [k for k in (1, 2, 3) if np.array_equal(g, np.rot90(b, k))]
    assert len(k) == 1
    turns += k
  assert len(set(turns)) > 1


def test_random_crops_vary_and_keep_labels(folder):
  c = cfg(
    dataset="folder",
    folder=folder,
    augment=dict(inception_crop=True, rrc_prob=1.0, rrc_scale=(0.5, 1.0)),
  )
  a = take(ip.host_batches(c, process_index=0, process_count=1), 4)
  b = take(
    ip.host_batches(c, start_step=4, process_index=0, process_count=1), 4
  )  # epoch 2: same images
  files = split_files(folder, "train")
  differ = 0
  for image, label, i in zip(cat(a, "image"), cat(a, "label"), cat(a, "index"), strict=True):
    assert colour(image[None])[0] == label and -1.0 <= image.min() <= image.max() <= 1.0
    differ += not np.allclose(
      image, reference_eval(files[i]), atol=0.05
    )  # > 6 levels of 2/255: a crop
  assert differ >= 12
  first = {i: im for im, i in zip(cat(a, "image"), cat(a, "index"), strict=True)}
  assert (
    sum(
      not np.array_equal(first[i], im)
      for im, i in zip(cat(b, "image"), cat(b, "index"), strict=True)
    )
    >= 12
  )


def test_inception_crop_area_and_aspect_within_limits(tmp_path):
  # Images whose red level is the pixel's x and green its y, so each output tells its crop box.
  width, height = 256, 224  # not square: catches swapped axes; the whole image (the crop's
  y, x = np.mgrid[:height, :width]  # fallback) still has an aspect, 8/7, inside the limits
  ramp = df.encode(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
  for i in range(16):
    df.write_file(str(tmp_path / "train" / "ab"[i % 2] / f"{i}.png"), ramp)
  df.write_file(str(tmp_path / "val" / "a" / "0.png"), ramp)
  c = cfg(dataset="folder", folder=str(tmp_path), batch_size=16, augment=dict(hflip=False))
  images = cat(take(ip.host_batches(c, process_index=0, process_count=1), 4), "image")  # 64 crops
  coords = images[..., :2].astype(np.float64) * 127.5 + 127.5  # back to [0, 255]: (x, y)
  lo, hi = coords.min(axis=(1, 2)), coords.max(axis=(1, 2))
  span = hi - lo
  # The bilinear resize samples the crop at (j + 0.5) * n / SIZE - 0.5 and clamps at the border:
  # shrinking (n >= SIZE), the ramp's extremes lie (n / SIZE - 1) / 2 px inside each edge, so the
  # span is n (1 - 1 / SIZE); enlarging, they are the edge pixels, span n - 1. A ramp interpolates
  # exactly, so this inverts to the crop's size in pixels, and its start.
  n = np.maximum(span + 1, span * SIZE / (SIZE - 1))
  start = lo - np.maximum(0.0, (n / SIZE - 1) / 2)
  # Crops are whole pixels; float32 resizing of values <= 255 errs by ~1e-5 px (measured 8e-6).
  np.testing.assert_allclose(n, np.round(n), atol=1e-3)
  np.testing.assert_allclose(start, np.round(start), atol=1e-3)
  (x0, y0), (w, h) = np.round(start).astype(int).T, np.round(n).astype(int).T
  assert (
    (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
  )
  area = w * h / (width * height)
  # The documented limits (input_pipeline: area 5-100%, aspect 3/4-4/3), not the module's
  # constants, so that changing those fails here. Area: TF rejects a box outside the range
  # after rounding it to whole pixels, so no tolerance.
  assert (0.05 <= area).all() and (area <= 1.0).all(), np.sort(area)[[0, -1]]
  # Aspect: TF draws a ratio r in range and a height h, then rounds the width h * r to whole
  # pixels, so w / h may overshoot r by up to 0.5 / h.
  aspect = w / h
  assert (aspect >= 3 / 4 - 0.5 / h).all() and (aspect <= 4 / 3 + 0.5 / h).all(), np.sort(aspect)[
    [0, -1]
  ]
  # And they spread over the ranges (each bound below fails by chance < 1e-5 in 64 crops).
  assert area.min() < 0.15 and area.max() > 0.6, np.sort(area)[[0, -1]]
  assert aspect.min() < 0.85 and aspect.max() > 1.2, np.sort(aspect)[[0, -1]]
  assert (
    len(set(zip(x0, y0, w, h, strict=True))) > 60
  )  # and the boxes differ, image to image and epoch to epoch


@pytest.mark.slow
def test_mixup_soft_targets(folder):
  c = cfg(dataset="folder", folder=folder, batch_size=8, augment=dict(mixup_alpha=0.4))
  batches = take(ip.host_batches(c, process_index=0, process_count=1), 4)
  plain = take(
    ip.host_batches(
      cfg(dataset="folder", folder=folder, batch_size=8), process_index=0, process_count=1
    ),
    4,
  )
  for b, p in zip(batches, plain, strict=True):
    assert b["label"].shape == (8, 3) and b["label"].dtype == np.float32
    np.testing.assert_allclose(b["label"].sum(-1), 1.0, rtol=1e-6)  # lam + (1 - lam): 2 roundings
    onehot = np.eye(3, dtype=np.float32)[p["label"]]
    lam = b["label"][0] @ onehot[0] if p["label"][0] != p["label"][-1] else None
    if lam is not None:  # the pair (first, last) shares one lambda for images and targets
      # lam comes back exactly (lam * 1 + (1 - lam) * 0), and the mix is the same three correctly
      # rounded float32 operations as the pipeline's: equal bit for bit.
      np.testing.assert_array_equal(b["image"], lam * p["image"] + (1 - lam) * p["image"][::-1])
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert any(not np.allclose(b["label"], np.round(b["label"])) for b in batches)


# -- awkward inputs ----------------------------------------------------------------------------


def test_corrupt_files_skipped_counted_and_logged(tmp_path, caplog):
  root = str(tmp_path)
  df.write_folder(root, {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
  corrupt = df.corrupt_images()
  for name, data in corrupt.items():
    df.write_file(os.path.join(root, "train", "a" if "j" in name else "b", name), data)
  df.write_file(os.path.join(root, "val", "b", "truncated.jpg"), corrupt["truncated.jpg"])
  for name, data in df.odd_images(label=1).items():  # class b's colour
    df.write_file(os.path.join(root, "train", "b", "odd_" + name), data)
  c = cfg(dataset="folder", folder=root)
  pipe = ip.Pipeline(c)
  assert pipe.info.num_examples["train"] == 8 + len(corrupt) + len(df.odd_images())
  with caplog.at_level(logging.WARNING, logger="vit_jax.data"):
    ev = list(pipe.host_batches("eval", process_index=0, process_count=1))
  assert pipe.decode_errors == 1 and cat(ev, "mask").sum() == 4
  assert "truncated.jpg" in caplog.text
  files = split_files(root, "train")
  bad = {i for i, f in enumerate(files) if os.path.basename(f) in corrupt}
  before = pipe.decode_errors
  with caplog.at_level(logging.WARNING, logger="vit_jax.data"):
    batches = take(pipe.host_batches(process_index=0, process_count=1), 12)  # 48 of 16 good/epoch
  idx = cat(batches, "index")
  assert not bad & set(idx.tolist()) and set(idx.tolist()) == set(range(len(files))) - bad
  coloured = np.array(["gray" not in files[i] and "la.png" not in files[i] for i in idx])
  np.testing.assert_array_equal(
    colour(cat(batches, "image"))[coloured], cat(batches, "label")[coloured]
  )
  assert 2 * len(bad) <= pipe.decode_errors - before <= 3 * len(bad)
  assert f"train epoch 0: {len(bad)} undecodable images skipped" in caplog.text


def test_multilabel_lists_csv_and_json(tmp_path):
  root = str(tmp_path)
  tags = [["cat", "dog"], [], ["dog"], ["bird", "cat"], ["bird"], ["cat"], ["dog", "bird"]]
  splits = ["train", "train", "val", "train", "val", "train", "train"]
  for i in range(len(tags)):
    df.write_file(os.path.join(root, "img", f"{i}.png"), df.encode(df.class_image(i, i)))
  rows = ["path,labels,split"] + [
    f"img/{i}.png,{';'.join(t)},{s}" for i, (t, s) in enumerate(zip(tags, splits, strict=True))
  ]
  with open(os.path.join(root, "list.csv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  with open(os.path.join(root, "list.json"), "w") as f:
    json.dump(
      {
        "classes": ["bird", "cat", "dog"],
        "items": [
          {"path": f"img/{i}.png", "labels": t, "split": s}
          for i, (t, s) in enumerate(zip(tags, splits, strict=True))
        ],
      },
      f,
    )
  names = ["bird", "cat", "dog"]
  for list_file in ("list.csv", "list.json"):
    c = cfg(dataset="multilabel", multilabel_file=os.path.join(root, list_file))
    info = ip.get_info(c)
    assert (info.num_classes, info.class_names, info.multilabel) == (3, names, True)
    assert info.num_examples == {"train": 5, "eval": 2, "test": 0}
    for split, batches in (
      ("train", take(ip.host_batches(c, process_index=0, process_count=1), 3)),
      ("val", list(ip.host_batches(c, "eval", process_index=0, process_count=1))),
    ):
      members = [i for i, s in enumerate(splits) if s == split]
      for b in batches:
        assert b["label"].dtype == np.float32 and b["label"].shape == (4, 3)
        keep = b.get("mask", np.ones(4, bool))
        for target, i in zip(b["label"][keep], b["index"][keep], strict=True):
          want = np.array([n in tags[members[i]] for n in names], np.float32)
          np.testing.assert_array_equal(target, want)


@pytest.mark.slow
def test_tfds_sequence_of_class_labels_gives_multi_hot(tmp_path):
  name = df.build_tfds(str(tmp_path), num_shards=2, multilabel=True)
  c = cfg(dataset=name, tfds_data_dir=str(tmp_path), batch_size=10)
  info = ip.get_info(c)
  assert (info.num_classes, info.multilabel, info.class_names[-1]) == (4, True, "even")
  batches = take(ip.host_batches(c, process_index=0, process_count=1), 5)  # one epoch
  targets = cat(batches, "label")
  assert targets.shape == (50, 4) and targets.dtype == np.float32
  np.testing.assert_array_equal(targets[:, :3].argmax(-1), colour(cat(batches, "image")))
  np.testing.assert_array_equal(targets[:, :3].sum(-1), 1.0)
  assert targets[:, 3].sum() == sum(3 in df.tfds_tags(i) for i in range(50))


@pytest.mark.slow
def test_balanced_classes_are_even(tmp_path, tfds_dir):
  root = str(tmp_path)
  df.write_folder(root, {"train": {"a": 9, "b": 3, "c": 1}, "val": {"a": 1}})
  c = cfg(dataset="folder", folder=root, batch_size=3, balance_classes=True)
  batches = take(ip.host_batches(c, process_index=0, process_count=1), 9)  # one epoch: 3 x 9
  np.testing.assert_array_equal(np.bincount(cat(batches, "label"), minlength=3), [9, 9, 9])
  np.testing.assert_array_equal(colour(cat(batches, "image")), cat(batches, "label"))
  counts = np.bincount(cat(batches, "index"), minlength=13)
  np.testing.assert_array_equal(counts, [1] * 9 + [3] * 3 + [9])
  c = cfg(dataset=df.TFDS_NAME, tfds_data_dir=tfds_dir, batch_size=3, balance_classes=True)
  labels = cat(take(ip.host_batches(c, process_index=0, process_count=1), 17), "label")  # 3 x 17
  np.testing.assert_array_equal(np.bincount(labels, minlength=3), [17, 17, 17])


# -- user errors, labels file -------------------------------------------------------------------


def test_clear_errors_for_user_mistakes(tmp_path, folder):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    ip.get_info(cfg(dataset="folder", folder=str(tmp_path / "missing")))
  empty = tmp_path / "empty"
  df.write_folder(str(empty), {"train": {"a": 2}, "val": {"a": 1}})
  os.makedirs(empty / "train" / "b")
  with pytest.raises(ValueError, match=r"train/b: no images"):
    ip.get_info(cfg(dataset="folder", folder=str(empty)))
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    ip.get_info(cfg(dataset="no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared"):
    ip.get_info(cfg(dataset="cifar10", tfds_data_dir=str(tmp_path / "nothing")))
  with pytest.raises(ValueError, match="batch_size 6 does not divide over 4 processes"):
    ip.host_batches(
      cfg(dataset="folder", folder=folder, batch_size=6), process_index=0, process_count=4
    )
  with pytest.raises(ValueError, match="eval_batch_size 5 does not divide over 2 processes"):
    ip.host_batches(
      cfg(dataset="folder", folder=folder, eval_batch_size=5),
      "eval",
      process_index=1,
      process_count=2,
    )
  with pytest.raises(FileNotFoundError, match="nosuch"):
    ip.host_batches(
      cfg(dataset="folder", folder=folder), "nosuch", process_index=0, process_count=1
    )
  pointers = (
    tmp_path / "pointers"
  )  # Git LFS pointers where images should be: fail, do not wait forever
  for i in range(3):
    df.write_file(
      str(pointers / "train" / "a" / f"{i}.jpg"), b"version https://git-lfs.github.com/spec/v1\n"
    )
  with pytest.raises(
    ValueError, match=r"none of the first 32 training images .*pointers/train/a/\d\.jpg"
  ):
    ip.host_batches(cfg(dataset="folder", folder=str(pointers)), process_index=0, process_count=1)


def test_class_names_file_reads_back_with_predict_labels(folder, tmp_path):
  info = ip.get_info(cfg(dataset="folder", folder=folder))
  ip.write_class_names(info, str(tmp_path))
  assert labels_lib.read(str(tmp_path / ip.LABELS_FILE)) == ["a", "b", "c"]


# -- devices --------------------------------------------------------------------------------


@pytest.mark.slow
def test_global_arrays_on_one_device(folder):
  c = cfg(dataset="folder", folder=folder)
  s = sharding.batch_sharding(sharding.make_mesh())
  batch = next(ip.train_iterator(c, s, start_step=2))
  host = next(ip.host_batches(c, start_step=2))
  assert set(batch) == {"image", "label"} and batch["image"].sharding == s
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
  np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
  ev = list(ip.eval_iterator(c, "eval", s))
  assert (
    set(ev[0]) == {"image", "label", "mask"}
    and sum(int(np.asarray(b["mask"]).sum()) for b in ev) == 7
  )
  indexed = list(ip.eval_iterator(c, "eval", s, with_index=True))
  idx = np.concatenate([np.asarray(b["index"]) for b in indexed])
  assert idx.dtype == np.int32 and idx.tolist() == list(range(7)) + [-1]


def test_device_prefetch_keeps_batches_in_flight():
  from vit_jax.data import devices

  pulled = []

  def host():
    for i in range(5):
      pulled.append(i)
      yield {"image": np.full((2, 3), i, np.float32)}

  s = sharding.batch_sharding(sharding.make_mesh())
  it = devices.to_devices(host(), ("image",), s, rows=2, depth=3)
  first = next(it)
  assert pulled == [0, 1, 2] and float(first["image"][0, 0]) == 0  # two more already on their way
  assert [float(b["image"][0, 0]) for b in it] == [1, 2, 3, 4] and pulled == [0, 1, 2, 3, 4]


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from vit_jax.config import schema
    from vit_jax.training import sharding
    from vit_jax import data as ip
    c = schema.base()
    c.dataset, c.folder, c.image_size = "folder", sys.argv[1], 16
    c.batch_size, c.eval_batch_size = 16, 8
    c.data_threads = 2
    s = sharding.batch_sharding(sharding.make_mesh())
    out = {"devices": jax.device_count()}
    b = next(ip.train_iterator(c, s))
    out["shape"] = list(b["image"].shape)
    out["rows"] = sorted(x.data.shape[0] for x in b["image"].addressable_shards)
    out["same"] = bool(np.array_equal(np.asarray(b["image"]), next(ip.host_batches(c))["image"]))
    ev = list(ip.eval_iterator(c, "eval", s))
    out["eval"] = [len(ev), int(sum(np.asarray(e["mask"]).sum() for e in ev))]
    out["simulated"] = []
    for p in range(2):  # two processes simulated: this host's rows form the array
      g = next(ip.train_iterator(c, s, process_index=p, process_count=2))
      h = next(ip.host_batches(c, process_index=p, process_count=2))
      same = bool(np.array_equal(np.asarray(g["label"]), h["label"]))
      out["simulated"].append([g["image"].shape[0], same])
    s4 = sharding.batch_sharding(sharding.make_mesh({"data": 4, "model": 2}))
    c.batch_size = 12
    shards = next(ip.train_iterator(c, s4))["image"].addressable_shards
    out["model2"] = sorted(x.data.shape[0] for x in shards)
    try:
      ip.train_iterator(c, s)
      out["error"] = None
    except ValueError as e:
      out["error"] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_global_arrays_sharded_over_eight_devices(folder):
  # The script also exits with training iterators still open, which must not hang.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, "-c", _DEVICES_SCRIPT, folder],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["shape"] == [16, SIZE, SIZE, 3] and out["rows"] == [2] * 8
  assert out["same"]
  assert out["eval"] == [1, 7]
  assert out["simulated"] == [[8, True], [8, True]]
  assert out["model2"] == [3] * 8  # 4-way data split, each row block on the 2 model devices
  assert out["error"] == (
    "config.batch_size 12 does not divide over the 8 devices of the batch axes "
    "(mesh {'data': 8, 'fsdp': 1, 'model': 1})"
  )


_TWO_PROCESSES_SCRIPT = textwrap.dedent("""
    import json, sys
    from vit_jax.training import sharding
    sharding.maybe_initialize_distributed(sys.argv[2], 2, int(sys.argv[3]))
    import jax, numpy as np
    from vit_jax.config import schema
    from vit_jax import data as ip
    c = schema.base()
    c.dataset, c.folder, c.image_size = "folder", sys.argv[1], 16
    c.batch_size, c.eval_batch_size = 16, 8
    c.data_threads = 1
    s = sharding.batch_sharding(sharding.make_mesh())

    def local_rows(x):
      shards = sorted(x.addressable_shards, key=lambda d: d.index[0].start)
      return np.concatenate([np.asarray(d.data) for d in shards])

    b = next(ip.train_iterator(c, s))
    host = next(ip.host_batches(c))
    ev = list(ip.eval_iterator(c, "eval", s))
    mine = bool(np.array_equal(local_rows(b["image"]), host["image"]))
    print(json.dumps({"process": jax.process_index(), "shape": list(b["image"].shape),
                      "rows_are_this_hosts": mine,
                      "indices": host["index"].tolist(), "eval_batches": len(ev),
                      "eval_local": int(sum(local_rows(e["mask"]).sum() for e in ev))}))
""")


@pytest.mark.slow
def test_two_real_processes_assemble_one_global_batch(folder, run_on_free_port):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  runs = run_on_free_port(
    lambda port: [
      [sys.executable, "-c", _TWO_PROCESSES_SCRIPT, folder, f"127.0.0.1:{port}", str(i)]
      for i in range(2)
    ],
    env=env,
    timeout=300,
  )
  outs = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in runs]
  assert sorted(o["process"] for o in outs) == [0, 1]
  for o in outs:
    assert o["shape"] == [16, SIZE, SIZE, 3] and o["rows_are_this_hosts"] and o["eval_batches"] == 1
  assert not set(outs[0]["indices"]) & set(outs[1]["indices"])  # each host its own share
  assert sum(o["eval_local"] for o in outs) == 7  # the 7 validation images, once
