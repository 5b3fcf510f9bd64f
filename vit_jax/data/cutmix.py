"""CutMix on a batch: one box of the batch reversed is pasted into every image, labels weighted by
area.

As timm's Mixup in 'batch' mode (huggingface/pytorch-image-models, timm/data/mixup.py):
lambda ~ Beta(alpha, alpha), one per batch; the box's sides are the image's times
sqrt(1 - lambda), int-truncated, about a centre drawn uniformly over the image and clipped to it
(`rand_bbox`, margin 0); the partner of image i is image B-1-i (`x.flip(0)`); and the label weight
is recomputed from the pasted box, 1 - box area / image area (`correct_lam=True`,
`cutmix_bbox_and_lam`), so clipping at the border shows in the targets. Targets are float [B, C],
one-hot or multi-hot; both mix alike. Every draw is stateless on the batch's [2] int64 seed.
"""

from __future__ import annotations

from vit_jax.platform import tf_setup


def box(height, width, seed, alpha: float):
  """timm's rand_bbox for lambda ~ Beta(alpha, alpha): int32 [4] (top, bottom, left, right)."""
  tf = tf_setup.tf()
  s = tf.random.experimental.stateless_split(seed, num=4)
  g = [tf.random.stateless_gamma([], s[i], alpha=alpha) for i in (0, 1)]
  lam = g[0] / (g[0] + g[1])
  ratio = tf.sqrt(1.0 - lam)
  h, w = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  cut_h = tf.cast(tf.cast(h, tf.float32) * ratio, tf.int32)  # int(): truncation
  cut_w = tf.cast(tf.cast(w, tf.float32) * ratio, tf.int32)
  cy = tf.random.stateless_uniform([], s[2], 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], s[3], 0, w, tf.int32)
  return tf.stack(
    [
      tf.clip_by_value(cy - cut_h // 2, 0, h),
      tf.clip_by_value(cy + (cut_h + 1) // 2, 0, h),
      tf.clip_by_value(cx - cut_w // 2, 0, w),
      tf.clip_by_value(cx + (cut_w + 1) // 2, 0, w),
    ]
  )


def cutmix(images, targets, seed, alpha: float):
  """images float [B, h, w, c], targets float [B, C] -> both mixed with the batch reversed."""
  tf = tf_setup.tf()
  shape = tf.shape(images)
  top, bottom, left, right = tf.unstack(box(shape[1], shape[2], seed, alpha))
  pad = [[0, 0], [top, shape[1] - bottom], [left, shape[2] - right], [0, 0]]
  m = tf.pad(tf.ones([shape[0], bottom - top, right - left, shape[3]], images.dtype), pad)
  # Exact (x * 0 + y * 1 = y), and cheaper than tf.where on CPU (randaugment.box_mask).
  images = images * (1 - m) + tf.reverse(images, [0]) * m
  area = tf.cast((bottom - top) * (right - left), tf.float32)
  lam = 1.0 - area / tf.cast(shape[1] * shape[2], tf.float32)
  targets = lam * targets + (1.0 - lam) * tf.reverse(targets, [0])
  return images, targets
