"""The one typed configuration schema of megatron-mdm, and its three views (YAML, flags, dict).

Nested dataclasses, one per concern (model, objective, data, parallel, optim, checkpoint, logging).
Field names are unique across sections, so command-line flags stay flat and use Megatron-LM's
spelling (``micro_batch_size`` -> ``--micro-batch-size``). Precedence, lowest first:
defaults < preset (``--preset``) < YAML (``--config``) < flags.

Each field's help text is the string literal written under it (read from this file's source),
so the documentation lives in exactly one place. This module imports nothing from the project.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_mdm.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


def check(cond: bool, name: str, msg: str) -> None:
    """Raise ``ConfigError`` naming the flag of field ``name`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"--{name.replace('_', '-')}: {msg}")


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    """Named model size from megatron_mdm.presets (e.g. smdm-1.1b, llama-3b, tiny); its values are
    applied before YAML and flags."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Transformer hidden size."""
    num_attention_heads: int = 4
    """Number of attention (query) heads."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA); None means multi-head attention."""
    ffn_hidden_size: int = 176
    """SwiGLU intermediate size."""
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary size including special tokens; None means read it from --tokenizer."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding to a multiple of this times the tensor-parallel size."""
    rotary_base: int = 10000
    """RoPE base frequency (theta)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output head (Llama); False ties them."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: Transformer Engine spec, Megatron local spec with SDPA attention, or
    auto (TE when it is importable and a GPU is present)."""
    attention_backend: Literal["auto", "flash", "fused", "unfused", "local"] = "auto"
    """Transformer Engine attention backend (TE spec only)."""
    fp8_format: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 training format (Transformer Engine spec only); None disables FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe."""
    fp8_amax_history_len: int = 1024
    """Delayed-scaling amax history length."""
    first_last_layers_bf16: bool = False
    """Keep the first and last layers in BF16 when FP8 is on (not with the delayed recipe)."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation: None, selective (attention core) or full (whole layers)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """How full recomputation groups layers."""
    recompute_num_layers: int = 1
    """Layers per recomputation group (full recomputation)."""
    architecture: Literal["llama", "bert"] = "llama"
    """Layer family: llama (pre-RMSNorm decoder stack with RoPE and SwiGLU: Llama, Mistral, Qwen2) or bert
    (post-LayerNorm encoder with learned absolute positions, token types, GELU MLP with biases and the MLM
    head tied to the embeddings: BERT, RoBERTa, XLM-R, for diffusive adaptation of masked LMs, Ye et al. 2023)."""
    hf_model_type: Optional[str] = None
    """Hugging Face model_type the weights were imported from (set by mdm-convert from-hf); mdm-convert to-hf
    writes that family back. None: a model trained here (exported as Llama)."""
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2)."""
    rope_scaling: Optional[Literal["llama3"]] = None
    """RoPE frequency scaling: None, or llama3 (Llama 3.1+: wavelengths above original/low-freq-factor are
    divided by --rope-scaling-factor, those below original/high-freq-factor kept, a smooth ramp between)."""
    rope_scaling_factor: float = 8.0
    """llama3 RoPE scaling: the factor long wavelengths are divided by."""
    rope_low_freq_factor: float = 1.0
    """llama3 RoPE scaling: low_freq_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 RoPE scaling: high_freq_factor."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 RoPE scaling: the context length the model was pretrained with before scaling."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table (--architecture bert); for RoPE models only recorded for export.
    None means --seq-length."""
    num_tokentypes: int = 0
    """Token-type (segment) embeddings of an encoder (BERT's type_vocab_size); inputs always use type 0."""
    position_padding_idx: Optional[int] = None
    """RoBERTa/XLM-R position ids: non-pad tokens are numbered from this id + 1 and pad tokens get this id
    (the pad token id); None numbers positions 0..s-1."""
    masked_only_logits: bool = False
    """Run the output layer and the cross-entropy only on positions with a nonzero loss weight (the
    masked ones for MDM), gathered before the head: same loss and gradients, less work (training and
    validation; see docs/BENCHMARKS.md)."""


@dataclass
class ObjectiveConfig:
    objective: Literal["mdm", "arm"] = "mdm"
    """Training objective: masked diffusion (bidirectional) or the autoregressive baseline (causal)."""
    eps: float = 1e-3
    """Lower bound of the masking rate: t ~ U(eps, 1)."""
    t_sampling: Literal["uniform", "antithetic"] = "uniform"
    """How t is drawn within a micro-batch: independent uniform, or antithetic/low-discrepancy
    (stratified over the micro-batch, as in MDLM)."""
    random_length_prob: Optional[float] = None
    """Fraction of sequences cut to a uniformly random length (the SMDM/LLaDA variable-length trick); unset:
    0.01 in pretraining, 0 (off) with instruction data (--sft-data or prepare-sft shards), where it would cut
    completions."""
    shift_logits: bool = False
    """Shifted prediction, for starts from an autoregressive model: the output at position i predicts token
    i + 1, which keeps the AR head aligned (Dream, Ye et al. 2025; DiffuLLaMA, Gong et al. 2025). Position 0
    is never masked, so decoding needs a prompt of at least one token."""
    attention_anneal_iters: int = 0
    """Anneal the attention mask from causal to bidirectional over this many steps (DiffuLLaMA, Gong et al.
    2025): at step k each non-causal query/key pair attends with probability min(1, k / N), one draw per
    micro-batch shared by all layers and heads; 0 disables it (bidirectional from the start)."""


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)
    """Training data: shard directories with a manifest.json, optionally weighted as Megatron does
    ("0.7 dirA 0.3 dirB")."""
    valid_data_path: list = field(default_factory=list)
    """Validation data (same form); default: the validation split written by mdm-data prepare."""
    tokenizer: Optional[str] = field(default=None, metadata={"aliases": ("--tokenizer-model",)})
    """Tokenizer directory (from mdm-tokenizer) or a tokenizer.json (--tokenizer-model: Megatron-LM's name)."""
    tokenizer_type: Literal["HuggingFaceTokenizer"] = "HuggingFaceTokenizer"
    """Megatron-LM's tokenizer type, accepted for its command lines: every tokenizer here is a Hugging Face
    tokenizer.json (--tokenizer)."""
    seq_length: int = 128
    """Sequence length in tokens."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0: read in the training process); they only prefetch, the
    data order does not depend on them."""
    data_shuffle: Literal["global", "none"] = "global"
    """Training data order: a seeded permutation of all samples of each epoch of each source (as
    Megatron's GPTDataset), or none (manifest order)."""
    verify_data: Literal["sha256", "size", "none"] = "sha256"
    """Check of training and validation shards at start: size and sha256, size only, or none."""
    override_data_state: bool = False
    """Resume even when the checkpoint's data order cannot be continued exactly (another --seed,
    --seq-length, --data-path or --data-shuffle): continue at its consumed samples in this run's order."""
    sft_data: Optional[str] = None
    """Prompt/completion jsonl files for supervised finetuning (glob); prompt tokens are never masked."""
    sft_train_on_prompt: bool = False
    """With --sft-data: train on the whole prompt + completion sequence (prompt masked and in the loss
    too), as SMDM's reversal-curse finetuning does; default: prompt kept and out of the loss."""
    mock_data: bool = False
    """Train and validate on random tokens drawn from --seed instead of --data-path (Megatron-LM's
    --mock-data): to try a configuration or measure speed; the tokenizer still gives the vocabulary."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual pipeline stage (interleaved 1F1B); None disables interleaving."""
    context_parallel_size: int = 1
    """Context-parallel size: each rank holds 2 of 2 x CP sequence chunks (--seq-length divisible by
    2 x CP). Local spec: all-gather of K/V over the CP group; TE spec: TE's CP (--cp-comm-type)."""
    cp_comm_type: Literal["p2p", "a2a", "all_gather"] = "p2p"
    """Transformer Engine spec only: TE's context-parallel communication (Megatron-LM's default p2p);
    the local spec always all-gathers K and V."""
    sequence_parallel: bool = False
    """Sequence parallelism with TP (needs Transformer Engine norms)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward (GPU)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward (GPU)."""
    distributed_timeout_minutes: float = 10
    """Timeout of collective operations, in minutes (fractions allowed): a rank that stops answering (hung,
    stopped, its node lost) ends the job after this long, with an error naming it (on gloo)."""


@dataclass
class OptimConfig:
    micro_batch_size: int = 4
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    train_iters: Optional[int] = None
    """Optimizer steps to train."""
    train_tokens: Optional[int] = None
    """Tokens to train (alternative to --train-iters)."""
    train_samples: Optional[int] = None
    """Sequences to train (Megatron-LM's sample budget; alternative to --train-iters): the iterations are
    samples / --global-batch-size, rounded up."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps."""
    lr_warmup_fraction: Optional[float] = None
    """Linear warmup as a fraction of the decay steps (Megatron-LM; instead of --lr-warmup-iters)."""
    lr_decay_iters: Optional[int] = None
    """Steps over which the learning rate decays (default: --train-iters)."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = "cosine"
    """Learning-rate decay shape."""
    lr_wsd_decay_iters: Optional[int] = None
    """Steps of the final decay phase for WSD (default: 10% of --lr-decay-iters)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    bf16: bool = False
    """BF16 mixed precision (FP32 main weights in the optimizer)."""
    max_consecutive_nan_steps: int = 5
    """Stop with an error after this many non-finite loss/gradient steps in a row (each is skipped)."""


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Run directory: checkpoints, resolved config, metrics.jsonl."""
    load: Optional[str] = None
    """Checkpoint directory to resume (or finetune) from. Equal to --save, it may hold no checkpoint yet (the
    first start of a job whose restarts pass the same flags): training then starts from scratch."""
    save_interval: Optional[int] = None
    """Save every N steps (and at the end)."""
    keep_last: int = 2
    """Keep the last K checkpoints; 0 keeps all."""
    finetune: bool = False
    """Load only the model weights from --load and start at iteration 0 (new optimizer, data order)."""
    async_save: bool = False
    """Save checkpoints asynchronously (GPU)."""
    ckpt_iteration: Optional[int] = None
    """Load this iteration instead of the latest."""
    verify_checkpoint: bool = True
    """Check the checksums of every file of a checkpoint before loading it (--no-verify-checkpoint skips
    the hashing, for speed on trusted storage; file sizes are still checked)."""
    allow_tokenizer_change: bool = False
    """With --finetune, allow a tokenizer other than the checkpoint's (its token ids change meaning)."""
    load_optim: bool = True
    """On a resume, load the optimizer state (Adam moments) and the learning-rate scheduler; --no-load-optim
    starts a fresh optimizer and continues the schedule at the loaded iteration."""
    load_rng: bool = True
    """On a resume, restore the random generators' states (same layout only); --no-load-rng keeps this
    run's seeding."""
    allow_unverified_checkpoint: bool = False
    """Load a checkpoint that lost its checksums.json (its files cannot be verified)."""
    exit_interval: Optional[int] = None
    """Save and exit 0 after an iteration divisible by N (Megatron-LM's flag, for schedulers that send no
    signal before a time limit); a resumed run goes on to the next multiple."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit 0 after the first step that ends more than this many minutes after training set-up
    began (Megatron-LM's flag; the ranks agree on it); set it below the scheduler's time limit."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    """Log every N steps."""
    eval_interval: Optional[int] = None
    """Validate every N steps (and at the end); None disables validation."""
    eval_iters: int = 10
    """Validation micro-batches per data-parallel rank and evaluation."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard directory (default: <save>/tensorboard when --save is set)."""
    seed: int = 1234
    """Seed of initialisation, data order and masks."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU (default: detected for H100/H200/A100, else none)."""
    wandb_project: Optional[str] = None
    """Weights & Biases project to log to (needs pip install 'megatron-mdm[wandb]'); unset: no W&B. A resume
    into the same --save logs to the same W&B run; WANDB_MODE=offline keeps it on disk."""
    wandb_exp_name: Optional[str] = None
    """The W&B run's name (default: W&B's)."""
    wandb_entity: Optional[str] = None
    """The W&B team or user (default: your default entity)."""
    wandb_save_dir: Optional[str] = None
    """Directory of W&B's local files (default: <save>/wandb)."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        cfg = cls()
        apply_dict(cfg, d, source)
        return cfg

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Check consistency; with ``world_size`` also the parallel layout. Raises ConfigError."""
        validate(self, world_size)
        return self


# ---- field metadata ------------------------------------------------------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (the string literal following each annotation)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - source not available
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config field {f.name}"
            index[f.name] = (sec, f)
    return index


FIELDS = _field_index()


def _resolved_type(sec: str, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(SECTIONS[sec])
    return hints[f.name]


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a flag string) to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name.replace('_', '-')}: expected true/false, got {value!r}")
    if tp in (list, typing.List) or origin is list:
        if isinstance(value, str):
            return value.split()
        return [str(v) for v in value]
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}")
        try:
            fv = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}") from None
        if not fv.is_integer():
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer, got {value!r}")
        return int(fv)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name.replace('_', '-')}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


REMOVED: dict[str, str] = {
    "shuffle_buffer": "was removed: the loader shuffles all samples of each epoch (--data-shuffle global, the "
                      "default); drop the option",
}
"""Options that no longer exist, with what to do instead. A saved config (a checkpoint's config.yaml) that
holds one as null still reads; any other value is an error naming it."""


def set_field(cfg: Config, name: str, value: Any) -> None:
    if name in REMOVED:
        if value is None:
            return
        raise ConfigError(f"--{name.replace('_', '-')}: {REMOVED[name]}")
    if name not in FIELDS:
        raise ConfigError(f"unknown option {name!r}")
    sec, f = FIELDS[name]
    setattr(getattr(cfg, sec), name, _coerce(value, _resolved_type(sec, f), name))


def apply_dict(cfg: Config, d: dict, source: str = "config") -> None:
    """Apply a nested ({section: {field: v}}) or flat ({field: v}) mapping; unknown keys raise."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if k in REMOVED:
                    set_field(cfg, k, v)
                    continue
                if k not in FIELDS or FIELDS[k][0] != key:
                    raise ConfigError(f"{source}: unknown option {key}.{k}")
                set_field(cfg, k, v)
        elif key.replace("-", "_") in FIELDS or key.replace("-", "_") in REMOVED:
            set_field(cfg, key.replace("-", "_"), value)
        else:
            raise ConfigError(f"{source}: unknown option {key!r}")


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {p} is not valid YAML: {e}") from None
    return data


# ---- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per field (Megatron spelling), help from the field docs.

    A bool field is a switch (``--bf16`` / ``--no-bf16``); a Literal field lists its choices; a field's
    ``metadata["aliases"]`` adds other spellings (``--tokenizer-model`` for ``--tokenizer``). Every flag's
    value stays None unless given, so YAML and presets are only overridden by what is on the command line.
    """
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file with options, nested by section or flat; flags win over it")
    for sec, cls in SECTIONS.items():
        group = parser.add_argument_group(sec)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            tp = _resolved_type(sec, f)
            default = f.default if f.default is not dataclasses.MISSING else None
            doc = docs.get(f.name, "")
            if tp is bool:
                shown = "on" if default else "off"
                group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=_help(doc, shown))
            elif tp is list or typing.get_origin(tp) is list:
                group.add_argument(*flags, dest=f.name, nargs="+", default=None, metavar="PATH",
                                   help=_help(doc, default or None))
            else:
                choices = _choices(tp)
                metavar = "{" + ",".join(choices) + "}" if choices else _metavar(tp)
                group.add_argument(*flags, dest=f.name, default=None, metavar=metavar, help=_help(doc, default))


def _help(doc: str, default: Any) -> str:
    """The field's doc with its default once: appended unless the doc already says what the default is."""
    text = doc if default is None or "default" in doc.lower() else f"{doc} (default: {default})"
    return text.replace("%", "%%")


def _choices(tp: Any) -> Optional[list[str]]:
    """The values of a Literal (or Optional[Literal]) type, else None."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return [str(a) for a in typing.get_args(tp)] if typing.get_origin(tp) is Literal else None


def _metavar(tp: Any) -> Optional[str]:
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return {int: "N", float: "X"}.get(tp)  # type: ignore[return-value] - None: argparse's (the flag's name)


def from_args(args: argparse.Namespace, presets: Optional[dict] = None) -> Config:
    """Build the resolved Config: defaults < preset < checkpoint architecture < YAML < flags.

    With ``--load``, the architecture fields of the checkpoint's saved config fill every model field that
    no preset, YAML or flag set; one that is set to another value is a ConfigError naming its flag (the
    weights would not fit). See :func:`apply_checkpoint_architecture`.
    """
    cfg = Config()
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    yaml_dict = load_yaml(args.config) if getattr(args, "config", None) else {}
    explicit: dict[str, str] = {}  # model field -> where it was set
    preset = overrides.get("preset") or _flat_get(yaml_dict, "preset")
    if preset:
        if presets is None:
            from megatron_mdm.presets import PRESETS as presets  # noqa: N811 - lazy, avoids a cycle
        if preset not in presets:
            raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {sorted(presets)}")
        apply_dict(cfg, presets[preset], f"preset {preset}")
        cfg.model.preset = preset
        explicit.update({k: f"--preset {preset}" for k in _flat_keys(presets[preset])})
    apply_dict(cfg, yaml_dict, str(getattr(args, "config", "config")))
    explicit.update({k: f"--config {args.config}" for k in _flat_keys(yaml_dict)})
    for k, v in overrides.items():
        set_field(cfg, k, v)
    explicit.update({k: "the command line" for k in overrides})
    if cfg.checkpoint.load:
        saved = checkpoint_config(cfg.checkpoint.load, cfg.checkpoint.ckpt_iteration, cfg.checkpoint.verify_checkpoint,
                                  cfg.checkpoint.allow_unverified_checkpoint)
        if saved is not None:
            apply_checkpoint_architecture(cfg, saved.get("model", {}), explicit, cfg.checkpoint.load)
    return cfg


ARCHITECTURE_FREE = ("preset", "transformer_impl", "attention_backend", "fp8_format", "fp8_recipe",
                     "fp8_amax_history_len", "first_last_layers_bf16", "recompute_granularity", "recompute_method",
                     "recompute_num_layers", "init_method_std", "masked_only_logits")
"""Model fields that do not change the weights' shapes or meaning: free to differ from a checkpoint's."""


def architecture_fields() -> list[str]:
    """The model fields a checkpoint fixes (every ``ModelConfig`` field but ``ARCHITECTURE_FREE``)."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ARCHITECTURE_FREE]


def _flat_keys(d: dict) -> list[str]:
    keys = []
    for k, v in d.items():
        if k in SECTIONS and isinstance(v, dict):
            keys.extend(v)
        else:
            keys.append(k.replace("-", "_"))
    return keys


def checkpoint_config(load: str | Path, iteration: Optional[int] = None, verify: bool = True,
                      allow_unverified: bool = False) -> Optional[dict]:
    """The config saved with a checkpoint (``config.yaml`` of its ``iter_*`` directory), or None when absent.

    ``load`` is a run directory (the marker file names the newest complete iteration) or an ``iter_*``
    directory. A missing checkpoint returns None: the loader reports it later, naming ``--load``. The file is
    checked against the checkpoint's checksums first (a damaged value would otherwise be reported as a
    conflict with the user's flags): ``verify``/``allow_unverified`` are ``--[no-]verify-checkpoint`` and
    ``--allow-unverified-checkpoint``.
    """
    from megatron_mdm.checkpoint import integrity, layout  # noqa: PLC0415 - file names and hashing (no torch)

    path = layout.latest_checkpoint_dir(load) if iteration is None else layout.iteration_dir(load, iteration)
    cfg_file = layout.config_file(path) if path is not None else None
    if cfg_file is None or not cfg_file.is_file():
        return None
    with integrity.settings_changed(verify_hash=verify, allow_unverified=allow_unverified):
        integrity.verify_entry(path, layout.CONFIG_FILE)
    try:
        data = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--load: {cfg_file} is not valid YAML: {e}") from None
    return data if isinstance(data, dict) else None


def apply_checkpoint_architecture(cfg: Config, saved_model: dict, explicit: dict[str, str], source: str) -> None:
    """Take the architecture from a checkpoint's saved ``model`` section; a conflicting explicit value raises.

    Args:
        cfg: the config being resolved (modified in place).
        saved_model: the ``model`` section of the checkpoint's config.
        explicit: model fields set by a preset, the YAML or a flag, with where (for the message).
        source: the checkpoint, for the message.
    Raises:
        ConfigError: ``--flag: value (from where) differs from the checkpoint's ...``.
    """
    for name in architecture_fields():
        if name not in saved_model:
            continue
        sec, f = FIELDS[name]
        value = _coerce(saved_model[name], _resolved_type(sec, f), name)
        if name in explicit:
            mine = getattr(cfg.model, name)
            if mine != value:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {mine!r} (from {explicit[name]}) differs from the checkpoint "
                    f"{source} ({value!r}); the architecture comes from the checkpoint: drop the option")
        else:
            setattr(cfg.model, name, value)


def _flat_get(d: dict, key: str) -> Any:
    if key in d:
        return d[key]
    for v in d.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


# ---- validation ----------------------------------------------------------------------------------

# The allowed range of every numeric field, as an interval ("[1, inf)": integers from 1; "(0, 1)": open).
# A None value of an Optional field means "not set" and is not checked; floats must also be finite.
# tests/test_config.py checks that every int/float field of the schema is listed here.
RANGES: dict[str, str] = {
    # model
    "num_layers": "[1, inf)", "hidden_size": "[1, inf)", "num_attention_heads": "[1, inf)",
    "num_query_groups": "[1, inf)", "ffn_hidden_size": "[1, inf)", "vocab_size": "[1, inf)",
    "make_vocab_size_divisible_by": "[1, inf)", "rotary_base": "[1, inf)", "norm_epsilon": "(0, inf)",
    "init_method_std": "(0, inf)", "fp8_amax_history_len": "[1, inf)", "recompute_num_layers": "[1, inf)",
    "rope_scaling_factor": "[1, inf)", "rope_low_freq_factor": "(0, inf)", "rope_high_freq_factor": "(0, inf)",
    "rope_original_max_position_embeddings": "[1, inf)", "max_position_embeddings": "[1, inf)",
    "num_tokentypes": "[0, inf)", "position_padding_idx": "[0, inf)",
    # objective
    "eps": "(0, 1)", "random_length_prob": "[0, 1]", "attention_anneal_iters": "[0, inf)",
    # data
    "seq_length": "[2, inf)", "num_workers": "[0, inf)",
    # parallel
    "tensor_model_parallel_size": "[1, inf)", "pipeline_model_parallel_size": "[1, inf)",
    "num_layers_per_virtual_pipeline_stage": "[1, inf)", "context_parallel_size": "[1, inf)",
    "distributed_timeout_minutes": "(0, inf)",
    # optim
    "micro_batch_size": "[1, inf)", "global_batch_size": "[1, inf)", "train_iters": "[1, inf)",
    "train_tokens": "[1, inf)", "train_samples": "[1, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)",
    "lr_warmup_iters": "[0, inf)", "lr_warmup_fraction": "[0, 1]",
    "lr_decay_iters": "[1, inf)", "lr_wsd_decay_iters": "[1, inf)", "weight_decay": "[0, inf)",
    "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_eps": "(0, inf)", "clip_grad": "[0, inf)",
    "max_consecutive_nan_steps": "[1, inf)",
    # checkpoint
    "save_interval": "[1, inf)", "keep_last": "[0, inf)", "ckpt_iteration": "[0, inf)",
    "exit_interval": "[1, inf)", "exit_duration_in_mins": "(0, inf)",
    # logging
    "log_interval": "[1, inf)", "eval_interval": "[1, inf)", "eval_iters": "[0, inf)",
    "seed": "[0, 4294967295]", "peak_tflops": "(0, inf)",
}


def _range_error(value: Any, interval: str) -> Optional[str]:
    """Why ``value`` is outside ``interval`` ("[lo, hi)" notation), or None when it is inside."""
    lo_s, hi_s = (x.strip() for x in interval[1:-1].split(","))
    lo, hi = float(lo_s), float(hi_s)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low_ok = value >= lo if interval[0] == "[" else value > lo
    high_ok = value <= hi if interval[-1] == "]" else value < hi
    if low_ok and high_ok:
        return None
    if hi == math.inf:
        return f"must be {'>=' if interval[0] == '[' else '>'} {lo_s}, got {value}"
    return f"must be in {interval}, got {value}"


def _check_ranges(cfg: Config) -> None:
    for name, interval in RANGES.items():
        sec, _ = FIELDS[name]
        value = getattr(getattr(cfg, sec), name)
        if value is not None:
            err = _range_error(value, interval)
            check(err is None, name, err or "")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, p, opt, ck, lg = cfg.model, cfg.parallel, cfg.optim, cfg.checkpoint, cfg.logging
    _check_ranges(cfg)
    check(m.hidden_size % m.num_attention_heads == 0, "hidden_size",
          f"{m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    check(m.num_attention_heads % groups == 0, "num_query_groups",
          f"--num-attention-heads {m.num_attention_heads} is not divisible by {groups}")
    _validate_architecture(cfg)
    _validate_data(cfg.data)
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    check(m.num_attention_heads % tp == 0, "tensor_model_parallel_size",
          f"--num-attention-heads {m.num_attention_heads} is not divisible by TP={tp}")
    check(groups % tp == 0, "tensor_model_parallel_size",
          f"the {groups} query groups are not divisible by TP={tp}")
    check(m.ffn_hidden_size % tp == 0, "tensor_model_parallel_size",
          f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by TP={tp}")
    check(m.num_layers % pp == 0, "pipeline_model_parallel_size",
          f"--num-layers {m.num_layers} is not divisible by PP={pp}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        vl = p.num_layers_per_virtual_pipeline_stage
        check(pp > 1, "num_layers_per_virtual_pipeline_stage", "needs --pipeline-model-parallel-size > 1")
        check((m.num_layers // pp) % vl == 0, "num_layers_per_virtual_pipeline_stage",
              f"layers per pipeline stage ({m.num_layers // pp}) is not divisible by {vl}")
    if p.sequence_parallel:
        check(tp > 1, "sequence_parallel", "needs --tensor-model-parallel-size > 1")
    if cp > 1:
        check(cfg.data.seq_length % (2 * cp) == 0, "seq_length",
              f"{cfg.data.seq_length} is not divisible by 2 x --context-parallel-size = {2 * cp} "
              "(each CP rank holds 2 of 2 x CP equal chunks)")
    if m.fp8_format is not None:
        check(m.transformer_impl != "local", "fp8_format",
              "FP8 needs the Transformer Engine spec (--transformer-impl transformer_engine or auto on GPU)")
        check(not (m.first_last_layers_bf16 and m.fp8_recipe == "delayed"), "first_last_layers_bf16",
              "is not supported with --fp8-recipe delayed; use tensorwise or blockwise")
    check(opt.global_batch_size >= opt.micro_batch_size, "global_batch_size",
          f"{opt.global_batch_size} is smaller than --micro-batch-size {opt.micro_batch_size}")
    check(opt.min_lr <= opt.lr, "min_lr", f"{opt.min_lr} is larger than --lr {opt.lr}")
    budgets = [n for n in ("train_iters", "train_tokens", "train_samples") if getattr(opt, n) is not None]
    check(len(budgets) <= 1, budgets[-1] if budgets else "train_iters",
          "give one of --train-iters, --train-tokens, --train-samples, not both "
          + " and ".join("--" + n.replace("_", "-") for n in budgets))
    if opt.lr_warmup_fraction is not None:
        check(opt.lr_warmup_iters == 0, "lr_warmup_fraction", "give --lr-warmup-fraction or --lr-warmup-iters, not both")
    if ck.save_interval is not None:
        check(ck.save is not None, "save_interval", "needs --save")
    if lg.eval_interval is not None:
        check(lg.eval_iters >= 1, "eval_iters",
              f"is {lg.eval_iters} with --eval-interval {lg.eval_interval}: validation needs at least one "
              "micro-batch (leave out --eval-interval to train without validation)")
    if world_size is not None:
        _check_world_size(tp, pp, cp, world_size)
        model_parallel = tp * pp * cp
        dp = world_size // model_parallel
        check(opt.global_batch_size % (opt.micro_batch_size * dp) == 0, "global_batch_size",
              f"{opt.global_batch_size} is not divisible by --micro-batch-size x DP = "
              f"{opt.micro_batch_size} x {dp}")


def _check_world_size(tp: int, pp: int, cp: int, world_size: int) -> None:
    """The launched processes must hold whole TP x PP x CP model replicas."""
    sizes = (("tensor_model_parallel_size", "TP", tp), ("pipeline_model_parallel_size", "PP", pp),
             ("context_parallel_size", "CP", cp))
    for name, short, v in sizes:
        check(v <= world_size, name, f"{short}={v} is larger than the world size {world_size} "
              "(the number of processes the launcher started)")
    first = next((name for name, _, v in sizes if v > 1), "tensor_model_parallel_size")
    check(world_size % (tp * pp * cp) == 0, first,
          f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}")


def _validate_architecture(cfg: Config) -> None:
    """Family-specific options (the family's own checks, from its registry record), then the shared ones."""
    from megatron_mdm.models.registry import family  # noqa: PLC0415 - the records import this module

    m, o = cfg.model, cfg.objective
    family(cfg).validate(cfg)
    if m.rope_scaling is not None:
        check(0 < m.rope_low_freq_factor < m.rope_high_freq_factor, "rope_high_freq_factor",
              "need 0 < --rope-low-freq-factor < --rope-high-freq-factor")
        check(m.rope_original_max_position_embeddings > 0, "rope_original_max_position_embeddings", "must be > 0")
    for name, on in (("shift_logits", o.shift_logits), ("attention_anneal_iters", o.attention_anneal_iters > 0)):
        if on:
            check(o.objective == "mdm", name, "needs --objective mdm")
    if o.attention_anneal_iters > 0:
        check(cfg.parallel.context_parallel_size == 1, "attention_anneal_iters",
              "is not supported with context parallelism")
        check(m.fp8_format is None, "attention_anneal_iters", "needs an arbitrary attention mask (no FP8)")


def _validate_data(d: DataConfig) -> None:
    if d.mock_data:
        check(not d.data_path and not d.sft_data, "mock_data", "trains on random tokens: drop --data-path / --sft-data")
    parse_data_path(d.data_path)
    parse_data_path(d.valid_data_path, "valid_data_path")


def virtual_pipeline_size(parallel: ParallelConfig, num_layers: int) -> Optional[int]:
    """Model chunks per pipeline rank (interleaved schedule), or None without interleaving."""
    if parallel.num_layers_per_virtual_pipeline_stage is None:
        return None
    return num_layers // parallel.pipeline_model_parallel_size // parallel.num_layers_per_virtual_pipeline_stage


def num_train_iters(cfg: Config) -> int:
    """Optimizer steps of the run, from --train-iters or --train-tokens."""
    opt = cfg.optim
    if opt.train_iters is not None:
        return opt.train_iters
    if opt.train_tokens is not None:
        return math.ceil(opt.train_tokens / (opt.global_batch_size * cfg.data.seq_length))
    if opt.train_samples is not None:
        return math.ceil(opt.train_samples / opt.global_batch_size)
    raise ConfigError("--train-iters: give --train-iters, --train-tokens or --train-samples")


def lr_warmup_iters(cfg: Config, train_iters: int) -> int:
    """Warmup steps: --lr-warmup-iters, or --lr-warmup-fraction of the decay steps (Megatron-LM's rule)."""
    opt = cfg.optim
    if opt.lr_warmup_fraction is None:
        return opt.lr_warmup_iters
    return int(opt.lr_warmup_fraction * (opt.lr_decay_iters or train_iters))


def parse_data_path(items: list, name: str = "data_path") -> list[tuple[float, str]]:
    """Megatron's blend convention: ``[dir]``, ``[w1, dir1, w2, dir2, ...]`` or ``[dir1, dir2, ...]``
    (equal weights); weights normalised. ``name`` is the option reported in errors."""
    flag = "--" + name.replace("_", "-")
    items = [str(x) for x in items]
    if not items:
        return []
    if len(items) == 1:
        return [(1.0, items[0])]

    def number(x: str) -> Optional[float]:
        try:
            return float(x)
        except ValueError:
            return None

    numbers = [number(x) for x in items]
    if len(items) % 2 == 0 and all(w is not None for w in numbers[0::2]):
        weights = numbers[0::2]
        for w, raw in zip(weights, items[0::2]):
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"{flag}: blend weight {raw!r} must be a finite number >= 0")
        if sum(weights) <= 0:
            raise ConfigError(f"{flag}: blend weights {items[0::2]} must have a positive sum")
        total = sum(weights)
        return [(w / total, d) for w, d in zip(weights, items[1::2])]
    if any(w is not None for w in numbers) or any(re.match(r"[+-]?\.?\d", x) and not Path(x).exists()
                                                  for x in items[0::2]):
        odd = next((x for x in items[0::2] if number(x) is None), None)
        what = f"{odd!r} is not a weight" if odd is not None else "a weight without a path"
        raise ConfigError(f"{flag}: {what}: expected weight/path pairs such as '0.7 dirA 0.3 dirB' (or only "
                          f"paths, for equal weights), got {items}")
    return [(1.0 / len(items), d) for d in items]
