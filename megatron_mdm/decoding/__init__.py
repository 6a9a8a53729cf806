"""Diffusion decoding: one loop for every model (Hugging Face export, Megatron, any ``LogitsFn``).

* ``logits``: the model interface (``LogitsFn``, ``ModelForward``), vocabulary clipping, CFG;
* ``backends``: the models behind that interface, ``backends.hf.HFForward`` and
  ``backends.megatron.MegatronForward``;
* ``cache``: the prefix / dual KV cache of block decoding (``KVCache``);
* ``unmasking``: candidates, scores and how many to unmask (schedule, threshold, factor);
* ``settings``: ``DecodingConfig``, the sampler's settings (one dataclass for every caller);
* ``loop``: ``generate`` / ``decode``, the iteration over blocks and steps;
* ``hf_generation``: ``HFForward`` (a transformers masked LM as the model) and the exported model's own
  ``generate`` (``DiffusionGenerationMixin``).

``hf_generation`` and the modules it imports use only torch and import one another relatively: exports ship
them byte for byte beside ``modeling_mdm.py`` (``megatron_mdm.hf.modeling.shipped_files``).
"""

from megatron_mdm.decoding.cache import MODES as CACHE_MODES
from megatron_mdm.decoding.cache import KVCache
from megatron_mdm.decoding.logits import LogitsFn, ModelForward, apply_cfg, clip_logits, model_logits, run_model
from megatron_mdm.decoding.loop import GenerationOutput, decode, generate
from megatron_mdm.decoding.settings import DecodingConfig
from megatron_mdm.decoding.unmasking import REMASKING, num_transfer_tokens

__all__ = [
    "CACHE_MODES", "KVCache", "LogitsFn", "ModelForward", "apply_cfg", "clip_logits", "model_logits", "run_model",
    "DecodingConfig", "GenerationOutput", "decode", "generate", "REMASKING", "num_transfer_tokens",
]
