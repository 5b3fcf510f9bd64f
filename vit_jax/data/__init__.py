"""The tf.data input pipeline: TFDS datasets, image folders and multi-label lists, sharded over
hosts.

A run makes one `Pipeline(config)`. It keeps the config's data section (plus
batch_size, eval_batch_size and seed, all it reads) and the dataset source, so
a folder is listed and a TFDS builder opened once per run. Its `info`,
`train_iterator`, `eval_iterator` and `host_batches` are described below; the
module-level functions of those names make a one-off Pipeline (tools, tests).

Sources (`config.dataset`):
  * a TFDS name ('cifar10', 'imagenet2012', 'oxford_iiit_pet', 'name:1.0.0/config', ...),
    prepared in `config.tfds_data_dir` (local or gs://; never downloaded). cifar10
    and cifar100 default to train 'train[:98%]', eval 'train[98%:]', test 'test';
    imagenet2012 to 'train[:99%]', 'train[99%:]', 'validation'. Other datasets:
    'train', then 'validation' (or 'test') for eval, 'test'. Features
    `config.tfds_image_key`/`tfds_label_key` ('image'/'label'); a Sequence of
    ClassLabel gives multi-hot targets.
  * 'folder': `config.folder` = ROOT/{train,val,test}/{class_name}/*.{jpg,jpeg,png,bmp,webp};
    classes are train's folder names, sorted; `write_class_names` saves them.
  * 'multilabel': `config.multilabel_file`, a CSV (`path,labels[,split]`, labels
    separated by ';' or '|') or JSON list; multi-hot float targets. See ListSource.
  Split strings may slice: 'train[:90%]', 'val[100:]' (for folders and lists the
  slice is over a fixed hash order of the file names, so it mixes classes).

Training (`train_iterator`): every host reads its own share (`jax.process_index()`
of `jax.process_count()`) and yields per-host batches of batch_size / processes,
assembled into global jax.Arrays sharded over the mesh's batch axes and kept
`config.prefetch` batches ahead on the devices. Folders and lists are permuted
completely every epoch (`shuffle_buffer` is not needed); TFDS datasets read
their shards in a per-epoch order through a `config.shuffle_buffer` shuffle.
Augmentation (`config.augment`): Inception crop (area 5-100%, aspect 3/4-4/3;
JPEGs decode only the crop window), resize, horizontal flip, vertical flip,
quarter turns, random-resized-crop (`rrc_prob`, `rrc_scale`), RandAugment on
the uint8 pixels (`randaug_layers`, `randaug_magnitude`: big_vision's ops,
data/randaugment.py), scale to [-1, 1], random erasing (`erase_prob`), then per
batch mixup (`mixup_alpha`) or CutMix (`cutmix_alpha`; with both, CutMix has
probability `mix_switch_prob`): labels become float [B, C] soft targets.
Switches are bools (True: p=0.5) or probabilities. `config.balance_classes`
repeats minority classes until every class has as many examples per epoch as
the largest. The stream is a function of `config.seed` and the step only:
`start_step=k` gives exactly the batches an uninterrupted run saw from step k,
without decoding what came before (folders: nothing is read; TFDS: earlier
epochs are skipped outright, the records of the current one are read again).

Evaluation (`eval_iterator`): each example once; the last batches are padded
and carry `mask` (False on padding), with the same number of batches on every
host; `with_index=True` adds each row's example index in the split.
`config.eval_crop`: False for the original plain resize, True (or a crop
fraction such as 0.875) to resize the short side and cut out the centre.

Undecodable images are skipped, never fatal: a pipeline's `decode_errors` is the
number it skipped so far (training and evaluation); the first ten are logged one
by one (with the file name, for folders and lists), and each epoch's or
evaluation pass's total is logged when it ends. A training set whose first 32
images all fail to decode is an error (rather than a stream that never yields).
Images are decoded as RGB (grayscale, palette, CMYK and alpha converted, as
`preprocess.decode_rgb` does; JPEGs with the same IDCT as PIL, so evaluation
numbers equal `vit-jax predict`'s). Resuming a stream that had skipped images
before the resume point shifts its batches by that many examples.

`host_batches(config, split=None)` is the same data per host as numpy, before
device placement: the training stream (split None) or one evaluation pass,
with each example's 'index' in its split (tests, tools). `process_index` /
`process_count` arguments simulate other hosts; the arrays then hold only this
host's rows.

The config keys read are the data section of `schema.SCHEMA` (`vit-jax train
--help-config` lists them) and the three above.
"""

from vit_jax.data.pipeline import Pipeline
from vit_jax.data.pipeline import eval_iterator
from vit_jax.data.pipeline import get_info
from vit_jax.data.pipeline import host_batches
from vit_jax.data.pipeline import train_iterator
from vit_jax.data.sources import LABELS_FILE
from vit_jax.data.sources import DatasetInfo
from vit_jax.data.sources import write_class_names

__all__ = [
  "DatasetInfo",
  "LABELS_FILE",
  "eval_iterator",
  "get_info",
  "host_batches",
  "Pipeline",
  "train_iterator",
  "write_class_names",
]
