"""Reverse-diffusion sampling: kept as the historical import path of ``megatron_mdm.decoding``.

The algorithm (blocks, schedule, remasking, CFG, EOS, KV cache, parallel unmasking) is documented and
implemented in ``megatron_mdm.decoding.loop``; this module re-exports it.
"""

from megatron_mdm.decoding.loop import GenerationOutput, generate
from megatron_mdm.decoding.unmasking import REMASKING, num_transfer_tokens

__all__ = ["GenerationOutput", "generate", "REMASKING", "num_transfer_tokens"]
