"""Parameter counts and training FLOPs of a configured model (plain arithmetic: no torch, no Megatron).

N, the non-embedding parameter count, is the paper's N in C = 6·N·D (SMDM and Chinchilla count it this way);
the family's record counts its own parameters.
"""

from __future__ import annotations

from megatron_mdm.config import Config
from megatron_mdm.models.registry import family


def count_parameters(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Parameter counts of the full (unsharded) model: total, embedding, non-embedding (N of C=6ND)."""
    return family(cfg).count_parameters(cfg, vocab_size)


def flops_per_sequence(cfg: Config, vocab_size: int, causal: bool) -> float:
    """Training FLOPs (forward + backward) of one sequence.

    6·N·S for the non-embedding matmuls (the paper's C = 6ND), plus the output head 6·S·h·V, plus
    attention scores and values: 12·L·S²·h for full (bidirectional) attention, the work an MDM
    really does. The causal baseline's kernels skip the masked half, so it counts half of that term
    (Megatron-LM's convention); the 6·N·D part, the paper's compute measure, is the same for both.
    """
    m = cfg.model
    s = cfg.data.seq_length
    n = count_parameters(cfg, vocab_size)["non_embedding"]
    head = 6 * s * m.hidden_size * vocab_size
    attention = 12 * m.num_layers * s * s * m.hidden_size // (2 if causal else 1)
    return float(6 * n * s + head + attention)
