"""The BERT-family encoders (BERT, RoBERTa, XLM-R) as masked diffusion models (Ye et al.'s diffusive adaptation).

Post-LayerNorm blocks, learned absolute positions and token types, GELU MLP with biases everywhere, the MLM head
tied to the embeddings: the modules are in ``encoder.py`` (Megatron's own, extended through the spec system).
Always the local spec with SDPA attention (no Transformer Engine, no FP8), bidirectional, so MDM only.

Torch and Megatron are imported inside the functions: importing this module registers the record only.
"""

from __future__ import annotations

from megatron_mdm.config import Config, check
from megatron_mdm.models.registry import ModelFamily, register


def transformer_kwargs(cfg: Config) -> dict:
    import torch.nn.functional as F  # noqa: N812, PLC0415

    return dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True,
                add_qkv_bias=True)


def layer_spec(cfg: Config, use_te: bool):
    from megatron_mdm.models.attention import SDPAttention  # noqa: PLC0415
    from megatron_mdm.models.encoder import post_ln_layer_spec  # noqa: PLC0415

    return post_ln_layer_spec(SDPAttention)


def construct(cfg: Config, tconf, spec, common: dict):
    from megatron_mdm.models.encoder import EncoderMLM, encoder_block_spec  # noqa: PLC0415

    m = cfg.model
    return EncoderMLM(transformer_layer_spec=encoder_block_spec(tconf, spec, common["vp_stage"]),
                      max_sequence_length=m.max_position_embeddings or cfg.data.seq_length,
                      position_embedding_type="learned_absolute", num_tokentypes=m.num_tokentypes,
                      position_padding_idx=m.position_padding_idx, **common)


def count_parameters(cfg: Config, vocab_size: int) -> dict[str, int]:
    m = cfg.model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    qkv = h + 2 * (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    attn = h * qkv + h * h
    # biases everywhere, GELU MLP, LayerNorm (weight and bias), MLM head
    per_layer = attn + qkv + h + 2 * h * f + f + h + 4 * h
    non_embedding = L * per_layer + (h * h + h + 2 * h)  # + the head's dense and norm
    positions = (m.max_position_embeddings or cfg.data.seq_length) + m.num_tokentypes
    emb = (vocab_size + positions) * h + 2 * h + vocab_size  # + embedding norm, output bias
    emb += vocab_size * h if m.untie_embeddings_and_output_weights else 0
    return {"total": non_embedding + emb, "embedding": emb, "non_embedding": non_embedding}


def validate(cfg: Config) -> None:
    m, o = cfg.model, cfg.objective
    check(m.rope_scaling is None, "rope_scaling", "needs --architecture llama (bert has learned positions)")
    check(not m.add_qkv_bias, "add_qkv_bias", "needs --architecture llama (bert has biases everywhere)")
    check(m.num_query_groups in (None, m.num_attention_heads), "num_query_groups",
          "--architecture bert has multi-head attention (no query groups)")
    check(m.fp8_format is None, "fp8_format", "--architecture bert runs on the local spec (no FP8)")
    rows = m.max_position_embeddings or cfg.data.seq_length
    offset = 0 if m.position_padding_idx is None else m.position_padding_idx + 1
    check(cfg.data.seq_length + offset <= rows, "seq_length",
          f"{cfg.data.seq_length} positions (+ offset {offset}) do not fit --max-position-embeddings {rows}")
    check(not o.shift_logits and o.attention_anneal_iters == 0,
          "shift_logits" if o.shift_logits else "attention_anneal_iters",
          "is for starts from autoregressive models (--architecture llama)")


def hf_family(cfg: Config):
    from megatron_mdm.hf.bert import BERT, ROBERTA, XLM_ROBERTA  # noqa: PLC0415

    m = cfg.model
    if m.hf_model_type == "xlm-roberta":
        return XLM_ROBERTA
    return BERT if m.position_padding_idx is None else ROBERTA


def describe(cfg: Config) -> str:
    m = cfg.model
    return (f"{hf_family(cfg).name} encoder ({m.num_layers} post-LayerNorm layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads} heads, GELU {m.ffn_hidden_size}, learned positions "
            f"{m.max_position_embeddings}, MLM head tied to the embeddings)")


BERT_ENCODER = register(ModelFamily(
    name="bert", objectives=("mdm",), supports_te=False, ships_modeling_code=False,
    transformer_kwargs=transformer_kwargs, layer_spec=layer_spec, construct=construct,
    count_parameters=count_parameters, validate=validate, hf_family=hf_family, describe=describe,
))
