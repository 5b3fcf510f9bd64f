"""Per-image ops in TensorFlow graph form: decoding, crops, augmentations, eval resize, mixup.

RandAugment, CutMix and random erasing are in modules of their own (randaugment, cutmix, erasing).

Every random choice is a stateless op driven by a per-example seed (a [2]
int64 tensor), so an image's augmentation depends only on the run's seed and
the image's position in the stream, never on threads or on what ran before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from vit_jax import errors
from vit_jax.data import cutmix
from vit_jax.data import erasing
from vit_jax.data import preprocess
from vit_jax.data import randaugment
from vit_jax.platform import tf_setup

# libjpeg's accurate integer IDCT: the decoder PIL uses, so JPEG pixels equal
# those `vit-jax predict` sees (the fast IDCT differs by up to 4 levels), at
# the same speed with libjpeg-turbo.
JPEG_DCT = "INTEGER_ACCURATE"
INCEPTION_AREA = (0.05, 1.0)
INCEPTION_RATIO = (3 / 4, 4 / 3)


def _prob(value: Any, key: str = "augmentation probability") -> float:
  """An augmentation switch as a probability: True means 0.5, False/None 0."""
  if value is True:
    return 0.5
  if not value:
    return 0.0
  p = float(value)
  if not 0.0 <= p <= 1.0:
    raise errors.ConfigError(f"{key} {value!r} is not in [0, 1]")
  return p


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentations, read from `config.augment`."""

  inception_crop: bool = True
  hflip: float = 0.5
  vflip: float = 0.0
  rot90: float = 0.0
  rrc_prob: float = 0.0
  rrc_scale: tuple[float, float] = (0.05, 1.0)
  mixup_alpha: float = 0.0
  randaug_layers: int = 0
  randaug_magnitude: float = 10.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  erase_prob: float = 0.0

  @classmethod
  def from_config(cls, aug: Any) -> Augment:
    scale = tuple(float(s) for s in aug.rrc_scale)
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
      raise errors.ConfigError(
        f"augment.rrc_scale {scale} is not a range (lo, hi) with 0 < lo <= hi <= 1"
      )
    alpha = float(aug.mixup_alpha)
    if alpha < 0:
      raise errors.ConfigError(f"augment.mixup_alpha {alpha} is negative")
    layers, magnitude = int(aug.randaug_layers), float(aug.randaug_magnitude)
    if layers < 0:
      raise errors.ConfigError(f"augment.randaug_layers {layers} is negative")
    if not 0.0 <= magnitude < float("inf"):
      raise errors.ConfigError(f"augment.randaug_magnitude {magnitude} is not a number >= 0")
    cut_alpha = float(aug.cutmix_alpha)
    if not cut_alpha >= 0:
      raise errors.ConfigError(f"augment.cutmix_alpha {cut_alpha} is not a number >= 0")
    switch = float(aug.mix_switch_prob)
    if not 0.0 <= switch <= 1.0:
      raise errors.ConfigError(f"augment.mix_switch_prob {switch} is not in [0, 1]")
    return cls(
      inception_crop=bool(aug.inception_crop),
      hflip=_prob(aug.hflip),
      vflip=_prob(aug.vflip),
      rot90=_prob(aug.rot90),
      rrc_prob=_prob(aug.rrc_prob),
      rrc_scale=scale,
      mixup_alpha=alpha,
      randaug_layers=layers,
      randaug_magnitude=magnitude,
      cutmix_alpha=cut_alpha,
      mix_switch_prob=switch,
      erase_prob=_prob(aug.erase_prob, "augment.erase_prob"),
    )


# -- decoding ------------------------------------------------------------------


def _pil_decode(encoded: bytes) -> np.ndarray:
  """PIL's RGB pixels, or an empty image for undecodable bytes (the graph then fails quietly)."""
  try:
    return preprocess.decode_rgb(encoded)
  except preprocess.ImageError:
    return np.zeros((0, 0, 3), np.uint8)


def _pil_decode_op(encoded):
  tf = tf_setup.tf()
  image = tf.numpy_function(_pil_decode, [encoded], tf.uint8, stateful=False)
  # An op error (not a Python exception) so that the pipeline drops the image without a traceback.
  check = tf.debugging.assert_positive(tf.size(image), message="undecodable image")
  with tf.control_dependencies([check]):
    return tf.identity(image)


def _needs_pil(encoded):
  """True for formats TF decodes wrongly or not at all: palette/low-depth BMP, TIFF, ..."""
  tf = tf_setup.tf()
  # A fixed-size header, so that short (corrupt) files do not make substr fail.
  head = tf.strings.substr(encoded, 0, 32) + tf.constant(b"\0" * 32)
  magic4 = tf.strings.substr(head, 0, 4)
  png = tf.equal(magic4, b"\x89PNG")
  gif = tf.equal(magic4, b"GIF8")
  webp = tf.logical_and(tf.equal(magic4, b"RIFF"), tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"))
  bmp = tf.equal(tf.strings.substr(head, 0, 2), b"BM")
  # TF's BMP decoder reads 8-bit palette images as gray levels.
  bits = tf.cast(
    tf.io.decode_raw(tf.strings.substr(head, 28, 2), tf.uint16, little_endian=True)[0], tf.int32
  )
  return tf.logical_not(png | gif | webp | (bmp & (bits >= 24)))


def decode(encoded, crop_window: Callable | None = None):
  """Encoded bytes to uint8 RGB [h, w, 3]; `crop_window(shape) -> [y, x, h, w]` crops first.

  JPEGs decode only the crop window. Grayscale, palette, CMYK and alpha images
  come out as RGB (alpha dropped, as PIL's convert("RGB") does). Undecodable
  bytes raise an error in the op; the pipeline drops and counts that element.
  """
  tf = tf_setup.tf()

  def jpeg():
    if crop_window is None:
      return tf.io.decode_jpeg(encoded, channels=3, dct_method=JPEG_DCT)
    window = crop_window(tf.io.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method=JPEG_DCT)

  def other():
    image = tf.cond(
      _needs_pil(encoded),
      lambda: _pil_decode_op(encoded),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
    image = tf.ensure_shape(image, [None, None, 3])
    if crop_window is None:
      return image
    window = crop_window(tf.shape(image))
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  return tf.ensure_shape(image, [None, None, 3])


# -- geometry ------------------------------------------------------------------


def random_crop_window(
  shape,
  seed,
  area: tuple[float, float] = INCEPTION_AREA,
  ratio: tuple[float, float] = INCEPTION_RATIO,
):
  """An Inception-style crop [y, x, h, w]: area fraction in `area`, aspect ratio in `ratio`."""
  tf = tf_setup.tf()
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.cast(shape, tf.int32),
    tf.zeros([0, 0, 4], tf.float32),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=ratio,
    area_range=area,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def scale_to_unit(image):
  """[0, 255] pixels to float32 [-1, 1], as preprocess.scale_to_unit."""
  tf = tf_setup.tf()
  return (tf.cast(image, tf.float32) - 127.5) / 127.5


def eval_image(image, size: int, crop_ratio: float | None = None):
  """uint8 [h, w, 3] -> float32 [size, size, 3] in [-1, 1] for evaluation.

  crop_ratio None: the original plain bilinear resize (preprocess.eval_resize).
  Otherwise the short side is resized to size / crop_ratio and the centre
  size x size is cut out (crop_ratio 1: the short side becomes `size`).
  """
  tf = tf_setup.tf()
  if crop_ratio is None:
    resized = tf.image.resize(image, [size, size], method="bilinear")
  else:
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.maximum(tf.cast(tf.math.ceil(size / crop_ratio), tf.float32), float(size))
    new_hw = tf.maximum(tf.cast(tf.round(hw * short / tf.reduce_min(hw)), tf.int32), size)
    resized = tf.image.resize(image, new_hw, method="bilinear")
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    resized = tf.slice(resized, [top, left, 0], [size, size, 3])
  return scale_to_unit(resized)


def train_image(encoded, seed, size: int, aug: Augment):
  """Encoded bytes -> float32 [size, size, 3] in [-1, 1], augmented as `aug` says with `seed`."""
  tf = tf_setup.tf()
  seeds = tf.random.experimental.stateless_split(seed, num=7)

  def coin(i: int, p: float):
    return tf.random.stateless_uniform([], seeds[i]) < p

  crop = (lambda shape: random_crop_window(shape, seeds[0])) if aug.inception_crop else None
  image = tf.image.resize(decode(encoded, crop), [size, size], method="bilinear")
  if aug.hflip:
    image = tf.cond(coin(1, aug.hflip), lambda: tf.image.flip_left_right(image), lambda: image)
  if aug.vflip:
    image = tf.cond(coin(2, aug.vflip), lambda: tf.image.flip_up_down(image), lambda: image)
  if aug.rot90:
    # 1 to 3 quarter turns, so that `rot90` is the chance the image changes.
    k = tf.random.stateless_uniform([], seeds[4], minval=1, maxval=4, dtype=tf.int32)
    image = tf.cond(coin(3, aug.rot90), lambda: tf.image.rot90(image, k), lambda: image)
  if aug.rrc_prob:

    def rrc():
      window = random_crop_window(tf.shape(image), seeds[6], area=aug.rrc_scale)
      cut = tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])
      return tf.image.resize(cut, [size, size], method="bilinear")

    image = tf.cond(coin(5, aug.rrc_prob), rrc, lambda: image)
  # RandAugment's and erasing's seeds are folded in, so that the seeds above (and the streams
  # of runs without them) stay as they were.
  if aug.randaug_layers:
    # On uint8, as big_vision's (its crop rounds down; this rounds to nearest).
    pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    image = randaugment.randaugment(
      pixels,
      tf.random.experimental.stateless_fold_in(seed, 7),
      aug.randaug_layers,
      aug.randaug_magnitude,
    )
  image = scale_to_unit(image)
  if aug.erase_prob:
    image = erasing.random_erase(
      image, tf.random.experimental.stateless_fold_in(seed, 8), aug.erase_prob
    )
  return tf.ensure_shape(image, [size, size, 3])


def mixup(images, targets, seed, alpha: float):
  """Mixes a batch with itself reversed; lambda ~ Beta(alpha, alpha), one per batch.

  `targets` are float [B, C] (one-hot or multi-hot); they are mixed alike.
  """
  tf = tf_setup.tf()
  seeds = tf.random.experimental.stateless_split(seed, num=2)
  g = [tf.random.stateless_gamma([], s, alpha=alpha) for s in tf.unstack(seeds)]
  lam = g[0] / (g[0] + g[1])
  images = lam * images + (1.0 - lam) * tf.reverse(images, [0])
  targets = lam * targets + (1.0 - lam) * tf.reverse(targets, [0])
  return images, targets


def mix_batch(images, targets, seed, aug: Augment):
  """Mixup or CutMix, one per batch: with both on, CutMix has probability `aug.mix_switch_prob`.

  As timm's Mixup (mode 'batch', prob 1): `switch_prob` picks between the two.
  """
  tf = tf_setup.tf()
  if not aug.cutmix_alpha:
    return mixup(images, targets, seed, aug.mixup_alpha)
  if not aug.mixup_alpha:
    return cutmix.cutmix(images, targets, seed, aug.cutmix_alpha)
  use_cutmix = (
    tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 2))
    < aug.mix_switch_prob
  )
  return tf.cond(
    use_cutmix,
    lambda: cutmix.cutmix(images, targets, seed, aug.cutmix_alpha),
    lambda: mixup(images, targets, seed, aug.mixup_alpha),
  )
