"""Trains timm's VisionTransformer, loaded from an original-layout .npz by timm's own loader, with
PyTorch's optimizers: the reference side of tests/test_training_parity.py.

  python timm_train.py CASES.json DATA.npz OUT.json

CASES.json: {"npz": path, "model": {...}, "cases": [{name, optimizer, lr, ...}]}; DATA.npz holds
the batches (`images` [steps, B, H, W, 3] in [-1, 1], `labels`, `eval_images`). Every rule here
is written from PyTorch's and timm's documented behaviour, not from vit_jax: the schedule as a
formula, AdamW's decay as parameter groups, the losses from torch.nn.functional.
Runs in its own process: torchvision, which timm imports, must not share one with TensorFlow.
"""

import json
import math
import sys

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.optim._param_groups import param_groups_layer_decay
from timm.utils import ModelEmaV2


def lr_at(step, c):
  """Linear warmup from 0, then cosine or linear decay to `end_lr` over the remaining steps."""
  base, warmup, total, end = c["lr"], c["warmup"], c["total"], c.get("end_lr", 0.0)
  if step < warmup:
    return base * step / warmup
  t = (step - warmup) / (total - warmup)
  if c["decay"] == "cosine":
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * t))
  return base + (end - base) * t


def build(spec, npz, scan_like=False):
  model = timm.models.vision_transformer.VisionTransformer(
    img_size=spec["image_size"],
    patch_size=spec["patch_size"],
    num_classes=spec["num_classes"],
    embed_dim=spec["hidden_size"],
    depth=spec["num_layers"],
    num_heads=spec["num_heads"],
    mlp_ratio=spec["mlp_dim"] / spec["hidden_size"],
    qkv_bias=True,
    class_token=True,
    global_pool="token",
    act_layer="gelu_tanh",  # the original checkpoints' GELU
  )
  model.load_pretrained(npz)  # timm's own .npz loader
  return model


def param_groups(model, c):
  """AdamW's groups: decay on the weight matrices and convolutions alone, as timm decides it
  (no 1-D parameters, no class token or position embedding), with timm's layer-wise scales."""
  wd = c.get("weight_decay", 0.0)
  if c.get("layer_decay"):
    groups = param_groups_layer_decay(
      model,
      weight_decay=wd,
      no_weight_decay_list=model.no_weight_decay(),
      layer_decay=c["layer_decay"],
    )
  else:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      excluded = p.ndim <= 1 or name in model.no_weight_decay()
      (no_decay if excluded else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
  for g in groups:
    g["params"] = [p for p in g["params"] if p.requires_grad]
    g.setdefault("lr_scale", 1.0)
  return [g for g in groups if g["params"]]


def loss_of(logits, labels, c):
  a = c.get("label_smoothing", 0.0)
  if c.get("loss", "softmax") == "softmax":
    return F.cross_entropy(logits, labels, label_smoothing=a)
  targets = labels.float() if labels.ndim == 2 else F.one_hot(labels, logits.shape[-1]).float()
  targets = targets * (1 - a) + 0.5 * a  # vit_jax's sigmoid smoothing, as its README states
  return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


def run(spec, npz, data, c):
  torch.manual_seed(0)
  model = build(spec, npz)
  if c.get("train_only"):  # the rest frozen: no gradient, no optimizer state, not clipped
    for name, p in model.named_parameters():
      p.requires_grad = name.startswith(tuple(c["train_only"]))
  groups = param_groups(model, c)
  if c["optimizer"] == "sgd":
    opt = torch.optim.SGD(groups, lr=c["lr"], momentum=c["momentum"])
  else:
    opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, 0.999), eps=1e-8)
  trainable = [p for g in groups for p in g["params"]]
  # timm's weight average: a copy of the model, decay * ema + (1 - decay) * params after each step.
  ema = ModelEmaV2(model, decay=c["ema"]) if c.get("ema") else None
  losses = []
  model.train()
  for step, (x, y) in enumerate(zip(data["images"], data["labels"], strict=True)):
    for g in opt.param_groups:
      g["lr"] = lr_at(step, c) * g["lr_scale"]
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(y)
    opt.zero_grad()
    loss = loss_of(model(x), y, c)
    loss.backward()
    if c.get("clip"):
      torch.nn.utils.clip_grad_norm_(trainable, c["clip"])
    opt.step()
    if ema is not None:
      ema.update(model)
    losses.append(float(loss))
  model.eval()
  with torch.no_grad():
    x = torch.from_numpy(data["eval_images"].transpose(0, 3, 1, 2).copy())
    logits = model(x).numpy()
    out = {"losses": losses, "logits": logits.tolist()}
    if ema is not None:
      out["ema_logits"] = ema.module(x).numpy().tolist()
  return out


def main(cases_json, data_npz, out_json):
  torch.set_num_threads(2)
  torch.use_deterministic_algorithms(True)
  spec = json.load(open(cases_json))
  out = {}
  for c in spec["cases"]:
    data = dict(np.load(data_npz.replace(".npz", f".{c['data']}.npz")))
    out[c["name"]] = run(spec["model"], spec["npz"][c["name"]], data, c)
  with open(out_json, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
