"""The recipes, pinned to their sources: each value written out here as the source gives it."""

import json
import os

import data_fixtures as df
import pytest

from vit_jax import cli
from vit_jax.config import recipes
from vit_jax.config.recipes import augreg_imagenet
from vit_jax.training import optim
from vit_jax.weights import registry


def test_vit_s16_i1k_is_big_visions():
  """google-research/big_vision, big_vision/configs/vit_s16_i1k.py."""
  c = recipes.read("vit_s16_i1k")
  assert (c.dataset, c.train_split, c.eval_split) == ("imagenet2012", "train[:99%]", "train[99%:]")
  assert c.evals == (
    ("val", None, "validation", None),
    ("v2", "imagenet_v2", "test", None),
    ("real", "imagenet2012_real", "validation", "real_label"),
  )
  assert (c.batch_size, c.image_size, c.shuffle_buffer) == (1024, 224, 250_000)
  # decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2,10); mixup p=0.2 (the Beta's alpha).
  a = c.augment
  assert (a.inception_crop, a.hflip, a.randaug_layers, a.randaug_magnitude) == (True, 0.5, 2, 10)
  assert a.mixup_alpha == 0.2 and a.cutmix_alpha == 0 and a.erase_prob == 0
  # variant S/16, rep_size=True (as wide as the model), pool_type gap, posemb sincos2d.
  m = c.model
  assert (m.name, m.representation_size, m.classifier, m.posemb) == (
    "ViT-S_16",
    384,
    "gap",
    "sincos2d",
  )
  # scale_by_adam with mu_dtype bfloat16, lr 1e-3, wd 1e-4 (not multiplied by lr there),
  # warmup 10k then cosine, clipping at 1, softmax_xent, 90 epochs of train[:99%].
  assert (c.optimizer, c.mu_dtype, c.base_lr, c.b1, c.b2) == ("adam", "bfloat16", 1e-3, 0.9, 0.999)
  assert c.weight_decay * c.base_lr == pytest.approx(1e-4)
  assert c.wd_mults == ((".*/kernel$", 1.0),)
  assert (c.warmup_steps, c.decay_type, c.end_lr, c.grad_clip_norm) == (10_000, "cosine", 0, 1)
  assert c.loss == "softmax_xent" and c.pretrained is None
  assert c.total_steps == round(90 * round(1_281_167 * 0.99) / 1024)
  # resize_small(256)|central_crop(224)
  assert c.image_size / c.eval_crop == pytest.approx(256)


@pytest.mark.parametrize("variant", list(augreg_imagenet.RECOMMENDED))
def test_augreg_imagenet_is_the_recommended_fine_tune(variant):
  """The registry's recommended fine-tune file names (the original README's table) give the
  lr, steps and resolution; the original repository's vit_jax/configs give the rest."""
  c = recipes.read(f"augreg_imagenet:{variant}")
  upstream = registry.lookup(c.pretrained)
  fine_tune = registry.lookup(c.pretrained.replace("/augreg", f"/augreg+i1k-{c.image_size}"))
  fields = dict(fine_tune.fields)
  assert upstream.model == fine_tune.model == c.model.name
  assert (c.base_lr, c.total_steps, c.image_size) == (
    float(fields["adapt_lr"]),
    int(fields["steps"]) * 1000,
    int(fields["res"]),
  )
  assert (c.batch_size, c.optimizer, c.momentum, c.grad_clip_norm) == (512, "sgd", 0.9, 1.0)
  assert (c.warmup_steps, c.decay_type, c.weight_decay, c.model.dropout_rate) == (
    500,
    "cosine",
    0.0,
    0.0,
  )
  assert (c.train_split, c.test_split, c.eval_crop) == ("train[:99%]", "validation", 0.0)


def test_vit_b16_chaoyang_is_the_model_cards():
  """huggingface.co/Snarci/ViT-base-patch16-384-Chaoyang-finetuned."""
  c = recipes.read("vit_b16_chaoyang")
  assert c.image_size == 384 and c.model.name == "ViT-B_16"
  assert registry.lookup(c.pretrained).image_size == 384
  a = c.augment
  assert not a.inception_crop and (a.hflip, a.vflip, a.rot90, a.rrc_prob) == (0.5, 0.5, 0.5, 0.5)
  assert a.rrc_scale == (0.5, 1.0) and c.balance_classes
  assert (c.train_split, c.eval_split, c.best_metric) == ("train[:90%]", "train[90%:]", "loss")


@pytest.mark.slow
def test_digits_regularised_runs_with_everything_on(tmp_path):
  """The recipe as a user runs it, shortened: every piece on, on the demo's digits."""
  df.write_digits(str(tmp_path / "digits"), range(0, 5), size=16)
  code = cli.main(
    [
      "train",
      "--config",
      "digits_regularised",
      "--workdir",
      str(tmp_path / "run"),
      f"--config.folder={tmp_path / 'digits'}",
      "--config.total_steps=60",
      "--config.warmup_steps=10",
      "--config.eval_every=30",
    ]
  )
  assert code == 0
  rows = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  assert {"train", "eval", "eval_ema", "train_sample", "train_sample_ema", "test"} <= {
    r["split"] for r in rows
  }
  c = recipes.read("digits_regularised")
  assert c.augment.randaug_layers and c.augment.cutmix_alpha and c.augment.erase_prob
  assert c.model.drop_path_rate and c.model.posemb == "sincos2d" and c.ema_decay
  assert c.mu_dtype == "bfloat16" and c.layer_decay and optim.schedule(c)(c.total_steps) == 0
  assert os.path.exists(tmp_path / "run" / "final.npz")
