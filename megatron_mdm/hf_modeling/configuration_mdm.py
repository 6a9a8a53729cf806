"""Configuration of a masked diffusion language model (MDM) with the Llama architecture.

Shipped into exported directories by ``mdm-convert to-hf``; imports only ``transformers``.
It is ``LlamaConfig`` with its own ``model_type`` (so ``AutoConfig`` picks this class through
``auto_map``), the mask token id, and no KV cache (attention is bidirectional).
"""

from transformers import LlamaConfig


class MDMConfig(LlamaConfig):
    """``LlamaConfig`` of a bidirectional masked diffusion model.

    Args:
        mask_token_id: id of the mask token that the reverse diffusion starts from.
        **kwargs: every ``LlamaConfig`` argument (hidden_size, num_key_value_heads, ...).
    """

    model_type = "mdm_llama"

    def __init__(self, mask_token_id=None, **kwargs):
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("tie_word_embeddings", False)
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
        self.is_causal = False
