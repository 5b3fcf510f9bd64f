"""Where the model looks: attention rollout and the last layer's attention, what `vit-jax explain`
runs.

Rollout (Abnar & Zuidema, 2020): per layer, the weights averaged over heads,
plus the identity for the residual path (0.5 A + 0.5 I), rows renormalised;
the layers multiplied from first to last. The class token's row of the
product, over the patch tokens, is the map. A `gap` model reads the mean of
every token, so its map is the mean of the product's rows.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vit_jax import errors
from vit_jax import models
from vit_jax.apps import classifier as classifier_lib
from vit_jax.data import preprocess
from vit_jax.platform import files

METHODS = ("rollout", "last")


def _readout(model: models.VisionTransformer, rows: jax.Array) -> jax.Array:
  """[B, Q, K] rows -> [B, K]: the class token's row, or the mean of every token's for `gap`."""
  return rows[:, 0] if model.classifier == "token" else rows.mean(axis=1)


def _to_grid(model: models.VisionTransformer, scores: jax.Array) -> jax.Array:
  """[..., K] scores over all tokens -> [..., g, g] over the patches, each divided by its max."""
  g = model.grid_size
  patches = scores[..., 1:] if model.classifier == "token" else scores
  grid = patches.reshape(*patches.shape[:-1], g, g)
  peak = grid.max(axis=(-2, -1), keepdims=True)
  # A map with no weight on any patch (identity attention) stays zero, not 0/0.
  return jnp.where(peak > 0, grid / jnp.where(peak > 0, peak, 1.0), 0.0)


def rollout(model: models.VisionTransformer, weights: Sequence[jax.Array]) -> jax.Array:
  """Attention rollout [B, g, g] from per-layer weights [B, heads, queries, keys]."""
  joint = None
  for w in weights:
    a = jnp.asarray(w, jnp.float32).mean(axis=1)  # [B, Q, K]
    q, k = a.shape[-2:]
    # The last layer of an unrolled token model has the class token's query alone: the
    # first q rows of the identity are that token's.
    a = 0.5 * a + 0.5 * jnp.eye(k, dtype=a.dtype)[:q]
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a if joint is None else a @ joint
  return _to_grid(model, _readout(model, joint))


def last_layer(
  model: models.VisionTransformer, weights: Sequence[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """The last layer's attention from the class token (every token's mean, for gap):
  averaged over heads [B, g, g], and per head [B, heads, g, g]."""
  w = jnp.asarray(weights[-1], jnp.float32)  # [B, H, Q, K]
  rows = w[:, :, 0] if model.classifier == "token" else w.mean(axis=2)  # [B, H, K]
  return _to_grid(model, rows.mean(axis=1)), _to_grid(model, rows)


@dataclasses.dataclass
class Explanation:
  """One image's predictions and map, or why there are none."""

  image: str
  predictions: list[dict[str, Any]] | None = None
  map: np.ndarray | None = None  # [g, g], 1.0 at its peak
  heads: np.ndarray | None = None  # [heads, g, g] with --method last
  pixels: np.ndarray | None = None  # the image as read, uint8 [H, W, 3]
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    """The object `vit-jax explain --json` prints: the map before upsampling."""
    if self.error is not None:
      return {"image": self.image, "error": self.error}
    row = {
      "image": self.image,
      "predictions": [{"label": p["label"], "score": p["score"]} for p in self.predictions],
      "grid": list(self.map.shape),
      "map": np.round(self.map, 6).tolist(),
    }
    if self.heads is not None:
      row["heads"] = np.round(self.heads, 6).tolist()
    return row


class Explainer:
  """A classifier's predictions and attention maps, in one jitted call per batch."""

  def __init__(self, clf: classifier_lib.Classifier, method: str = "rollout"):
    if method not in METHODS:
      raise errors.ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    self.clf, self.method = clf, method
    model = clf.model

    def run(params, images):
      logits, weights = models.attention_weights(model, params, images)
      if method == "rollout":
        return clf.activation(logits), rollout(model, weights), None
      return clf.activation(logits), *last_layer(model, weights)

    self._run = jax.jit(run)

  def batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(probabilities [N, C], maps [N, g, g], per-head maps [N, heads, g, g] or None)."""
    n = len(images)
    out = self._run(
      self.clf.params, classifier_lib.pad_batch(np.asarray(images, np.float32), self.clf.batch_size)
    )
    return tuple(None if x is None else np.asarray(x)[:n] for x in out)

  def files(self, paths: Sequence[str], k: int = 3) -> Iterator[Explanation]:
    """An Explanation for every path, in order; an unreadable file gets an error, the rest go on."""
    size = self.clf.batch_size
    for start in range(0, len(paths), size):
      results, ok, pixels = [], [], []
      for path in paths[start : start + size]:
        try:
          pixels.append(preprocess.read_rgb(path))
          ok.append(len(results))
          results.append(Explanation(path, pixels=pixels[-1]))
        except preprocess.ImageError as e:
          results.append(Explanation(path, error=str(e)))
      if pixels:
        images = np.stack([preprocess.eval_resize(p, self.clf.image_size) for p in pixels])
        probs, maps, heads = self.batch(images)
        for j, (i, p) in enumerate(zip(ok, self.clf.rank(probs, k), strict=True)):
          results[i].predictions, results[i].map = p, maps[j]
          results[i].heads = None if heads is None else heads[j]
      yield from results


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [g, g] map resized bilinearly to [height, width]."""
  img = Image.fromarray(np.asarray(grid, np.float32), mode="F")
  return np.asarray(img.resize((width, height), Image.BILINEAR))


def output_names(paths: Sequence[str], out_dir: str) -> list[str]:
  """DIR/<image-stem>.png for each path; repeated stems get -2, -3, ... in input order.

  A name that is one of the inputs is refused: a picture never replaces an image.
  """
  seen: dict[str, int] = {}
  names = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
    seen[stem] = seen.get(stem, 0) + 1
    names.append(
      files.join(out_dir, f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    )
  local = lambda p: os.path.abspath(p) if not files.is_remote(p) else p  # noqa: E731
  inputs = {local(p) for p in paths}
  clash = next((n for n in names if local(n) in inputs), None)
  if clash:
    raise errors.ConfigError(f"{clash}: is one of the input images; give another --output")
  return names


def render(result: Explanation, path: str, min_side: int = 256, max_side: int = 768) -> None:
  """Writes the image, then its map over it as a heat map (and each head's, for `last`), titled
  with the top labels (PNG). Small images are drawn larger and big ones smaller, maps alike."""
  import matplotlib  # noqa: PLC0415  # the explain extra

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415  # the explain extra

  pixels = result.pixels
  h, w = pixels.shape[:2]
  scale = min(max(1.0, min_side / max(h, w)), max_side / max(h, w))
  if scale != 1.0:
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
  panels = [("image", None), ("rollout" if result.heads is None else "mean of heads", result.map)]
  if result.heads is not None:
    panels += [(f"head {i}", m) for i, m in enumerate(result.heads)]
  cols = min(len(panels), 5)
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.0 * cols, 3.0 * rows * h / w + 0.5), squeeze=False
  )
  for ax in axes.flat:
    ax.axis("off")
  for ax, (label, grid) in zip(axes.flat, panels, strict=False):  # more axes than panels
    ax.imshow(pixels)
    if grid is not None:
      ax.imshow(upsample(grid, h, w), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_title(label, fontsize=9)
  fig.suptitle(", ".join(f"{p['label']} {p['score']:.1%}" for p in result.predictions), fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  with files.atomic_write(path) as f:
    f.write(buf.getvalue())
