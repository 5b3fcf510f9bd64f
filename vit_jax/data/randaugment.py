"""RandAugment as big_vision trains the AugReg ViTs: N ops per image, each at magnitude M.

Source: google-research/big_vision @ 0127fb6, big_vision/pp/autoaugment.py (a fork of
tensorflow/tpu models/official/efficientnet/autoaugment.py), registered as the pp op
`randaug(num_layers, magnitude)` in big_vision/pp/archive/randaug.py. Line numbers below are
that file's. AugReg's names map to (N, M) in big_vision/configs/vit_i21k.py RANDAUG_DEF:
light1 (2, 0), light2 (2, 10), medium1/2 (2, 15), strong1/2 (2, 20).

What is kept from big_vision (`distort_image_with_randaugment`, L662-700):
  * the 16 ops of `OPS`, in its order; each layer picks one uniformly (with replacement:
    layers draw independently), and the picked op is always applied (big_vision draws an
    apply probability in [0.2, 0.8) and discards it);
  * M is fixed, not sampled; `level_to_arg` (L466-527) maps it with _MAX_LEVEL = 10 (L36):
      Rotate       M/10 * 30 degrees, random sign               (_rotate_level_to_arg)
      ShearX/Y     M/10 * 0.3, random sign                      (_shear_level_to_arg)
      TranslateX/Y M/10 * 100 pixels, random sign               (translate_const=100)
      Color, Contrast, Brightness, Sharpness  factor M/10 * 1.8 + 0.1, no sign
                                                                (_enhance_level_to_arg)
      Posterize    int(M/10 * 4) bits kept
      Solarize     threshold int(M/10 * 256)
      SolarizeAdd  int(M/10 * 110) added below 128
      Cutout       half-side int(M/10 * 40) pixels              (cutout_const=40)
      AutoContrast, Equalize, Invert  no argument;
  * out-of-image pixels (Rotate, Shear, Translate) and the Cutout square are filled with 128
    (`replace_value = [128] * 3`; cutout's own default of 0 is overridden, L544-547);
    the affine ops sample nearest-neighbour (tensorflow_addons' default) in pixel-index
    coordinates, rotating about ((w - 1) / 2, (h - 1) / 2), as PIL does about its pixel
    centres; Cutout's centre is uniform over the image and the square is clipped at its edges;
  * the input is uint8, as big_vision's (its crop casts back to the input dtype).

Where big_vision's numbers are quirks, the op does what its name and PIL (ImageOps,
ImageEnhance; checked against Pillow 13 in tests/test_augment.py) say:
  * Contrast blends towards the image's mean grey level (PIL: int(mean of L + 0.5)). big_vision
    blends towards `sum(histogram) / 256` (L203-217), the pixel count / 256: 196 for every
    224x224 image whatever its content, 255 (clipped) at 384x384.
  * Solarize inverts the pixels >= threshold, so a threshold >= 256 changes nothing (PIL).
    In big_vision the Python threshold meets a uint8 tensor and wraps modulo 256 in TF 2.21:
    M = 10 gives 256 -> 0, inverting the whole image, M = 15 gives 384 -> 128, M = 20 inverts.
    Here Solarize is the identity from M = 10 up.
  * Posterize keeps int(M/10 * 4) bits clipped to PIL's range 1-8: at M < 2.5 (0 bits, which
    PIL refuses) one bit is kept, x & 128, which is also what big_vision's shift by 8 does in
    TF 2.21 (the shift is clamped to 7; L226-229); from 8 bits up the image is unchanged.
  * Color and Contrast take grey levels as PIL's L conversion, (19595 R + 38470 G + 7471 B +
    2^15) >> 16; big_vision's tf.image.rgb_to_grayscale is 1 level lower for 26% of colours
    (measured on 2M uniform random ones), never otherwise different.
  * Sharpness rounds the 3x3 smoothing (PIL's SMOOTH filter rounds); big_vision truncates, a
    degenerate image 0.5 levels darker on average (L326-355). Both keep the 1-pixel border.
  * AutoContrast builds its lookup table in float64 as PIL does; big_vision's float32 one
    (L289-323) is 1 level off in 21,325 of the 2,828,800 (lo, hi, level) entries (0.75%).
Blending (Color, Contrast, Brightness, Sharpness) is big_vision's and PIL's Image.blend:
float32, truncated to uint8, clipped to [0, 255] when extrapolating (factor > 1).

Identities: at M = 0, Rotate, ShearX/Y, TranslateX/Y, Cutout and SolarizeAdd; at M = 5
(factor 1.0) the four enhance ops; at M >= 10 Solarize; at M >= 20 Posterize. At M = 0 the
others still change the image (AugReg's "light1" comment: "Actually not nothing!").
Translation is in absolute pixels, as big_vision's (100 px at M = 10: 45% of a 224 side).

Randomness: every draw (the ops, their signs, Cutout's centre) is a stateless op on a seed
split from the image's [2] int64 seed, so the result depends on the seed only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from vit_jax.platform import tf_setup

OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Cutout",
  "SolarizeAdd",
)
MAX_LEVEL = 10.0
FILL = 128  # big_vision's replace value for affine ops and Cutout
TRANSLATE_CONST = 100  # pixels at M = 10 (RandAugment's; AutoAugment's is 250)
CUTOUT_CONST = 40  # half-side at M = 10 (RandAugment's; AutoAugment's is 100)


def level_args(name: str, magnitude: float) -> tuple[float | int, ...]:
  """big_vision's `level_to_arg` for one op, before the random sign: (), or (argument,)."""
  m = float(magnitude) / MAX_LEVEL
  if name in ("AutoContrast", "Equalize", "Invert"):
    return ()
  if name == "Rotate":
    return (m * 30.0,)
  if name in ("ShearX", "ShearY"):
    return (m * 0.3,)
  if name in ("TranslateX", "TranslateY"):
    return (m * float(TRANSLATE_CONST),)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return (m * 1.8 + 0.1,)
  if name == "Posterize":
    return (int(m * 4),)
  if name == "Solarize":
    return (int(m * 256),)
  if name == "SolarizeAdd":
    return (int(m * 110),)
  if name == "Cutout":
    return (int(m * CUTOUT_CONST),)
  raise ValueError(f"unknown RandAugment op {name!r}; the ops are {', '.join(OPS)}")


# -- colour ops: uint8 [h, w, 3] -> uint8 ------------------------------------------------------


def _u8(x):
  tf = tf_setup.tf()
  return tf.cast(x, tf.uint8)


def _grey(image):
  """PIL's convert('L'): int32 [h, w], (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  tf = tf_setup.tf()
  x = tf.cast(image, tf.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def blend(degenerate, image, factor):
  """PIL's Image.blend(degenerate, image, factor): float32 mix, clipped, truncated to uint8."""
  tf = tf_setup.tf()
  d = tf.cast(degenerate, tf.float32)
  mixed = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return _u8(tf.clip_by_value(mixed, 0.0, 255.0))


def _apply_lut(image, lut):
  """Per-channel lookup: lut int [3, 256] (values 0-255) -> lut[c, image[..., c]], uint8."""
  tf = tf_setup.tf()
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
  return tf.gather(tf.reshape(tf.cast(lut, tf.uint8), [-1]), index)


def autocontrast(image):
  """Each channel stretched to 0-255 (PIL's lookup table, float64); flat channels kept."""
  tf = tf_setup.tf()
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)  # [3]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
  flat = hi <= lo
  scale = tf.where(flat, tf.ones_like(lo), 255.0 / tf.where(flat, tf.ones_like(lo), hi - lo))
  offset = tf.where(flat, tf.zeros_like(lo), -lo * scale)
  # PIL's table entry for each pixel, computed in place (a gather per pixel costs more).
  return _u8(tf.clip_by_value(tf.floor(tf.cast(image, tf.float64) * scale + offset), 0.0, 255.0))


def equalize(image):
  """Per-channel histogram equalisation, PIL's and big_vision's lookup table (step = n // 255)."""
  tf = tf_setup.tf()
  index = tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512]), [-1])
  hist = tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])
  top = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32)
  last = tf.gather(hist, top, batch_dims=1)  # [3]: the count of each channel's brightest level
  step = ((tf.reduce_sum(hist, axis=1) - last) // 255)[:, None]
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.where(step > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)[None, :])
  return _apply_lut(image, lut)


def invert(image):
  return 255 - image


def posterize(image, bits: int):
  """Keeps the top `bits` bits, clipped to PIL's 1-8 (0 keeps one bit, as big_vision in TF 2.21)."""
  tf = tf_setup.tf()
  bits = min(max(int(bits), 1), 8)
  return tf.bitwise.bitwise_and(image, tf.constant(256 - 2 ** (8 - bits), tf.uint8))


def solarize(image, threshold: int):
  """Inverts the pixels >= threshold (PIL); threshold >= 256 changes nothing."""
  tf = tf_setup.tf()
  threshold = int(threshold)
  if threshold >= 256:
    return image
  if threshold <= 0:
    return 255 - image
  # 255 - x is x ^ 255; masks in arithmetic, as tf.where costs 10x as much on CPU (measured).
  flip = tf.cast(image >= tf.constant(threshold, tf.uint8), tf.uint8) * 255
  return tf.bitwise.bitwise_xor(image, flip)


def solarize_add(image, addition: int, threshold: int = 128):
  """Adds `addition` (clipped to 0-255) to the pixels below threshold."""
  tf = tf_setup.tf()
  add = min(max(int(addition), 0), 255)
  below = tf.cast(image < tf.constant(threshold, tf.uint8), tf.uint8)
  # min(x + add, 255) - x, in uint8 (wrapping arithmetic, exact as the result is in 0-255).
  gain = tf.minimum(image, tf.constant(255 - add, tf.uint8)) + tf.constant(add, tf.uint8) - image
  return image + below * gain


def color(image, factor):
  """PIL's ImageEnhance.Color: a blend with the image's grey version."""
  tf = tf_setup.tf()
  grey = tf.repeat(_grey(image)[..., None], 3, axis=-1)
  return blend(grey, image, factor)


def contrast(image, factor):
  """PIL's ImageEnhance.Contrast: a blend with the mean grey level, int(mean + 0.5)."""
  tf = tf_setup.tf()
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
  return blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image, factor):
  """PIL's ImageEnhance.Brightness: a blend with black."""
  tf = tf_setup.tf()
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL's ImageEnhance.Sharpness: a blend with the SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13,
  rounded; the 1-pixel border kept)."""
  tf = tf_setup.tf()
  x = tf.cast(image, tf.int32)
  rows = x[:-2] + x[1:-1] + x[2:]
  inner = x[1:-1, 1:-1]
  s = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * inner  # the weighted sum, in integers
  smooth = (2 * s + 13) // 26  # s / 13 rounded half up
  return blend(x + tf.pad(smooth - inner, [[1, 1], [1, 1], [0, 0]]), image, factor)


# -- geometric ops ---------------------------------------------------------------------------


def _transform(image, coefficients: Sequence[Any]):
  """Output pixel (x, y) <- input (a0 x + a1 y + a2, b0 x + b1 y + b2), nearest; outside: 128."""
  tf = tf_setup.tf()
  t = tf.cast(tf.stack([*coefficients, 0.0, 0.0]), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=t[None],
    output_shape=tf.shape(image)[:2],
    fill_value=float(FILL),
    interpolation="NEAREST",
    fill_mode="CONSTANT",
  )
  return out[0]


def rotate(image, degrees):
  """Counter-clockwise by `degrees` about the image centre (tensorflow_addons' rotate, PIL's)."""
  tf = tf_setup.tf()
  h, w = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2]))
  a = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(a), tf.sin(a)
  x0 = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y0 = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _transform(image, [cos, -sin, x0, sin, cos, y0])


def shear_x(image, level):
  """Input x = x + level * y (big_vision's shear_x)."""
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, level):
  """Input y = y + level * x (big_vision's shear_y)."""
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0])


def translate_x(image, pixels):
  """Input x = x + pixels: the content moves left (big_vision's translate_x)."""
  return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image, pixels):
  """Input y = y + pixels: the content moves up."""
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


def box_mask(shape, top, bottom, left, right, dtype):
  """1 in rows [top, bottom) and columns [left, right) of an [h, w, c] `shape`, else 0.

  Masks are multiplied in, full-shaped: tf.where and broadcasting binary ops cost about 10x as
  much on CPU (measured on 224x224x3 uint8 in tf.data: 1.4 ms for a where, 0.02 ms for a
  multiply).
  """
  tf = tf_setup.tf()
  ones = tf.ones([bottom - top, right - left, shape[2]], dtype)
  return tf.pad(ones, [[top, shape[0] - bottom], [left, shape[1] - right], [0, 0]])


def cutout(image, pad: int, center):
  """Rows [cy - pad, cy + pad) and columns [cx - pad, cx + pad), clipped, set to 128."""
  tf = tf_setup.tf()
  shape = tf.shape(image)
  cy, cx = center[0], center[1]
  top, bottom = tf.maximum(cy - pad, 0), tf.minimum(cy + pad, shape[0])
  left, right = tf.maximum(cx - pad, 0), tf.minimum(cx + pad, shape[1])
  m = box_mask(shape, top, bottom, left, right, image.dtype)
  return image * (1 - m) + tf.constant(FILL, image.dtype) * m


# -- RandAugment -----------------------------------------------------------------------------


def _draws(image, seed):
  """An op's random draws from its seed: negate (the signed ops' sign) and Cutout's centre."""
  tf = tf_setup.tf()
  sign_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.shape(image)
  # big_vision's _randomly_negate_tensor: negative with probability 1/2.
  negate = tf.random.stateless_uniform([], sign_seed) < 0.5
  center = tf.stack(
    [
      tf.random.stateless_uniform([], y_seed, 0, shape[0], tf.int32),
      tf.random.stateless_uniform([], x_seed, 0, shape[1], tf.int32),
    ]
  )
  return negate, center


_SIGNED = {
  "Rotate": rotate,
  "ShearX": shear_x,
  "ShearY": shear_y,
  "TranslateX": translate_x,
  "TranslateY": translate_y,
}
_UNSIGNED = {
  "AutoContrast": autocontrast,
  "Equalize": equalize,
  "Invert": invert,
  "Posterize": posterize,
  "Solarize": solarize,
  "Color": color,
  "Contrast": contrast,
  "Brightness": brightness,
  "Sharpness": sharpness,
  "SolarizeAdd": solarize_add,
}


def _apply(image, name: str, magnitude: float, negate, center):
  tf = tf_setup.tf()
  args = level_args(name, magnitude)
  if name in _SIGNED:
    return _SIGNED[name](image, tf.where(negate, -args[0], args[0]))
  if name == "Cutout":
    return cutout(image, args[0], center)
  return _UNSIGNED[name](image, *args)


def apply_op(image, name: str, magnitude: float, seed):
  """One op at magnitude M; `seed` ([2] int64) draws the sign (signed ops) or Cutout's centre."""
  return _apply(image, name, magnitude, *_draws(image, seed))


def layer_ops(seed, num_layers: int):
  """The op index (into OPS) of each layer, int32 [N], and each layer's op seed, int64 [N, 2]."""
  tf = tf_setup.tf()
  seeds = tf.random.experimental.stateless_split(seed, 2 * num_layers)
  ops = tf.stack(
    [
      tf.random.stateless_uniform([], seeds[2 * i], 0, len(OPS), tf.int32)
      for i in range(num_layers)
    ]
  )
  return ops, seeds[1::2]


def randaugment(image, seed, num_layers: int, magnitude: float):
  """uint8 [h, w, 3] -> uint8: `num_layers` ops drawn uniformly from OPS, each at `magnitude`."""
  tf = tf_setup.tf()
  ops, op_seeds = layer_ops(seed, num_layers)
  for i in range(num_layers):
    # The draws outside the branches: every branch's nodes cost time even when not taken.
    draws = _draws(image, op_seeds[i])
    branches = [functools.partial(_apply, image, name, magnitude, *draws) for name in OPS]
    image = tf.ensure_shape(tf.switch_case(ops[i], branches), image.shape)
  return image
