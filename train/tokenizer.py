"""Train a byte-level BPE (Hugging Face ``tokenizers``) on caption layers; save a PreTrainedTokenizerFast dir."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from engine.config import StorageConfig
from engine.layout import Dataset, LayoutError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _captions(ds: Dataset, layers: list[str]) -> Iterator[str]:
    for name in layers:
        if name == "alt-text":
            for shard in ds.committed_shards():
                with ds.shards.open(f"{shard}.parquet") as f:
                    yield from (c for c in pq.read_table(f, columns=["caption"]).column(0).to_pylist() if c)
            continue
        layer = ds.layer(name)
        shards = layer.committed()
        if not shards:
            raise LayoutError(f"layer {name!r} has no committed shards at {layer.store.root}")
        for shard in shards:
            with layer.store.open(layer.parquet(shard)) as f:
                table = pq.read_table(f, columns=["caption", "status"]).to_pydict()
            yield from (c for c, s in zip(table["caption"], table["status"], strict=True) if c and s == "ok")


def train_tokenizer(
    dataset: str, layers: list[str], vocab_size: int, out: str, storage: StorageConfig | None = None
) -> int:
    """Train on the captions of ``layers`` (``alt-text``: the shards' own captions); returns the vocab size."""
    return train_tokenizer_on(_captions(Dataset(dataset, storage), layers), vocab_size, out)


def train_tokenizer_on(texts: Iterable[str], vocab_size: int, out: str) -> int:
    """The project's byte-level BPE (specials, ``<s> ... </s>`` template) on ``texts``, saved as a
    ``PreTrainedTokenizerFast`` folder; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return len(fast)
