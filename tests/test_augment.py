"""RandAugment, CutMix, the mixup/CutMix switch and random erasing.

Each RandAugment op is checked at a fixed magnitude against PIL (ImageOps, ImageEnhance,
Image.rotate/transform) or numpy written out here, with the magnitude's argument computed
here from big_vision's formulas; the ops run as the pipeline runs them, in a traced graph.
CutMix and erasing are checked by what they did to the pixels; the pipeline tests run the
real tf.data stream on small image folders.
"""

import data_fixtures as df
import ml_collections
import numpy as np
import pytest
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from vit_jax import data as ip
from vit_jax import errors
from vit_jax.config import schema
from vit_jax.data import cutmix
from vit_jax.data import erasing
from vit_jax.data import randaugment as ra
from vit_jax.data import transforms
from vit_jax.platform import tf_setup

tf = tf_setup.tf()
H, W = 24, 32  # not square: swapped axes show
SEEDS = range(8)


def _seed(k: int, base: int = 17):
  return tf.constant([base, k], tf.int64)


def sample_image(avoid_fill: bool = False) -> np.ndarray:
  """uint8 [24, 32, 3]: smooth colour with fine grain, levels 20-230 (so AutoContrast has work).

  Asymmetric, so a flip, a turn the other way, or a wrong sign gives another image.
  """
  a = df.class_image(0, 5, H, W).astype(np.int64)
  grain = np.random.default_rng(1).integers(-30, 31, a.shape)
  a = np.clip(a * 3 // 4 + 20 + grain, 20, 230)
  if avoid_fill:  # Cutout's fill must tell from the image
    a[a == ra.FILL] = ra.FILL - 1
  return a.astype(np.uint8)


_traced = {}


def run_op(image: np.ndarray, name: str, magnitude: float, seeds=SEEDS) -> list[np.ndarray]:
  """The op at `magnitude` in a traced graph (as tf.data runs it), for each seed."""
  key = (name, magnitude)
  if key not in _traced:
    _traced[key] = tf.function(lambda im, s: ra.apply_op(im, name, magnitude, s))
  return [_traced[key](tf.constant(image), _seed(k)).numpy() for k in seeds]


def pil(a: np.ndarray) -> Image.Image:
  return Image.fromarray(a)


def affine(a: np.ndarray, data) -> np.ndarray:
  """PIL's nearest-neighbour affine map, out-of-image pixels 128 (output (x, y) <- data . (x, y,
  1) in PIL's continuous coordinates, pixel centres at +0.5)."""
  fill = (ra.FILL,) * 3
  return np.asarray(
    pil(a).transform((a.shape[1], a.shape[0]), Image.AFFINE, data, Image.NEAREST, fillcolor=fill)
  )


def shear_x(a, level):
  # big_vision's shear maps pixel index x to x + level * y; in PIL's coordinates (index + 0.5)
  # that is x' = x + level * y - level / 2.
  return affine(a, (1, level, -level / 2, 0, 1, 0))


def shear_y(a, level):
  return affine(a, (1, 0, 0, level, 1, -level / 2))


def enhance(kind):
  return lambda a, f: np.asarray(kind(pil(a)).enhance(f))


# (op, magnitude, the argument big_vision's level_to_arg gives, a reference for one sign).
# The magnitudes keep the ops away from identities and exact nearest-neighbour ties:
# shear 0.21 * y never reaches a half-integer for y < 50 rows (at 0.3, y = 5 does, and float32
# and PIL's float64 then round a tie to different sides).
UNSIGNED = [
  ("AutoContrast", 7, None, lambda a, _: np.asarray(ImageOps.autocontrast(pil(a)))),
  ("Equalize", 7, None, lambda a, _: np.asarray(ImageOps.equalize(pil(a)))),
  ("Invert", 7, None, lambda a, _: np.asarray(ImageOps.invert(pil(a)))),
  ("Posterize", 5, 5 / 10 * 4, lambda a, b: np.asarray(ImageOps.posterize(pil(a), int(b)))),
  ("Posterize", 7.5, 7.5 / 10 * 4, lambda a, b: np.asarray(ImageOps.posterize(pil(a), int(b)))),
  # 0 bits, which PIL refuses: one bit kept, as big_vision's clamped shift.
  ("Posterize", 0, 0, lambda a, _: a & 0x80),
  ("Solarize", 5, 5 / 10 * 256, lambda a, t: np.asarray(ImageOps.solarize(pil(a), int(t)))),
  ("Solarize", 7, 7 / 10 * 256, lambda a, t: np.asarray(ImageOps.solarize(pil(a), int(t)))),
  (
    "SolarizeAdd",
    5,
    5 / 10 * 110,
    lambda a, n: np.where(a < 128, np.minimum(a.astype(int) + int(n), 255), a),
  ),
  (
    "SolarizeAdd",
    9.5,
    9.5 / 10 * 110,
    lambda a, n: np.where(a < 128, np.minimum(a.astype(int) + int(n), 255), a),
  ),
]
for _name, _kind in [
  ("Color", ImageEnhance.Color),
  ("Contrast", ImageEnhance.Contrast),
  ("Brightness", ImageEnhance.Brightness),
  ("Sharpness", ImageEnhance.Sharpness),
]:
  # factor 0.64 interpolates; 2.44 extrapolates and clips.
  UNSIGNED += [(_name, m, m / 10 * 1.8 + 0.1, enhance(_kind)) for m in (3, 13)]

SIGNED = [
  (
    "Rotate",
    7,
    7 / 10 * 30,
    lambda a, d: np.asarray(pil(a).rotate(d, Image.NEAREST, fillcolor=(ra.FILL,) * 3)),
  ),
  ("ShearX", 7, 7 / 10 * 0.3, shear_x),
  ("ShearY", 7, 7 / 10 * 0.3, shear_y),
  ("TranslateX", 1, 1 / 10 * 100, lambda a, p: affine(a, (1, 0, p, 0, 1, 0))),
  ("TranslateY", 1, 1 / 10 * 100, lambda a, p: affine(a, (1, 0, 0, 0, 1, p))),
  # 5.7 pixels: a fraction, rounded to the nearest pixel (5.5 would be a tie).
  ("TranslateX", 0.57, 0.57 / 10 * 100, lambda a, p: affine(a, (1, 0, p, 0, 1, 0))),
]


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, magnitude, arg, reference", UNSIGNED, ids=[f"{u[0]}-{u[1]}" for u in UNSIGNED]
)
def test_colour_ops_equal_pil_at_a_fixed_magnitude(name, magnitude, arg, reference):
  a = sample_image()
  want = reference(a, arg).astype(np.uint8)
  assert not np.array_equal(want, a)  # the op does something to this image
  for got in run_op(a, name, magnitude, seeds=range(2)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness"])
def test_enhance_ops_clip_on_a_small_image(name):
  # TF's float -> uint8 cast saturates in its vectorised loop but wraps in the scalar tail (300
  # becomes 44), so on a 5x3 image (45 values, 13 of them past the last full AVX-512 vector)
  # only the explicit clip gives 0 and 255. Sharpness blends alike, but keeps a 1-pixel border
  # here and has one interior column to extrapolate.
  a = sample_image()[:5, :3]
  kind = getattr(ImageEnhance, name)
  want = np.asarray(kind(pil(a)).enhance(30 / 10 * 1.8 + 0.1))
  assert ((want == 0) | (want == 255)).sum() >= 3  # extrapolating past black or white
  np.testing.assert_array_equal(run_op(a, name, 30, seeds=[0])[0], want)


def test_autocontrast_leaves_a_flat_channel_as_pil_does():
  a = sample_image()
  a[..., 1] = 77
  want = np.asarray(ImageOps.autocontrast(pil(a)))
  assert (want[..., 1] == 77).all() and not np.array_equal(want, a)
  np.testing.assert_array_equal(run_op(a, "AutoContrast", 0, seeds=[0])[0], want)


@pytest.mark.parametrize(
  "name, magnitude, arg, reference", SIGNED, ids=[f"{s[0]}-{s[1]}" for s in SIGNED]
)
def test_geometric_ops_equal_pil_with_either_sign(name, magnitude, arg, reference):
  a = sample_image()
  plus, minus = reference(a, arg), reference(a, -arg)
  assert not np.array_equal(plus, minus) and not np.array_equal(plus, a)
  signs = []
  for got in run_op(a, name, magnitude):
    signs.append(+1 if np.array_equal(got, plus) else -1 if np.array_equal(got, minus) else 0)
  assert 0 not in signs, signs
  # Each sign has chance 1/2: both among 8 seeds unless a 1-in-128 coincidence (seeds fixed).
  assert set(signs) == {1, -1}, signs


def test_cutout_is_a_square_of_128_clipped_at_the_border():
  a = sample_image(avoid_fill=True)
  magnitude = 2.5
  pad = int(magnitude / 10 * 40)  # 10: a 20-pixel square, larger than half the image
  centres = []
  for got in run_op(a, "Cutout", magnitude, seeds=range(24)):
    filled = np.argwhere((got == ra.FILL).all(-1))
    (top, left), (bottom, right) = filled.min(0), filled.max(0) + 1
    # The centre from the box: a box clipped at the top ends at cy + pad, else it starts at
    # cy - pad (both clipped: any centre fits; take the middle).
    cy = top + pad if top > 0 else bottom - pad if bottom < H else H // 2
    cx = left + pad if left > 0 else right - pad if right < W else W // 2
    assert 0 <= cy < H and 0 <= cx < W
    want = a.copy()
    want[max(cy - pad, 0) : cy + pad, max(cx - pad, 0) : cx + pad] = ra.FILL
    np.testing.assert_array_equal(got, want)
    centres.append((cy, cx))
  # Both coordinates drawn afresh for every seed: 24 draws of 24 rows (32 columns) give 15 (18)
  # different ones on average; 8 or fewer has chance < 1e-4.
  ys, xs = zip(*centres, strict=True)
  assert len(set(ys)) > 8 and len(set(xs)) > 8, centres


# The ops whose definition makes them the identity at some magnitude (big_vision's mapping):
# 0 degrees, 0 shear, 0 pixels, a 0-pixel square, 0 added; enhance factor 5/10 * 1.8 + 0.1 = 1;
# Solarize threshold 256 (nothing is >= 256); Posterize int(20/10 * 4) = 8 bits.
IDENTITIES = [
  ("Rotate", 0),
  ("ShearX", 0),
  ("ShearY", 0),
  ("TranslateX", 0),
  ("TranslateY", 0),
  ("Cutout", 0),
  ("SolarizeAdd", 0),
  ("Color", 5),
  ("Contrast", 5),
  ("Brightness", 5),
  ("Sharpness", 5),
  ("Solarize", 10),
  ("Posterize", 20),
]


@pytest.mark.parametrize("name, magnitude", IDENTITIES)
def test_ops_are_the_identity_where_their_definition_says(name, magnitude):
  a = sample_image()
  for got in run_op(a, name, magnitude, seeds=range(4)):
    np.testing.assert_array_equal(got, a)


def test_at_magnitude_0_the_other_ops_still_change_the_image():
  # big_vision's AugReg configs: 'light1': 'randaug(2,0)',  # Actually not nothing!
  a = sample_image()
  changing = [n for n in ra.OPS if not np.array_equal(run_op(a, n, 0, seeds=[0])[0], a)]
  identity = {n for n, _ in IDENTITIES[:7]}
  assert sorted(changing) == sorted(set(ra.OPS) - identity)


def test_layers_pick_ops_uniformly_with_replacement():
  n = 1600
  picks = (
    tf.data.Dataset.range(n)
    .map(lambda k: ra.layer_ops(tf.stack([tf.constant(5, tf.int64), k]), 2)[0])
    .batch(n)
    .get_single_element()
    .numpy()
  )
  counts = np.bincount(picks.ravel(), minlength=len(ra.OPS))
  # 3200 picks, 200 expected per op, binomial sd 13.7: +-70 is 5.1 sd (all 16 inside: p > 0.99999).
  assert len(counts) == 16 and np.abs(counts - 200).max() <= 70, counts
  # With replacement the two layers repeat an op 1/16 of the time: 100 expected, sd 9.7.
  repeats = int((picks[:, 0] == picks[:, 1]).sum())
  assert 50 <= repeats <= 150, repeats


@pytest.mark.slow
def test_randaugment_applies_each_picked_op_in_turn():
  a = sample_image()
  magnitude = 9  # no op is the identity at 9
  f = tf.function(lambda im, s: ra.randaugment(im, s, 2, magnitude))
  seen = set()
  for k in range(6):
    ops, seeds = ra.layer_ops(_seed(k), 2)
    want = a
    for op, s in zip(ops.numpy(), seeds, strict=True):
      want = ra.apply_op(tf.constant(want), ra.OPS[op], magnitude, s).numpy()
      seen.add(int(op))
    np.testing.assert_array_equal(f(tf.constant(a), _seed(k)).numpy(), want)
  assert len(seen) >= 6  # 12 picks of 16 ops: the composition covers many of them


# -- CutMix and the switch ---------------------------------------------------------------------


def _distinct_batch(b: int, h: int, w: int) -> np.ndarray:
  """float32 [b, h, w, 3]: every image different from every other at every pixel."""
  rng = np.random.default_rng(b * 1000 + h)
  noise = rng.uniform(0.0, 0.05, (b, h, w, 3))
  return (np.arange(b)[:, None, None, None] * 0.1 - 0.5 + noise).astype(np.float32)


def _pasted(out: np.ndarray, images: np.ndarray) -> np.ndarray:
  """bool [B, h, w]: the pixels of each output that are its partner's (image B-1-i)."""
  partner = images[::-1]
  own = (out == images).all(-1)
  theirs = (out == partner).all(-1)
  assert (own ^ theirs).all()  # every pixel is one or the other, never a blend
  return theirs


@pytest.mark.parametrize("multilabel", [False, True])
def test_cutmix_label_weights_equal_the_pasted_area(multilabel):
  b, h, w = 6, 16, 20
  images = _distinct_batch(b, h, w)
  if multilabel:
    targets = (np.random.default_rng(3).uniform(size=(b, 5)) < 0.4).astype(np.float32)
  else:
    targets = np.eye(b, dtype=np.float32)
  f = tf.function(lambda s: cutmix.cutmix(tf.constant(images), tf.constant(targets), s, 1.0))
  areas, clipped, sides = [], 0, []
  for k in range(60):
    out, mixed = (x.numpy() for x in f(_seed(k)))
    pasted = _pasted(out, images)
    assert (pasted == pasted[:1]).all()  # one box for the whole batch
    frac = pasted[0].mean()
    if frac:
      rows, cols = np.flatnonzero(pasted[0].any(1)), np.flatnonzero(pasted[0].any(0))
      # A rectangle: consecutive rows and columns, and every pixel where they cross.
      assert np.ptp(rows) == len(rows) - 1 and np.ptp(cols) == len(cols) - 1
      assert pasted[0].sum() == len(rows) * len(cols)
      touches = rows[0] == 0 or cols[0] == 0 or rows[-1] == h - 1 or cols[-1] == w - 1
      clipped += touches
      if not touches:  # timm's sides: int(h * r), int(w * r) for one r = sqrt(1 - lambda)
        bh, bw = len(rows), len(cols)
        assert max(bh / h, bw / w) < min((bh + 1) / h, (bw + 1) / w), (bh, bw)
        sides.append((bh, bw))
    # Label weight of the partner = the pasted fraction. float32: lambda = 1 - area / (h w) and
    # the mix lambda * t + (1 - lambda) * t' each round once (2.4e-7 at most for values <= 1).
    want = (1 - frac) * targets + frac * targets[::-1]
    np.testing.assert_allclose(mixed, want, rtol=0, atol=3e-7)
    areas.append(frac)
  # Beta(1, 1): lambda uniform; the boxes vary, some clip at the border, some are unclipped.
  assert np.ptp(areas) > 0.5 and clipped >= 5 and len(sides) >= 5, (np.ptp(areas), clipped)


def _mixed_by_cutmix(out: np.ndarray, images: np.ndarray) -> bool:
  """CutMix leaves every pixel its own or its partner's; mixup blends every pixel."""
  partner = images[::-1]
  return bool(((out == images) | (out == partner)).all())


@pytest.mark.slow
def test_mix_switch_picks_cutmix_with_its_probability():
  images = _distinct_batch(2, 8, 8)
  targets = np.eye(2, dtype=np.float32)
  n = 600

  def cutmix_count(p: float) -> int:
    aug = transforms.Augment(mixup_alpha=1.0, cutmix_alpha=1.0, mix_switch_prob=p)
    out = (
      tf.data.Dataset.range(n)
      .map(
        lambda k: transforms.mix_batch(
          tf.constant(images), tf.constant(targets), tf.stack([tf.constant(9, tf.int64), k]), aug
        )[0]
      )
      .batch(n)
      .get_single_element()
      .numpy()
    )
    return sum(_mixed_by_cutmix(o, images) for o in out)

  # Beta(1, 1) mixup leaves a pixel unblended only if 1 - lambda < 1e-7 (chance 1e-7 a batch),
  # so every batch is told right. 600 batches at p = 0.3: 180 expected, sd 11.2; +-56 is 5 sd.
  assert abs(cutmix_count(0.3) - 180) <= 56
  assert cutmix_count(0.0) == 0 and cutmix_count(1.0) == n


# -- random erasing ----------------------------------------------------------------------------


@pytest.mark.slow
def test_random_erasing_rate_boxes_and_noise():
  h, w, n, p = 64, 48, 800, 0.25
  image = tf.fill([h, w, 3], 0.5)  # a level the N(0, 1) noise never hits exactly
  out = (
    tf.data.Dataset.range(n)
    .map(lambda k: erasing.random_erase(image, tf.stack([tf.constant(4, tf.int64), k]), p))
    .batch(n)
    .get_single_element()
    .numpy()
  )
  changed = (out != 0.5).any(-1)
  erased = changed.any((1, 2))
  # Every attempt fits unless area * aspect >= 1 (or area / aspect >= 1) of a side: below 3% of
  # attempts, so all 10 fail with chance < 1e-15 and the rate is p. 800 images: 200 expected,
  # binomial sd 12.2; +-61 is 5 sd.
  assert abs(int(erased.sum()) - n * p) <= 61, erased.sum()
  boxes, values = [], []
  for img, mask in zip(out[erased], changed[erased], strict=True):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bh, bw = len(rows), len(cols)
    assert np.ptp(rows) == bh - 1 and np.ptp(cols) == bw - 1 and mask.sum() == bh * bw
    assert (img[mask] != 0.5).all()  # every channel of the box is noise
    values.append(img[mask].ravel())
    boxes.append((bh, bw))
  bh, bw = np.array(boxes, float).T
  assert (bh < h).all() and (bw < w).all()
  # h = round(sqrt(a * r)), w = round(sqrt(a / r)) with a in [0.02, 1/3] of the image and r in
  # [0.3, 1/0.3]: each side is within half a pixel of the unrounded one.
  assert ((bh + 0.5) * (bw + 0.5) >= 0.02 * h * w).all()
  assert ((bh - 0.5) * (bw - 0.5) <= h * w / 3).all()
  assert ((bh + 0.5) / (bw - 0.5) >= 0.3).all() and ((bh - 0.5) / (bw + 0.5) <= 1 / 0.3).all()
  area, aspect = bh * bw / (h * w), bh / bw
  # Spread over the ranges (200 draws: each bound fails by chance < 1e-6).
  assert area.min() < 0.04 and area.max() > 0.28, (area.min(), area.max())
  assert aspect.min() < 0.45 and aspect.max() > 2.2, (aspect.min(), aspect.max())
  v = np.concatenate(values)  # ~3e5 values of N(0, 1): mean sd 0.002, std sd 0.0013
  assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01, (v.mean(), v.std())


# -- config and pipeline -----------------------------------------------------------------------


def cfg(folder: str, **aug):
  c = schema.base()
  c.dataset, c.folder = "folder", folder
  c.image_size, c.batch_size, c.data_threads, c.seed = 16, 4, 2, 3
  c.augment = ml_collections.ConfigDict({**c.augment.to_dict(), **aug})
  return c


def take(c, n: int, start: int = 0) -> list[dict]:
  it = ip.host_batches(c, start_step=start, process_index=0, process_count=1)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
  "key, value",
  [
    ("randaug_layers", -1),
    ("randaug_magnitude", -0.5),
    ("randaug_magnitude", float("nan")),
    ("cutmix_alpha", -1.0),
    ("mix_switch_prob", 1.5),
    ("erase_prob", 1.5),
  ],
)
def test_bad_values_are_one_line_errors_naming_the_key(key, value):
  aug = cfg("unused").augment
  aug[key] = value
  with pytest.raises(errors.ConfigError, match=rf"^augment\.{key} {value!r}[^\n]*$"):
    transforms.Augment.from_config(aug)


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory):
  """16x16 images for a 16-pixel model: without a crop the resize changes nothing."""
  root = str(tmp_path_factory.mktemp("square"))
  df.write_folder(root, {"train": {"a": 6, "b": 5, "c": 5}}, size=(16, 16))
  return root


@pytest.mark.slow
def test_the_pipeline_randaugments_the_uint8_pixels(square_folder):
  plain = dict(inception_crop=False, hflip=False)
  base = take(cfg(square_folder, **plain), 8)
  got = take(cfg(square_folder, **plain, randaug_layers=1, randaug_magnitude=0.0), 8)
  ops = set()
  for b, g in zip(base, got, strict=True):
    np.testing.assert_array_equal(b["index"], g["index"])
    for x, y in zip(b["image"], g["image"], strict=True):
      pixels = np.round(x * 127.5 + 127.5).astype(np.uint8)  # integer levels: exact
      after = np.round(y * 127.5 + 127.5).astype(np.uint8)
      np.testing.assert_array_equal(y, (after.astype(np.float32) - 127.5) / np.float32(127.5))
      # At M = 0 no op draws anything that matters: each is one image.
      match = [n for n in ra.OPS if np.array_equal(run_op(pixels, n, 0, seeds=[0])[0], after)]
      assert match, "not any RandAugment op of the image"
      ops.add(match[0] if len(match) == 1 else "identity")
  # 32 images, 10 outcomes: 9 ops that change the image, and the 7 that do not (7/16). All 32 in
  # 4 outcomes has chance below 84 * (10/16)^32 + 126 * (4/16)^32 = 2.5e-5.
  assert len(ops) >= 5, ops


@pytest.mark.slow
def test_the_pipeline_cutmixes_batches_with_area_weights(square_folder):
  base = take(cfg(square_folder, batch_size=8), 4)
  got = take(cfg(square_folder, batch_size=8, cutmix_alpha=1.0), 4)
  fractions = []
  for b, g in zip(base, got, strict=True):
    pasted = _pasted(g["image"], b["image"])
    frac = pasted[0].mean()
    onehot = np.eye(3, dtype=np.float32)[b["label"]]
    np.testing.assert_allclose(  # float32 rounding of lambda and the mix, as above
      g["label"], (1 - frac) * onehot + frac * onehot[::-1], rtol=0, atol=3e-7
    )
    fractions.append(frac)
  assert len(set(fractions)) > 1


@pytest.fixture(scope="module")
def folder_all(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("folder"))
  df.write_folder(root, {"train": {"a": 7, "b": 5, "c": 4}})
  return root


@pytest.mark.slow
def test_two_passes_and_a_resumed_run_see_the_same_batches_with_every_augmentation(folder_all):
  c = cfg(
    folder_all,
    batch_size=4,
    vflip=0.5,
    rot90=0.5,
    rrc_prob=0.5,
    randaug_layers=2,
    randaug_magnitude=10.0,
    mixup_alpha=0.4,
    cutmix_alpha=1.0,
    mix_switch_prob=0.5,
    erase_prob=0.5,
  )
  first = take(c, 10)  # 16 images, 4 batches an epoch: 10 cross two epoch boundaries
  again = take(c, 10)
  resumed = {start: take(c, 10 - start, start=start) for start in (3, 6)}

  def same(a, b):
    return all(
      np.array_equal(x[k], y[k])
      for x, y in zip(a, b, strict=True)
      for k in ("image", "label", "index")
    )

  assert same(first, again)
  for start, batches in resumed.items():
    assert same(batches, first[start:]), start
  c.seed = 4
  assert not same(take(c, 2), first[:2])
  images = np.concatenate([b["image"] for b in first])
  labels = np.concatenate([b["label"] for b in first])
  assert (np.abs(images) > 1).any()  # erased boxes of N(0, 1) noise
  assert ((labels > 0) & (labels < 1)).any()  # mixed targets
