"""Training metrics: throughput, TFLOP/s and MFU, memory, and their sinks (stdout, JSON lines, TensorBoard).

MFU = achieved model FLOP/s / peak dense FLOP/s of the device. Model FLOPs per sequence come from
``model.flops_per_sequence`` (6·N·S + head + full S² attention for the bidirectional MDM), so an MDM
is never credited with the causal discount.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mdm.checkpoint import layout

log = logging.getLogger(__name__)

# dense BF16 peak TFLOP/s (no sparsity) by device name fragment
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Peak dense TFLOP/s of this device (BF16), or None when unknown (CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def memory_gib() -> dict[str, float]:
    """Peak device memory (GPU) or resident memory (CPU) of this process, in GiB."""
    if torch.cuda.is_available():
        return {
            "mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    try:
        import psutil

        return {"mem_rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    except ImportError:  # pragma: no cover
        return {}


class Throughput:
    """Tokens/s and FLOP/s over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, world_size: int,
                 peak: Optional[float]):
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.world_size = world_size
        self.peak = peak
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        steps = max(self._steps, 1)
        tflops = self.flops_per_step * steps / elapsed / self.world_size / 1e12
        out = {
            "step_time_s": elapsed / steps,
            "tokens_per_sec": self.tokens_per_step * steps / elapsed,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
        }
        self._t0, self._steps = now, 0
        return out


LOSS_NAMES = {"mdm": "mdm_elbo", "arm": "arm_next_token"}
"""What the loss of each objective is, in the logged names: an MDM's loss is the negative ELBO (a bound on the NLL
per token), an ARM's the next-token cross-entropy; different quantities, so different series."""

_GROUPS = {"lr": "train", "grad_norm": "train", "skipped_steps": "train", "tokens_per_sec": "perf",
           "step_time_s": "perf", "tflops_per_device": "perf", "mfu": "perf", "mem_alloc_gib": "memory",
           "mem_reserved_gib": "memory", "mem_rss_gib": "memory"}
_NOT_SERIES = {"iteration", "consumed_samples", "tokens", "time", "eta_s"}


def series_name(key: str, objective: str) -> Optional[str]:
    """The grouped TensorBoard / W&B name of a record's key (``train/loss_mdm_elbo``, ``val/loss_arm_next_token``,
    ``perf/tokens_per_sec``, ...), or None for keys that are not series (iteration, tokens, time)."""
    loss = LOSS_NAMES.get(objective, objective)
    named = {"loss": f"train/loss_{loss}", "completion_loss": f"train/completion_loss_{loss}",
             "val_loss": f"val/loss_{loss}",
             "val_ppl": "val/ppl_bound_mdm" if objective == "mdm" else f"val/ppl_{objective}"}
    if key in named:
        return named[key]
    if key in _NOT_SERIES:
        return None
    return f"{_GROUPS.get(key, 'train')}/{key}"


class MetricsWriter:
    """Writes one JSON object per logged step / evaluation to ``metrics.jsonl``, TensorBoard and W&B (rank 0).

    Every record gets the wall-clock ``time`` (seconds since the epoch). In TensorBoard the series are grouped
    (``train/``, ``val/``, ``perf/``, ``memory/``) and name the objective's loss (:data:`LOSS_NAMES`); each is
    written against iterations in ``tensorboard/`` and against tokens (``*_by_tokens/``, step = tokens) in its
    ``by_tokens/`` run; the resolved config is a text entry. :meth:`start` also writes a start record
    (``{"event": "start", "iteration", "time", "objective", ...}``: where a run began or resumed, and what it
    was loaded from), which the curves use to mark resumes and to draw the run a finetuning continued.

    Nothing is opened before :meth:`start` (or the first :meth:`write`). ``start(iteration)`` is
    called with the iteration the run starts from; records of steps that the run will redo are
    taken out first, so a resumed run's curves have each iteration once: in ``metrics.jsonl`` the
    records past the loaded iteration (all of them on a fresh start, whose iteration-0 validation
    is redone too) move to ``metrics.dropped.jsonl`` beside it (never deleted; the file is rewritten
    atomically), and TensorBoard gets ``purge_step`` so its reader discards the same steps (W&B keeps them: it
    cannot rewind a run).
    """

    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], enabled: bool,
                 objective: str = "mdm", wandb: Optional[dict] = None):
        """``wandb``: ``{"project", "name", "entity", "dir", "config"}`` to log to Weights & Biases too."""
        self.enabled = enabled
        self.objective = objective
        self._save_dir = save_dir
        self._path = layout.metrics_file(save_dir) if save_dir else None
        self._tb_dir = tensorboard_dir or (str(layout.tensorboard_dir(save_dir)) if save_dir else None)
        self._wandb_args = wandb
        self._file = None
        self._tb = None
        self._tb_tokens = None
        self._wandb = None
        self._started = False

    def start(self, iteration: Optional[int], tokens: Optional[int] = None, info: Optional[dict] = None,
              config_text: Optional[str] = None) -> None:
        """Open the sinks for a run starting at ``iteration`` (None: append, drop nothing).

        ``tokens``: tokens consumed at ``iteration`` (the token series drop what follows); ``info``: more fields
        of the start record (``loaded_from``, ``finetune``, ...); ``config_text``: the resolved config (YAML).
        """
        if not self.enabled or self._started:
            return
        self._started = True
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if iteration is not None:
                moved = drop_redone_records(self._path, iteration)
                if moved:
                    log.info("%s: %d records of steps redone from iteration %d moved to %s", self._path,
                             moved, iteration, self._path.with_name(DROPPED_NAME))
            self._file = open(self._path, "a", encoding="utf-8")
        if self._tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                fresh = iteration is None or iteration == 0
                self._tb = SummaryWriter(log_dir=self._tb_dir, purge_step=None if iteration is None else
                                         (0 if fresh else iteration + 1))
                self._tb_tokens = SummaryWriter(log_dir=str(layout.tensorboard_tokens_dir(self._tb_dir)),
                                                purge_step=None if iteration is None else
                                                (0 if fresh or not tokens else tokens + 1))
                if config_text:
                    self._tb.add_text("config", "\n".join("    " + ln for ln in config_text.splitlines()),
                                      iteration or 0)
            except ImportError:
                log.warning("tensorboard is not installed: --tensorboard-dir ignored")
        if self._wandb_args is not None:
            self._wandb = _start_wandb(self._wandb_args, self._save_dir)
        if iteration is not None:
            self.write({"event": "start", "iteration": iteration, "objective": self.objective,
                        **({"tokens": tokens} if tokens is not None else {}), **(info or {})})

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.start(None)
        record = dict(record, time=round(time.time(), 3))
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if record.get("event"):
            return
        step = record.get("iteration", 0)
        series = {name: v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and (name := series_name(k, self.objective)) is not None}
        if self._tb is not None:
            for name, v in series.items():
                self._tb.add_scalar(name, v, step)
            self._tb.flush()
        tokens = record.get("tokens")
        if self._tb_tokens is not None and isinstance(tokens, int):
            for name, v in series.items():
                group, _, rest = name.partition("/")
                self._tb_tokens.add_scalar(f"{group}_by_tokens/{rest}", v, tokens)
            self._tb_tokens.flush()
        if self._wandb is not None:
            self._wandb.log(dict(series, iteration=step, **({"tokens": tokens} if tokens is not None else {})))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for tb in (self._tb, self._tb_tokens):
            if tb is not None:
                tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(args: dict, save_dir: Optional[str]):
    """The W&B run of this run directory: the id saved in ``<save>/wandb/run_id.txt`` is resumed, a new one
    saved. Its series are plotted against ``iteration`` (``tokens`` is logged beside it)."""
    from megatron_mdm.config import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb-project: needs the wandb package: pip install 'megatron-mdm[wandb]'") from None
    local = args.get("dir") or (str(layout.wandb_dir(save_dir)) if save_dir else None)
    id_file = layout.wandb_id_file(save_dir) if save_dir else None
    run_id = id_file.read_text().strip() if id_file is not None and id_file.is_file() else None
    if local:
        Path(local).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=args["project"], name=args.get("name"), entity=args.get("entity"), dir=local,
                     id=run_id, resume="allow", config=args.get("config"))
    if id_file is not None and run_id is None:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run.id + "\n")
    run.define_metric("iteration")
    run.define_metric("*", step_metric="iteration")
    log.info("W&B run %s (project %s)%s", run.id, args["project"], " resumed" if run_id else "")
    return run


DROPPED_NAME = layout.DROPPED_METRICS_FILE


def drop_redone_records(path: Path, iteration: int) -> int:
    """Move the records of ``path`` that a run starting at ``iteration`` redoes to metrics.dropped.jsonl.

    Kept: records with ``record["iteration"] <= iteration`` when ``iteration`` > 0; a start from
    iteration 0 keeps none (its iteration-0 validation is redone too). Lines that do not parse (a
    line cut by a crash) move too. The dropped lines are appended and synced before ``path`` is
    replaced by its kept lines, so a crash in between loses nothing.

    Returns:
        The number of lines moved.
    """
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            it = json.loads(line).get("iteration")
        except (ValueError, AttributeError):
            it = None
        kept = isinstance(it, int) and iteration > 0 and it <= iteration
        (keep if kept else drop).append(line if line.endswith("\n") else line + "\n")
    if not drop:
        return 0
    with open(path.with_name(DROPPED_NAME), "a", encoding="utf-8") as f:
        f.writelines(drop)
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(drop)


def format_line(record: dict) -> str:
    """A human-readable log line of a training record."""
    parts = [f"iter {record['iteration']:>7d}"]
    fmt = {
        "loss": "loss {:.4f}", "completion_loss": "completion loss {:.4f}", "lr": "lr {:.3e}",
        "grad_norm": "grad_norm {:.3f}",
        "tokens_per_sec": "tok/s {:,.0f}", "tflops_per_device": "TFLOP/s/dev {:.2f}",
        "mfu": "MFU {:.1%}", "mem_alloc_gib": "mem {:.2f} GiB", "mem_rss_gib": "rss {:.2f} GiB",
        "eta_s": "ETA {:.0f}s", "skipped_steps": "skipped {}",
    }
    for key, f in fmt.items():
        v = record.get(key)
        if v is not None and not (key == "skipped_steps" and v == 0):
            parts.append(f.format(v))
    return " | ".join(parts)
