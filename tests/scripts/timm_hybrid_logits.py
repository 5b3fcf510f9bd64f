"""Logits of an original-layout hybrid .npz through timm, which builds and loads it on its own.

  python timm_hybrid_logits.py MODEL_NAME WEIGHTS.npz IMAGES.npy OUT.npy NUM_CLASSES IMAGE_SIZE

timm departs from the original numerics in three documented places, set back here so
that what is compared is the architecture, the padding and the loading:
  * weight standardisation: timm computes (w - mean) / sqrt(var + eps) with eps 1e-8,
    the original (w - mean) / (std + 1e-5);
  * GroupNorm eps: timm 1e-5, the original (Flax's default) 1e-6;
  * GELU: timm's exact form, the original's tanh approximation.
Runs in its own process: torchvision, which timm imports, must not share one with TensorFlow.
"""

import sys
import types

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2dSame
from timm.layers.padding import pad_same


def _original_std_conv(self, x):
  if self.same_pad:
    x = pad_same(x, self.kernel_size, self.stride, self.dilation)
  w = self.weight
  w = w - w.mean(dim=(1, 2, 3), keepdim=True)
  w = w / (w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
  return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def main(name, weights, images, out, num_classes, image_size):
  torch.set_num_threads(2)
  model = timm.create_model(
    name,
    pretrained=False,
    num_classes=int(num_classes),
    img_size=int(image_size),
    act_layer="gelu_tanh",
  ).eval()
  model.load_pretrained(weights)
  patched = 0
  for m in model.modules():
    if isinstance(m, StdConv2dSame):
      m.forward = types.MethodType(_original_std_conv, m)
      patched += 1
    elif isinstance(m, torch.nn.GroupNorm):
      m.eps = 1e-6
  assert patched, "no weight-standardised convolution found"
  x = torch.from_numpy(np.load(images).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    np.save(out, model(x).numpy())


if __name__ == "__main__":
  main(*sys.argv[1:])
