"""BERT-family encoders (BERT, RoBERTa, XLM-R) on Megatron-core, as masked diffusion models.

Ye et al. (2023) adapt pretrained masked LMs (XLM-R) to diffusion LMs by continued training with the
diffusion objective. Their architecture differs from the Llama stack in four places, each an extension of
Megatron's own modules through the spec system and a ``GPTModel`` subclass, not a fork:

* **post-LayerNorm blocks**: ``x = LN(x + Attn(x)); x = LN(x + MLP(x))``. :class:`PostLNTransformerLayer`
  is Megatron's ``TransformerLayer`` (its attention, MLP and bias-dropout-add paths) with identity pre-norms
  and two norms after the residual adds; the block has no final norm;
* **embeddings**: word + learned absolute position + token type (always type 0), then LayerNorm
  (:class:`EncoderEmbedding`, around the ``LanguageModelEmbedding`` that ``GPTModel`` built). RoBERTa and
  XLM-R number positions from ``padding_idx + 1`` skipping pad tokens, as ``transformers`` does;
* **GELU MLP with biases** on every linear layer (``TransformerConfig`` options);
* **the MLM head**: Megatron's ``BertLMHead`` (dense + GELU + LayerNorm) before the output layer, whose
  weight is tied to the word embeddings and which gets a vocabulary-parallel bias.

Tensor and pipeline parallelism work as for ``GPTModel``: the head lives on the last stage, the tied
output weight is kept in sync by Megatron's embedding group.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


def roberta_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa positions: non-pad tokens numbered padding_idx + 1, + 2, ... in order; pad tokens padding_idx.

    Args:
        input_ids: [b, s] token ids.
        padding_idx: the pad token id (also the padding row of the position table).
    Returns:
        position ids [b, s] (int64).
    """
    keep = (input_ids != padding_idx).long()  # [b, s]
    return torch.cumsum(keep, dim=1) * keep + padding_idx


@dataclass
class PostLNLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus the two norms of a post-LN block (after each residual add)."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class PostLNTransformerLayer(TransformerLayer):
    """Megatron's ``TransformerLayer`` with post-LayerNorm: ``LN(x + Attn(x))``, then ``LN(h + MLP(h))``.

    The pre-norms of the spec are identities; attention, MLP and bias-dropout-add are Megatron's own.
    """

    def __init__(self, config: TransformerConfig, submodules: PostLNLayerSubmodules, **kwargs):
        super().__init__(config=config, submodules=submodules, **kwargs)
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm, config=self.config, hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon)
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm, config=self.config, hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        """hidden_states [s, b, h] (+ Megatron's layer kwargs) -> (output [s, b, h], context)."""
        kwargs.pop("dynamic_inference_decode_only", None)
        hidden, context = self._forward_attention(*args, **kwargs)  # x + Attn(x) (identity pre-norm)
        hidden = self.post_self_attn_layernorm(hidden)
        out = self._forward_mlp(hidden, kwargs.get("inference_context"), padding_mask=kwargs.get("padding_mask"))
        return self.post_mlp_layernorm(out), context


def _layer_norm() -> Union[ModuleSpec, type]:
    """The LayerNorm implementation of Megatron's local spec (Apex's fused norm when present, else torch)."""
    return get_gpt_layer_local_spec(normalization="LayerNorm").submodules.input_layernorm


def post_ln_layer_spec(core_attention: type) -> ModuleSpec:
    """Megatron's local layer spec (LayerNorm), turned post-LN: pre-norms out, post-norms in."""
    sub = get_gpt_layer_local_spec(normalization="LayerNorm").submodules
    norm = _layer_norm()
    base = {f.name: getattr(sub, f.name) for f in fields(TransformerLayerSubmodules)}
    base.update(input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, sharded_state_dict_keys_map={})
    submodules = PostLNLayerSubmodules(**base, post_self_attn_layernorm=norm, post_mlp_layernorm=norm)
    submodules.self_attention.submodules.core_attention = core_attention
    return ModuleSpec(module=PostLNTransformerLayer, submodules=submodules)


def encoder_block_spec(config: TransformerConfig, layer: ModuleSpec, vp_stage: Optional[int]) -> TransformerBlockSubmodules:
    """This stage's layers, and no final norm (a post-LN stack ends normalised)."""
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=None)


class EncoderEmbedding(MegatronModule):
    """BERT embeddings: LayerNorm(word + position + token type 0); word/position tables are ``base``'s.

    Args:
        base: the ``LanguageModelEmbedding`` (learned absolute positions) that ``GPTModel`` built; its word
            embedding keeps the attributes Megatron set on it (tied head, pipeline embedding group).
        num_tokentypes: rows of the token-type table (0: none).
        position_padding_idx: RoBERTa/XLM-R position numbering from this pad id, or None for 0..s-1.
    """

    def __init__(self, base: LanguageModelEmbedding, config: TransformerConfig, num_tokentypes: int,
                 position_padding_idx: Optional[int]):
        super().__init__(config=config)
        self.word_embeddings = base.word_embeddings
        self.position_embeddings = base.position_embeddings
        self.tokentype_embeddings = None
        if num_tokentypes > 0:
            self.tokentype_embeddings = torch.nn.Embedding(num_tokentypes, config.hidden_size)
            if config.perform_initialization:
                config.embedding_init_method(self.tokentype_embeddings.weight)
        self.layernorm = build_module(_layer_norm(), config=config, hidden_size=config.hidden_size,
                                      eps=config.layernorm_epsilon)
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)
        self.position_padding_idx = position_padding_idx

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids=None) -> torch.Tensor:
        """input_ids [b, s] -> embeddings [s, b, h] (position_ids are recomputed for RoBERTa)."""
        if self.position_padding_idx is not None:
            position_ids = roberta_position_ids(input_ids, self.position_padding_idx)
        emb = self.word_embeddings(input_ids)  # [b, s, h], reduced over TP
        if self.tokentype_embeddings is not None:
            types = torch.zeros_like(input_ids) if tokentype_ids is None else tokentype_ids
            emb = emb + self.tokentype_embeddings(types)
        emb = emb + self.position_embeddings(position_ids)
        emb = self.layernorm(emb.transpose(0, 1).contiguous())  # [s, b, h]
        return self.embedding_dropout(emb)


class EncoderMLM(GPTModel):
    """A BERT-family masked LM on ``GPTModel``: :class:`EncoderEmbedding`, post-LN blocks, the MLM head.

    Args:
        num_tokentypes: rows of the token-type table.
        position_padding_idx: RoBERTa/XLM-R position numbering (the pad id), or None.
        **kwargs: ``GPTModel`` arguments (``position_embedding_type`` must be ``learned_absolute``).
    """

    def __init__(self, *, num_tokentypes: int, position_padding_idx: Optional[int], **kwargs):
        super().__init__(**kwargs)
        if self.pre_process:
            self.embedding = EncoderEmbedding(self.embedding, self.config, num_tokentypes, position_padding_idx)
        if self.post_process:
            self.lm_head = BertLMHead(self.config.hidden_size, self.config)
            rows = self.output_layer.output_size_per_partition
            bias = torch.nn.Parameter(torch.zeros(rows, dtype=self.config.params_dtype))
            set_tensor_model_parallel_attributes(bias, True, 0, 1)
            bias.allreduce = True
            self.output_layer.bias = bias  # vocabulary-parallel; ColumnParallelLinear adds it to the logits
            # the MLM head transforms the hidden states right before the (tied) output layer
            self.output_layer.register_forward_pre_hook(self._apply_lm_head, with_kwargs=True)

    def _apply_lm_head(self, module, args, kwargs):
        if args:
            return (self.lm_head(args[0]), *args[1:]), kwargs
        kwargs["input_"] = self.lm_head(kwargs["input_"])
        return args, kwargs
