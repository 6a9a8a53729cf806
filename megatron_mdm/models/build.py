"""Model construction: Megatron-core ``GPTModel`` with the attention mask chosen by the objective.

The masked diffusion model is a Llama-style transformer (RMSNorm, RoPE, GQA, SwiGLU, untied head)
with **no causal mask**. That is a spec change, not a fork: the layer spec's self-attention
``attn_mask_type`` becomes ``AttnMaskType.no_mask`` for MDM and stays ``causal`` for the ARM baseline.

* Transformer Engine spec (GPU, TE importable): ``TEDotProductAttention`` with no_mask, FP8 options.
* Local spec (CPU, or GPU without TE): Megatron's local layers with ``SDPAttention`` as the core
  attention (memory linear in sequence length).

``--architecture bert`` builds the BERT-family encoder of ``megatron_mdm.models.encoder`` (post-LN blocks,
learned positions, the MLM head) for diffusive adaptation of masked LMs; Qwen2's q/k/v biases and Llama 3's
RoPE scaling are options of the Llama stack. ``transformer_config`` is the one place where our config names
become Megatron's ``TransformerConfig``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mdm.config import Config, ConfigError, virtual_pipeline_size
from megatron_mdm.models.attention import SDPAttention
from megatron_mdm.models.encoder import EncoderMLM, encoder_block_spec, post_ln_layer_spec
from megatron_mdm.tokenization import padded_vocab_size

log = logging.getLogger(__name__)


def te_available() -> bool:
    """True when Transformer Engine's PyTorch extension imports and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError or a broken build
        return False
    return True


def use_transformer_engine(cfg: Config) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "local":
        return False
    if impl == "transformer_engine":
        if not te_available():
            raise ConfigError(
                "--transformer-impl: transformer_engine was asked for but Transformer Engine is not "
                "importable (or no GPU is present); use --transformer-impl local"
            )
        return True
    return te_available()


def transformer_config(cfg: Config, use_te: bool | None = None) -> TransformerConfig:
    """Our config -> Megatron ``TransformerConfig`` (the single mapping)."""
    m, p = cfg.model, cfg.parallel
    use_te = use_te_for(cfg, use_te)
    bert = m.architecture == "bert"
    on_gpu = torch.cuda.is_available()
    bf16 = cfg.optim.bf16
    vpp = virtual_pipeline_size(p, m.num_layers)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_attention_heads,
        # llama: RMSNorm, SwiGLU, no biases (q/k/v biases for Qwen2); bert: LayerNorm, GELU, biases everywhere
        normalization="LayerNorm" if bert else "RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=not bert,
        activation_func=F.gelu if bert else F.silu,
        add_bias_linear=bert,
        add_qkv_bias=bert or m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        # CPU initialisation makes weights independent of the TP layout (full matrix, then split)
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # fusions that need CUDA/Apex kernels
        masked_softmax_fusion=False,
        bias_activation_fusion=use_te and on_gpu,
        bias_dropout_fusion=use_te and on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method if m.recompute_granularity == "full" else None,
        recompute_num_layers=m.recompute_num_layers if m.recompute_granularity == "full" else None,
        deallocate_pipeline_outputs=on_gpu,
        # gloo matches point-to-point messages per peer in posting order; batched p2p posts a stage's
        # sends and receives in an order that, with PP=2 (next == previous rank) in the interleaved
        # schedule, pairs a forward activation with a backward gradient. Unbatched p2p orders them
        # consistently (even ranks send first); NCCL groups batched ops and is unaffected.
        batch_p2p_comm=on_gpu,
        # the loss is a weighted *sum* per micro-batch; gradients are divided by the token count of
        # the global batch (finalize_model_grads), not averaged over micro-batches and DP ranks
        calculate_per_token_loss=True,
    )
    if use_te:
        kwargs["attention_backend"] = _attention_backend(m.attention_backend)
        # TE's own context parallelism; the local spec (SDPAttention) always all-gathers K/V
        kwargs["cp_comm_type"] = p.cp_comm_type
    if m.fp8_format is not None:
        if not use_te:
            raise ConfigError("--fp8-format: FP8 needs the Transformer Engine spec")
        kwargs.update(
            fp8=m.fp8_format,
            fp8_recipe=m.fp8_recipe,
            fp8_amax_history_len=m.fp8_amax_history_len,
            fp8_amax_compute_algo="max",
            first_last_layers_bf16=m.first_last_layers_bf16,
        )
    return TransformerConfig(**kwargs)


def _attention_backend(name: str):
    from megatron.core.transformer.enums import AttnBackend

    return getattr(AttnBackend, name)


def layer_spec(cfg: Config, causal: bool, use_te: bool | None = None) -> ModuleSpec:
    """The transformer-layer spec with the mask type of the objective.

    No mask for the MDM, causal for the ARM, and ``arbitrary`` for an MDM whose attention is annealed from
    causal to bidirectional (``--attention-anneal-iters``): the mask then comes with every forward.
    """
    use_te = use_transformer_engine(cfg) if use_te is None else use_te
    if cfg.model.architecture == "bert":  # post-LN blocks: the local spec, SDPA attention
        spec = post_ln_layer_spec(SDPAttention)
    elif use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if not causal and cfg.objective.attention_anneal_iters > 0:
        mask = AttnMaskType.arbitrary
    spec.submodules.self_attention.params["attn_mask_type"] = mask
    return spec


def use_te_for(cfg: Config, use_te: bool | None = None) -> bool:
    """Whether the model is built on the TE spec (never for the post-LN encoders, which use the local spec)."""
    if cfg.model.architecture == "bert":
        return False
    return use_transformer_engine(cfg) if use_te is None else use_te


MEGATRON_LLAMA3 = (1.0, 4.0, 8192)
"""(low_freq_factor, high_freq_factor, original_max_position_embeddings) that Megatron's ``RotaryEmbedding``
fixes when built with ``rope_scaling=True`` (Llama 3.1/3.2/3.3 use exactly these); only the factor is free."""


def _rope_kwargs(cfg: Config) -> dict:
    m = cfg.model
    fits = (m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_position_embeddings) == MEGATRON_LLAMA3
    return {"rope_scaling": m.rope_scaling == "llama3" and fits, "rope_scaling_factor": m.rope_scaling_factor}


def _rescale_rope(model: GPTModel, cfg: Config) -> None:
    """llama3 scaling with other constants than Megatron's fixed ones: its own rule, all four parameters.

    Megatron's ``RotaryEmbedding._apply_scaling`` is transformers' ``_compute_llama3_parameters`` (the same
    wavelength bands and smooth ramp, float32); its constructor only fixes three of the four parameters.
    """
    m = cfg.model
    rotary = getattr(model, "rotary_pos_emb", None)
    if m.rope_scaling != "llama3" or _rope_kwargs(cfg)["rope_scaling"] or rotary is None:
        return
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=m.rope_scaling_factor, low_freq_factor=m.rope_low_freq_factor,
        high_freq_factor=m.rope_high_freq_factor,
        original_max_position_embeddings=m.rope_original_max_position_embeddings)


def build_model(
    cfg: Config,
    vocab_size: int,
    causal: bool,
    use_te: bool | None = None,
) -> list[GPTModel]:
    """Build this rank's model chunks (one, or one per virtual pipeline stage).

    Args:
        cfg: the resolved run config.
        vocab_size: the tokenizer's vocabulary size (padded here for TP divisibility).
        causal: True for the ARM baseline, False for the masked diffusion model.
        use_te: force the Transformer Engine spec on/off (default: from the config).
    Returns:
        Model chunks on ``runtime.device()``, not yet wrapped in DDP.
    """
    use_te = use_te_for(cfg, use_te)
    tconf = transformer_config(cfg, use_te)
    spec = layer_spec(cfg, causal, use_te)
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)
    vpp = tconf.virtual_pipeline_model_parallel_size
    m = cfg.model
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        common = dict(
            config=tconf,
            vocab_size=padded,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
            vp_stage=stage,
        )
        if m.architecture == "bert":
            model = EncoderMLM(
                transformer_layer_spec=encoder_block_spec(tconf, spec, stage),
                max_sequence_length=m.max_position_embeddings or cfg.data.seq_length,
                position_embedding_type="learned_absolute",
                num_tokentypes=m.num_tokentypes,
                position_padding_idx=m.position_padding_idx,
                **common,
            )
        else:
            model = GPTModel(
                transformer_layer_spec=spec,
                max_sequence_length=cfg.data.seq_length,
                position_embedding_type="rope",
                rotary_base=m.rotary_base,
                **_rope_kwargs(cfg),
                **common,
            )
            _rescale_rope(model, cfg)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if cfg.optim.bf16:
            model.bfloat16()
        chunks.append(model)
    return chunks


def count_parameters(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Parameter counts of the full (unsharded) model: total, embedding, non-embedding (N of C=6ND)."""
    m = cfg.model
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    groups = m.num_query_groups or m.num_attention_heads
    head_dim = h // m.num_attention_heads
    qkv = h + 2 * groups * head_dim
    attn = h * qkv + h * h
    if m.architecture == "bert":  # biases everywhere, GELU MLP, LayerNorm (weight and bias), MLM head
        per_layer = attn + qkv + h + 2 * h * f + f + h + 4 * h
        non_embedding = L * per_layer + (h * h + h + 2 * h)  # + the head's dense and norm
        positions = (m.max_position_embeddings or cfg.data.seq_length) + m.num_tokentypes
        emb = (vocab_size + positions) * h + 2 * h + vocab_size  # + embedding norm, output bias
        emb += vocab_size * h if m.untie_embeddings_and_output_weights else 0
        return {"total": non_embedding + emb, "embedding": emb, "non_embedding": non_embedding}
    mlp = 3 * h * f
    norms = 2 * h
    per_layer = attn + mlp + norms + (qkv if m.add_qkv_bias else 0)
    non_embedding = L * per_layer + h  # + final norm
    emb = vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    return {"total": non_embedding + emb, "embedding": emb, "non_embedding": non_embedding}


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
