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
        qkv_bias: biases on the query/key/value projections only (a model adapted from Qwen2).
        shift_logits: the network's output at i predicts token i + 1 (adapted from an AR model, Dream /
            DiffuLLaMA); ``MDMForMaskedLM`` re-aligns its ``logits`` so that entry i predicts token i.
        **kwargs: every ``LlamaConfig`` argument (hidden_size, num_key_value_heads, ...).
    """

    model_type = "mdm_llama"

    def __init__(self, mask_token_id=None, qkv_bias=False, shift_logits=False, **kwargs):
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("tie_word_embeddings", False)
        self.mask_token_id = mask_token_id
        self.qkv_bias = qkv_bias
        self.shift_logits = shift_logits
        super().__init__(**kwargs)
        self.is_causal = False
