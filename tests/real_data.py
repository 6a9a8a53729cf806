"""Small real datasets for loop tests: a BPE tokenizer and prepared shards of generated word documents, and a
loader wrapper that records the sample ids of every micro-batch (for data-order checks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "king", "queen", "sword", "rose"]


def prepare_word_dataset(d: Path, seed: int, words: list[str], words_per_doc: int, docs: int,
                         shard_sequences: int, seq_length: int = 16) -> Path:
    """``d/tok`` (BPE, 400 ids, trained on the shipped corpus) and ``d/shards`` of ``docs`` random documents."""
    from megatron_mdm.data.prepare import prepare
    from megatron_mdm.tokenization import train_bpe_tokenizer

    rng = random.Random(seed)
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(words_per_doc))})
                                          + "\n" for _ in range(docs)))
    train_bpe_tokenizer([str(CORPUS)], 400, d / "tok", max_docs=300)
    prepare([str(d / "docs.jsonl")], str(d / "tok"), str(d / "shards"), seq_length,
            shard_tokens=seq_length * shard_sequences)
    return d


class SampleIdRecorder:
    """The loader, recording the sample ids of every micro-batch it hands out."""

    def __init__(self, loader):
        self.loader, self.ids = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.ids.append(batch["sample_ids"].tolist())
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)
