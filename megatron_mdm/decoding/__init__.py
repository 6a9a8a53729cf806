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

import importlib

_EXPORTS = {
    "CACHE_MODES": ("settings", "MODES"), "KVCache": ("cache", "KVCache"), "LogitsFn": ("logits", "LogitsFn"),
    "ModelForward": ("logits", "ModelForward"), "apply_cfg": ("logits", "apply_cfg"),
    "clip_logits": ("logits", "clip_logits"), "model_logits": ("logits", "model_logits"),
    "run_model": ("logits", "run_model"), "DecodingConfig": ("settings", "DecodingConfig"),
    "GenerationOutput": ("loop", "GenerationOutput"), "decode": ("loop", "decode"), "generate": ("loop", "generate"),
    "REMASKING": ("settings", "REMASKING"), "num_transfer_tokens": ("unmasking", "num_transfer_tokens"),
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """The exports, imported on first use: ``decoding.settings`` (what command lines build flags from) stays
    free of torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
