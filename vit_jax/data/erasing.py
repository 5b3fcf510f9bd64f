"""Random erasing (Zhong et al. 2017) as timm's RandomErasing in 'pixel' mode, on one image.

Source: huggingface/pytorch-image-models, timm/data/random_erasing.py (`_erase`, `_get_pixels`).
With probability p one box is erased (count 1). Up to 10 attempts: the box's area is
U(0.02, 1/3) of the image's, its aspect h/w log-uniform in [0.3, 1/0.3]; h = round(sqrt(area *
aspect)), w = round(sqrt(area / aspect)) (half to even, as Python's round); the first attempt
with h < height and w < width is placed uniformly (top in [0, height - h], left in [0, width - w])
and filled with N(0, 1) noise, every pixel and channel its own. No attempt fitting leaves the
image as it is. As in timm, the image is already normalised ([-1, 1] here) and the noise is not
clipped to that range.

Every draw is a stateless op on the image's [2] int64 seed.
"""

from __future__ import annotations

import math

from vit_jax.platform import tf_setup

AREA = (0.02, 1 / 3)
ASPECT = (0.3, 1 / 0.3)
ATTEMPTS = 10


def erase_box(height, width, seed):
  """int32 [4]: (top, left, h, w) of timm's first fitting attempt; h = w = 0 when none fits."""
  tf = tf_setup.tf()
  s = tf.random.experimental.stateless_split(seed, num=4)
  h_img, w_img = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  area = tf.random.stateless_uniform([ATTEMPTS], s[0], *AREA, tf.float32)
  area *= tf.cast(h_img * w_img, tf.float32)
  aspect = tf.exp(
    tf.random.stateless_uniform(
      [ATTEMPTS], s[1], math.log(ASPECT[0]), math.log(ASPECT[1]), tf.float32
    )
  )
  hs = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  ws = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (hs < h_img) & (ws < w_img)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # 0 when none fits
  found = tf.reduce_any(fits)
  h = tf.where(found, hs[first], 0)
  w = tf.where(found, ws[first], 0)
  top = tf.random.stateless_uniform([], s[2], 0, h_img - h + 1, tf.int32)
  left = tf.random.stateless_uniform([], s[3], 0, w_img - w + 1, tf.int32)
  return tf.stack([top, left, h, w])


def random_erase(image, seed, prob: float):
  """float [h, w, c] -> float: with probability `prob`, one box filled with N(0, 1) noise."""
  tf = tf_setup.tf()
  coin_seed, box_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = tf.shape(image)
  top, left, h, w = tf.unstack(erase_box(shape[0], shape[1], box_seed))

  def erase():
    pad = [[top, shape[0] - top - h], [left, shape[1] - left - w], [0, 0]]
    noise = tf.pad(tf.random.stateless_normal([h, w, shape[2]], noise_seed, dtype=image.dtype), pad)
    inside = tf.pad(tf.ones([h, w, shape[2]], image.dtype), pad)
    # Exact (x * 0 + n = n, x * 1 + 0 = x), and cheaper than tf.where on CPU
    # (randaugment.box_mask).
    return image * (1 - inside) + noise

  return tf.cond(tf.random.stateless_uniform([], coin_seed) < prob, erase, lambda: image)
