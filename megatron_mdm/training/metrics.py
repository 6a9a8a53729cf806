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


class MetricsWriter:
    """Writes one JSON object per logged step / evaluation to ``metrics.jsonl`` and TensorBoard.

    Nothing is opened before :meth:`start` (or the first :meth:`write`). ``start(iteration)`` is
    called with the iteration the run starts from; records of steps that the run will redo are
    taken out first, so a resumed run's curves have each iteration once: in ``metrics.jsonl`` the
    records past the loaded iteration (all of them on a fresh start, whose iteration-0 validation
    is redone too) move to ``metrics.dropped.jsonl`` beside it (never deleted; the file is rewritten
    atomically), and TensorBoard gets ``purge_step`` so its reader discards the same steps.
    """

    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self._path = layout.metrics_file(save_dir) if save_dir else None
        self._tb_dir = tensorboard_dir or (str(layout.tensorboard_dir(save_dir)) if save_dir else None)
        self._file = None
        self._tb = None
        self._started = False

    def start(self, iteration: Optional[int]) -> None:
        """Open the sinks for a run starting at ``iteration`` (None: append, drop nothing)."""
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

                purge = None if iteration is None else (iteration + 1 if iteration > 0 else 0)
                self._tb = SummaryWriter(log_dir=self._tb_dir, purge_step=purge)
            except ImportError:
                log.warning("tensorboard is not installed: --tensorboard-dir ignored")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.start(None)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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
