"""The one training loop, for both objectives (MDM and the ARM baseline) and for finetuning.

Megatron-core does the distributed work: ``DistributedDataParallel`` (gradient buckets, overlapped
reduction on GPU), ``get_megatron_optimizer`` (mixed precision, optional distributed optimizer),
``get_forward_backward_func`` (no pipelining, 1F1B, or interleaved 1F1B), ``OptimizerParamScheduler``
and ``finalize_model_grads``. The loop never asks which objective it runs: the objective turns clean
tokens into (inputs, labels, weights) and weights the per-token cross-entropy that ``GPTModel``
computes with the vocabulary-parallel cross-entropy.

Normalisation: per-token loss (``calculate_per_token_loss``): each micro-batch returns its weighted
loss *sum* and its token count; Megatron divides the gradients by the token count of the whole global
batch, so the step minimises sum(weighted CE) / (global batch x sequence length), the paper's loss.

Determinism: the masks of a micro-batch come from a generator seeded by (seed, iteration, global
micro-batch index); the data of a step is a function of (seed, consumed samples) (``data/order.py``),
so a resumed run repeats an uninterrupted one exactly (bit-exact on CPU on the same layout) and reads
the same samples on any other layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_mdm import heartbeat, runtime
from megatron_mdm.checkpoint import checkpointing, layout
from megatron_mdm.checkpoint import lock as save_lock
from megatron_mdm.config import Config, ConfigError, lr_warmup_iters, num_train_iters
from megatron_mdm.models.build import build_model
from megatron_mdm.models.flops import flops_per_sequence
from megatron_mdm.models.output_head import forward_at_loss_positions
from megatron_mdm.objective import (
    PreparedBatch,
    anneal_generator,
    build_objective,
    document_attention_mask,
    mask_generator,
)
from megatron_mdm.training.metrics import MetricsWriter, Throughput, format_line, memory_gib, peak_tflops

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


# ---- model, optimizer, scheduler -------------------------------------------------------------------


def wrap_ddp(cfg: Config, chunks: list) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk (bucketing only on the first, as Megatron-LM does)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]


def build_optimizer(cfg: Config, model: list):
    opt = cfg.optim
    oconf = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=opt.bf16,
        params_dtype=torch.bfloat16 if opt.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(oconf, model)


def build_scheduler(cfg: Config, optimizer, train_iters: int) -> OptimizerParamScheduler:
    opt = cfg.optim
    decay = opt.lr_decay_iters or train_iters
    warmup = lr_warmup_iters(cfg, train_iters)
    wsd = opt.lr_wsd_decay_iters or max(1, decay // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(train_iters, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd if opt.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if opt.lr_decay_style == "WSD" else None,
    )


# ---- micro-batches -----------------------------------------------------------------------------------


def prepared_batches(
    objective, raw_iter: Iterator[dict], num_microbatches: int, seed: int, iteration: int,
    dp_rank: int, device: torch.device,
) -> Iterator[PreparedBatch]:
    """The micro-batches of one step: clean tokens from the loader, masks from a seeded generator."""
    first = dp_rank * num_microbatches  # global index of this replica's first micro-batch
    for mb in range(num_microbatches):
        raw = next(raw_iter)
        tokens = raw["tokens"].to(device, non_blocking=True)
        loss_mask, doc_ids, answer = (raw.get(k) for k in ("loss_mask", "doc_ids", "answer_mask"))
        gen = mask_generator(seed, iteration, first + mb)
        batch = objective.prepare(tokens, None if loss_mask is None else loss_mask.to(device), gen,
                                  doc_ids=None if doc_ids is None else doc_ids.to(device),
                                  answer_mask=None if answer is None else answer.to(device))
        batch.attention_mask = _attention_mask(objective, tokens.shape[1], seed, iteration, first + mb, device)
        if doc_ids is not None:  # packed examples: attention stays inside each one
            docs = document_attention_mask(doc_ids.to(device))
            if docs is not None:
                batch.attention_mask = docs if batch.attention_mask is None else docs | batch.attention_mask
        yield batch


def _attention_mask(objective, seq_len: int, seed: int, iteration: int, microbatch: int, device):
    mask = objective.attention_mask(seq_len, iteration, anneal_generator(seed, iteration, microbatch))
    return None if mask is None else mask.to(device)


def stage_masks(objective, num_microbatches: int, seq_len: int, seed: int, iteration: int, dp_rank: int,
                device: torch.device) -> Iterator[Optional[torch.Tensor]]:
    """What a pipeline stage without data consumes per micro-batch: the attention mask (annealing) or None."""
    first = dp_rank * num_microbatches
    for mb in range(num_microbatches):
        yield _attention_mask(objective, seq_len, seed, iteration, first + mb, device)


def forward_step(objective, data_iterator, model, masked_only_logits: bool = False):
    """Megatron ``forward_step_func``: run one micro-batch, return (output, loss function).

    With ``masked_only_logits`` the output layer and cross-entropy run only where the loss weight is
    nonzero (``output_head.forward_at_loss_positions``), after the context-parallel split.
    """
    batch = next(data_iterator) if data_iterator is not None else None
    if not isinstance(batch, PreparedBatch):  # a middle pipeline stage: input comes from the previous stage
        output = model(None, None, batch)  # batch: this micro-batch's attention mask or None
        return output, None
    b, s = batch.inputs.shape
    position_ids = torch.arange(s, device=batch.inputs.device).unsqueeze(0).expand(b, -1)
    if ps.get_context_parallel_world_size() > 1:
        # each CP rank keeps 2 of 2*CP sequence chunks (TE's split, also used by SDPAttention's K/V
        # all-gather and by RotaryEmbedding's positions); the normaliser becomes the count of this
        # rank's chunks, and finalize_model_grads sums loss gradients and counts over DP x CP, so the
        # step equals the CP=1 step. position_ids are sliced for completeness: GPTModel's RoPE derives
        # positions from the CP rank itself.
        keys = {"inputs": batch.inputs, "labels": batch.labels, "weights": batch.weights,
                "count_mask": batch.count_mask, "position_ids": position_ids}
        if batch.answer_weights is not None:
            keys.update(answer_weights=batch.answer_weights, answer_mask=batch.answer_mask)
        parts = get_batch_on_this_cp_rank(keys)
        position_ids = parts.pop("position_ids")
        batch = batch.split(parts)
    if masked_only_logits:
        output, batch = forward_at_loss_positions(model, batch, position_ids)  # [1, n] CE on last stage
        return output, partial(_loss_func, objective, batch)
    output = model(batch.inputs, position_ids, batch.attention_mask, labels=batch.labels)  # [b, s] CE (last stage)
    return output, partial(_loss_func, objective, batch)


def _loss_func(objective, batch: PreparedBatch, per_token_loss: torch.Tensor):
    loss_sum, num_tokens = objective.loss(batch, per_token_loss)
    report = torch.stack([loss_sum.detach().float(), num_tokens.detach().float()])
    out = {"loss": report}
    if batch.answer_weights is not None:  # SFT: the completion-only loss, token-normalised
        w = batch.answer_weights.to(per_token_loss.device)
        out["completion"] = torch.stack([(per_token_loss.detach().float() * w).sum(),
                                         batch.answer_mask.sum().to(per_token_loss.device).float()])
    return loss_sum, num_tokens.to(torch.int), out


def _stage_needs_data(model: list, chunk: int) -> bool:
    m = model[chunk].module if hasattr(model[chunk], "module") else model[chunk]
    return bool(m.pre_process or m.post_process)


def run_microbatches(
    cfg: Config, model: list, objective, raw_iter: Iterator[dict], num_microbatches: int,
    iteration: int, forward_only: bool,
) -> torch.Tensor:
    """Forward (and backward unless ``forward_only``) over the micro-batches of one step.

    Returns:
        [loss_sum, num_tokens, completion_loss_sum, completion_tokens] summed over micro-batches and the whole
        world (a ratio-preserving sum: every tensor-parallel copy of the last stage counts equally in each
        pair); the completion pair (instruction data) is 0 without a completion mask.
    """
    dev = runtime.device()
    dp_rank = ps.get_data_parallel_rank()
    seed = cfg.logging.seed if not forward_only else cfg.logging.seed + 7919
    iters = []
    for i in range(len(model)):
        if _stage_needs_data(model, i):
            iters.append(prepared_batches(objective, raw_iter, num_microbatches, seed, iteration,
                                          dp_rank, dev))
        elif objective.cfg.attention_anneal_iters > 0:  # middle stages need the annealed mask too
            iters.append(stage_masks(objective, num_microbatches, cfg.data.seq_length, seed, iteration,
                                     dp_rank, dev))
        else:
            iters.append(None)
    data_iterator = iters[0] if len(model) == 1 else iters
    losses = get_forward_backward_func()(
        forward_step_func=partial(forward_step, objective, masked_only_logits=cfg.model.masked_only_logits),
        data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.optim.micro_batch_size,
        forward_only=forward_only,
    )
    total = torch.zeros(4, dtype=torch.float64, device=dev)
    for d in losses:
        total[:2] += d["loss"].to(torch.float64)
        if "completion" in d:
            total[2:] += d["completion"].to(torch.float64)
    torch.distributed.all_reduce(total)
    return total


# ---- the trainer ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


class _StopSignal:
    """A request to stop: finish the step, save, exit 0.

    SIGTERM/SIGUSR1 (schedulers before preemption), SIGINT (Ctrl-C), SIGHUP (the terminal closed) and SIGQUIT
    all stop gracefully. A second one aborts at once without saving (exit 128 + the signal; the previous
    checkpoint stays in force): a second Ctrl-C, or torchrun's SIGTERM after a second Ctrl-C reached it. One
    that arrives within ``DUPLICATE_S`` of the first is taken for the same request delivered twice (to the
    process group and forwarded by a launcher) and ignored.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP", "SIGQUIT")
    DUPLICATE_S = 1.0

    def __init__(self):
        self.received = False
        self._first = 0.0
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:  # pragma: no cover - not on this platform
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.received:
            if now - self._first < self.DUPLICATE_S:
                return  # the first request, delivered twice
            log.error("received %s again: stopping at once without saving (the last checkpoint stays in force)",
                      name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received, self._first = True, now
        log.warning("received %s: saving after this step, then exiting (a second signal aborts without saving)",
                    name)

    def any_rank(self, time_up: bool = False) -> tuple[bool, bool]:
        """(a signal reached some rank, ``time_up`` on some rank): one all-reduce, so every rank stops together."""
        flags = torch.tensor([float(self.received), float(time_up)], device=runtime.device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0].item() > 0), bool(flags[1].item() > 0)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds the built job (model, optimizer, data) and runs it. ``pretrain(cfg)`` is the entry."""

    def __init__(self, cfg: Config, vocab_size: int, mask_id: int, pad_id: int,
                 train_loader, valid_loader=None, tokenizer_dir: Optional[str] = None):
        self.cfg = cfg
        self.world_size = torch.distributed.get_world_size()
        self.dp_size = ps.get_data_parallel_world_size()
        self.rank = torch.distributed.get_rank()
        self.num_microbatches = cfg.optim.global_batch_size // (cfg.optim.micro_batch_size * self.dp_size)
        self.train_iters = num_train_iters(cfg)
        self.objective = build_objective(cfg.objective, mask_id, pad_id)
        self.eval_objective = build_objective(  # validation: full length, bidirectional (no annealing)
            dataclasses.replace(cfg.objective, random_length_prob=0.0, attention_anneal_iters=0), mask_id, pad_id)
        self.vocab_size = vocab_size
        self.tokenizer_dir = tokenizer_dir
        self.train_loader = train_loader
        self.valid_loader = valid_loader
        self.state = TrainState()
        runtime.set_seed(cfg.logging.seed)
        init_num_microbatches_calculator(
            rank=self.rank, rampup_batch_size=None, global_batch_size=cfg.optim.global_batch_size,
            micro_batch_size=cfg.optim.micro_batch_size, data_parallel_size=self.dp_size,
        )
        chunks = build_model(cfg, vocab_size, causal=self.objective.causal)
        self.model = wrap_ddp(cfg, chunks)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.train_iters)
        mconf = chunks[0].config
        mconf.finalize_model_grads_func = finalize_model_grads
        mconf.grad_scale_func = self.optimizer.scale_loss
        if cfg.parallel.overlap_grad_reduce:
            mconf.no_sync_func = [m.no_sync for m in self.model]
            if len(self.model) == 1:
                mconf.no_sync_func = mconf.no_sync_func[0]
        self.async_queue = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        lg = cfg.logging
        wandb = None if lg.wandb_project is None else {
            "project": lg.wandb_project, "name": lg.wandb_exp_name, "entity": lg.wandb_entity,
            "dir": lg.wandb_save_dir, "config": cfg.to_dict()}
        self.writer = MetricsWriter(cfg.checkpoint.save, lg.tensorboard_dir, enabled=self.rank == 0,
                                    objective=cfg.objective.objective, wandb=wandb)
        self._loaded: dict[str, Any] = {}  # what this run was loaded from, for its start record
        tokens_per_step = cfg.optim.global_batch_size * cfg.data.seq_length
        flops = flops_per_sequence(cfg, vocab_size, self.objective.causal) * cfg.optim.global_batch_size
        self.throughput = Throughput(tokens_per_step, flops, self.world_size,
                                     peak_tflops(cfg.logging.peak_tflops))
        self.history: list[dict] = []
        self.started = time.monotonic()  # --exit-duration-in-mins counts from here (pretrain(): its own start)

    # -- checkpoints --
    def load(self) -> None:
        ck = self.cfg.checkpoint
        if ck.load is None:
            return
        if ck.allow_tokenizer_change and not ck.finetune:
            raise ConfigError("--allow-tokenizer-change: only applies with --finetune (a resume keeps "
                              "the checkpoint's tokenizer)")
        if not ck.finetune and ck.ckpt_iteration is None and layout.nothing_to_resume(ck.load, ck.save):
            if self.rank == 0:
                log.info("--load %s: no checkpoint there yet (it is the --save directory): starting from scratch",
                         ck.load)
            return
        meta = checkpointing.load_checkpoint(ck.load, self.model, self.optimizer, self.scheduler,
                                             iteration=ck.ckpt_iteration, finetune=ck.finetune,
                                             verify=ck.verify_checkpoint, tokenizer=self._tokenizer_id(),
                                             allow_tokenizer_change=ck.allow_tokenizer_change,
                                             load_optim=ck.load_optim, load_rng=ck.load_rng,
                                             allow_unverified=ck.allow_unverified_checkpoint,
                                             distributed_optimizer=self.cfg.parallel.use_distributed_optimizer)
        self._loaded = {"loaded_from": str(ck.load), "loaded_iteration": int(meta.get("iteration", 0)),
                        "finetune": bool(ck.finetune)}
        if ck.finetune:
            log.info("finetuning from %s: weights loaded, iteration reset to 0", meta["path"])
            return
        self.state = TrainState(
            iteration=int(meta["iteration"]),
            consumed_samples=int(meta.get("consumed_samples", 0)),
            skipped_steps=int(meta.get("skipped_steps", 0)),
        )
        if self.state.iteration > self.train_iters:
            flag = "--train-iters" if self.cfg.optim.train_iters else "--train-tokens"
            raise ConfigError(f"{flag}: this run ends at iteration {self.train_iters}, before the iteration of "
                              f"the checkpoint it resumes ({self.state.iteration}, {meta['path']}): raise {flag} "
                              "to continue it, or pass --finetune to start a new run from its weights")
        if not ck.load_optim:  # a fresh optimizer; the learning-rate schedule continues where it was
            self.scheduler.step(increment=self.state.iteration)
            log.info("--no-load-optim: optimizer state not loaded; learning-rate schedule at iteration %d",
                     self.state.iteration)
        # the data position is the consumed samples: the order is a function of (seed, consumed samples),
        # so it continues on any layout; the loader refuses a state whose order differs (seed, data, ...)
        data_state = meta.get("data_state")
        if data_state is None:
            log.warning("%s holds no global data-loader state (saved before the global data order): the data "
                        "continues at consumed sample %d in this version's order, not exactly as saved",
                        meta["path"], self.state.consumed_samples)
            data_state = {}
        self.train_loader.load_state_dict(dict(data_state, consumed_samples=self.state.consumed_samples))

    def _tokenizer_id(self) -> Optional[tuple[str, str]]:
        """(hash, directory) of this run's tokenizer, recorded in and checked against checkpoints."""
        if self.tokenizer_dir is None or not Path(self.tokenizer_dir).exists():
            return None
        if getattr(self, "_tokenizer_hash", None) is None:
            from megatron_mdm.tokenization import MDMTokenizer

            self._tokenizer_hash = MDMTokenizer.load(self.tokenizer_dir).hash
        return self._tokenizer_hash, str(self.tokenizer_dir)

    def _saved_already(self, start_iter: int) -> bool:
        """Nothing trained since the load and --save already holds this iteration (a finished job
        resubmitted with --load): saving again would only rewrite the marker's checkpoint."""
        ck = self.cfg.checkpoint
        return (self.state.iteration == start_iter
                and checkpointing.read_latest_iteration(ck.save) == self.state.iteration)

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if ck.save is None:
            return
        meta = {
            "consumed_samples": self.state.consumed_samples,
            "skipped_steps": self.state.skipped_steps,
            "config": self.cfg.to_dict(),
            "objective": self.cfg.objective.objective,
            "vocab_size": self.vocab_size,
        }
        tok = self._tokenizer_id()
        if tok is not None:
            meta["tokenizer"] = {"hash": tok[0], "path": tok[1]}
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        checkpointing.save_checkpoint(
            ck.save, self.state.iteration, self.model, self.optimizer, self.scheduler, meta,
            data_state=dict(self.train_loader.state_dict(), consumed_samples=self.state.consumed_samples),
            tokenizer_dir=self.tokenizer_dir,
            config_yaml=self.cfg.to_yaml(), keep_last=ck.keep_last, async_queue=self.async_queue,
        )

    # -- steps --
    def train_step(self) -> dict:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = run_microbatches(self.cfg, self.model, self.objective, self._train_iter,
                                 self.num_microbatches, self.state.iteration, forward_only=False)
        loss = (total[0] / total[1].clamp(min=1)).item()
        if not math.isfinite(loss):
            self.state.skipped_steps += 1
            self.state.consecutive_nonfinite += 1
            limit = self.cfg.optim.max_consecutive_nan_steps
            log.warning("iteration %d: non-finite loss (%s): step skipped (%d in a row)",
                        self.state.iteration + 1, loss, self.state.consecutive_nonfinite)
            if self.state.consecutive_nonfinite >= limit:
                raise TrainingError(
                    f"{self.state.consecutive_nonfinite} non-finite loss steps in a row (limit "
                    f"--max-consecutive-nan-steps {limit}): stopping. Lower --lr, check the data, or "
                    "resume from the last checkpoint.")
            grad_norm = None
        else:
            self.state.consecutive_nonfinite = 0
            ok, grad_norm, _ = self.optimizer.step()
            if ok:
                self.scheduler.step(increment=1)
            else:
                self.state.skipped_steps += 1
        self.state.iteration += 1
        self.state.consumed_samples += self.cfg.optim.global_batch_size
        completion = (total[2] / total[3]).item() if total[3] > 0 else None
        return {"loss": loss, "grad_norm": None if grad_norm is None else float(grad_norm),
                "completion_loss": completion}

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        if self.valid_loader is None:
            return None
        for m in self.model:
            m.eval()
        it = iter(self.valid_loader)
        total = run_microbatches(self.cfg, self.model, self.eval_objective, it,
                                 self.cfg.logging.eval_iters, 0, forward_only=True)
        for m in self.model:
            m.train()
        val = (total[0] / total[1].clamp(min=1)).item()
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def train(self) -> dict:
        cfg, lg, ck = self.cfg, self.cfg.logging, self.cfg.checkpoint
        for m in self.model:
            m.train()
        self._train_iter = iter(self.train_loader)
        stop = _StopSignal()
        start_iter = self.state.iteration
        self.writer.start(start_iter, tokens=self._tokens(), info=self._loaded,
                          config_text=self.cfg.to_yaml())  # drops the records of the steps this run redoes
        t_start = time.perf_counter()
        interval_losses: list[float] = []
        self._interval_completion: list[float] = []
        result: dict[str, Any] = {"losses": [], "val": []}
        if self.rank == 0:
            log.info("training %s: iterations %d -> %d, %d micro-batches/step, world %d (TP %d, PP %d, DP %d)",
                     cfg.objective.objective, start_iter, self.train_iters, self.num_microbatches,
                     self.world_size, cfg.parallel.tensor_model_parallel_size,
                     cfg.parallel.pipeline_model_parallel_size, self.dp_size)
        try:
            if lg.eval_interval and self.state.iteration == 0:
                self._validate(result)  # the untrained baseline, so that runs show the fall
            while self.state.iteration < self.train_iters:
                out = self.train_step()
                self.throughput.step()
                result["losses"].append(out["loss"])
                interval_losses.append(out["loss"])
                if out["completion_loss"] is not None:
                    result.setdefault("completion_losses", []).append(out["completion_loss"])
                    self._interval_completion.append(out["completion_loss"])
                it = self.state.iteration
                if it % lg.log_interval == 0 or it == self.train_iters:
                    self._log(out, interval_losses, start_iter, t_start)
                    interval_losses = []
                if lg.eval_interval and (it % lg.eval_interval == 0 or it == self.train_iters):
                    self._validate(result)
                if self.async_queue is not None:
                    self.async_queue.maybe_finalize_async_calls(blocking=False)
                reason = self._exit_reason(stop)
                if reason is not None:
                    self.save()
                    result["stopped_by_signal"] = reason == "signal"
                    result["exit_reason"] = reason
                    if self.rank == 0:
                        log.info("exiting at iteration %d (%s)%s", it, reason,
                                 ": checkpoint saved" if ck.save is not None else "")
                    break
                if ck.save_interval and it % ck.save_interval == 0 and it < self.train_iters:
                    self.save()
            else:
                if ck.save is not None and not self._saved_already(start_iter):
                    self.save()
                elif ck.save is not None and self.rank == 0:
                    log.info("iteration %d is already saved in %s: nothing to save",
                             self.state.iteration, ck.save)
        except RuntimeError as e:  # another rank stopped answering or died: name it (gloo names none)
            if isinstance(e, (checkpointing.CheckpointError, TrainingError)) or not heartbeat.is_peer_failure(e):
                raise
            raise TrainingError(heartbeat.describe_peer_failure(e)) from None
        finally:
            stop.restore()
            if self.async_queue is not None:
                self.async_queue.maybe_finalize_async_calls(blocking=True)
            self.writer.close()
        result["iteration"] = self.state.iteration
        result["skipped_steps"] = self.state.skipped_steps
        return result

    def _tokens(self) -> int:
        """Tokens consumed so far (consumed samples x sequence length)."""
        return self.state.consumed_samples * self.cfg.data.seq_length

    def _exit_reason(self, stop: _StopSignal) -> Optional[str]:
        """Why training stops after this step: "signal", "--exit-interval", "--exit-duration-in-mins", or None."""
        ck, it = self.cfg.checkpoint, self.state.iteration
        minutes = (time.monotonic() - self.started) / 60
        signalled, time_up = stop.any_rank(ck.exit_duration_in_mins is not None
                                           and minutes >= ck.exit_duration_in_mins)
        if signalled:
            return "signal"
        if it >= self.train_iters:  # the last step: the run ends and saves as usual
            return None
        if ck.exit_interval and it % ck.exit_interval == 0:
            return "--exit-interval"
        return "--exit-duration-in-mins" if time_up else None

    def _validate(self, result: dict) -> None:
        val = self.evaluate()
        if val is None:
            return
        it = self.state.iteration
        val["iteration"] = it
        result["val"].append(val)
        self.writer.write(dict(val, consumed_samples=self.state.consumed_samples, tokens=self._tokens()))
        if self.rank == 0:
            what = "validation ELBO" if self.cfg.objective.objective == "mdm" else "validation loss"
            log.info("iter %7d | %s %.4f nats/token | ppl%s %.2f", it, what, val["val_loss"],
                     " bound" if self.cfg.objective.objective == "mdm" else "", val["val_ppl"])

    def _log(self, out: dict, interval_losses: list, start_iter: int, t_start: float) -> None:
        it = self.state.iteration
        finite = [x for x in interval_losses if math.isfinite(x)]
        elapsed = time.perf_counter() - t_start
        done = it - start_iter
        record = {
            "iteration": it,
            "consumed_samples": self.state.consumed_samples,
            "tokens": self._tokens(),
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": out["grad_norm"],
            "skipped_steps": self.state.skipped_steps,
            "eta_s": elapsed / max(done, 1) * (self.train_iters - it),
        }
        comp = [x for x in self._interval_completion if math.isfinite(x)]
        if comp:  # instruction data: the completion-only loss beside the (per-example) training loss
            record["completion_loss"] = sum(comp) / len(comp)
        self._interval_completion = []
        record.update(self.throughput.report())
        record.update(memory_gib())
        self.history.append(record)
        self.writer.write(record)
        if self.rank == 0:
            log.info(format_line(record))


# ---- entry -----------------------------------------------------------------------------------------


def pretrain(cfg: Config, train_loader=None, valid_loader=None) -> dict:
    """Run a full job from a config: resolve, check, init, data, model, resume, train, save.

    The config is resolved from the run's files first (``training.data.resolve_config``), then validated, then
    saved: what is saved is what is checked. Loaders may be given (tests); otherwise they are built from
    ``cfg.data``.
    """
    from megatron_mdm.training.data import build_data, resolve_config  # noqa: PLC0415 - imports the data stack

    started = time.monotonic()
    world = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
             else runtime.detect_launch_env().world_size)
    cfg.validate(world_size=world)  # the flags alone first: a bad layout is named before files are read
    tokenizer = resolve_config(cfg, train_loader)
    cfg.validate(world_size=world)  # before Megatron sees the layout: errors name our flags
    num_train_iters(cfg)
    launch = runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    held = None
    try:
        held = save_lock.acquire_collective(cfg.checkpoint.save)  # before anything is written into --save
        tokenizer, train_loader, valid_loader = build_data(cfg, train_loader, valid_loader, tokenizer)
        if launch.rank == 0:
            log.info("resolved config:\n%s", cfg.to_yaml())
            if cfg.checkpoint.save:
                Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
                layout.config_file(cfg.checkpoint.save).write_text(cfg.to_yaml())
        trainer = Trainer(cfg, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.pad_id,
                          train_loader, valid_loader, tokenizer_dir=cfg.data.tokenizer)
        trainer.started = started
        trainer.load()
        result = trainer.train()
        result["history"] = trainer.history
        return result
    finally:
        if held is not None:
            held.release()
        destroy_num_microbatches_calculator()
        runtime.shutdown()


__all__ = ["pretrain", "Trainer", "TrainingError", "ConfigError"]
