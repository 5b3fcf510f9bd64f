"""Small real datasets for input tests: encoded image files in folders, and a locally built TFDS
dataset.

Images are colour-coded by class (class c has channel c bright, the others
dark, plus texture), so a test can tell an image's class from its pixels after
any crop, flip or resize, and check that images and labels stay together.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

CLASS_COLOURS = ("red", "green", "blue")


def class_image(label: int, seed: int, height: int = 24, width: int = 32) -> np.ndarray:
  """uint8 [h, w, 3]: channel `label % 3` around 200, the others around 50, with smooth texture."""
  rng = np.random.default_rng(seed)
  base = np.full((height, width, 3), 50.0)
  base[..., label % 3] = 200.0
  coarse = rng.normal(0.0, 25.0, (max(height // 6, 2), max(width // 6, 2), 3)).astype(np.float32)
  texture = np.stack(
    [
      np.asarray(Image.fromarray(coarse[..., c], "F").resize((width, height), Image.BILINEAR))
      for c in range(3)
    ],
    axis=-1,
  )
  return np.clip(base + texture, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
  """Encoded image bytes; `mode` converts first ('L', 'P', 'RGBA', 'CMYK', ...)."""
  im = Image.fromarray(array)
  if mode:
    im = im.convert(mode)
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def write_file(path: str, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def write_mode_images(directory: str, seed: int = 0) -> dict[str, str]:
  """One 70x50 image in each format and mode that decoding must bring to RGB, by file name."""
  rgb = np.random.default_rng(seed).uniform(0, 255, (50, 70, 3)).astype(np.uint8)
  images = {
    "rgb.jpg": Image.fromarray(rgb),
    "gray.png": Image.fromarray(rgb[..., 0]),
    "palette.png": Image.fromarray(rgb).convert("P"),
    "alpha.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
    "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    "pic.bmp": Image.fromarray(rgb[::-1]),
  }
  paths = {}
  for name, im in images.items():
    paths[name] = os.path.join(directory, name)
    im.save(paths[name])
  return paths


def write_folder(
  root: str,
  counts: Mapping[str, Mapping[str, int]],
  *,
  ext: str = "png",
  size: tuple[int, int] = (24, 32),
  seed: int = 0,
) -> dict[str, list[str]]:
  """ROOT/{split}/{class}/{i}.{ext}; counts = {split: {class_name: n}}; returns paths per split.

  The class index (for the colour) is the class name's place in sorted order.
  """
  fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP"}[ext]
  names = sorted({c for per in counts.values() for c in per})
  out: dict[str, list[str]] = {}
  k = seed
  for split, per in counts.items():
    for cls, n in per.items():
      for i in range(n):
        k += 1
        data = encode(class_image(names.index(cls), k, *size), fmt)
        out.setdefault(split, []).append(
          write_file(os.path.join(root, split, cls, f"{i:04d}.{ext}"), data)
        )
  return out


def odd_images(label: int = 0, seed: int = 0) -> dict[str, bytes]:
  """The awkward inputs: grayscale, palette, RGBA and LA PNGs, CMYK and grayscale JPEGs, palette
  BMP.
  """
  a = class_image(label, seed, 28, 20)
  return {
    "gray.png": encode(a, "PNG", "L"),
    "palette.png": encode(a, "PNG", "P"),
    "rgba.png": encode(a, "PNG", "RGBA"),
    "la.png": encode(a, "PNG", "LA"),
    "cmyk.jpg": encode(a, "JPEG", "CMYK"),
    "gray.jpg": encode(a, "JPEG", "L"),
    "palette.bmp": encode(a, "BMP", "P"),
    "rgb.webp": encode(a, "WEBP", lossless=True),
  }


def corrupt_images() -> dict[str, bytes]:
  """Files with image names that no decoder can read."""
  jpeg = encode(class_image(0, 1), "JPEG")
  return {
    "truncated.jpg": jpeg[: len(jpeg) // 3],
    "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    "empty.jpg": b"",
    "text.jpeg": b"this is not an image\n",
  }


# -- TFDS --------------------------------------------------------------------------

TFDS_NAME = "vit_jax_test_images"
TFDS_MULTILABEL_NAME = "vit_jax_test_tags"
TFDS_SPLITS = {"train": 50, "test": 13}


def tfds_tags(i: int) -> list[int]:
  """The multi-label test dataset's labels of example i: its colour, and 'even' (3) for even i."""
  return [i % 3] + ([3] if i % 2 == 0 else [])


def _builder_class(multilabel: bool):
  import tensorflow_datasets as tfds

  # Not registered: the pipeline must find it by name in the data_dir, as it finds prepared
  # datasets.
  class VitJaxTestImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Colour-coded JPEGs of varied sizes in three classes (multi-label: plus 'even')."""

    VERSION = tfds.core.Version("1.0.0")
    name = TFDS_MULTILABEL_NAME if multilabel else TFDS_NAME

    def _info(self):
      if multilabel:
        label = tfds.features.Sequence(tfds.features.ClassLabel(names=[*CLASS_COLOURS, "even"]))
      else:
        label = tfds.features.ClassLabel(names=list(CLASS_COLOURS))
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": label,
            "id": tfds.features.Scalar(np.int64),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, n) for split, n in TFDS_SPLITS.items()}

    def _generate_examples(self, split, n):
      offset = 0 if split == "train" else 1000
      for i in range(n):
        h, w = 20 + (i * 7) % 21, 24 + (i * 5) % 17
        yield (
          f"{split}-{i}",
          {
            "image": class_image(i % 3, offset + i, h, w),
            "label": tfds_tags(i) if multilabel else i % 3,
            "id": offset + i,
          },
        )

  return VitJaxTestImages


def build_tfds(data_dir: str, num_shards: int = 4, multilabel: bool = False) -> str:
  """Prepares a test dataset in `data_dir` (no network); returns its name."""
  import tensorflow_datasets as tfds

  builder = _builder_class(multilabel)(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  return builder.name


CIFAR10_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def build_small_cifar10(data_dir: str, train: int = 100, test: int = 20) -> str:
  """A few colour-coded 32x32 images in the layout of TFDS's cifar10 3.0.2, prepared in `data_dir`.

  `tfds.builder('cifar10', data_dir=...)` then loads it with the real cifar10
  builder, so the cifar10 split presets are exercised without a download.
  """
  from tensorflow_datasets.image_classification import cifar

  class SmallCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      del dl_manager
      self.info.features["label"].names = list(CIFAR10_NAMES)
      return {"train": self._small("train", train), "test": self._small("test", test)}

    def _small(self, split, n):
      for i in range(n):
        key = f"{split}_{i:05d}"
        image = class_image(i % 10, zlib.crc32(key.encode()), 32, 32)
        yield key, {"id": key, "image": image, "label": i % 10}

  SmallCifar10(data_dir=data_dir).download_and_prepare()
  return "cifar10"


def write_digits(
  root: str, classes: Sequence[int], size: int = 32, seed: int = 0
) -> dict[str, int]:
  """scikit-learn's handwritten digits of `classes` as ROOT/{train,val,test}/digit_K/*.png
  (60/15/25%).
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  ids = [
    i
    for i in np.random.default_rng(seed).permutation(len(digits.target))
    if digits.target[i] in classes
  ]
  n = len(ids)
  parts = {
    "train": ids[: int(0.6 * n)],
    "val": ids[int(0.6 * n) : int(0.75 * n)],
    "test": ids[int(0.75 * n) :],
  }
  for split, part in parts.items():
    for i in part:
      d = os.path.join(root, split, f"digit_{digits.target[i]}")
      os.makedirs(d, exist_ok=True)
      pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # the digits are 0..16
      Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(
        os.path.join(d, f"{i:04d}.png")
      )
  return {split: len(part) for split, part in parts.items()}


IMAGENET_POOL = (3, 17, 250, 500, 999)


def build_imagenet_eval_sets(data_dir: str, n: int = 24) -> dict[str, Any]:
  """Local builds of TFDS's `imagenet2012_real` (validation) and `imagenet_v2` (test), in the
  registered builders' own formats: their `_generate_examples` fed with generated JPEGs instead
  of the downloads. Returns each image's original label and ReaL set (some empty, as ~3,500
  of the real 50,000 are)."""
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  pool = np.array(IMAGENET_POOL)  # a few classes, so that sets and labels share some

  def jpeg(i: int) -> bytes:
    return encode(class_image(i % 3, i, 32, 32), "JPEG", quality=95)

  names = [f"ILSVRC2012_val_{i:08}.JPEG" for i in range(1, n + 1)]
  original = {f: int(rng.choice(pool)) for f in names}
  real = {}
  for i, f in enumerate(names):
    if i % 5 == 4:
      real[f] = []  # no label fits the image: left out of ReaL accuracy
    else:
      real[f] = sorted({original[f], *rng.choice(pool, i % 3).tolist()})
  builder = tfds.builder("imagenet2012_real", data_dir=data_dir)
  builder._split_generators = lambda dl_manager: [
    tfds.core.SplitGenerator(
      name=tfds.Split.VALIDATION,
      gen_kwargs=dict(
        archive=[(f, io.BytesIO(jpeg(i))) for i, f in enumerate(names)],
        original_labels=original,
        real_labels=real,
      ),
    )
  ]
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  builder.download_and_prepare(download_config=config)
  root = os.path.join(data_dir, "imagenet_v2_images")
  v2 = {}
  for i in range(n):
    label = int(rng.choice(pool))
    v2[f"{label}/{i}.jpeg"] = label
    write_file(os.path.join(root, str(label), f"{i}.jpeg"), jpeg(i))
  builder = tfds.builder("imagenet_v2/matched-frequency", data_dir=data_dir)
  builder._split_generators = lambda dl_manager: [
    tfds.core.SplitGenerator(name=tfds.Split.TEST, gen_kwargs={"imagenet_v2_root": root})
  ]
  builder.download_and_prepare(download_config=config)
  return {"original": original, "real": real, "v2": v2}
