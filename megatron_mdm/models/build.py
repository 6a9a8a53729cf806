"""Model construction: the family's Megatron model with the attention mask chosen by the objective.

The masked diffusion model is its family's transformer with **no causal mask**. That is a spec change, not a
fork: the layer spec's self-attention ``attn_mask_type`` becomes ``AttnMaskType.no_mask`` for MDM and stays
``causal`` for the ARM baseline (``layer_spec``), whatever the family.

* Transformer Engine spec (GPU, TE importable, a family that supports it): ``TEDotProductAttention`` with
  no_mask, FP8 options.
* Local spec (CPU, or GPU without TE): Megatron's local layers with ``SDPAttention`` as the core attention.

What differs between families (norms, MLP, biases, positions, the module built) comes from their registry
record (``models.registry``). ``transformer_config`` is the one place where our config names become Megatron's
``TransformerConfig``.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mdm.config import Config, ConfigError, virtual_pipeline_size
from megatron_mdm.models.registry import family
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
        **family(cfg).transformer_kwargs(cfg),  # the norm, the MLP, the biases
        layernorm_epsilon=m.norm_epsilon,
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
    spec = family(cfg).layer_spec(cfg, use_te_for(cfg, use_te))
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if not causal and cfg.objective.attention_anneal_iters > 0:
        mask = AttnMaskType.arbitrary
    spec.submodules.self_attention.params["attn_mask_type"] = mask
    return spec


def use_te_for(cfg: Config, use_te: bool | None = None) -> bool:
    """Whether the model is built on the TE spec (never for a family without TE support: the local spec)."""
    if not family(cfg).supports_te:
        return False
    return use_transformer_engine(cfg) if use_te is None else use_te


def build_model(
    cfg: Config,
    vocab_size: int,
    causal: bool,
    use_te: bool | None = None,
) -> list[MegatronModule]:
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
    m, fam = cfg.model, family(cfg)
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
        model = fam.construct(cfg, tconf, spec, common)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if cfg.optim.bf16:
            model.bfloat16()
        chunks.append(model)
    return chunks
