"""A tiny in-memory stateful loader over fixed random sequences, for loop tests without shards."""

from __future__ import annotations

import torch


class SyntheticLoader:
    """Yields {"tokens": [mb, s]} from a fixed pool, split by DP rank; exact resume via state_dict."""

    def __init__(self, vocab: int, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, num_samples: int = 64, seed: int = 0, low: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randint(low, vocab, (num_samples, seq_length), generator=g)
        self.mb, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.pos = 0

    def __iter__(self):
        while True:
            n = len(self.pool)
            idx = [((self.pos + i) * self.dp_size + self.dp_rank) % n for i in range(self.mb)]
            self.pos += self.mb
            yield {"tokens": self.pool[idx].clone()}

    def state_dict(self):
        return {"kind": "synthetic"}

    def load_state_dict(self, state):
        """The trainer's contract: ``consumed_samples`` (global) fixes this rank's position."""
        self.pos = int(state["consumed_samples"]) // self.dp_size if "consumed_samples" in state else int(state.get("pos", 0))
