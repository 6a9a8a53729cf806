"""Model logits for sampling and scoring (vocabulary clipping, mask token, unsupervised CFG).

Kept as the historical import path: the code lives in ``megatron_mdm.decoding.logits``.
"""

from megatron_mdm.decoding.logits import LogitsFn, ModelForward, apply_cfg, clip_logits, model_logits, run_model

__all__ = ["LogitsFn", "ModelForward", "apply_cfg", "clip_logits", "model_logits", "run_model"]
