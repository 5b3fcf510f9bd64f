"""Image decoding and the original evaluation preprocessing, for single files.

The original evaluation is a plain bilinear resize to the model's size (no
aspect preservation, no centre crop) and a scale to [-1, 1]. The tf.data
pipeline applies the same ops in-graph; this module serves `predict` and
`serve`, which get one file or one request body at a time.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from vit_jax import errors
from vit_jax.platform import files
from vit_jax.platform import tf_setup

# Decompression-bomb guard; serve passes a stricter limit.
DEFAULT_MAX_PIXELS = 178_956_970


class ImageError(errors.UserError, ValueError):
  """An input that is not a readable image."""


def decode_rgb(
  data: bytes, *, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
  """Encoded bytes (JPEG, PNG, BMP, GIF, WebP, TIFF, ...) to uint8 RGB [H, W, 3].

  Grayscale, palette, CMYK and alpha images are converted to RGB; alpha is
  dropped (composited on black), as TensorFlow's decoders do with channels=3.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.width * im.height > max_pixels:
        raise ImageError(f"{name}: {im.width}x{im.height} pixels is over the limit of {max_pixels}")
      im.draft("RGB", (im.width, im.height))
      rgb = im.convert("RGB")
      rgb.load()
  except ImageError:
    raise
  except UnidentifiedImageError:
    raise ImageError(f"{name}: not a readable image (unknown format or corrupt data)") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None
  return np.asarray(rgb, dtype=np.uint8)


def read_rgb(path: str) -> np.ndarray:
  """A file (local or gs://) decoded to uint8 RGB; ImageError names the file."""
  try:
    data = files.read_bytes(path)
  except OSError as e:
    raise ImageError(f"{path}: cannot read ({e})") from None
  return decode_rgb(data, name=str(path))


def scale_to_unit(images):
  """uint8 (or float in [0, 255]) pixels to float32 in [-1, 1]: (x - 127.5) / 127.5."""
  return (np.asarray(images, np.float32) - 127.5) / 127.5


def eval_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The original evaluation: bilinear resize to size x size, then scale to [-1, 1].

  Uses tf.image.resize so the numbers equal those of the tf.data pipeline.
  """
  tf = tf_setup.tf()
  resized = tf.image.resize(tf.convert_to_tensor(image), [size, size], method="bilinear")
  return ((resized.numpy() - 127.5) / 127.5).astype(np.float32)
