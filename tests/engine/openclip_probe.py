"""Run OpenCLIP's own training loader over a tar pattern; print what it sized (not a test module).

    python tests/engine/openclip_probe.py 'DS/shards/{00000..00002}.tar'

Run in a subprocess with ``.bench-deps`` (``make bench-deps``) on the path, so its torchvision
never reaches the test process. The stand-ins below are the ones the Makefile's bench-deps
comment explains (the PyPI torchvision wheel is a CUDA build).
"""

import json
import sys
import types
from argparse import Namespace

for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))

import open_clip  # noqa: E402
from open_clip_train.data import get_wds_dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

args = Namespace(
    train_data=sys.argv[1],
    val_data=None,
    train_num_samples=None,  # no --train-num-samples: sized from sizes.json
    dataset_resampled=False,
    train_data_upsampling_factors=None,
    seed=0,
    batch_size=2,
    workers=0,
    world_size=1,
)
preprocess = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
seen = 0
for batch in info.dataloader:
    seen += batch[0].shape[0]
images, texts = batch
print(
    json.dumps(
        {
            "num_samples": info.dataloader.num_samples,
            "num_batches": info.dataloader.num_batches,
            "seen": seen,
            "image_shape": list(images.shape),
            "text_shape": list(texts.shape),
        }
    )
)
