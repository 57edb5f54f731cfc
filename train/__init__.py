"""Stage 1 trainer: native-resolution packed ViT + RoPE text tower, trained contrastively.

Library only (the CLI in ``finevit/cmd_train.py`` builds a config and calls in):

* ``train.config``: ``Stage1Config`` (model/data/optim/loss/loop/checkpoint/log + storage), ``check_fits``.
* ``train.model``: ``attention.packed_attention`` (one entry point, backend ladder), ``rope``,
  ``blocks`` (pre-norm block, MAP head), ``towers`` (``VisionTower``, ``TextTower``, ``Stage1Model``).
* ``train.data``: ``naflex`` (grid + patchify), ``packing`` (plan + assemble), ``loader``
  (``Stage1Stream`` / ``Stage1Loader`` over shards + layers, exact resume).
* ``train.losses``: ``sigmoid_loss`` / ``softmax_loss``, correct across ranks.
* ``train.stage1.train_stage1``: the loop (DDP / FSDP2, AdamW, warmup + cosine, checkpoints, logs).
* ``train.tokenizer.train_tokenizer``: BPE on caption layers.
"""
