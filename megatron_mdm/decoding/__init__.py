"""Diffusion decoding: one loop for every model (Hugging Face export, Megatron, any ``LogitsFn``).

* ``logits``: the model interface (``LogitsFn``, ``ModelForward``), vocabulary clipping, CFG;
* ``backends``: ``HFForward``, the Hugging Face model behind that interface (the Megatron one is
  ``megatron_mdm.decoding.backends.megatron.MegatronForward``);
* ``cache``: the prefix / dual KV cache of block decoding (``KVCache``);
* ``unmasking``: candidates, scores and how many to unmask (schedule, threshold, factor);
* ``loop``: ``generate``, the iteration over blocks and steps.
"""

from megatron_mdm.decoding.cache import MODES as CACHE_MODES
from megatron_mdm.decoding.cache import KVCache
from megatron_mdm.decoding.logits import LogitsFn, ModelForward, apply_cfg, clip_logits, model_logits, run_model
from megatron_mdm.decoding.loop import GenerationOutput, generate
from megatron_mdm.decoding.unmasking import REMASKING, num_transfer_tokens

__all__ = [
    "CACHE_MODES", "KVCache", "LogitsFn", "ModelForward", "apply_cfg", "clip_logits", "model_logits", "run_model",
    "GenerationOutput", "generate", "REMASKING", "num_transfer_tokens",
]
