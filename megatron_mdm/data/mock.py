"""Random token sequences for ``--mock-data`` (Megatron-LM's option): training without a dataset.

Sample ``i`` of a stream is drawn from its own generator seeded by ``(seed, stream, i)``, so the data of a
step is a function of the seed and the consumed samples alone, like the real loader's order: a resume on any
layout continues exactly. A data-parallel rank reads its contiguous part of each global batch. Token ids are
uniform over the vocabulary without the mask token (which real data never holds).
"""

from __future__ import annotations

import torch

TRAIN_STREAM, VALID_STREAM = 0, 1


class MockLoader:
    """Yields ``{"tokens": [micro_batch_size, seq_length]}`` batches of random ids, resumable by consumed samples."""

    def __init__(self, vocab_size: int, seq_length: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, mask_id: int, stream: int = TRAIN_STREAM):
        self.vocab_size, self.seq_length, self.mask_id = vocab_size, seq_length, mask_id
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.stream = dp_rank, dp_size, seed, stream
        self.consumed = 0

    def sample(self, i: int) -> torch.Tensor:
        """The ``i``-th sequence of this stream."""
        # mixed by odd constants: torch's CPU generator keeps only the low 32 bits of its seed
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + self.stream * 0xBF58476D1CE4E5B9
                                           + i * 0x94D049BB133111EB) % (2**63 - 1))
        ids = torch.randint(0, self.vocab_size - 1, (self.seq_length,), generator=g)
        return ids + (ids >= self.mask_id).long()  # skip the mask id

    def __iter__(self):
        """From the loaded position on (each ``iter`` starts there: validation reads the same batches each time)."""
        per_rank = self.global_batch_size // self.dp_size
        consumed = self.consumed
        while True:
            first = consumed + self.dp_rank * per_rank
            for k in range(0, per_rank, self.micro_batch_size):
                yield {"tokens": torch.stack([self.sample(first + k + j) for j in range(self.micro_batch_size)])}
            consumed += self.global_batch_size

    def state_dict(self) -> dict:
        return {"kind": "mock", "seed": self.seed, "seq_length": self.seq_length}

    def load_state_dict(self, state: dict) -> None:
        """Start at ``state["consumed_samples"]`` (global); any mock state continues (the data is only noise)."""
        self.consumed = int(state.get("consumed_samples", 0))
